"""`lighthouse-megatron slurm render` and `slurm submit`: their flags (the job's settings and a
few trainer settings, read off the fields: `settings.slurm.render_specs`), and the chain
submitted with afterok dependencies."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..settings.files import writable_dir_problem
from ..settings.slurm import add_render_flags, render_specs
from ..settings.yaml_file import load_yaml
from .jobs import CHAIN, JOBS, load_config, load_job, values_for
from .script import render, render_chain, write_script


def submit_chain(scripts: Mapping[str, Path], sbatch: str = "sbatch") -> dict[str, str]:
    """Submit the chain with afterok dependencies; job ids by stage. A job that fails cancels
    the ones waiting for it (--kill-on-invalid-dep) instead of leaving them pending forever."""
    ids: dict[str, str] = {}
    previous = None
    for name in CHAIN:
        cmd = [sbatch, "--parsable"]
        if previous:
            cmd += [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"]
        cmd.append(str(scripts[name]))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            raise ValueError(f"{sbatch} not found: submit needs Slurm's sbatch on PATH") from None
        if proc.returncode:
            done = f" (submitted so far: {ids})" if ids else ""
            raise ValueError(f"sbatch {scripts[name]} failed{done}: {proc.stderr.strip()}")
        # --parsable prints "jobid" or "jobid;cluster".
        previous = ids[name] = proc.stdout.strip().split(";")[0]
    return ids


def _add_value_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of settings (top level: every job; a section named after a "
                   "job: that job) (default: none)")
    add_render_flags(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, by its name (the trainer's flags with '_', or a job key); "
                        "repeatable (default: none)")
    p.add_argument("--allow-placeholders", action="store_true",
                   help="write scripts with /path/to/... or unset data/checkpoint paths (they fail when run) "
                        "(default: off)")
    p.add_argument("--force", action="store_true", help="overwrite existing scripts (default: off)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = load_yaml(value) if value else ""
    for key in render_specs():
        value = getattr(args, f"v_{key}")
        if value is not None:
            out[key] = value
    return out


def add_slurm_parser(sub: argparse._SubParsersAction) -> None:
    slurm = sub.add_parser("slurm", help="fill the Slurm launcher from a recipe and submit the chain")
    cmds = slurm.add_subparsers(dest="slurm_command", required=True)
    r = cmds.add_parser("render", help="write one filled, checked sbatch script")
    r.add_argument("job", help=f"a job the package ships ({', '.join(JOBS)}) or a path to a job file")
    r.add_argument("--output", "-o", required=True, help="the script to write (required)")
    _add_value_args(r)
    r.set_defaults(run="lighthouse_megatron.slurm.cli:run_render")
    s = cmds.add_parser("submit", help="render stage1, convert and stage2; submit them chained with afterok")
    s.add_argument("--output-dir", required=True, help="where the three scripts are written (required)")
    s.add_argument("--dry-run", action="store_true",
                   help="write the scripts, print the sbatch commands, submit nothing (default: off)")
    _add_value_args(s)
    s.set_defaults(run="lighthouse_megatron.slurm.cli:run_submit")


def _error(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _make_log_dir(text: str) -> None:
    # Slurm does not create the --output directory: without it the job fails with no log.
    m = re.search(r"^#SBATCH --output=(.*)/[^/]*$", text, re.M)
    if m:
        problem = writable_dir_problem(m.group(1))
        if problem:
            raise ValueError(f"log_dir {m.group(1)}: {problem}")
        Path(m.group(1)).mkdir(parents=True, exist_ok=True)


def run_render(args: argparse.Namespace) -> int:
    try:
        job = load_job(args.job)
        values = values_for(job, load_config(args.config), {})
        values.update(_overrides(args))
        text = render(job, values, allow_placeholders=args.allow_placeholders)
        write_script(text, Path(args.output), args.force, what="-o")
        _make_log_dir(text)
    except (ValueError, OSError) as e:
        return _error(e)
    print(f"wrote {args.output}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    try:
        scripts = render_chain(load_config(args.config), _overrides(args),
                               allow_placeholders=args.allow_placeholders)
        out = Path(args.output_dir)
        paths = {name: out / f"{name}.sbatch" for name in CHAIN}
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing and not args.force:
            raise ValueError(f"{', '.join(existing)} exist(s); pass --force to overwrite")
        if not args.dry_run and shutil.which("sbatch") is None:
            # Before writing: a rerun on a machine with Slurm must not need --force.
            raise ValueError("sbatch not found: submit needs Slurm's sbatch on PATH (nothing was written; "
                             "--dry-run writes the scripts and prints the commands)")
        problem = writable_dir_problem(out)
        if problem:
            raise ValueError(f"--output-dir {out}: {problem}")
        for name, text in scripts.items():
            write_script(text, paths[name], force=True, what="--output-dir")
            if not args.dry_run:
                _make_log_dir(text)
        if args.dry_run:
            first, *rest = CHAIN
            print(f"sbatch --parsable {paths[first]}")
            for prev, name in zip(CHAIN, rest, strict=False):
                print(f"sbatch --parsable --dependency=afterok:<{prev} job id> --kill-on-invalid-dep=yes "
                      f"{paths[name]}")
            return 0
        ids = submit_chain(paths)
    except (ValueError, OSError) as e:
        return _error(e)
    for name in CHAIN:
        print(f"{name} {ids[name]}")
    return 0
