"""Benchmarks behind `lighthouse-megatron bench ...` (users tune their settings with them;
their flags: `settings.bench`), and the helpers the repository's evidence studies
(`benchmarks/`, not part of the wheel) share with them."""

from __future__ import annotations

from ..settings.bench import K, format_length, parse_length, parse_lengths
from ._common import (
    UsageError,
    check_writable,
    error,
    median,
    nvidia_smi,
    run_meta,
    sync,
    time_ms,
    usage_errors_as_exit_2,
    write_json,
)

__all__ = ["K", "UsageError", "check_writable", "error", "format_length", "median",
           "nvidia_smi", "parse_length", "parse_lengths", "run_meta", "sync", "time_ms",
           "usage_errors_as_exit_2",
           "write_json"]
