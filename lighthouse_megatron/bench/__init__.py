"""Benchmarks behind `lighthouse-megatron bench ...`."""

from __future__ import annotations

import argparse


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (GPU) and the evidence report")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    from .e2e import add_e2e_parser
    from .failure_modes import add_failure_modes_parser
    from .layer import add_layer_parser
    from .quality import add_quality_parser
    from .report import add_report_parser
    from .retrieval import add_retrieval_parser

    add_layer_parser(kinds)
    add_e2e_parser(kinds)
    add_failure_modes_parser(kinds)
    add_quality_parser(kinds)
    add_retrieval_parser(kinds)
    add_report_parser(kinds)
