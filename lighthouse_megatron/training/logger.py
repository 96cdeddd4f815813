"""Where the trainer's numbers go: a progress bar (tqdm), JSONL and TensorBoard.

Only the first rank writes. JSONL records: {"kind": "train", "iteration", "loss", "lr",
"grad_norm", "tokens_per_s", "time_per_iter_s", "attention"} after each logged
iteration, and {"kind": "eval", "iteration", "loss", "attention"} for each evaluation
(attention "lighthouse" or "dense"), and at the first dense iteration of an in-run switch
{"kind": "switch", "iteration", "loss_lighthouse", "loss_dense"}: that iteration's batch under
both attentions, same weights, before the update. A resumed run appends to the same file after dropping
the records past the iteration it resumed from (the run that wrote them did not reach a
checkpoint after them), as TensorBoard's `purge_step` drops its events.
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
            if start_iteration and os.path.exists(metrics_file):
                _truncate_after(metrics_file, start_iteration)
            self._jsonl = open(metrics_file, "a")
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tb_dir, purge_step=start_iteration + 1 if start_iteration else None)
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
            elif record["kind"] == "eval":
                self._tb.add_scalar(f"eval/loss_{record['attention']}", record["loss"], step)
            else:
                for key in ("loss_lighthouse", "loss_dense"):
                    self._tb.add_scalar(f"switch/{key}", record[key], step)
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


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _truncate_after(path: str, iteration: int) -> None:
    """Drop the records of iterations after `iteration`, and a line a killed run left half
    written (the file is rewritten through a temporary name)."""
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
    print(f"{path}: dropped {len(lines) - len(kept)} records after iteration {iteration} (not in the "
          "checkpoint resumed from)", flush=True)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
