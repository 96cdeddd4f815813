"""`python -m benchmarks.leak.run`: does stage 1 read the future? The leak probe.

Lighthouse selects per tile, and the selection sees the whole tile: a token's output can move
with later tokens of its tile. Whether training exploits that shows in the loss: on held-out
text x, for positions t inside tiles, x' = x[:t] followed by another real text, and the
per-token loss on the `--window` tokens just before t (targets and inputs all inside x[:t]).
A causal model gives exactly the same losses for x and x'. Reported per model and attention:
the mean over (sample, t) of mean(loss(x') - loss(x)) over the window, its standard error,
and the largest |difference|. Models: the Lighthouse-trained one (the stage-1 checkpoint) and
the dense-trained control (its weights in the same Lighthouse model), each evaluated with
Lighthouse attention and with dense attention; under dense attention the difference must be
exactly 0 (the check).

    python -m benchmarks.leak.run --lighthouse STAGE1_CKPT --control DENSE_CKPT --data-path PREFIX \
        --out X.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from .._common import UsageError, main, run_meta, usage_errors_as_exit_2, write_json

MODELS = ("lighthouse_trained", "dense_trained")


def add_leak_parser(sub) -> None:
    p = sub.add_parser("leak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lighthouse", required=True, help="a trainer checkpoint of the Lighthouse-trained model")
    p.add_argument(
        "--control",
        required=True,
        help="a trainer checkpoint of the same architecture trained with dense attention",
    )
    p.add_argument("--data-path", required=True, metavar="PREFIX", help="the dataset they trained on")
    p.add_argument("--samples", type=int, default=4, help="held-out windows (default 4)")
    p.add_argument("--window", type=int, default=32, help="tokens scored just before each t (default 32)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, required=True, help="the JSON to write")
    p.set_defaults(func=usage_errors_as_exit_2(run))


def positions(seq_length: int, tile: int, window: int) -> list[int]:
    """Positions t in the middle and at three quarters of every tile (the tile's later tokens
    change with x'), with a full window before them."""
    ts = {j * tile + off for j in range(seq_length // tile) for off in (tile // 2, 3 * tile // 4)}
    return sorted(t for t in ts if window < t < seq_length)


@torch.no_grad()
def token_losses(model, seq: torch.Tensor) -> torch.Tensor:
    """Per-token losses [b, n] of sequences [b, n + 1] (position p predicts seq[:, p + 1])."""
    tokens, labels = seq[:, :-1], seq[:, 1:]
    pos = torch.arange(tokens.shape[1], device=seq.device).expand_as(tokens)
    return model(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels).float()


def differences(model, xs: torch.Tensor, others: torch.Tensor, ts: list[int], window: int) -> list[float]:
    """mean(loss(x') - loss(x)) over the window before t, per (sample, t); x' = x[:t] + other[t:]."""
    out = []
    base = token_losses(model, xs)
    for t in ts:
        swapped = torch.cat([xs[:, :t], others[:, t:]], dim=1)
        # Positions t-1-window .. t-2 predict tokens t-window .. t-1: all of x[:t].
        lo, hi = t - 1 - window, t - 1
        diff = token_losses(model, swapped)[:, lo:hi] - base[:, lo:hi]
        out += diff.double().mean(dim=1).tolist()
    return out


def summarize(diffs: list[float]) -> dict:
    n = len(diffs)
    sd = statistics.stdev(diffs) if n > 1 else float("nan")
    return {
        "n": n,
        "mean": statistics.fmean(diffs),
        "se": sd / math.sqrt(n) if n > 1 else float("nan"),
        "max_abs": max(abs(d) for d in diffs),
    }


def probe(model, xs, others, ts, window) -> dict:
    """The model's differences with Lighthouse attention and with dense attention."""
    from lighthouse_megatron.megatron import forced_dense

    res = {"lighthouse": summarize(differences(model, xs, others, ts, window))}
    with forced_dense():
        res["dense"] = summarize(differences(model, xs, others, ts, window))
    return res


def run(args: argparse.Namespace) -> int:
    from lighthouse_megatron.megatron import lighthouse_config_from_args
    from lighthouse_megatron.training import checkpoint_model

    from ..retrieval.run import held_out_tokens

    if args.samples < 2 or args.window < 1:
        raise UsageError(f"--samples must be >= 2 and --window >= 1, got {args.samples}, {args.window}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch dist-checkpoint deprecations
        with (
            checkpoint_model(args.lighthouse, args.device) as (model, margs, it_lh),
            checkpoint_model(args.control, args.device) as (control, cargs, it_dense),
        ):
            if margs.attention_impl != "lighthouse":
                raise UsageError(
                    f"--lighthouse {args.lighthouse}: a {margs.attention_impl}-attention checkpoint"
                )
            n, device = margs.seq_length, margs.device
            cfg = lighthouse_config_from_args(margs)
            tile = n // cfg.num_tiles
            ts = positions(n, tile, args.window)
            text = held_out_tokens(args.data_path, margs.split)
            if len(text) < 4 * (n + 1):
                raise UsageError(
                    f"--data-path {args.data_path}: {len(text)} held-out tokens, fewer than 4 x {n + 1}"
                )
            rng = np.random.default_rng(args.seed)
            half = len(text) // 2 - (n + 1)
            # x from the first half of the held-out text, x' continuations from the second.
            starts = rng.integers(0, half, size=(args.samples, 2))
            xs = torch.as_tensor(np.stack([text[a : a + n + 1] for a, _ in starts]), device=device)
            others = torch.as_tensor(
                np.stack([text[half + n + 1 + b : half + 2 * (n + 1) + b] for _, b in starts]), device=device
            )
            result = {
                "lighthouse_trained": {
                    "checkpoint": args.lighthouse,
                    "iteration": it_lh,
                    **probe(model, xs, others, ts, args.window),
                }
            }
            # The control's weights in the Lighthouse model (Lighthouse has no parameters).
            # Unwrapped: Megatron's Float16Module (bf16 on the GPU) returns nothing from load_state_dict.
            target, source = getattr(model, "module", model), getattr(control, "module", control)
            missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
            bad = [k for k in [*missing, *unexpected] if not k.endswith("_extra_state")]
            if bad:
                raise UsageError(
                    f"--control {args.control}: its weights do not fit the Lighthouse model ({bad[:3]}...)"
                )
            result["dense_trained"] = {
                "checkpoint": args.control,
                "iteration": it_dense,
                **probe(model, xs, others, ts, args.window),
            }
    exact = all(result[m]["dense"]["max_abs"] == 0.0 for m in MODELS)
    result.update(
        meta=run_meta(torch.device(device)),
        seq_length=n,
        tile_length=tile,
        positions=ts,
        window=args.window,
        samples=args.samples,
        check={
            "statement": "under dense attention the loss before t does not depend on tokens from t on",
            "ok": exact,
        },
    )
    write_json(args.out, result)
    for m in MODELS:
        for att in ("lighthouse", "dense"):
            r = result[m][att]
            print(
                f"leak {m:>18} with {att:>10} attention: {r['mean']:+.3e} +- {r['se']:.1e} "
                f"(max |d| {r['max_abs']:.1e}, n {r['n']})"
            )
    print(f"check  dense attention gives exactly 0: {'ok' if exact else 'FAILED'}", flush=True)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main(add_leak_parser, "benchmarks.leak.run"))
