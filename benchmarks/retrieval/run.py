"""`python -m benchmarks.retrieval.run`: a needle-in-a-haystack probe of a dense and a recovered model.

    python -m benchmarks.retrieval.run --dense DENSE_CKPT --recovered RECOVERED_CKPT --data-path PREFIX

Samples (`needle.py`) are `length` byte tokens of held-out text (the validation split of PREFIX, the
data the models trained on) with the needle planted at each depth and the question at the end. Both
models read the samples with dense attention, loaded from their trainer checkpoints; scored are the
value's tokens, from the logits at the positions before them: mean cross-entropy, token accuracy
(argmax) and exact match (every digit right). The comparison says something only where the dense
model retrieves (token accuracy at least RETRIEVES above chance); below that the JSON marks it
uninformative.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._common import UsageError, check_writable, main, run_meta, usage_errors_as_exit_2, write_json
from .._common import format_length as _fmt_len
from .._common import parse_lengths as _int_list
from .needle import CHANCE, NEEDLE, QUERY, RETRIEVES, TOLERANCE, Sample, fixed_tokens, make_sample, retrieves

MODELS = ("dense", "recovered")


def add_retrieval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieval", help="needle-in-a-haystack probe of a dense and a recovered model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="trainer checkpoint of the dense control")
    p.add_argument("--recovered", required=True, help="trainer checkpoint of the recovered (two-stage) model")
    p.add_argument("--data-path", required=True, metavar="PREFIX",
                   help="the byte dataset they trained on (its validation split gives the haystacks)")
    p.add_argument("--lengths", default=None,
                   help="comma-separated context lengths ('K' suffix), at most the trained length "
                        "(default: 1/8, 1/4, 1/2 and all of it)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, fractions in [0, 1]")
    p.add_argument("--trials", type=int, default=4, help="samples per length and depth")
    p.add_argument("--digits", type=int, default=6, help="digits of the value")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per forward pass")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=Path("benchmarks/retrieval/results"),
                   help="folder for NAME.json and NAME.png")
    p.add_argument("--name", default="retrieval", help="output file stem (default retrieval)")
    p.add_argument("--force", action="store_true", help="overwrite an existing NAME.json")
    p.set_defaults(func=run_cli)


def held_out_tokens(prefix: str, split: str) -> np.ndarray:
    """The validation split's documents of dataset `prefix` (megatron-core's split by
    document), end to end."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    n = ds.sequence_lengths.shape[0]
    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[1]
    docs = range(round(bounds[0] * n), round(bounds[1] * n)) if bounds else range(0)
    if not docs:
        raise UsageError(f"{prefix}: --split {split} leaves no validation documents for the haystacks")
    return np.concatenate([ds[i] for i in docs]).astype(np.int64)


# ---------------------------------------------------------------------- scoring


@torch.no_grad()
def score(model, samples: list[Sample], device: str, batch_size: int) -> list[dict]:
    """Per sample (all of one length): the value tokens' mean cross-entropy, token accuracy
    and exact match, from the model's logits at the positions before them."""
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        tokens = torch.as_tensor(np.stack([s.tokens for s in chunk]), device=device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=None).float()
        for row, s in enumerate(chunk):
            pred, target = logits[row, s.value_start - 1:-1], tokens[row, s.value_start:]
            correct = (pred.argmax(-1) == target).float()
            out.append({"loss": F.cross_entropy(pred, target).item(), "token_accuracy": correct.mean().item(),
                        "exact": bool(correct.all())})
    return out


def probe(model, text: np.ndarray, lengths: list[int], depths: list[float], args, device: str) -> list[dict]:
    """One cell per (length, depth): the means over its trials."""
    from lighthouse_megatron.megatron import forced_dense

    cells = []
    with forced_dense():
        for length in lengths:
            for depth in depths:
                samples = [make_sample(text, length, depth, t, args.seed, args.digits)
                           for t in range(args.trials)]
                scores = score(model, samples, device, max(1, args.batch_tokens // length))
                cells.append({"length": length, "depth": depth, "trials": len(scores),
                              **{k: statistics.fmean(float(s[k]) for s in scores)
                                 for k in ("loss", "token_accuracy", "exact")}})
    return cells


def _summary(cells: list[dict]) -> dict:
    return {k: statistics.fmean(c[k] for c in cells) for k in ("loss", "token_accuracy", "exact")}


# ------------------------------------------------------------------------ plot


def plot_heatmap(result: dict, path: Path) -> bool:
    """Token accuracy per depth (rows) and length (columns), one panel per model; False
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [m for m in MODELS if m in result["models"]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes[0], names, strict=True):
        cells = result["models"][name]["cells"]
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in cells:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["token_accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (r, col), v in np.ndenumerate(grid):
            ax.text(col, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(lengths)), [_fmt_len(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if ax is axes[0][0]:
            ax.set_ylabel("needle depth (0: start of the context)")
        mean = result["models"][name]["summary"]["token_accuracy"]
        ax.set_title(f"{name}: value token accuracy\n(mean {mean:.2f}, chance {CHANCE})", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    tmp = path.with_name(f".{path.name}.tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


# ------------------------------------------------------------------------- run


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None


def _check_args(args: argparse.Namespace, trained: int, vocab_size: int) -> tuple[list[int], list[float]]:
    """The lengths and depths to probe, every flag checked against the models' settings."""
    from lighthouse_megatron.data import BYTE_EOD, null_tokenizer

    shortest = fixed_tokens(args.digits) + 1
    try:
        default = [n for n in (trained // 8, trained // 4, trained // 2, trained) if n >= shortest]
        lengths = _int_list(args.lengths) if args.lengths else default
    except ValueError:
        raise UsageError(f"--lengths {args.lengths!r}: expected comma-separated lengths such as 2K,16K") \
            from None
    depths = _floats(args.depths, "--depths")
    if not lengths or any(not shortest <= n <= trained for n in lengths):
        raise UsageError(f"--lengths {args.lengths}: each must lie in {shortest}..{trained} (the needle, "
                         f"question and value take {shortest - 1} tokens; the models trained on {trained})")
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise UsageError(f"--depths {args.depths}: each must lie in [0, 1]")
    if args.trials < 1 or args.digits < 1 or args.batch_tokens < 1:
        raise UsageError(f"--trials, --digits and --batch-tokens must be >= 1, got {args.trials}, "
                         f"{args.digits}, {args.batch_tokens}")
    ids = null_tokenizer(vocab_size).vocab_size
    if ids != BYTE_EOD + 1:
        raise UsageError(f"--dense {args.dense}: the models read {ids} token ids (--vocab-size "
                         f"{vocab_size}); the needle is written in bytes ({BYTE_EOD + 1} ids with the "
                         "end-of-document id)")
    return lengths, depths


def _probe_models(args, text, lengths, depths) -> tuple[dict, str]:
    """Each model's cells and summary, and the device they ran on."""
    from lighthouse_megatron.training import checkpoint_model

    models, device = {}, None
    for name in MODELS:
        root = getattr(args, name)
        with warnings.catch_warnings():
            # torch's distributed-checkpoint deprecations inside megatron-core's loading
            warnings.filterwarnings("ignore", category=FutureWarning)
            with checkpoint_model(root, args.device) as (model, margs, iteration):
                device = margs.device
                print(f"{name}: {root} (iteration {iteration}), {len(lengths)} lengths x {len(depths)} "
                      f"depths x {args.trials} trials on {device}", flush=True)
                cells = probe(model, text, lengths, depths, args, device)
        models[name] = {"checkpoint": root, "iteration": iteration, "cells": cells,
                        "summary": _summary(cells)}
    return models, device


def compare(models: dict) -> dict:
    """Recovered - dense on each score, and the verdict (uninformative where dense does not retrieve)."""
    dense, rec = models["dense"]["summary"], models["recovered"]["summary"]
    gap = rec["token_accuracy"] - dense["token_accuracy"]
    return {
        "accuracy_gap": gap, "exact_match_gap": rec["exact"] - dense["exact"],
        "loss_gap": rec["loss"] - dense["loss"],
        "verdict": {"statement": "the recovered model retrieves no worse than the dense one",
                    "threshold": f"recovered - dense token accuracy >= -{TOLERANCE}", "ok": gap >= -TOLERANCE,
                    "chance_token_accuracy": CHANCE, "informative": retrieves(dense["token_accuracy"])},
    }


def _print(result: dict) -> None:
    print(f"\n{'model':>10} {'token acc':>9} {'exact':>6} {'value loss':>10}")
    for name in MODELS:
        s = result["models"][name]["summary"]
        print(f"{name:>10} {s['token_accuracy']:9.3f} {s['exact']:6.3f} {s['loss']:10.3f}")
    v = result["verdict"]
    print(f"check  recovered - dense token accuracy: {result['accuracy_gap']:+.3f}, {v['threshold']}  "
          f"{'ok' if v['ok'] else 'did not hold'}")
    print(f"info   chance is {CHANCE} per digit; a uniform guess over digits has value loss "
          f"{math.log(10):.3f}")
    if not v["informative"]:
        print(f"info   the dense model's token accuracy is below chance + {RETRIEVES}: neither model "
              "retrieves at this scale, so the check above says nothing about retrieval (uninformative)")


def run(args: argparse.Namespace) -> int:
    from lighthouse_megatron.training.trainer import checkpoint_eval_args

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU here")
    for name in MODELS:
        root = getattr(args, name)
        if not Path(root, "latest_checkpointed_iteration.txt").is_file():
            raise UsageError(f"--{name} {root}: not a trainer checkpoint (no "
                             "latest_checkpointed_iteration.txt)")
    # The settings the dense model trained with (the recovered one shares them).
    config = checkpoint_eval_args(args.dense, args.device)
    lengths, depths = _check_args(args, config.seq_length, config.vocab_size)
    out_json, out_png = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    check_writable(out_json, args.force)
    text = held_out_tokens(args.data_path, config.split)
    if len(text) < max(lengths):
        raise UsageError(f"the held-out split has {len(text)} tokens, fewer than --lengths {max(lengths)}")
    start = time.perf_counter()
    models, device = _probe_models(args, text, lengths, depths)
    meta = run_meta(torch.device(device))
    meta.update(data_path=args.data_path, lengths=lengths, depths=depths, trials=args.trials,
                digits=args.digits, seed=args.seed, needle=NEEDLE, query=QUERY, haystack_tokens=len(text),
                trained_length=config.seq_length, wall_s=time.perf_counter() - start)
    result = {"meta": meta, "models": models, **compare(models)}
    write_json(out_json, result)
    plotted = plot_heatmap(result, out_png)
    _print(result)
    print(f"\nwrote {out_json}" + (f" and {out_png}" if plotted else " (no plot: no matplotlib)"), flush=True)
    return 0 if all(math.isfinite(m["summary"]["loss"]) for m in models.values()) else 1


run_cli = usage_errors_as_exit_2(run)


if __name__ == "__main__":
    sys.exit(main(add_retrieval_parser, "benchmarks.retrieval.run"))
