"""A compact single-machine trainer on megatron-core: `lighthouse-megatron train`.

It trains a megatron-core GPTModel built with this package's layer specs (Lighthouse or
dense core attention) on megatron-core's GPT datasets, with AdamW, linear warm-up and
cosine decay, gradient clipping, bf16 on CUDA (fp32 on CPU), and data, tensor and
context parallelism over the processes torchrun starts (gloo on CPU, NCCL on CUDA).
Checkpoints are Megatron-LM's torch_dist checkpoints (see `checkpointing`), so
Megatron-LM can `--load` them and this trainer can `--load` Megatron-LM's. It is the
engine for one machine and CI; clusters use Megatron-LM with the plugin.

Python API (stable):

    from lighthouse_megatron import training

    training.main(argv) -> int
        The `lighthouse-megatron train` command: parses `argv` (flags as below), trains,
        returns the exit code; bad settings print one `error: ...` line and return 2, a
        diverged run (NaN/Inf loss or gradient norm) one line and 17, a run stopped by
        SIGTERM/SIGINT (after saving) one line and 128 + the signal number.

    args = training.parse_args(argv)            # argparse.Namespace, validated
        Flags named like Megatron-LM's (--num-layers, --hidden-size, --seq-length,
        --micro-batch-size, --global-batch-size, --lr, --train-iters, --data-path,
        --mock-data, --save, --load, --tensor-model-parallel-size,
        --context-parallel-size, --attention-impl, --lighthouse-*, ...; `--help`
        lists them), a YAML `--config FILE` with the same settings (flags win).
        Raises ValueError naming the setting and the valid values.
    args = training.settings_args(dict(num_layers=2, ...))  # the same from a mapping (YAML keys)

    result = training.run(args)                 # TrainResult
        result.train: one dict per logged iteration: iteration, loss, lr, grad_norm,
                      tokens_per_s, time_per_iter_s, attention ("lighthouse"/"dense")
        result.evals: one dict per evaluation: iteration, attention, loss (held-out
                      split, with the training attention and with dense attention)
        result.checkpoints: the iter_NNNNNNN directories written
        result.start_iteration, result.iteration: where it started (after --load) and stopped
        Raises training.TrainingDiverged (a RuntimeError; nothing of the diverged state is
        saved) and training.TrainingStopped (SIGTERM/SIGINT with --exit-signal-handler, the
        default: .signum, .iteration, .checkpoint, .exit_code).

    training.read_metrics(path) -> list[dict]   # the JSONL file (train and eval records)

    with training.checkpoint_model(root, device="auto") as (model, args, iteration):
        The model of a checkpoint this trainer wrote, weights loaded, in eval mode, wrapped
        as training runs it; `lighthouse_megatron.megatron.forced_dense()` makes Lighthouse layers dense.

`run` creates (and afterwards destroys) a one-process group when none exists, or uses
torchrun's. Under torchrun every rank calls it; rank 0 writes logs and metrics.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# Importing megatron-core warns that apex/TE are absent: expected on CPU, where the fallbacks
# are what runs. Silenced for these imports only, not for the process.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine and Apex) (is|are) not installed")
    from ..settings.train import build_parser, megatron_lm_args, parse_args, resolve_args, settings_args
    from .logger import LoggerError, read_metrics
    from .trainer import (
        TrainingDiverged,
        TrainingStopped,
        TrainResult,
        checkpoint_model,
        prepare,
        process_group,
        run,
        train_loop,
    )

__all__ = ["TrainResult", "TrainingDiverged", "TrainingStopped", "checkpoint_model",
           "main", "megatron_lm_args", "parse_args", "read_metrics", "run", "settings_args"]


def run_cli(cli: argparse.Namespace) -> int:
    """Run the parsed `lighthouse-megatron train` flags (the parser: `settings.train`)."""
    try:
        args = resolve_args(cli)
        prepare(args)  # file-system checks (checkpoints, output folders), before anything is built
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank stops alike; one says why
    try:
        with process_group(args):
            train_loop(args)
    except LoggerError as e:
        if first:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        if first:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingStopped as e:
        if first:
            print(e, file=sys.stderr)
        return e.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    """`lighthouse-megatron train ARGS`; returns the exit code."""
    cli = build_parser().parse_args(argv)
    return run_cli(cli)
