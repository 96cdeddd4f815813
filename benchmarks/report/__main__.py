import sys

from .._common import main
from .build import add_report_parser

sys.exit(main(add_report_parser, "benchmarks.report"))
