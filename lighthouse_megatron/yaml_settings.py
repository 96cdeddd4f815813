"""The one reader of YAML settings files (trainer `--config`, `--lighthouse-config`, Slurm
recipes and job files): a mapping, or nothing for an empty file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in YAML file `path`; `what` names the file in errors ("--config", "recipe").
    Raises ValueError when the file cannot be read, is not YAML or holds no mapping."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a mapping of settings, got {type(data).__name__}")
    return data
