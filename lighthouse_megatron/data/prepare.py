"""`lighthouse-megatron prepare-data`: text into a Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`).

Inputs are text files (one document per file), directories (every file below them whose
name matches `--glob`, in sorted order) and JSONL files (`*.jsonl`, one document per line,
its text under `--json-key`). With no input, the Python sources of the running
interpreter's standard library: real text that every machine has, with no download.

Tokens are bytes by default, as in the paper: ids 0..255 are the UTF-8 bytes and 256 is
the end-of-document token appended to every document: a vocabulary of 257 with `eod` 256,
megatron-core's `NullTokenizer(256)` up to 0.16 and `NullTokenizer(257)` from 0.19 on (0.19
counts the end-of-document id in the size). `byte_vocab_size()` gives the `--vocab-size` of
the installed release; the summary prints the Megatron-LM flags. `--tokenizer PATH` uses a Hugging Face
tokenizer saved on disk instead (transformers needed; its EOS token ends documents, as
Megatron-LM's `HuggingFaceTokenizer` does).

The files are written with megatron-core's own `IndexedDatasetBuilder` under temporary
names next to the output and renamed at the end; existing outputs are kept unless
`--force`; inputs are only read.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import shutil
import struct
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..settings.files import make_output_dir

BYTE_VOCAB_SIZE = 256
BYTE_EOD = 256  # the id right after the bytes
# Python sources ship with the interpreter; third-party packages live below these.
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


def null_tokenizer(vocab_size: int):
    """megatron-core's NullTokenizer for `--vocab-size`, the one Megatron-LM of the same release
    builds: its vocabulary is vocab_size + 1 (end-of-document id vocab_size) up to 0.16 and
    vocab_size (end-of-document id vocab_size - 1) from 0.19 on."""
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    return NullTokenizer(vocab_size)


def byte_vocab_size() -> int:
    """The `--vocab-size` whose megatron-core NullTokenizer has end-of-document id BYTE_EOD:
    256 up to megatron-core 0.16 (vocabulary = size + 1), 257 from 0.19 on (vocabulary = size)."""
    return BYTE_VOCAB_SIZE if null_tokenizer(BYTE_VOCAB_SIZE).eod == BYTE_EOD else BYTE_EOD + 1


class DataError(ValueError):
    """A bad input or output for data preparation; the message names it."""


@dataclass
class Summary:
    """What `prepare_data` wrote."""

    prefix: str
    files: int = 0
    documents: int = 0
    tokens: int = 0  # including one end-of-document token per document
    input_bytes: int = 0
    empty_skipped: int = 0
    binary_skipped: list[str] = field(default_factory=list)
    tokenizer: str = "bytes"
    vocab_size: int = BYTE_VOCAB_SIZE + 1
    eod: int = BYTE_EOD
    seconds: float = 0.0
    stale_cache: str | None = None  # megatron-core's index cache of the data this run replaced, removed

    @property
    def megatron_args(self) -> str:
        """The Megatron-LM flags that read this dataset with the same tokenizer."""
        if self.tokenizer == "bytes":
            tok = f"--tokenizer-type NullTokenizer --vocab-size {byte_vocab_size()}"
        else:
            tok = f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {self.tokenizer}"
        return f"--data-path {self.prefix} {tok}"


# ------------------------------------------------------------------------ inputs


def default_inputs() -> list[Path]:
    """The standard library's Python files (not site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if p.is_file() and not _NOT_STDLIB & set(p.parts))


def expand_inputs(inputs: Sequence[str | os.PathLike], glob: str = "*") -> list[Path]:
    """Files to read, in order: files as given, directories walked in sorted order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and fnmatch.fnmatch(p.name, glob)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"--input {path}: the directory has no files matching --glob {glob!r}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise DataError(f"--input {path}: not a regular file or a directory")
        else:
            raise DataError(f"--input {path}: no such file or directory")
    return files


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith(".jsonl")


def _documents(path: Path, json_key: str, summary: Summary) -> Iterator[bytes]:
    """The documents of one input file, as UTF-8 bytes; counts the bytes read."""
    try:
        if not _is_jsonl(path):
            data = path.read_bytes()
            summary.input_bytes += len(data)
            if b"\0" in data[:8192]:
                summary.binary_skipped.append(str(path))
            else:
                yield data
            return
        # Line by line: a JSONL corpus may be far larger than memory.
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                summary.input_bytes += len(line)
                if line.strip():
                    yield _jsonl_text(line, json_key, f"{path}, line {number}").encode("utf-8")
    except OSError as e:
        raise DataError(f"--input {path}: cannot read it ({e.strerror})") from e


def _jsonl_text(line: bytes, key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no {key!r} field (found: {keys}); choose the field with --json-key")
    if not isinstance(record[key], str):
        raise DataError(f"{where}: field {key!r} is a {type(record[key]).__name__}, not a string")
    return record[key]


# -------------------------------------------------------------------- tokenizers


class _ByteTokenizer:
    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE + 1
    eod = BYTE_EOD

    def encode(self, data: bytes, where: Path) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)


class _HFTokenizer:
    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError("--tokenizer needs the transformers package: pip install transformers") from None
        if not Path(path).exists():
            raise DataError(f"--tokenizer {path}: no such directory (a tokenizer saved on disk, "
                            "e.g. with save_pretrained)")
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types for a folder that is no tokenizer
            raise DataError(f"--tokenizer {path}: cannot load a Hugging Face tokenizer from it ({e})") from e
        if self._tok.eos_token_id is None:
            raise DataError(f"--tokenizer {path}: the tokenizer has no EOS token to end documents with")
        self.name = str(path)
        self.vocab_size = len(self._tok)
        self.eod = self._tok.eos_token_id

    def encode(self, data: bytes, where: Path) -> np.ndarray:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text (byte {e.start}); a tokenizer needs text") from None
        return np.asarray(self._tok.encode(text, add_special_tokens=False), dtype=np.int64)


# ---------------------------------------------------------------------- progress


class _Progress:
    """A one-line bar on stderr, redrawn at most ten times a second (terminals only)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self._last = max(total, 1), enabled, 0.0

    def update(self, done: int, docs: int, tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.1):
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        bar = "#" * int(30 * frac)
        end = "\n" if final else ""
        sys.stderr.write(f"\rprepare-data [{bar:<30}] {frac:4.0%} {done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
                         f"{docs} documents {tokens} tokens{end}")
        sys.stderr.flush()


# ------------------------------------------------------------------------ output


def _indexed_dataset():
    # megatron-core's package import warns that TE and apex are missing; neither is
    # used for writing a dataset.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


# The first bytes of every index file megatron-core writes (its _IndexWriter), before the version.
INDEX_HEADER = b"MMIDIDX\x00\x00"
# Header, version, dtype code, sequence count, document count.
_INDEX_PREAMBLE = struct.Struct(f"<{len(INDEX_HEADER)}sQBQQ")


def open_indexed_dataset(prefix: str, setting: str = "--data-path"):
    """megatron-core's IndexedDataset for PREFIX.bin/.idx, or a DataError naming `setting` and
    what is wrong with the pair (missing, not an index file, truncated) instead of the
    reader's assertion and the AttributeError its destructor raises after it."""
    idx = _indexed_dataset()
    bin_path, idx_path = idx.get_bin_path(prefix), idx.get_idx_path(prefix)
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{setting} {prefix}: missing {', '.join(missing)} (a Megatron indexed dataset is "
                        "PREFIX.bin + PREFIX.idx, e.g. from `lighthouse-megatron prepare-data`)")
    try:
        with open(idx_path, "rb") as f:
            head = f.read(_INDEX_PREAMBLE.size)
    except OSError as e:
        raise DataError(f"{setting} {prefix}: cannot read {idx_path} ({e.strerror})") from None
    if not head.startswith(INDEX_HEADER):
        raise DataError(f"{setting} {prefix}: {idx_path} is not a Megatron indexed dataset index "
                        f"(it does not start with {INDEX_HEADER!r}); write the dataset with "
                        "`lighthouse-megatron prepare-data` or Megatron-LM's tools/preprocess_data.py")
    # The reader asserts on a short file and then fails again in its destructor: check the
    # length the header's counts imply (int32 lengths, int64 pointers, int64 document bounds).
    if len(head) < _INDEX_PREAMBLE.size:
        raise DataError(f"{setting} {prefix}: {idx_path} is truncated ({len(head)} bytes)")
    _, _, code, sequences, documents = _INDEX_PREAMBLE.unpack(head)
    needed_idx = _INDEX_PREAMBLE.size + 12 * sequences + 8 * documents
    if os.path.getsize(idx_path) < needed_idx:
        raise DataError(f"{setting} {prefix}: {idx_path} is truncated ({os.path.getsize(idx_path)} bytes; "
                        f"its header counts {sequences} sequences, {needed_idx} bytes)")
    try:
        itemsize = idx.DType.size(code)
    except (ValueError, KeyError):
        raise DataError(f"{setting} {prefix}: {idx_path} names token type code {code}, which megatron-core "
                        "does not know (a damaged index)") from None
    needed_bin = 0
    if sequences:
        lengths = np.memmap(idx_path, np.int32, "r", _INDEX_PREAMBLE.size, (sequences,))
        pointers = np.memmap(idx_path, np.int64, "r", _INDEX_PREAMBLE.size + 4 * sequences, (sequences,))
        needed_bin = int(pointers[-1]) + int(lengths[-1]) * itemsize
    size = os.path.getsize(bin_path)
    if size < needed_bin or (sequences and size == 0):
        raise DataError(f"{setting} {prefix}: {bin_path} has {size} bytes but its index needs {needed_bin} "
                        "(truncated, or the .bin of another dataset)")
    try:
        ds = idx.IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, IndexError, OSError, struct.error) as e:
        raise DataError(f"{setting} {prefix}: {idx_path} is damaged ({e})") from None
    return ds


def _check_output(prefix: str, force: bool) -> Path:
    idx = _indexed_dataset()
    out_dir = Path(prefix).parent
    for path in (idx.get_bin_path(prefix), idx.get_idx_path(prefix)):
        if Path(path).is_dir():
            raise DataError(f"--output {prefix}: {path} is a directory")
        if Path(path).exists() and not force:
            raise DataError(f"--output {prefix}: {path} exists; pass --force to overwrite it")
    problem = make_output_dir(out_dir)
    if problem:
        raise DataError(f"--output {prefix}: {problem}")
    return out_dir


def prepare_data(
    inputs: Sequence[str | os.PathLike] | None,
    output: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    json_key: str = "text",
    glob: str = "*",
    force: bool = False,
    progress: bool | None = None,
) -> Summary:
    """Write `output`.bin/.idx from `inputs` (None or empty: the standard library's sources).

    Raises DataError naming the bad input or output; on any failure nothing is left at
    the output paths that was not there before.
    """
    idx = _indexed_dataset()
    DType, IndexedDatasetBuilder = idx.DType, idx.IndexedDatasetBuilder  # noqa: N806
    get_bin_path, get_idx_path = idx.get_bin_path, idx.get_idx_path
    start = time.perf_counter()
    prefix = os.fspath(output)
    if not prefix or prefix.endswith(("/", ".bin", ".idx")):
        raise DataError(f"--output {prefix!r}: give a path prefix such as data/stdlib "
                        "(PREFIX.bin and PREFIX.idx are written)")
    files = expand_inputs(inputs, glob) if inputs else default_inputs()
    if not files:
        raise DataError("no input files found (the standard library's sources are missing: pass --input)")
    out_dir = _check_output(prefix, force)
    tok = _HFTokenizer(tokenizer) if tokenizer else _ByteTokenizer()
    summary = Summary(prefix=prefix, tokenizer=tok.name, vocab_size=tok.vocab_size, eod=tok.eod)
    dtype = DType.optimal_dtype(tok.vocab_size)
    show = sys.stderr.isatty() if progress is None else progress
    bar = _Progress(sum(f.stat().st_size for f in files), show)

    try:
        # Special file systems (/proc, /sys) pass the access check but refuse new files.
        tmp = Path(tempfile.mkdtemp(prefix=f".{Path(prefix).name}.", suffix=".tmp", dir=out_dir))
    except OSError as e:
        raise DataError(f"--output {prefix}: cannot write in the directory {out_dir} ({e.strerror})") from e
    try:
        builder = IndexedDatasetBuilder(get_bin_path(str(tmp / "data")), dtype=dtype)
        for path in files:
            summary.files += 1
            for doc in _documents(path, json_key, summary):
                ids = tok.encode(doc, path)
                if ids.size == 0:
                    summary.empty_skipped += 1
                    continue
                builder.add_document(np.append(ids.astype(dtype), np.array([tok.eod], dtype=dtype)),
                                     [ids.size + 1])
                summary.documents += 1
                summary.tokens += ids.size + 1
                bar.update(summary.input_bytes, summary.documents, summary.tokens)
        builder.finalize(get_idx_path(str(tmp / "data")))
        if summary.documents == 0:
            raise DataError(f"the input has no documents ({summary.files} files, {summary.empty_skipped} "
                            f"empty documents, {len(summary.binary_skipped)} binary files skipped)")
        bar.update(summary.input_bytes, summary.documents, summary.tokens, final=True)
        # .bin first: a reader needs the .idx, so a crash between the renames leaves no
        # readable half-dataset behind.
        os.replace(get_bin_path(str(tmp / "data")), get_bin_path(prefix))
        os.replace(get_idx_path(str(tmp / "data")), get_idx_path(prefix))
        summary.stale_cache = _remove_index_cache(prefix)
    except OSError as e:
        raise DataError(f"--output {prefix}: writing failed ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary.seconds = time.perf_counter() - start
    return summary


def _remove_index_cache(prefix: str) -> str | None:
    """Remove megatron-core's default index cache of dataset `prefix` (PREFIX/cache/<Dataset>_indices,
    keyed by the dataset's path and settings, not its contents): indices of the replaced data
    would otherwise be read as this data's. Returns the folder removed, if any."""
    cache = Path(prefix) / "cache"
    owned = [d for d in cache.glob("*Dataset_indices") if d.is_dir()]
    for folder in owned:
        shutil.rmtree(folder)
    for folder in (cache, Path(prefix)):  # the folders megatron-core made, once empty
        with contextlib.suppress(OSError):
            folder.rmdir()
    return str(cache) if owned else None


def format_summary(s: Summary) -> str:
    lines = [
        f"wrote {s.prefix}.bin and {s.prefix}.idx in {s.seconds:.1f} s",
        f"  documents  {s.documents:,} from {s.files:,} files ({s.input_bytes / 1e6:.1f} MB)",
        f"  tokens     {s.tokens:,} (including one end-of-document token per document)",
        f"  tokenizer  {s.tokenizer}: vocabulary {s.vocab_size:,}, end-of-document id {s.eod}",
    ]
    if s.empty_skipped:
        lines.append(f"  skipped    {s.empty_skipped} empty documents")
    if s.binary_skipped:
        lines.append(f"  skipped    {len(s.binary_skipped)} binary files (NUL bytes), "
                     f"e.g. {s.binary_skipped[0]}")
    if s.stale_cache:
        lines.append(f"  removed    {s.stale_cache}: megatron-core's index cache of the data replaced")
    lines.append(f"  Megatron-LM: {s.megatron_args}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- CLI


def add_prepare_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-data", help="text files or JSONL into a Megatron indexed dataset (.bin/.idx)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="text files, directories or .jsonl files (default: this Python's standard library "
                        "sources)")
    p.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a Hugging Face tokenizer directory (default: bytes, vocabulary 256 + "
                        f"end-of-document id {BYTE_EOD})")
    p.add_argument("--json-key", default="text", help="text field of JSONL records (default: text)")
    p.add_argument("--glob", default="*", help="file-name pattern inside directories (default: *)")
    p.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.bin/.idx")
    p.set_defaults(run="lighthouse_megatron.data.prepare:run_prepare_data")


def run_prepare_data(args: argparse.Namespace) -> int:
    try:
        summary = prepare_data(args.input, args.output, tokenizer=args.tokenizer, json_key=args.json_key,
                               glob=args.glob, force=args.force)
    except DataError as e:
        print(f"lighthouse-megatron prepare-data: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0
