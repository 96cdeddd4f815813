"""Launch-setting sweep for the Lighthouse kernels (one GPU; prints a line per variant).

    PYTHONPATH=. python3 benchmarks/layer/tune_kernels.py

Times each kernel alone (CUDA events, median of 20) at B=1, 8 heads, d=128, bf16, L=3, p=4,
k=2048 for N = 128K and 512K, over a grid of launch settings, and checks every variant's output
against the module's default settings. The chosen settings live in the kernel modules
(*_LAUNCH dicts); NOTES.md records the outcome.
"""

from __future__ import annotations

import itertools

import torch

from lighthouse_megatron.bench.layer import time_ms
from lighthouse_megatron.config import LighthouseConfig
from lighthouse_megatron.ops.scores import score_pyramids
from lighthouse_megatron.ops.segments import feed_segments, pool_segments
from lighthouse_megatron.ops.tiles import select
from lighthouse_megatron.ops.tokens import feed_tokens, pool_tokens


def same(out, ref) -> bool:
    return all(torch.equal(a, b) if not a.is_floating_point() else
               torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)
               for a, b in zip(out, ref, strict=True))


def sweep(label, fn, grid, rows):
    ref = fn({})
    for values in itertools.product(*grid.values()):
        opts = dict(zip(grid, values, strict=True))
        ok = same(fn(opts), ref)
        ms = time_ms(lambda i, opts=opts: fn(opts), 3, 20)
        rows.append((label, opts, ms, ok))
        print(f"{label:30s} {str(opts):55s} {ms:8.3f} ms {'ok' if ok else 'MISMATCH'}", flush=True)


def tune_at(n: int) -> None:
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=2048, tile_topk=128)
    g = torch.Generator(device="cuda").manual_seed(n)
    q, k = (torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    sq, sk = score_pyramids(q, k, cfg)
    plan = select(sq, sk, 1, 8, n, cfg)
    o = torch.randn(1, plan.length, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    tag = f"N={n // 1024}K"
    rows = []

    def plan_tensors(p):
        return p.level, p.index, p.inverse

    sweep(f"{tag} scores", lambda opts: score_pyramids(q, k, cfg, **opts),
          {"block_elems": [4096, 8192, 16384], "num_warps": [4, 8]}, rows)
    sweep(f"{tag} select", lambda opts: plan_tensors(select(sq, sk, 1, 8, n, cfg, **opts)),
          {"block": [256, 512, 1024, 2048], "num_warps": [4, 8, 16]}, rows)
    for mode in (False, True):
        sweep(f"{tag} segment_sum bwd={mode}",
              lambda opts, mode=mode: ((feed_segments if mode else pool_segments)(q, plan, **opts),),
              {"block_s": [16, 32, 64], "num_warps": [2, 4, 8], "unroll": [False, True]}, rows)
        sweep(f"{tag} token_gather fwd={mode}",
              lambda opts, mode=mode: ((feed_tokens if mode else pool_tokens)(o, plan, **opts),),
              {"block_t": [16, 32, 64, 128], "num_warps": [2, 4, 8]}, rows)
    print(f"\nbest at {tag}:")
    for label in dict.fromkeys(r[0] for r in rows):
        best = min((r for r in rows if r[0] == label and r[3]), key=lambda r: r[2])
        print(f"  {label:30s} {best[2]:8.3f} ms  {best[1]}")


def main() -> None:
    print(torch.cuda.get_device_name())
    for n in (128 * 1024, 512 * 1024):
        tune_at(n)


if __name__ == "__main__":
    main()
