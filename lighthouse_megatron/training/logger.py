"""Where the trainer's numbers go: a progress bar (tqdm), JSONL and TensorBoard.

Only the first rank writes. JSONL records: {"kind": "train", "iteration", "loss", "lr",
"grad_norm", "tokens_per_s", "time_per_iter_s", "attention"} after each logged
iteration, and {"kind": "eval", "iteration", "loss", "attention"} for each evaluation
(attention "lighthouse" or "dense"). A resumed run appends to the same file.
"""

from __future__ import annotations

import json
import os
import sys

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, args, start_iteration: int, enabled: bool):
        self.enabled = enabled
        self.records: list[dict] = []
        self._jsonl = self._tb = self._bar = None
        if not enabled:
            return
        metrics_file = args.metrics_file or (os.path.join(args.save, "metrics.jsonl") if args.save else None)
        tb_dir = args.tensorboard_dir or (os.path.join(args.save, "tensorboard") if args.save else None)
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self._jsonl = open(metrics_file, "a")
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tb_dir)
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
            step = record["iteration"]
            if record["kind"] == "train":
                for key in ("loss", "lr", "grad_norm", "tokens_per_s", "time_per_iter_s"):
                    if record.get(key) is not None:
                        self._tb.add_scalar(f"train/{key}", record[key], step)
            else:
                self._tb.add_scalar(f"eval/loss_{record['attention']}", record["loss"], step)
        line = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "kind")
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix_str(line if record["kind"] == "eval" else
                                      f"loss={_fmt(record['loss'])} lr={_fmt(record['lr'])} "
                                      f"tok/s={_fmt(record['tokens_per_s'])}")
            if record["kind"] == "eval":
                self._bar.write(f"[eval] {line}")
        else:
            print(f"[{record['kind']}] {line}", flush=True)

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


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
