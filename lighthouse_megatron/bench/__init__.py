"""Benchmarks behind `lighthouse-megatron bench ...` (users tune their settings with them),
and the helpers the repository's evidence studies (`benchmarks/`, not part of the wheel)
share with them."""

from __future__ import annotations

import argparse

from ._common import (
    K,
    UsageError,
    check_writable,
    error,
    format_length,
    median,
    nvidia_smi,
    parse_length,
    parse_lengths,
    run_meta,
    sync,
    time_ms,
    usage_errors_as_exit_2,
    write_json,
)

__all__ = ["K", "UsageError", "add_bench_parser", "check_writable", "error", "format_length", "median",
           "nvidia_smi", "parse_length", "parse_lengths", "run_meta", "sync", "time_ms",
           "usage_errors_as_exit_2",
           "write_json"]


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks of one layer (also under context parallelism) and "
                           "of whole training steps (GPU)")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    from .e2e import add_e2e_parser
    from .layer import add_layer_parser

    add_layer_parser(kinds)
    add_e2e_parser(kinds)
