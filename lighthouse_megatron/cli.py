"""`lighthouse-megatron` command line."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, its parser builder, one-line help). The parser modules import no torch
# (tests/test_cli.py): `--help` and `--version` must not wait seconds for torch and
# megatron-core. Each parser names the function that runs its command ("module:function",
# the `run` default); only that module is imported, and only to run it.
COMMANDS = {
    "demo": (".demo", "add_demo_parser",
             "the two-stage workflow on a tiny model: data, Lighthouse, convert, dense recovery"),
    "prepare-data": (".data", "add_prepare_data_parser",
                     "text files or JSONL into a Megatron indexed dataset (.bin/.idx)"),
    "bench": (".settings.bench", "add_bench_parser",
              "benchmarks of one layer and of whole training steps (GPU)"),
    "slurm": (".slurm", "add_slurm_parser", "fill the Slurm launcher from a recipe and submit the chain"),
    "train": (".settings.train", "add_train_parser", "train a GPT with Lighthouse attention (megatron-core)"),
    "convert": (".settings.convert", "add_convert_parser",
                "make a stage-1 (Lighthouse) checkpoint load under the dense spec, or export it to Hugging "
                "Face Llama"),
    "inspect": (".settings.convert", "add_inspect_parser", "summarise a Megatron-LM checkpoint"),
}


def _command(argv: list[str]) -> str | None:
    """The subcommand argv names (its first word that is not an option), if it is one of ours."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser with the full parser of the command in `argv` and a stub for the others."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="lighthouse-megatron", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = _command(argv)
    for name, (module, builder, help_text) in COMMANDS.items():
        if name == chosen:
            getattr(importlib.import_module(module, __package__), builder)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_function(target: str):
    """The function a parser's `run` default names ("package.module:function")."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        run = command_function(args.run)  # imports torch for most commands: seconds, Ctrl-C likely
        return int(run(args) or 0)
    except ValueError as e:
        # Bad settings (LighthouseConfig and friends raise ValueError naming them): one line
        # and exit code 2, as argparse does for the flags it checks itself.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C where a command has nothing to save: one line, the shell's code for SIGINT.
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
