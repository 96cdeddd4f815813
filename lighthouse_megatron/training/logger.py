"""Where the trainer's numbers go: a progress bar (tqdm), JSONL, TensorBoard and, with
--wandb-project, Weights & Biases.

Only the first rank writes. JSONL records: {"kind": "train", "iteration", "loss", "lr",
"grad_norm", "tokens_per_s", "time_per_iter_s", "attention"} after each logged
iteration (plus "skipped": true for an iteration whose update the NaN check skipped),
{"kind": "eval", "iteration", "loss", "attention"} for each evaluation (attention
"lighthouse" or "dense"), and at the first dense iteration of an in-run switch {"kind":
"switch", "iteration", "loss_lighthouse", "loss_dense", "loss_one_dense"}: that iteration's batch
under both attentions, same weights, before the update, and with only the r-th Lighthouse layer
dense (a list, depth order). A run appends to the same file after dropping
the records past the iteration it starts from (a resumed run: those the run that wrote them
did not reach a checkpoint after; a run from scratch, a restart before the first save or
--force: all), as TensorBoard's `purge_step` drops its events, so each iteration appears once.
"""

from __future__ import annotations

import json
import os
import sys
from typing import NamedTuple

from tqdm import tqdm


class OutputPaths(NamedTuple):
    metrics_file: str | None
    tensorboard_dir: str | None
    wandb_dir: str | None


def output_paths(args) -> OutputPaths:
    """Where the logs go: the flags, else under --save (as Megatron-LM puts W&B's files)."""
    under = (lambda name: os.path.join(args.save, name)) if args.save else (lambda name: None)
    wandb_dir = (args.wandb_save_dir or under("wandb")) if args.wandb_project else None
    return OutputPaths(args.metrics_file or under("metrics.jsonl"),
                       args.tensorboard_dir or under("tensorboard"), wandb_dir)


class LoggerError(ValueError):
    """A logging backend could not start (the message names its setting)."""


class MetricsLogger:
    def __init__(self, args, start_iteration: int, enabled: bool):
        self.enabled = enabled
        self.records: list[dict] = []
        self._jsonl = self._tb = self._bar = self._wandb = None
        if not enabled:
            return
        metrics_file, tb_dir, wandb_dir = output_paths(args)
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            if os.path.exists(metrics_file):
                _truncate_after(metrics_file, start_iteration)
            self._jsonl = open(metrics_file, "a")
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            # Events of iterations past the start, left by an earlier attempt, are dropped.
            self._tb = SummaryWriter(tb_dir, purge_step=start_iteration + 1)
        if args.wandb_project:
            self._wandb = _start_wandb(args, wandb_dir)
        show = sys.stderr.isatty() if args.progress is None else args.progress
        self._bar = tqdm(total=args.train_iters, initial=start_iteration, disable=not show, unit="it",
                         dynamic_ncols=True, file=sys.stderr)

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb:
            for name, value in _scalars(record).items():
                self._tb.add_scalar(name, value, record["iteration"])
        if self._wandb:
            self._wandb.log(_scalars(record), step=record["iteration"])
        line = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "kind")
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix_str(line if record["kind"] != "train" else
                                      f"loss={_fmt(record['loss'])} lr={_fmt(record['lr'])} "
                                      f"tok/s={_fmt(record['tokens_per_s'])}")
            if record["kind"] != "train":
                self._bar.write(f"[{record['kind']}] {line}")
        else:
            print(f"[{record['kind']}] {line}", flush=True)

    def note(self, line: str) -> None:
        """A line of text for the user (through the progress bar when it shows)."""
        if not self.enabled:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


_TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "time_per_iter_s")


def _scalars(record: dict) -> dict:
    """A record's scalars under the names TensorBoard and W&B show: train/loss, ...,
    eval/loss_dense, switch/loss_lighthouse."""
    if record["kind"] == "eval":
        return {f"eval/loss_{record['attention']}": record["loss"]}
    if record["kind"] == "switch":
        return {f"switch/{key}": record[key] for key in ("loss_lighthouse", "loss_dense")}
    return {f"train/{key}": record[key] for key in _TRAIN_SCALARS if record.get(key) is not None}


def _start_wandb(args, directory: str | None):
    """A W&B run named as Megatron-LM names it (--wandb-project, --wandb-exp-name), with the
    settings as its config; WANDB_MODE=offline keeps it on this machine."""
    import wandb

    plain = (str, int, float, bool, type(None))
    config = {k: v for k, v in vars(args).items()
              if isinstance(v, plain) or isinstance(v, list) and all(isinstance(i, plain) for i in v)}
    if directory:
        os.makedirs(directory, exist_ok=True)
    try:
        return wandb.init(project=args.wandb_project, name=args.wandb_exp_name, dir=directory, config=config)
    except Exception as e:  # W&B's own errors (no login, no network) have many types
        raise LoggerError(f"--wandb-project {args.wandb_project}: W&B did not start ({e}); "
                          "WANDB_MODE=offline logs on this machine") from None


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _truncate_after(path: str, iteration: int) -> None:
    """Drop the records of iterations after `iteration` (all of them for 0), and a line a
    killed run left half written (the file is rewritten through a temporary name)."""
    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("iteration", 0) <= iteration
        except ValueError:
            return False

    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if keep(ln)]
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    why = ("not in the checkpoint resumed from" if iteration else
           "of an earlier run; this one starts from scratch")
    print(f"{path}: dropped {len(lines) - len(kept)} records after iteration {iteration} ({why})", flush=True)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
