"""`lighthouse-megatron slurm render` and `slurm submit`: their flags (the job's settings and a
few trainer settings, read off the fields: `settings.slurm.render_specs`), and the chain
submitted with afterok dependencies."""

from __future__ import annotations

import argparse
import contextlib
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


class SubmitError(ValueError):
    """sbatch refused a job of the chain; `queued`: the jobs before it still queued, by stage (none
    when they were cancelled)."""

    def __init__(self, message: str, queued: Mapping[str, str]):
        super().__init__(message)
        self.queued = dict(queued)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    return "; ".join(line.strip() for line in proc.stderr.splitlines() if line.strip()) or (
        f"exit code {proc.returncode}")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # not found, or not executable
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: {e.strerror or e}")


def submit_chain(scripts: Mapping[str, Path], sbatch: str = "sbatch",
                 scancel: str = "scancel") -> dict[str, str]:
    """Submit the chain with afterok dependencies; job ids by stage. A job that fails cancels
    the ones waiting for it (--kill-on-invalid-dep) instead of leaving them pending forever.
    All or none: when sbatch refuses a job, the ones already submitted are cancelled, so that
    submitting again cannot queue stage 1 twice; SubmitError says which are left if scancel fails."""
    ids: dict[str, str] = {}
    previous = None
    for name in CHAIN:
        cmd = [sbatch, "--parsable"]
        if previous:
            cmd += [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"]
        cmd.append(str(scripts[name]))
        proc = _run(cmd)
        if not proc.returncode:
            # --parsable prints "jobid" or "jobid;cluster".
            previous = ids[name] = proc.stdout.strip().split(";")[0]
            continue
        failed = f"sbatch {scripts[name]} failed ({_one_line(proc)})"
        if not ids:
            raise SubmitError(failed, {})
        jobs = ", ".join(f"{stage} {job_id}" for stage, job_id in ids.items())
        cancel = _run([scancel, *ids.values()])
        if not cancel.returncode:
            raise SubmitError(f"{failed}; cancelled the jobs it had submitted ({jobs})", {})
        raise SubmitError(f"{failed}; {jobs} stay(s) queued, as scancel failed ({_one_line(cancel)}): cancel "
                          f"them (scancel {' '.join(ids.values())}) before you submit again", ids)
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


def _missing_dirs(path: Path) -> list[Path]:
    """The folders that making `path` would create, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    return missing[::-1]


def _make_log_dir(text: str) -> list[Path]:
    """The script's log folder, made (Slurm does not create the --output directory: without it the
    job fails with no log); the folders it created."""
    m = re.search(r"^#SBATCH --output=(.*)/[^/]*$", text, re.M)
    if not m:
        return []
    problem = writable_dir_problem(m.group(1))
    if problem:
        raise ValueError(f"log_dir {m.group(1)}: {problem}")
    made = _missing_dirs(Path(m.group(1)))
    Path(m.group(1)).mkdir(parents=True, exist_ok=True)
    return made


def _undo(written: Mapping[Path, str | None], made: list[Path]) -> None:
    """Leave the output folder as it was: scripts written removed (or their old text back), folders
    made removed when empty."""
    for path, old in written.items():
        with contextlib.suppress(OSError, ValueError):
            if old is None:
                path.unlink()
            else:
                write_script(old, path, force=True)
    for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def run_render(args: argparse.Namespace) -> int:
    try:
        job = load_job(args.job)
        values = values_for(job, load_config(args.config), {})
        values.update(_overrides(args))
        text = render(job, values, allow_placeholders=args.allow_placeholders)
    except (ValueError, OSError) as e:
        return _error(e)
    made: list[Path] = []
    try:
        made = _make_log_dir(text)
        write_script(text, Path(args.output), args.force, what="-o")
    except (ValueError, OSError) as e:
        _undo({}, made)
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
        old = {p: p.read_text() if p.is_file() else None for p in paths.values()}
    except (ValueError, OSError) as e:
        return _error(e)
    # Until the chain is queued, a failure leaves the folder as it was: a rerun needs no --force.
    written: dict[Path, str | None] = {}
    made = _missing_dirs(out)
    try:
        for name, text in scripts.items():
            write_script(text, paths[name], force=True, what="--output-dir")
            written[paths[name]] = old[paths[name]]
            if not args.dry_run:
                made += _make_log_dir(text)
        if args.dry_run:
            first, *rest = CHAIN
            print(f"sbatch --parsable {paths[first]}")
            for prev, name in zip(CHAIN, rest, strict=False):
                print(f"sbatch --parsable --dependency=afterok:<{prev} job id> --kill-on-invalid-dep=yes "
                      f"{paths[name]}")
            return 0
        ids = submit_chain(paths)
    except SubmitError as e:
        if e.queued:
            return _error(f"{e}; the scripts stay in {out}")
        _undo(written, made)
        return _error(f"{e}: nothing is left queued or written")
    except (ValueError, OSError) as e:
        _undo(written, made)
        return _error(e)
    for name in CHAIN:
        print(f"{name} {ids[name]}")
    return 0
