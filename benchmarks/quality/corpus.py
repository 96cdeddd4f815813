"""The study's data: every Python source of this machine, each distinct text once.

The files under the interpreter's standard library and site-packages (and any other folder on
`sys.path` outside the working directory) are read, deduplicated by content (BLAKE2b of the bytes)
and ordered by that hash, so that the same files give the same corpus whatever the order of the
folders. The first documents in that order, up to `heldout_tokens`, become the held-out set
(`heldout.bin/.idx`); the rest is the training set (`train.bin/.idx`). Both are byte-level Megatron
indexed datasets written by `lighthouse_megatron.data.prepare_data`. `corpus.json` records the
counts and a digest of the document hashes, so runs from different machines can be checked to
have read the same corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

MAX_FILE_BYTES = 4 << 20  # generated giants (vendored tables, minified data) are not prose-like code


def source_roots() -> list[Path]:
    """The folders Python imports from (standard library, site-packages, other sys.path
    entries), minus the working directory; nested roots are dropped."""
    paths = sysconfig.get_paths()
    cands = [paths["stdlib"], paths["purelib"], paths["platlib"], *sys.path]
    cwd = Path.cwd().resolve()
    roots: list[Path] = []
    for c in cands:
        if not c:
            continue
        p = Path(c).resolve()
        if not p.is_dir() or p == cwd or cwd in p.parents or p in cwd.parents:
            continue
        roots.append(p)
    roots = sorted(set(roots))
    return [r for r in roots if not any(o != r and o in r.parents for o in roots)]


def unique_sources(roots: list[Path], limit_bytes: int | None = None) -> tuple[list[tuple[str, Path]], dict]:
    """(hash, path) of every distinct `*.py` text under `roots`, sorted by hash; and counts.
    `limit_bytes` keeps the first files (in hash order) up to that many bytes (CPU tests)."""
    seen: dict[str, Path] = {}
    files = duplicates = skipped = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = Path(dirpath) / name
                try:
                    if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
                        skipped += 1
                        continue
                    data = path.read_bytes()
                except OSError:
                    skipped += 1
                    continue
                files += 1
                if not data.strip():
                    skipped += 1
                    continue
                digest = hashlib.blake2b(data, digest_size=16).hexdigest()
                if digest in seen:
                    duplicates += 1
                else:
                    seen[digest] = path
    ordered = sorted(seen.items())
    if limit_bytes is not None:
        kept, total = [], 0
        for h, p in ordered:
            if total >= limit_bytes:
                break
            kept.append((h, p))
            total += p.stat().st_size
        ordered = kept
    return ordered, {"files_read": files, "duplicates_dropped": duplicates, "skipped": skipped}


def build_corpus(folder: Path, heldout_tokens: int, limit_mb: float | None = None) -> dict:
    """Write folder/train and folder/heldout (and corpus.json); reuse them when corpus.json exists."""
    from lighthouse_megatron.data import prepare_data

    info_path = folder / "corpus.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    roots = source_roots()
    ordered, counts = unique_sources(roots, None if limit_mb is None else int(limit_mb * 2**20))
    heldout, train, tokens = [], [], 0
    for _, p in ordered:
        if tokens < heldout_tokens:
            heldout.append(p)
            tokens += p.stat().st_size + 1  # bytes, the end-of-document id; empty-after-read is rare
        else:
            train.append(p)
    if not train:
        raise ValueError(f"the corpus ({len(ordered)} files) has nothing left for training after "
                         f"{heldout_tokens:,} held-out tokens")
    parts = {}
    for name, files in (("heldout", heldout), ("train", train)):
        s = prepare_data(files, folder / name, force=True, progress=False)
        parts[name] = {"prefix": str(folder / name), "documents": s.documents, "tokens": s.tokens}
    info = {
        "source": f"every distinct *.py under {', '.join(map(str, roots))}"
        + (f" (the first {limit_mb:g} MB in hash order)" if limit_mb else ""),
        "python": sys.version.split()[0],
        "unique_files": len(ordered),
        **counts,
        "digest": hashlib.blake2b("".join(h for h, _ in ordered).encode(), digest_size=16).hexdigest(),
        **parts,
    }
    tmp = info_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, info_path)
    return info


def samples_per_epoch(tokens: int, seq_length: int) -> int:
    """Sequences megatron-core's GPTDataset cuts from `tokens` tokens before it starts a second
    epoch (each sample reads seq_length + 1 tokens, consecutive samples share one)."""
    return (tokens - 1) // seq_length


def check_read_once(train_tokens: int, seq_length: int, samples: int, allow_repeat: bool) -> float:
    """Epochs a run of `samples` sequences reads; raises when > 1 unless allow_repeat."""
    per_epoch = samples_per_epoch(train_tokens, seq_length)
    epochs = samples / per_epoch
    if epochs > 1 and not allow_repeat:
        raise ValueError(
            f"the run reads {samples:,} sequences of {seq_length:,} tokens but the training set holds "
            f"{per_epoch:,} ({train_tokens:,} tokens): {epochs:.2f} epochs would read tokens twice; use "
            "fewer iterations, a larger corpus, or --allow-repeat (recorded in every run's JSON)")
    return epochs
