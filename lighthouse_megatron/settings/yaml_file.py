"""The one reader of YAML settings files (trainer `--config`, `--lighthouse-config`, Slurm
recipes and job files): a mapping, or nothing for an empty file.

YAML 1.1 (PyYAML) reads `1:00:00` as the base-60 integer 3600, so a Slurm time limit
written without quotes would silently become 3600 minutes; the loader here keeps such
values as the strings they look like. Everything else is PyYAML's safe loader; each
setting's own type is applied by its reader (`settings.train.typed_settings` for training
settings)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

# PyYAML's int and float patterns without their sexagesimal (base 60) branches.
_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


@functools.cache
def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, {"tag:yaml.org,2002:int": _INT, "tag:yaml.org,2002:float": _FLOAT}.get(tag, regexp))
                for tag, regexp in resolvers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return Loader


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` without base-60 numbers (see the module doc)."""
    import yaml

    return yaml.load(text, Loader=_loader())  # a SafeLoader: plain types only


def read_mapping(path, what: str) -> dict[str, Any]:
    """The mapping in YAML file `path` (a path, or a file of the package's data); `what` names
    the file in errors ("--config", "job file"). Raises ValueError when the file cannot be
    read, is not YAML or holds no mapping."""
    import yaml

    try:
        data = load_yaml((path if hasattr(path, "read_text") else Path(path)).read_text())
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: not a YAML text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a mapping of settings, got {type(data).__name__}")
    return data
