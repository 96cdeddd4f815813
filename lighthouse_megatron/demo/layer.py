"""`lighthouse-megatron demo --layer`: one Lighthouse attention layer on CPU, checked against dense attention.

Prints the gathered length S, the attention-FLOP saving, timings of Lighthouse and dense
attention on this machine, two checks (L = 1 equals dense attention; the output is causal:
no gradient flows from the future) and, as information, how close the L-level output is
to dense attention.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..config import LighthouseConfig


def add_layer_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--layer mode (one attention layer)")
    g.add_argument("--seq-len", type=int, default=8192)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--levels", type=int, default=3)
    g.add_argument("--pooling-factor", type=int, default=4)
    g.add_argument("--topk", type=int, default=128)
    g.add_argument("--tile-topk", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_layer_demo(args: argparse.Namespace) -> int:
    # Here, not at the top: `lighthouse-megatron demo --help` must not wait for torch.
    import torch

    from ..attention import lighthouse_attention
    from ..backends import dense_causal_attention

    cfg = LighthouseConfig(
        levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk, tile_topk=args.tile_topk
    )
    n = args.seq_len
    try:
        cfg.validate(n)
    except ValueError as err:
        print(f"lighthouse-megatron demo: error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    shape_q = (args.batch, n, args.heads, args.head_dim)
    shape_kv = (args.batch, n, args.kv_heads, args.head_dim)
    q = torch.randn(shape_q, requires_grad=True)
    k = torch.randn(shape_kv, requires_grad=True)
    v = torch.randn(shape_kv, requires_grad=True)

    s = cfg.gathered_length(n)
    print(f"Lighthouse attention demo (CPU): b={args.batch} N={n} heads={args.heads}/{args.kv_heads} "
          f"d={args.head_dim}")
    print(f"config: {cfg.to_dict()}")
    print(f"gathered length S = N/p^(L-1) + (L-1)*p*k = {n // cfg.coarsest_block} + "
          f"{(cfg.levels - 1) * cfg.pooling_factor * cfg.topk} = {s}")
    print(f"attention FLOPs: dense ~ N^2, Lighthouse ~ S^2 -> {cfg.attention_flops_ratio(n):.1f}x fewer")

    out, t_lh = _timed(lambda: lighthouse_attention(q, k, v, cfg))
    dense, t_dense = _timed(lambda: dense_causal_attention(q, k, v))
    print(f"forward time here: Lighthouse {t_lh * 1e3:.0f} ms, dense {t_dense * 1e3:.0f} ms")

    one_level = LighthouseConfig(levels=1, pooling_factor=cfg.pooling_factor, topk=cfg.topk,
                                 tile_topk=cfg.tile_topk)
    # Causal attention of a prefix is the prefix of the output: check L = 1 on a short one.
    m = min(n, 2048 // one_level.num_tiles * one_level.num_tiles)
    err_l1 = (lighthouse_attention(q[:, :m], k[:, :m], v[:, :m], one_level) - dense[:, :m]).abs().max().item()
    t = n // 3
    grads = torch.autograd.grad(out[:, t].sum(), (q, k, v))
    leak = max(g[:, t + 1:].abs().max().item() for g in grads)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), dense.flatten(1)).mean().item()
    checks = [
        ("L=1 equals dense attention: max |diff| < 1e-5", f"{err_l1:.2e}", err_l1 < 1e-5),
        (f"causal: max |d out[{t}] / d inputs after {t}| == 0", f"{leak:.1e}", leak == 0.0),
    ]
    width = max(len(c[0]) for c in checks)
    for name, value, ok in checks:
        print(f"  check  {name:<{width}}  {value:>10}  {'ok' if ok else 'FAILED'}")
    print(f"  info   L={cfg.levels} output vs dense attention, mean cosine similarity: {cos:.3f} "
          "(Lighthouse approximates attention; it is not meant to equal it)")
    return 0 if all(ok for _, _, ok in checks) else 1
