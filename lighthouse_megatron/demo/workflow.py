"""The demo's stages: prepare-data, stage 1 (Lighthouse), convert, stage 2 (dense), dense control.

Every stage goes through the package's own tools (`prepare_data`, the trainer, the
converter) with a YAML config written next to its checkpoint, so each stage can be rerun
by hand with `lighthouse-megatron train --config OUT/STAGE/config.yaml`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import recipes
from ..settings.fields import Values
from ..settings.files import writable_dir_problem
from ..settings.yaml_file import read_mapping
from .report import check_results, plot_losses, print_checks, print_table, summarize

# The demo's model and schedule: the package's tiny recipe. Byte-level: 256 byte ids plus the
# end-of-document id 256.
MODEL: dict[str, Any] = read_mapping(recipes.recipe("tiny"), "recipe tiny")

# Folders and files the demo owns inside --out (--force replaces these and nothing else).
OUTPUTS = ("data", "stage1", "stage1-dense", "stage2", "control", "summary.json", "loss.png")


class DemoError(RuntimeError):
    """The demo cannot run or a stage failed; the message says which."""


class DemoStopped(Exception):
    """SIGTERM or SIGINT stopped a training step (the trainer's TrainingStopped)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class Preset:
    stage1_iters: int
    stage2_iters: int
    overrides: dict[str, Any]

    def config(self) -> dict[str, Any]:
        return {**MODEL, **self.overrides, "train_iters": self.stage1_iters + self.stage2_iters}

    def describe(self) -> str:
        c = Values(self.config())
        return (f"{c.num_layers} layers x {c.hidden_size}, {c.seq_length} tokens, "
                f"{self.stage1_iters} Lighthouse + {self.stage2_iters} dense iterations")


PRESETS = {
    # The switch at 62.5% of the schedule, as in the 98k recipe.
    "default": Preset(stage1_iters=125, stage2_iters=75, overrides={}),
    # The end-to-end test's size: seconds, not minutes. 256 tokens, L=3, p=4: 16 coarsest
    # entries, 2 tiles of 8 each, S = 16 + 2*4*16 = 144.
    "tiny": Preset(stage1_iters=20, stage2_iters=12, overrides=dict(
        num_layers=2, hidden_size=32, seq_length=256, micro_batch_size=2, global_batch_size=2,
        lr_warmup_iters=4, lighthouse_until_iter=20, eval_interval=10, eval_iters=2)),
}


# --------------------------------------------------- the trainer's and converter's APIs


def _parse(config_path: Path):
    from ..training import parse_args

    return parse_args(["--config", str(config_path)], world_size=1)


def _train(args, log: Path | None = None) -> list[dict]:
    """Train in this process; the trainer's train and eval records. With `log` (stdout is not
    a terminal, so there is no progress bar), the trainer's lines go to that file and only a
    compact subset to the console."""
    from ..training import TrainingStopped, run

    with contextlib.ExitStack() as stack:
        if log is not None:
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(_CompactLog(log))))
        try:
            result = run(args)
        except TrainingStopped as e:
            raise DemoStopped(e.signum) from None
    return result.train + result.evals


class _CompactLog(io.TextIOBase):
    """A training stage's stdout when it is not a terminal: every line goes to its log file,
    the console gets every CONSOLE_EVERY-th iteration's line, the evaluations and the notes
    (a plain log of every iteration of the three runs was over 400 lines)."""

    CONSOLE_EVERY = 25

    def __init__(self, path: Path):
        self.path, self.console, self._partial = path, sys.stdout, ""

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        self.console.write(f"  (every iteration: {self.path})\n")
        return self

    def __exit__(self, *exc):
        self.write("\n" if self._partial else "")
        self.file.close()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.file.write(line + "\n")
            m = re.match(r"\[train\] iteration=(\d+) ", line)
            if m is None or int(m.group(1)) % self.CONSOLE_EVERY == 0:
                self.console.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.file.flush()
        self.console.flush()


def _convert(source: Path, target: Path) -> dict:
    from ..convert import convert

    # torch's distributed-checkpoint deprecation warnings, as `lighthouse-megatron convert`
    # silences them: the converter's own lines say what it changed and verified.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(source, target, log=lambda line: print(f"  {line}", flush=True))


# ---------------------------------------------------------------------------- stages


def _write_yaml(path: Path, settings: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def prepare_out(out: Path, force: bool, outputs: tuple[str, ...] = OUTPUTS) -> None:
    """Make `out`; refuse (or with `force`, remove) the `outputs` an earlier run left there."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file, not a folder")
    problem = writable_dir_problem(out)  # before anything is written, for root too
    if problem:
        raise DemoError(f"--out {out}: {problem}")
    present = [name for name in outputs if (out / name).exists()]
    if present and not force:
        raise DemoError(f"--out {out} holds the results of an earlier run ({', '.join(present)}); "
                        "pass --force to replace them or choose another --out")
    for name in present:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _sigterm(signum, frame):
    raise DemoStopped(signum)


def run_workflow(out: Path, preset: Preset, device: str = "auto", force: bool = False) -> int:
    # SIGTERM or SIGINT: the trainer stops at the end of an iteration (its handlers replace
    # these while it trains), the other steps at once. The demo does not resume: a rerun
    # starts over.
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        summary = _run(Path(out), preset, device, force)
    except (DemoError, ValueError, OSError) as e:
        print(f"lighthouse-megatron demo: error: {e}", file=sys.stderr)
        return 2
    except (DemoStopped, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, DemoStopped) else signal.SIGINT
        print(f"lighthouse-megatron demo: stopped by {signal.Signals(signum).name}; what it wrote so far "
              f"is in {out} (a rerun starts over with --force)", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if all(c["ok"] for c in summary["checks"]) else 1


@dataclass
class TwoStageRun:
    """What `run_two_stage` did: each run's metrics records (stage1, stage2, control), the
    seconds of each step (prepare-data, stage1, convert, stage2, control), the settings
    every run shares, the dataset, and the steps skipped for a spent time budget."""

    config: dict[str, Any]
    data_prefix: str
    metrics: dict[str, list[dict]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    data: Any = None  # data.Summary when this run prepared the data


def run_two_stage(out: Path, config: dict[str, Any], stage1_iters: int, device: str = "auto",
                  data_prefix: str | None = None, deadline: float | None = None) -> TwoStageRun:
    """Stage 1 (Lighthouse, iterations 1..stage1_iters), convert, stage 2 (dense, to
    config["train_iters"]) and the dense control from scratch, under `out`. Without
    `data_prefix`, the standard library's sources are prepared into OUT/data first. A step
    that would start after `deadline` (time.perf_counter()) is skipped with the steps
    after it."""
    from ..data import format_summary, prepare_data

    n1, total = stage1_iters, Values(config).train_iters
    seconds: dict[str, float] = {}
    data = None
    if data_prefix is None:
        t = _stage("1/5 prepare-data: this Python's standard library as bytes")
        data = prepare_data(None, out / "data" / "stdlib")
        print(format_summary(data))
        seconds["prepare-data"] = time.perf_counter() - t
        data_prefix = data.prefix

    # One learning-rate schedule over all `total` iterations for every run, the same seed
    # (same initial weights: Lighthouse has no parameters) and the same data order, so the
    # runs differ only in attention.
    common = dict(config, data_path=[data_prefix], device=device, log_interval=1)
    stages = {
        "stage1": dict(common, save=str(out / "stage1"), save_interval=n1, exit_interval=n1),
        "stage2": dict(common, attention_impl="dense", load=str(out / "stage1-dense"),
                       save=str(out / "stage2")),
        "control": dict(common, attention_impl="dense", save=str(out / "control")),
    }

    # Every stage's settings are checked before the first one trains.
    parsed = {name: _parse(_write_yaml(out / name / "config.yaml", settings))
              for name, settings in stages.items()}
    compact = not sys.stdout.isatty()
    log = {name: out / name / "train.log" if compact else None for name in stages}
    run = TwoStageRun(config=common, data_prefix=data_prefix, seconds=seconds, data=data)
    steps = [
        ("stage1", f"2/5 stage 1: Lighthouse attention, iterations 1-{n1}",
         lambda: _train(parsed["stage1"], log["stage1"])),
        ("convert", "3/5 convert: the stage-1 checkpoint into the dense model's",
         lambda: _convert(out / "stage1", out / "stage1-dense")),
        ("stage2", f"4/5 stage 2: dense recovery, iterations {n1 + 1}-{total}",
         lambda: _train(parsed["stage2"], log["stage2"])),
        ("control", f"5/5 control: dense attention from scratch, iterations 1-{total}",
         lambda: _train(parsed["control"], log["control"])),
    ]
    with warnings.catch_warnings():
        # torch's distributed-checkpoint deprecations, raised inside megatron-core's
        # checkpoint loading: nothing a user can act on.
        warnings.filterwarnings("ignore", category=FutureWarning)
        for i, (name, title, step) in enumerate(steps):
            if deadline is not None and time.perf_counter() > deadline:
                run.skipped = [later[0] for later in steps[i:]]
                print(f"\n== time budget spent: skipping {', '.join(run.skipped)}", flush=True)
                break
            t = _stage(title)
            records = step()
            seconds[name] = time.perf_counter() - t
            if name != "convert":
                run.metrics[name] = records
    return run


def _run(out: Path, preset: Preset, device: str, force: bool) -> dict:
    import torch

    if device == "cuda" and not torch.cuda.is_available():  # before anything is written
        raise DemoError("--device cuda: no CUDA device is available; use --device cpu or auto")
    prepare_out(out, force)
    n1, total = preset.stage1_iters, preset.stage1_iters + preset.stage2_iters
    run = run_two_stage(out, preset.config(), n1, device)
    metrics, seconds, common, data = run.metrics, run.seconds, run.config, run.data

    rows = summarize(metrics, seconds, n1, total, common)
    checks = check_results(rows)
    print_table(rows)
    print_checks(checks, rows, common)
    plot = out / "loss.png"
    plotted = plot_losses(metrics, n1, plot)
    summary = {"config": common, "stage1_iters": n1, "total_iters": total, "rows": rows, "checks": checks,
               "prepare_data": {"documents": data.documents, "tokens": data.tokens}}
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "summary.json")
    print(f"\nwrote {out / 'summary.json'}" + (f" and {plot}" if plotted else
          " (no loss.png: matplotlib is not installed; pip install matplotlib)"))
    return summary
