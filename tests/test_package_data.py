"""The package ships what it reads (issue 29): the Slurm launcher, the named recipes and the named
Slurm jobs are package data read with importlib.resources, never by a path into a checkout.
.ci/run builds the wheel, installs it alone and runs `slurm render` and `demo --help` from it."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

from lighthouse_megatron import recipes

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lighthouse_megatron"
DATA = PACKAGE / "recipes"


def test_every_shipped_file_is_named_and_every_named_file_ships():
    files = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file() and p.suffix != ".py"
             and "__pycache__" not in p.parts}
    named = {"launch.sbatch", *(f"{r}.yaml" for r in recipes.RECIPES),
             *(f"jobs/{j}.yaml" for j in recipes.JOBS)}
    assert files == named
    for path in (recipes.launcher(), *map(recipes.recipe, recipes.RECIPES), *map(recipes.job, recipes.JOBS)):
        assert path.is_file(), path


def test_the_wheel_includes_the_package_data():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = config["package-data"]["lighthouse_megatron.recipes"]
    for path in DATA.rglob("*"):
        if path.is_file() and path.suffix != ".py" and "__pycache__" not in path.parts:
            assert any(fnmatch.fnmatch(path.relative_to(DATA).as_posix(), g) for g in globs), path


def test_no_module_reads_a_path_outside_the_package():
    """`Path(__file__).parent.parent / "slurm"` found the launcher in a checkout only: an installed
    wheel has no such folder."""
    found = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"__file__|parent\.parent|parents\[", line)]
    assert found == []


def test_the_demo_reads_the_tiny_recipe():
    from lighthouse_megatron.demo.workflow import MODEL
    from lighthouse_megatron.settings.yaml_file import read_mapping

    assert MODEL == read_mapping(recipes.recipe("tiny"), "recipe")


def test_bench_writes_to_the_working_directory_by_default():
    import argparse

    from lighthouse_megatron.settings.bench import add_bench_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_bench_parser(sub)
    (kinds,) = (a for a in sub.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    for kind in ("layer", "e2e"):
        out = kinds.choices[kind].get_default("out")
        assert not out.is_absolute() and out.parts[0] != "benchmarks", (kind, out)
