"""`lighthouse-megatron convert` and `lighthouse-megatron inspect` (their flags: `settings.convert`)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from ..megatron.model import attention_spans
from ..settings.fields import SUMMARY, specs, with_role
from ..settings.tree import Model
from .dense import convert, export_hf, inspect_checkpoint


def _quiet(fn):
    """megatron-core and torch warn while loading (missing apex, deprecations); the
    tool's own output says what happened."""
    def run(args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(args)

    return run


def _fail(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


@_quiet
def run_convert(args: argparse.Namespace) -> int:
    options = dict(dry_run=args.dry_run, force=args.force, verify=not args.no_verify,
                   log=lambda msg: print(f"  {msg}"))
    try:
        if args.to == "hf":
            report = export_hf(args.input, args.output, **options)
        else:
            report = convert(args.input, args.output, weights_only=args.weights_only, **options)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        return _fail(e)
    if args.dry_run:
        print(f"dry run: nothing written; {args.output} would be "
              f"{'replaced (--force)' if report['replaces'] else 'created'}")
    else:
        print(f"wrote {report['output']}")
    return 0


@_quiet
def run_inspect(args: argparse.Namespace) -> int:
    try:
        info = inspect_checkpoint(args.checkpoint, verify=not args.no_verify)
    except (ValueError, OSError) as e:
        return _fail(e)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['directory']}")
    print(f"  format      {info['format']} ({info['layout']})")
    print(f"  iteration   {'release' if info['release'] else info['iteration']}, "
          f"checkpoint_version {info['checkpoint_version']}")
    par = info["parallel"]
    print(f"  parallel    TP {par['tp']}, PP {par['pp']}, CP {par['cp']}, DP {par['dp'] or '?'}")
    a = info["args"]
    # The model's sizes: the whole-number settings of the model that `inspect` shows.
    sizes = with_role({k: s for k, s in specs(Model).items() if s.kind is int}, SUMMARY)
    model = ", ".join(f"{k}={a[k]}" for k in sizes if k in a)
    print(f"  model       {model}")
    print(f"  tensors     {info['tensors']['count']}, {info['tensors']['parameters']:,} parameters")
    print("  attention   " + attention_spans(info["attention"]))
    if info["lighthouse"]:
        settings = (f"{k.removeprefix('lighthouse_')}={v}" for k, v in info["lighthouse"].items())
        print("  lighthouse  " + ", ".join(settings))
    print(f"  contents    {', '.join(info['contents'])}")
    print(f"  files       {info['verified']}")
    return 0
