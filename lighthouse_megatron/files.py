"""What the tools that write files (prepare-data, convert) share."""

from __future__ import annotations

import os
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
