"""`lighthouse-megatron` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lighthouse-megatron", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from .demo import add_demo_parser

    add_demo_parser(sub)
    from .data import add_prepare_data_parser

    add_prepare_data_parser(sub)
    from .bench import add_bench_parser

    add_bench_parser(sub)
    from .slurm import add_slurm_parser

    add_slurm_parser(sub)
    from .training import add_train_parser

    add_train_parser(sub)
    from .checkpoint.cli import add_convert_parser, add_inspect_parser

    add_convert_parser(sub)
    add_inspect_parser(sub)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        # Bad settings (LighthouseConfig and friends raise ValueError naming them): one line
        # and exit code 2, as argparse does for the flags it checks itself.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
