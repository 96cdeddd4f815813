"""`lighthouse-megatron --help`, `--version` and every subcommand's --help import no torch; every
parser names a function that exists."""

import argparse
import subprocess
import sys

import pytest

from lighthouse_megatron import __version__
from lighthouse_megatron.cli import COMMANDS, build_parser, command_function

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


SUBCOMMANDS = {"slurm": ("render", "submit"), "bench": ("layer", "e2e")}
HELP = [["--version"], ["--help"], *([name, "--help"] for name in COMMANDS),
        *([name, sub, "--help"] for name, subs in SUBCOMMANDS.items() for sub in subs)]


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
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


def _leaf_parsers(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in action.choices.values():
            yield from _leaf_parsers(child)


def test_every_parser_runs_a_function_that_exists():
    # The parsers name their command's function as a string, so that --help imports nothing
    # heavy; a typo there would only show when the command runs.
    targets = set()
    for name in COMMANDS:
        (command,) = (a for a in build_parser([name])._actions if isinstance(a, argparse._SubParsersAction))
        leaves = list(_leaf_parsers(command.choices[name]))
        assert set(SUBCOMMANDS.get(name, ())) <= {leaf.prog.split()[-1] for leaf in leaves}
        for leaf in leaves:
            found = {leaf.get_default("run")}
            found |= {a.const for a in leaf._actions if a.dest == "run" and a.const}
            assert None not in found, f"{leaf.prog} names no function to run"
            targets |= found
    for target in sorted(targets):
        assert callable(command_function(target)), target


@pytest.mark.parametrize("command", ["train", "slurm"])
def test_every_flag_says_what_it_does_and_its_default(command):
    """`train --help` and `slurm render --help` showed no defaults and mostly no descriptions
    (the trainer's small defaults lived only in docs/training.md)."""
    (sub,) = (a for a in build_parser([command])._actions if isinstance(a, argparse._SubParsersAction))
    for parser in _leaf_parsers(sub.choices[command]):
        for action in parser._actions:
            if action.dest == "help" or not action.option_strings:
                continue
            text = action.help or ""
            assert len(text) > 10 and ("default" in text.lower() or "required" in text), \
                f"{parser.prog} {action.option_strings[0]}: {text!r}"
