"""`python -m benchmarks.retrieval`: a needle-in-a-haystack probe of the dense and the
recovered model that `benchmarks.quality` trained.

Each sample is `length` byte tokens: held-out text (the validation split of the data the
models trained on) with a needle planted at a depth, a fraction of the haystack (0: at the
start, 1: right before the question), and the question at the end:

    haystack[:d]  NEEDLE  haystack[d:]  QUERY  VALUE
    NEEDLE = "# The secret key for <word> is <value>.\\n"
    QUERY  = "\\n# The secret key for <word> is "

with a random word and a random value of --digits digits (seeded per length, depth and
trial: the same samples for every model and run). Both models read the samples with dense
attention, loaded from their checkpoints through the trainer; scored are the value's tokens,
from the logits at the positions before them: mean cross-entropy, token accuracy (argmax)
and exact match (every digit right). Nothing but the needle tells the value: a model that
does not retrieve it guesses digits at chance (0.1 per digit).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._common import UsageError, check_writable, main, run_meta, usage_errors_as_exit_2, write_json
from ._common import format_length as _fmt_len
from ._common import parse_lengths as _int_list

NEEDLE = "# The secret key for {word} is {value}.\n"
QUERY = "\n# The secret key for {word} is "
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
# "No worse than dense": the recovered model's mean token accuracy at most this far below.
TOLERANCE = 0.05
CHANCE = 0.1  # one digit in ten
# The probe says something about retrieval only where the dense model retrieves: its token
# accuracy at least this far above chance.
RETRIEVES = 0.05
MODELS = ("dense", "recovered")  # the keys of benchmarks.quality's "checkpoints"


def add_retrieval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieval", help="needle-in-a-haystack probe of benchmarks.quality's dense and "
                       "recovered models", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", type=Path, default=Path("benchmarks/quality/quality.json"),
                   help="benchmarks.quality's JSON: the checkpoints and data it names are probed")
    p.add_argument("--lengths", default=None,
                   help="comma-separated context lengths ('K' suffix), at most the trained length "
                        "(default: 1/8, 1/4, 1/2 and all of it)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, fractions in [0, 1]")
    p.add_argument("--trials", type=int, default=4, help="samples per length and depth")
    p.add_argument("--digits", type=int, default=6, help="digits of the value")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per forward pass")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=Path("benchmarks/retrieval"),
                   help="folder for NAME.json and NAME.png")
    p.add_argument("--name", default="retrieval", help="output file stem (default retrieval)")
    p.add_argument("--force", action="store_true", help="overwrite an existing NAME.json")
    p.set_defaults(func=run_cli)


# ---------------------------------------------------------------------- samples


def encode(text: str) -> np.ndarray:
    """Byte tokens, as `prepare-data` writes them."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def fixed_tokens(digits: int) -> int:
    """Tokens of a sample besides the haystack (the word is 6 letters)."""
    word, value = "x" * 6, "0" * digits
    texts = (NEEDLE.format(word=word, value=value), QUERY.format(word=word), value)
    return sum(len(encode(t)) for t in texts)


@dataclass(frozen=True)
class Sample:
    tokens: np.ndarray  # [length] int64
    needle_start: int  # tokens[needle_start:] begins with the needle
    value_start: int  # the value is tokens[value_start:]
    word: str
    value: str


def plant(haystack: np.ndarray, depth: float, word: str, value: str) -> Sample:
    """The needle at round(depth * len(haystack)) of the haystack, the question and the value after it."""
    needle = encode(NEEDLE.format(word=word, value=value))
    query, val = encode(QUERY.format(word=word)), encode(value)
    d = round(depth * len(haystack))
    tokens = np.concatenate([haystack[:d], needle, haystack[d:], query, val])
    return Sample(tokens, d, len(tokens) - len(val), word, value)


def make_sample(text: np.ndarray, length: int, depth: float, trial: int, seed: int, digits: int) -> Sample:
    """Sample `trial` at (length, depth): a random word, value and window of the held-out `text`."""
    rng = np.random.default_rng([seed, length, round(depth * 1_000_000), trial])
    word = "".join(rng.choice(list(CONSONANTS)) + rng.choice(list(VOWELS)) for _ in range(3))
    value = "".join(str(d) for d in rng.integers(0, 10, size=digits))
    room = length - fixed_tokens(digits)
    start = int(rng.integers(0, len(text) - room + 1))
    return plant(text[start:start + room], depth, word, value)


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
    from lighthouse_megatron.training import dense_attention

    cells = []
    with dense_attention(model):
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


def _read_quality(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--quality {path}: not a readable bench quality JSON ({e})") from None
    missing = [k for k in ("checkpoints", "data_prefix") if k not in data] + [
        m for m in MODELS if m not in data.get("checkpoints", {})]
    if missing:
        raise UsageError(f"--quality {path}: not a benchmarks.quality result (missing {missing})")
    for name in MODELS:
        if not Path(data["checkpoints"][name], "latest_checkpointed_iteration.txt").is_file():
            raise UsageError(f"--quality {path}: the {name} model's checkpoint {data['checkpoints'][name]} "
                             "is gone (benchmarks.quality keeps it in its --work-dir)")
    return data


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None


def run(args: argparse.Namespace) -> int:
    from lighthouse_megatron.data import BYTE_EOD, null_tokenizer
    from lighthouse_megatron.training import checkpoint_model
    from lighthouse_megatron.training.trainer import checkpoint_eval_args

    quality = _read_quality(args.quality)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU here")
    # The settings the dense model trained with (the recovered one shares them).
    config = checkpoint_eval_args(quality["checkpoints"]["dense"], args.device)
    trained = config.seq_length
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
    ids = null_tokenizer(config.vocab_size).vocab_size
    if ids != BYTE_EOD + 1:
        raise UsageError(f"--quality {args.quality}: the models read {ids} token ids (--vocab-size "
                         f"{config.vocab_size}); the needle is written in bytes ({BYTE_EOD + 1} ids with the "
                         "end-of-document id)")
    out_json, out_png = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    check_writable(out_json, args.force)
    text = held_out_tokens(quality["data_prefix"], config.split)
    if len(text) < max(lengths):
        raise UsageError(f"the held-out split has {len(text)} tokens, fewer than --lengths {max(lengths)}")

    start = time.perf_counter()
    models, device = {}, None
    for name in MODELS:
        root = quality["checkpoints"][name]
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

    meta = run_meta(torch.device(device))
    meta.update(quality=str(args.quality), quality_command=quality["meta"].get("command"), lengths=lengths,
                depths=depths, trials=args.trials, digits=args.digits, seed=args.seed, needle=NEEDLE,
                query=QUERY, haystack_tokens=len(text), trained_length=trained,
                wall_s=time.perf_counter() - start)
    dense, rec = models["dense"]["summary"], models["recovered"]["summary"]
    gap = rec["token_accuracy"] - dense["token_accuracy"]
    result = {
        "meta": meta, "models": models, "accuracy_gap": gap, "exact_match_gap": rec["exact"] - dense["exact"],
        "loss_gap": rec["loss"] - dense["loss"],
        "verdict": {"statement": "the recovered model retrieves no worse than the dense one",
                    "threshold": f"recovered - dense token accuracy >= -{TOLERANCE}", "ok": gap >= -TOLERANCE,
                    "chance_token_accuracy": CHANCE,
                    "informative": dense["token_accuracy"] >= CHANCE + RETRIEVES},
    }
    write_json(out_json, result)
    plotted = plot_heatmap(result, out_png)

    print(f"\n{'model':>10} {'token acc':>9} {'exact':>6} {'value loss':>10}")
    for name in MODELS:
        s = models[name]["summary"]
        print(f"{name:>10} {s['token_accuracy']:9.3f} {s['exact']:6.3f} {s['loss']:10.3f}")
    print(f"check  recovered - dense token accuracy: {gap:+.3f}, {result['verdict']['threshold']}  "
          f"{'ok' if result['verdict']['ok'] else 'did not hold'}")
    print(f"info   chance is {CHANCE} per digit; a uniform guess over digits has value loss "
          f"{math.log(10):.3f}")
    if not result["verdict"]["informative"]:
        print(f"info   the dense model's token accuracy {dense['token_accuracy']:.3f} is below chance + "
              f"{RETRIEVES}: neither model retrieves at this scale, so the check above says nothing "
              "about retrieval")
    print(f"\nwrote {out_json}" + (f" and {out_png}" if plotted else " (no plot: no matplotlib)"), flush=True)
    return 0 if all(math.isfinite(m["summary"]["loss"]) for m in models.values()) else 1


run_cli = usage_errors_as_exit_2(run)


if __name__ == "__main__":
    sys.exit(main(add_retrieval_parser, "benchmarks.retrieval"))
