"""What the studies share: the package's benchmark helpers and a `python -m` entry point."""

from __future__ import annotations

import argparse
import sys

from lighthouse_megatron.bench import (  # noqa: F401  (re-exported for the studies)
    K,
    UsageError,
    check_writable,
    error,
    format_length,
    median,
    nvidia_smi,
    parse_length,
    parse_lengths,
    sync,
    time_ms,
    usage_errors_as_exit_2,
    write_json,
)
from lighthouse_megatron.bench import run_meta as _package_run_meta


def command() -> str:
    """This study's command line as it was typed (`python -m benchmarks.NAME ...`)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    module = spec.name if spec is not None else sys.argv[0]
    return " ".join(["python", "-m", module, *sys.argv[1:]])


def seeds_text(n: int) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} seed{'' if n == 1 else 's'}"


def nvidia_smi_name() -> str | None:
    """The GPU's name as nvidia-smi gives it (no CUDA context in this process), None without one."""
    line = nvidia_smi()
    return line.split(",")[0].strip() if line else None


def run_meta(device) -> dict:
    return {**_package_run_meta(device), "command": command()}


class _OneParser:
    """Stands in for a subparsers object: a study's `add_*_parser(sub)` builds its own parser."""

    def __init__(self, prog: str):
        self.prog, self.parser = prog, None

    def add_parser(self, name: str, help: str | None = None, **kwargs) -> argparse.ArgumentParser:  # noqa: A002
        self.parser = argparse.ArgumentParser(prog=self.prog, **kwargs)
        return self.parser


def main(add_parser, module: str, argv: list[str] | None = None) -> int:
    """Parse `argv` with the parser `add_parser` builds and run it; the exit code."""
    one = _OneParser(f"python -m {module}")
    add_parser(one)
    args = one.parser.parse_args(argv)
    return args.func(args)
