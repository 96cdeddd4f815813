"""`lighthouse-megatron prepare-data`: read back with megatron-core's IndexedDataset and compare
to the input bytes; bad inputs fail with one error line and leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lighthouse_megatron import data
from lighthouse_megatron.cli import main

EOD = data.BYTE_EOD
REPO = Path(__file__).resolve().parents[1]


def read_back(prefix) -> list[list[int]]:
    """Documents as megatron-core's reader sees them (one sequence per document)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    assert list(ds.document_indices) == list(range(len(ds) + 1))
    return [ds[i].tolist() for i in range(len(ds))]


def as_tokens(text: bytes | str) -> list[int]:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return list(raw) + [EOD]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli(capsys, *argv):
    rc = main(["prepare-data", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lighthouse-megatron prepare-data: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def corpus(tmp_path):
    """A directory of text files: nested, non-ASCII, an empty file, a hidden file, a binary file."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    files = {
        "a.txt": b"plain ASCII text\nsecond line\n",
        "sub/b.md": "non-ASCII: Grüße, 光, emoji \U0001f680\n".encode(),
        "sub/c.txt": bytes(range(1, 256)),  # every byte value but NUL: bytes, not characters
        "z.txt": b"last",
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    (root / "empty.txt").write_bytes(b"")
    (root / ".hidden.txt").write_bytes(b"not read")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    return root, files


def test_directory_round_trip(corpus, tmp_path, capsys):
    root, files = corpus
    before = tree_hashes(root)
    rc, out, err = cli(capsys, "--input", root, "--output", tmp_path / "out" / "ds")
    assert rc == 0, err
    # sorted walk order; the empty, hidden and binary files hold no document
    expected = [as_tokens(files[name]) for name in ("a.txt", "sub/b.md", "sub/c.txt", "z.txt")]
    assert read_back(tmp_path / "out" / "ds") == expected
    tokens = sum(map(len, expected))
    assert "documents  4 from 6 files" in out and f"tokens     {tokens:,}" in out
    assert "1 binary files" in out and "1 empty documents" in out
    assert f"--tokenizer-type NullTokenizer --vocab-size {data.byte_vocab_size()}" in out
    assert tree_hashes(root) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds.bin", "ds.idx"]


def test_force_drops_the_index_cache_of_the_data_it_replaces(tmp_path, capsys):
    """megatron-core caches a dataset's sample indices under PREFIX/cache, keyed by its path and
    settings, not its contents: after `prepare-data --force` the old indices would point past
    the new, shorter data."""
    from lighthouse_megatron.settings.train import parse_args
    from lighthouse_megatron.training.trainer import build_datasets

    (tmp_path / "long.txt").write_text("x" * 2000 + "\n")
    (tmp_path / "short.txt").write_text("hello\n")
    prefix = tmp_path / "data"
    data.prepare_data([tmp_path / "long.txt"], prefix, progress=False)
    args = parse_args(["--data-path", str(prefix), "--split", "1,0,0", "--eval-iters", "0", "--num-layers",
                       "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
                       "--device", "cpu", "--train-iters", "4"], world_size=1)
    build_datasets(args)
    assert list((prefix / "cache").glob("GPTDataset_indices/*-train-sample_index.npy"))
    short = str(tmp_path / "short.txt")
    assert main(["prepare-data", "--input", short, "--output", str(prefix), "--force"]) == 0
    assert f"removed    {prefix / 'cache'}: megatron-core's index cache of the data replaced" in \
        capsys.readouterr().out
    assert not prefix.exists()  # the folder megatron-core made for its cache, once empty
    train, _ = build_datasets(args)
    samples = [train[i]["tokens"] for i in range(len(train))]  # the stale indices fail here
    assert all(set(t.tolist()) <= set(b"hello\n") | {256} for t in samples)


def test_file_list_keeps_order_and_glob_filters(corpus, tmp_path):
    root, files = corpus
    s = data.prepare_data([root / "z.txt", root / "a.txt"], tmp_path / "ds")
    assert read_back(tmp_path / "ds") == [as_tokens(files["z.txt"]), as_tokens(files["a.txt"])]
    assert (s.documents, s.files, s.tokens) == (2, 2, len(files["z.txt"]) + len(files["a.txt"]) + 2)
    data.prepare_data([root], tmp_path / "md", glob="*.md")
    assert read_back(tmp_path / "md") == [as_tokens(files["sub/b.md"])]


def test_jsonl(tmp_path, capsys):
    records = [{"text": "first document", "id": 1}, {"text": "zweites Dokument: ä\nmit Zeilen", "id": 2},
               {"text": ""}, {"text": "third"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    other = tmp_path / "more.jsonl"
    other.write_text(json.dumps({"content": "from the content field"}) + "\n", encoding="utf-8")
    rc, out, err = cli(capsys, "--input", path, "--output", tmp_path / "ds")
    assert rc == 0, err
    assert read_back(tmp_path / "ds") == [as_tokens(r["text"]) for r in records if r["text"]]
    rc, out, err = cli(capsys, "--input", other, "--json-key", "content", "--output", tmp_path / "ds2")
    assert rc == 0, err
    assert read_back(tmp_path / "ds2") == [as_tokens("from the content field")]


def test_default_input_is_the_standard_library(tmp_path):
    files = data.default_inputs()
    assert len(files) > 100 and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    s = data.prepare_data(None, tmp_path / "stdlib")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "stdlib"))
    nonempty = [f for f in files if f.stat().st_size]
    assert len(ds) == s.documents == len(nonempty) and s.files == len(files)
    assert int(ds.sequence_lengths.sum()) == s.tokens == sum(f.stat().st_size for f in nonempty) + len(ds)
    for i in (0, len(ds) // 2, len(ds) - 1):
        assert ds[i].tolist() == as_tokens(nonempty[i].read_bytes())


def test_hugging_face_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = "the cat sat on the mat the end"
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *dict.fromkeys(text.split())])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path / "tok")
    (tmp_path / "a.txt").write_text(text + " dog")
    s = data.prepare_data([tmp_path / "a.txt"], tmp_path / "ds", tokenizer=str(tmp_path / "tok"))
    expected = [vocab[w] for w in text.split()] + [vocab["<unk>"], vocab["<eos>"]]
    assert read_back(tmp_path / "ds") == [expected]
    assert (s.eod, s.vocab_size) == (vocab["<eos>"], len(vocab))
    assert "--tokenizer-type HuggingFaceTokenizer" in s.megatron_args


def test_missing_and_empty_inputs(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert_one_error(*cli(capsys, "--input", missing, "--output", tmp_path / "ds")[::2], str(missing),
                     "no such file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_bytes(b"")
    assert_one_error(*cli(capsys, "--input", tmp_path / "empty", "--output", tmp_path / "ds")[::2],
                     "no documents")
    assert_one_error(*cli(capsys, "--input", tmp_path / "empty", "--glob", "*.md", "--output",
                          tmp_path / "ds")[::2], "no files matching")
    assert_one_error(*cli(capsys, "--input", tmp_path / "empty", "--output", tmp_path / "ds.bin")[::2],
                     "path prefix")
    assert_one_error(*cli(capsys, "--input", tmp_path / "empty" / "e.txt", "--output", tmp_path / "ds",
                          "--tokenizer", tmp_path / "no-tokenizer")[::2], "--tokenizer")
    assert not list(tmp_path.glob("ds*"))


@pytest.mark.parametrize("line, needle", [
    ('{"text": "ok"', "not valid JSON"),
    ('{"body": "x"}', "no 'text' field (found: ['body'])"),
    ('{"text": 3}', "'text' is a int, not a string"),
    ('["text"]', "no 'text' field"),
])
def test_bad_json_line_names_file_and_line(tmp_path, capsys, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    rc, _, err = cli(capsys, "--input", path, "--output", tmp_path / "ds")
    assert_one_error(rc, err, f"{path}, line 3", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_existing_output_is_refused_then_forced(corpus, tmp_path, capsys):
    root, files = corpus
    prefix = tmp_path / "ds"
    data.prepare_data([root / "a.txt"], prefix)
    old = tree_hashes(tmp_path)
    rc, _, err = cli(capsys, "--input", root / "z.txt", "--output", prefix)
    assert_one_error(rc, err, "ds.bin exists", "--force")
    assert tree_hashes(tmp_path) == old
    (tmp_path / "ds.bin").unlink()  # a lone .idx is an output as well
    assert_one_error(*cli(capsys, "--input", root / "z.txt", "--output", prefix)[::2], "ds.idx exists")
    assert cli(capsys, "--input", root / "z.txt", "--output", prefix, "--force")[0] == 0
    assert read_back(prefix) == [as_tokens(files["z.txt"])]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_destination(corpus, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert_one_error(*cli(capsys, "--input", root, "--output", out / "ds")[::2], "not writable")
        assert not list(out.iterdir())
    finally:
        out.chmod(0o755)


def test_write_failure_leaves_previous_output_intact(corpus, tmp_path):
    """A write that fails half-way (file-size limit, which binds root too) keeps the old dataset."""
    root, files = corpus
    prefix = tmp_path / "ds"
    data.prepare_data([root / "a.txt"], prefix)
    old = tree_hashes(tmp_path)
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 400_000)  # 800 kB of uint16 tokens, over the 200 kB limit below

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lighthouse_megatron.cli", "prepare-data", "--input", str(big),
         "--output", str(prefix), "--force"],
        capture_output=True, text=True, env=env, preexec_fn=limit_file_size, timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "writing failed" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    big.unlink()
    assert tree_hashes(tmp_path) == old  # old outputs intact, no temporary files left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert np.array_equal(read_back(prefix), [as_tokens(files["a.txt"])])


@pytest.mark.parametrize("blocker", ["file", "proc"])
def test_output_in_a_file_or_special_path_is_one_error(corpus, tmp_path, capsys, blocker):
    """Unwritable for root too: a regular file where a directory should be, and /proc (the
    access check passes there, creating a file does not)."""
    root, _ = corpus
    if blocker == "file":
        (tmp_path / "plain").write_text("x")
        out, needle = tmp_path / "plain" / "sub" / "ds", "plain is not a directory"
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux /proc")
        out, needle = Path("/proc") / "lighthouse-ds", "cannot write in the directory /proc"
    assert_one_error(*cli(capsys, "--input", root / "a.txt", "--output", out)[::2], needle)


def _damaged(tmp_path, corpus, name, edit_idx=None, edit_bin=None):
    root, _ = corpus
    prefix = tmp_path / name
    data.prepare_data([root], prefix)
    for path, edit in ((Path(f"{prefix}.idx"), edit_idx), (Path(f"{prefix}.bin"), edit_bin)):
        if edit is not None:
            path.write_bytes(edit(path.read_bytes()))
    return str(prefix)


@pytest.mark.parametrize("name, edit_idx, edit_bin, needle", [
    ("text", lambda b: b"plain text, not an index", None, "is not a Megatron indexed dataset index"),
    ("short", lambda b: b[:20], None, "is truncated (20 bytes)"),
    ("cut", lambda b: b[:-3], None, "is truncated"),
    ("dtype", lambda b: b[:17] + b"\x63" + b[18:], None, "token type code 99"),
    ("bin", None, lambda b: b[: len(b) // 2], "truncated, or the .bin of another dataset"),
    ("empty", None, lambda b: b"", "has 0 bytes"),
])
def test_damaged_dataset_is_a_clear_error(tmp_path, corpus, name, edit_idx, edit_bin, needle):
    prefix = _damaged(tmp_path, corpus, name, edit_idx, edit_bin)
    with pytest.raises(data.DataError, match="--data-path") as e:
        data.open_indexed_dataset(prefix)
    assert needle in str(e.value)


def test_damaged_dataset_in_train_is_one_line_no_traceback(tmp_path, corpus):
    prefix = _damaged(tmp_path, corpus, "text", lambda b: b"not an index at all")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lighthouse_megatron.cli", "train", "--data-path", prefix,
                           "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                           "--seq-length", "64", "--train-iters", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert "is not a Megatron indexed dataset index" in proc.stderr


def test_opened_dataset_reads_back(corpus, tmp_path):
    root, files = corpus
    prefix = tmp_path / "ok"
    data.prepare_data([root / "a.txt"], prefix)
    ds = data.open_indexed_dataset(str(prefix))  # alive while its tokens are read: they are views of its mmap
    assert ds[0].tolist() == as_tokens(files["a.txt"])
