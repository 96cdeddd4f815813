"""`lighthouse-megatron --help`, `--version` and the light subcommands' --help import no torch."""

import subprocess
import sys

import pytest

from lighthouse_megatron import __version__
from lighthouse_megatron.cli import COMMANDS

HEAVY = ("torch", "megatron.core")
CHECK = "import runpy, sys; sys.argv = ['lighthouse-megatron', *{argv!r}]\n" \
        "try:\n    runpy.run_module('lighthouse_megatron.cli', run_name='__main__')\n" \
        "except SystemExit as e:\n    code = e.code\n" \
        "print([m for m in {heavy!r} if m in sys.modules]); print('exit', code)"


def _run(argv):
    proc = subprocess.run([sys.executable, "-c", CHECK.format(argv=argv, heavy=HEAVY)],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    return proc, lines[-2], lines[-1]


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["demo", "--help"], ["prepare-data", "--help"],
                                  ["slurm", "--help"], ["slurm", "render", "--help"],
                                  ["slurm", "submit", "--help"]])
def test_help_and_version_import_no_torch(argv):
    proc, heavy, code = _run(argv)
    assert code == "exit 0", proc.stderr
    assert heavy == "[]", f"lighthouse-megatron {' '.join(argv)} imported {heavy}"
    if argv == ["--version"]:
        assert f"lighthouse-megatron {__version__}" in proc.stdout


def test_every_command_is_listed_and_has_help():
    proc, _, code = _run(["--help"])
    assert code == "exit 0"
    for name in COMMANDS:
        assert f"    {name} " in proc.stdout


def test_the_chosen_command_gets_its_full_parser():
    # A stub parser would accept the command with no arguments; the real one wants --output.
    proc, _, code = _run(["prepare-data"])
    assert code == "exit 2" and "--output" in proc.stderr
