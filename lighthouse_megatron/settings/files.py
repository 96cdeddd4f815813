"""What the tools that write files (prepare-data, convert, train, demo, slurm render) share."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def make_output_dir(path: Path) -> str | None:
    """Create directory `path` and its missing parents. Returns None when files can be written
    in it, else why not (the caller names its setting in the error)."""
    blocking = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        return f"{blocking} is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the directory {path} ({e.strerror or e})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"the directory {path} is not writable"
    return None


def writable_dir_problem(path: str | os.PathLike) -> str | None:
    """Why a run could not write files in directory `path` (which it would create with its
    missing parents), or None. It tries: what is missing is created, a temporary file
    written, and both removed again, so nothing is left behind, and a read-only or special
    file system (/proc, /sys) is caught even for root, whom permission bits do not stop."""
    path = Path(path)
    blocking = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        return f"{blocking} is not a directory"
    created: list[Path] = []
    target = path  # named in the message, never the probe's temporary name
    try:
        for missing in reversed([p for p in (path, *path.parents) if not p.exists()]):
            target = missing
            missing.mkdir()
            created.append(missing)
        target = path
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        verb = "create" if target in created or not target.exists() else "write in"
        return f"cannot {verb} {target} ({e.strerror or e})"
    finally:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
    return None


def writable_file_problem(path: str | os.PathLike) -> str | None:
    """Why a run could not create or append to the regular file `path`, or None (nothing is
    changed: an existing file is only opened for appending)."""
    path = Path(path)
    if path.exists():
        if not path.is_file():
            return f"{path} is not a regular file"
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            return f"cannot write {path} ({e.strerror or e})"
        return None
    return writable_dir_problem(path.parent)
