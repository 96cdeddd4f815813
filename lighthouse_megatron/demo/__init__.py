"""`lighthouse-megatron demo`: the two-stage workflow end to end, small enough for a CPU.

Prepares byte-level data from this Python's standard library, trains a tiny GPT with
Lighthouse attention (stage 1), converts the checkpoint to the dense model, trains on with
dense attention (stage 2, the recovery), and trains the same model dense from scratch for
the same tokens (the control). Prints a table and checks with stated thresholds and writes
a loss-curve PNG. `--layer` runs the single-layer demo instead (one attention layer against
dense attention, no training).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .layer import add_layer_arguments
from .workflow import PRESETS


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the two-stage workflow on a tiny model: data, Lighthouse, convert, dense recovery",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("lighthouse-demo"),
                   help="folder for the data, checkpoints, metrics, summary.json and loss.png "
                        "(default: ./lighthouse-demo)")
    p.add_argument("--force", action="store_true", help="replace the results of an earlier demo in --out")
    p.add_argument("--tiny", action="store_true",
                   help=f"a smaller, faster run ({PRESETS['tiny'].describe()}) instead of the default "
                        f"({PRESETS['default'].describe()})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when there is one")
    # The flag picks the program at parse time: the workflow and the layer demo are two functions.
    p.add_argument("--layer", dest="run", action="store_const",
                   const="lighthouse_megatron.demo.layer:run_layer_demo",
                   default="lighthouse_megatron.demo:run_demo",
                   help="run the single-layer demo: one Lighthouse attention layer against dense attention")
    add_layer_arguments(p)


def run_demo(args: argparse.Namespace) -> int:
    """The two-stage workflow."""
    from .workflow import run_workflow

    layer_only = argparse.ArgumentParser(add_help=False)
    add_layer_arguments(layer_only)
    given = [a.option_strings[0] for a in layer_only._actions if getattr(args, a.dest) != a.default]
    if given:
        print(f"lighthouse-megatron demo: error: {', '.join(given)}: options of the single-layer demo, which "
              "runs with --layer; the two-stage workflow takes --out, --force, --tiny and --device",
              file=sys.stderr)
        return 2
    return run_workflow(args.out, PRESETS["tiny" if args.tiny else "default"], device=args.device,
                        force=args.force)
