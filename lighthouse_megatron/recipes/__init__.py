"""What the package reads at run time, shipped in the wheel as package data (read with
importlib.resources, never by a path into a source checkout):

    launch.sbatch       the one Slurm launcher that `slurm render` fills
    tiny.yaml           the demo's model and schedule (CPU, minutes)
    98k.yaml            the paper's 98K-context protocol
    1m-cp8.yaml         the 98K model at 1M tokens with context parallelism 8
    jobs/NAME.yaml      the named Slurm jobs: stage1, convert, stage2 (the two-stage chain), 1m

A recipe is trainer settings (`lighthouse-megatron train --recipe 98k`, `recipe: 98k` in a
--config file or a Slurm job file); user files that name one live in examples/ and slurm/ of
the repository.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

RECIPES = ("tiny", "98k", "1m-cp8")
JOBS = ("stage1", "convert", "stage2", "1m")


def _files() -> Traversable:
    return resources.files(__name__)


def launcher() -> Traversable:
    """The Slurm launcher."""
    return _files() / "launch.sbatch"


def recipe(name: str) -> Traversable:
    """The recipe `name` (one of RECIPES)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; the package ships {', '.join(RECIPES)}")
    return _files() / f"{name}.yaml"


def job(name: str) -> Traversable:
    """The Slurm job file `name` (one of JOBS)."""
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; valid: {', '.join(JOBS)}")
    return _files() / "jobs" / f"{name}.yaml"


def shown(path) -> str:
    """How a file is named to the user: a shipped one by its place in the package
    (lighthouse_megatron/recipes/...), any other by its path."""
    text = str(path)
    root = str(_files())
    if text.startswith(root):
        return "lighthouse_megatron/recipes" + text[len(root):]
    return text
