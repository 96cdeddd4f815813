"""`lighthouse-megatron bench layer --cp N`: one Lighthouse layer under context parallelism.

Starts N processes on the first N GPUs (NCCL). For each sequence length and top-k budget, in
one session: fwd+bwd of the whole sequence on one GPU (CP = 1, while the others wait, up to
--cp1-max-len), then fwd+bwd of each rank's load-balanced half-chunks with the CP group
(the time of the slowest rank), per-rank peak memory, the stage-5 attention alone on the
gathered length (CP = 1 and CP = N), and the layer once more with the halo exchange replaced by
zeros (the halo's cost inside the layer). CP overhead = CP = N time - its attention - (CP = 1
time - its attention) / N: the halo, the two-chunk bookkeeping and waiting for the slowest rank.
Before timing, a small configuration is checked: the CP = N output and input gradients,
gathered, against CP = 1 on the same inputs. JSON goes to --out/cp{N}.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

from ..attention import lighthouse_attention
from ..parallel import ContextParallel, causal_attention, merge_chunks, split_chunks
from ..settings.bench import format_length
from ._common import DTYPES, cuda_median_ms, layer_config


def run_cp(args) -> int:
    if not torch.cuda.is_available() or torch.cuda.device_count() < args.cp:
        print(f"error: bench layer --cp {args.cp} needs {args.cp} CUDA GPUs", file=sys.stderr)
        return 2
    if args.backend == "te":
        import transformer_engine.pytorch  # noqa: F401  (before torch first runs a cuDNN op)
    from ..parallel.context import CP_COMM_TYPES

    if args.cp_comm_type not in CP_COMM_TYPES[:3]:
        print(f"error: --cp-comm-type must be one of {list(CP_COMM_TYPES[:3])}", file=sys.stderr)
        return 2
    port = int(os.environ.get("MASTER_PORT", "29533"))
    torch.multiprocessing.spawn(_worker, args=(args, port), nprocs=args.cp, join=True)
    return 0


def _inputs(args, n: int, seed: int, grad: bool = False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hkv = args.kv_heads or args.heads
    dtype = DTYPES[args.dtype]
    return [torch.randn(args.batch, n, h, args.head_dim, device="cuda", dtype=dtype, generator=g)
            .requires_grad_(grad) for h in (args.heads, hkv, hkv)]


def _slowest(ms: float) -> float:
    t = torch.tensor([ms], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _check(args, cp: ContextParallel, rank: int) -> dict:
    """CP = N against CP = 1 (on every rank, same inputs) at 32K tokens per rank, k = 512."""
    cfg = layer_config(args, 512 * args.cp // 2 if args.cp > 2 else 512)
    n = 32768 * args.cp
    q, k, v = _inputs(args, n, seed=1, grad=True)
    grad = _inputs(args, n, seed=2)[0]
    want = lighthouse_attention(q, k, v, cfg)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    local = [split_chunks(x.detach(), 1, args.cp, rank).requires_grad_(True) for x in (q, k, v)]
    out = lighthouse_attention(*local, cfg, context_parallel=cp)
    grads = torch.autograd.grad(out, local, split_chunks(grad, 1, args.cp, rank))

    def whole(x):
        parts = [torch.empty_like(x) for _ in range(args.cp)]
        dist.all_gather(parts, x.contiguous())
        return merge_chunks(parts, dim=1)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    errors = {"out": rel(whole(out.detach()), want.detach())}
    errors.update({f"d{name}": rel(whole(g), w) for name, g, w in zip("qkv", grads, want_grads, strict=True)})
    return {"N": n, "topk": cfg.topk, "relative_error": errors}


def _worker(rank: int, args, port: int) -> None:
    torch.cuda.set_device(rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.cp,
                            device_id=torch.device("cuda", rank))
    cp = ContextParallel(dist.group.WORLD, args.cp_comm_type)
    meta = {
        "command": "lighthouse-megatron " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(), "gpus": args.cp, "cp_comm_type": args.cp_comm_type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "batch": args.batch, "heads": args.heads,
        "kv_heads": args.kv_heads or args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
        "levels": args.levels, "pooling_factor": args.pooling_factor, "tile_topk": args.tile_topk,
        "backend": args.backend, "warmup": args.warmup, "reps": args.reps,
    }
    if not args.no_check:
        meta["check"] = _check(args, cp, rank)
        if rank == 0:
            print(f"check CP={args.cp} vs CP=1: {meta['check']}", flush=True)
        worst = max(meta["check"]["relative_error"].values())
        if worst > 2e-2:
            raise SystemExit(f"CP={args.cp} differs from CP=1 by {worst:.3g} (relative): not timing it")
    rows = []
    for n in args.seq_lens:
        for topk in args.topks:
            cfg = layer_config(args, topk)
            try:
                cfg.validate(n, args.cp)
            except ValueError as e:
                if rank == 0:
                    print(f"skip N={n} k={topk}: {e}", flush=True)
                continue
            row = {"N": n, "topk": topk, "S": cfg.gathered_length(n), "cp": args.cp}
            row.update(_one_gpu(args, cfg, n) if rank == 0 and n <= args.cp1_max_len else {})
            dist.barrier()
            row.update(_with_cp(args, cfg, cp, n, rank))
            if "cp1_fwd_bwd_ms" in row:
                row["ratio_fwd_bwd"] = row["fwd_bwd_ms"] / row["cp1_fwd_bwd_ms"]
                row["ratio_attention"] = row["attention_fwd_bwd_ms"] / row["cp1_attention_fwd_bwd_ms"]
            row.update(_overheads(row, args.cp))
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if rank == 0:
        _report(args, meta, rows)
    dist.destroy_process_group()


def _fwd_bwd(args, cfg, n, cp=None):
    sets = []
    for s in range(2):
        q, k, v = _inputs(args, n, seed=10 + s, grad=True)
        sets.append((q, k, v, torch.randn_like(q)))

    def step(i, cp=cp):
        q, k, v, g = sets[i % 2]
        out = lighthouse_attention(q, k, v, cfg, context_parallel=cp)
        torch.autograd.backward(out, g)

    torch.cuda.reset_peak_memory_stats()
    ms = cuda_median_ms(step, args.warmup, args.reps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    # Stage 5 alone on the gathered length this rank holds.
    s_len = cfg.gathered_length(n * (cp.size if cp else 1)) // (cp.size if cp else 1)
    qg, kg, vg = (torch.randn(args.batch, s_len, x.shape[2], x.shape[3], device="cuda", dtype=x.dtype,
                              requires_grad=True) for x in sets[0][:3])
    og = torch.randn_like(qg)
    attn = cuda_median_ms(lambda i: torch.autograd.backward(
        causal_attention(qg, kg, vg, None, cfg.backend, cp), og), args.warmup, args.reps)
    return ms, peak, attn, step


def _one_gpu(args, cfg, n) -> dict:
    ms, peak, attn, _ = _fwd_bwd(args, cfg, n)
    return {"cp1_fwd_bwd_ms": ms, "cp1_peak_gib": peak, "cp1_attention_fwd_bwd_ms": attn}


def _with_cp(args, cfg, cp, n, rank) -> dict:
    ms, peak, attn, step = _fwd_bwd(args, cfg, n // args.cp, cp)
    # The halo's cost inside the layer: the same steps with the exchange replaced by zeros
    # (wrong numbers, every other launch the same), timed in the same session.
    no_halo_cp = dataclasses.replace(cp, halo=False)
    no_halo = cuda_median_ms(lambda i: step(i, no_halo_cp), args.warmup, args.reps)
    peaks = [torch.zeros(1, device="cuda") for _ in range(args.cp)]
    dist.all_gather(peaks, torch.tensor([peak], device="cuda"))
    return {"fwd_bwd_ms": _slowest(ms), "attention_fwd_bwd_ms": _slowest(attn),
            "no_halo_fwd_bwd_ms": _slowest(no_halo), "peak_gib_per_rank": [float(p) for p in peaks]}


def _overheads(row: dict, cp: int) -> dict:
    """The halo's share of the layer, and what CP adds beyond the attention across ranks and a
    1/CP share of everything else (halo, two-chunk bookkeeping, waiting for the slowest rank)."""
    out = {"halo_ms": row["fwd_bwd_ms"] - row["no_halo_fwd_bwd_ms"]}
    out["halo_share"] = out["halo_ms"] / row["fwd_bwd_ms"]
    if "cp1_fwd_bwd_ms" in row:
        rest_cp1 = row["cp1_fwd_bwd_ms"] - row["cp1_attention_fwd_bwd_ms"]
        out["cp_overhead_ms"] = row["fwd_bwd_ms"] - row["attention_fwd_bwd_ms"] - rest_cp1 / cp
        out["cp_overhead_share"] = out["cp_overhead_ms"] / row["fwd_bwd_ms"]
    return out


def _report(args, meta, rows) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cp{args.cp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(path)
    print(f"\n{meta['device']} x{args.cp}, CP={args.cp} ({args.cp_comm_type}), fwd+bwd of one layer, ms")
    print(f"{'N':>6} {'k':>5} {'S':>7} {'CP=1':>8} {'CP=' + str(args.cp):>8} {'ratio':>6} "
          f"{'attn1':>7} {'attnN':>7} {'halo%':>6} {'CP+%':>6} {'peak GiB':>9}")
    for r in rows:
        nan = float("nan")
        print(f"{format_length(r['N']):>6} {r['topk']:>5} {r['S']:>7} {r.get('cp1_fwd_bwd_ms', nan):8.2f} "
              f"{r['fwd_bwd_ms']:8.2f} {r.get('ratio_fwd_bwd', nan):6.3f} "
              f"{r.get('cp1_attention_fwd_bwd_ms', nan):7.2f} {r['attention_fwd_bwd_ms']:7.2f} "
              f"{100 * r['halo_share']:6.2f} {100 * r.get('cp_overhead_share', nan):6.2f} "
              f"{max(r['peak_gib_per_rank']):9.1f}")
    print(f"\nwrote {path}")
