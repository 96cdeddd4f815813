"""REPORT.md, generated: `build.py` (the command) renders the claims tables of `claims.yaml` (read and
checked by `claims.py`) with the measures of `extract.py` over the results `results.py` loads, and
the detail sections (`sections.py`) and plots (`plots.py`). Run it as `python -m benchmarks.report`."""

from .build import add_report_parser, build_report, run_cli  # noqa: F401  (the command's face)
