"""A manifest beside every checkpoint this package writes: each file's size and XXH3-128 hash.

`lighthouse-manifest.json` lies in the directory it describes (an `iter_NNNNNNN/`,
`release/` or a Hugging Face export) and lists every file under it by relative path.
It is written after the checkpoint's files are complete, through a temporary name.
`verify_manifest` re-hashes every listed file: a flipped byte anywhere (model, optimizer
state, metadata) fails with the file's name. Files not in the manifest are not read by
anything the manifest vouches for (the hashed `.metadata` names every distcp file), so
they are ignored. Checkpoints without a manifest (Megatron-LM's own) cannot be verified;
`verify_manifest` returns None for them and the caller says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .reader import CheckpointError

MANIFEST = "lighthouse-manifest.json"
ALGORITHM = "xxh3_128"
_KIND = "lighthouse-megatron checkpoint manifest"
_CHUNK = 8 << 20


def file_hash(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(MANIFEST))


def write_manifest(directory: str | Path) -> Path:
    """Hash every file under `directory` (complete by now) into its manifest; returns its path."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, ALGORITHM: file_hash(p)}
             for p in _files(directory)}
    target = directory / MANIFEST
    tmp = directory / f"{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"kind": _KIND, "version": 1, "algorithm": ALGORITHM, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def verify_manifest(directory: str | Path) -> dict | None:
    """Check every file the manifest of `directory` lists (size, then hash). Returns
    {"files", "bytes"} when all match, None when there is no manifest; raises CheckpointError
    naming the first file that is missing, truncated, grown or changed."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        algorithm = manifest["algorithm"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from e
    if algorithm != ALGORITHM:
        raise CheckpointError(f"{path}: hash algorithm {algorithm!r}; this version reads {ALGORITHM!r}")
    total = 0
    for name, entry in sorted(files.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST}): damaged or partly copied "
                                  "checkpoint")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{file}: {size} bytes, {MANIFEST} says {entry['size']}: damaged or partly "
                                "copied checkpoint")
        if file_hash(file) != entry[ALGORITHM]:
            raise CheckpointError(f"{file}: contents differ from {MANIFEST} ({ALGORITHM} mismatch): the file "
                                "is corrupted; restore it from a copy or use an earlier checkpoint")
        total += size
    return {"files": len(files), "bytes": total}


def verification_line(directory: str | Path, result: dict | None) -> str:
    """What to print after `verify_manifest`: what was verified, or that nothing could be."""
    if result is None:
        return (f"not verified: {directory} has no {MANIFEST} (not written by lighthouse-megatron, e.g. "
                "Megatron-LM's own checkpoint); its files could not be checked")
    return f"verified {result['files']} files ({result['bytes'] / 2**20:.1f} MiB) of {directory} against " \
           f"{MANIFEST}"
