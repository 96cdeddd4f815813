"""`lighthouse-megatron bench layer`: one attention layer, Lighthouse against dense cuDNN SDPA.

For every sequence length N and top-k budget k: forward and forward+backward latency of
`lighthouse_attention`, a per-stage breakdown (scores, selection, gather, attention,
scatter and the backward of gather, attention and scatter), peak memory, and the floor of
docs/performance.md measured in the same process: cuDNN SDPA forward+backward on the gathered
length S plus the memory passes (9 passes over one [N, H, d] tensor for forward+backward,
4 for the forward) at the copy bandwidth measured here. Dense cuDNN SDPA on N tokens runs
in the same process (up to --dense-max-len). Before timing anything, the fast path is
checked against the reference at a small size.

Timing: CUDA events, warm-up, median of the repetitions, inputs rotated among two sets of
random normal tensors. The table is printed last; JSON and a log-log PNG go to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

from ..attention import lighthouse_attention, plan_selection
from ..backends import dense_causal_attention, te_import_error
from ..ops import score_pyramids, select
from ..ops.segments import feed_segments, pool_segments
from ..ops.tokens import feed_tokens, pool_tokens
from ..settings.bench import K, format_length
from ._common import DTYPES, cudnn_version, layer_config
from ._common import cuda_median_ms as time_ms

# ----------------------------------------------------------------------- timing


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/ms, counting bytes read plus bytes written."""
    x = torch.randn(256 * K * K, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = time_ms(lambda i: y.copy_(x), 3, 10)
    return 2 * x.numel() * x.element_size() / ms


def random_inputs(args, n: int, sets: int, seed: int):
    dtype = DTYPES[args.dtype]
    hkv = args.kv_heads or args.heads
    g = torch.Generator(device="cuda").manual_seed(seed)

    def draw(h):
        return torch.randn(args.batch, n, h, args.head_dim, device="cuda", dtype=dtype, generator=g)

    return [(draw(args.heads), draw(hkv), draw(hkv), draw(args.heads)) for _ in range(sets)]


# ------------------------------------------------------------------ correctness


def check_against_reference(args) -> dict:
    """Fast path vs the reference at a small size, forward and gradients; raises if off.

    Random normal inputs: the selection of both sides must agree exactly (checked first);
    then the bf16 output and gradients within the bf16 tolerance of docs/performance.md."""
    from ..reference import lighthouse_attention_reference, plan

    n, topk = 16 * K, 512
    cfg = layer_config(args, topk)
    sets = random_inputs(args, n, 1, seed=1234)
    q, k, v, dout = sets[0]
    for t in (q, k, v):
        t.requires_grad_(True)
    ours, ref_plan = plan_selection(q, k, cfg), plan(q, k, cfg)
    if not (torch.equal(ours.level, ref_plan.level) and torch.equal(ours.index, ref_plan.index)):
        raise SystemExit("bench layer: the fast selection differs from the reference's")
    out = lighthouse_attention(q, k, v, cfg)
    ref = lighthouse_attention_reference(q, k, v, cfg)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    errors = {"out": rel(out, ref)}
    errors.update({f"d{x}": rel(a, b) for x, a, b in zip("qkv", grads, ref_grads, strict=True)})
    print(f"check vs reference (N={n}, k={topk}, {args.dtype}): selection identical; "
          + ", ".join(f"{key} rel err {val:.2e}" for key, val in errors.items()), flush=True)
    bad = {key: val for key, val in errors.items() if not (val < (1e-2 if key == "out" else 2e-2))}
    if bad:
        raise SystemExit(f"bench layer: fast path disagrees with the reference: {bad}")
    return errors


# ---------------------------------------------------------------------- timings


def sdpa_times(args, n: int, backend: str, warmup: int, reps: int) -> tuple[float, float]:
    """Dense causal attention on n fresh random tokens: (fwd ms, fwd+bwd ms)."""
    sets = random_inputs(args, n, 2, seed=n + 1)
    for x in sets:
        for t in x[:3]:
            t.requires_grad_(True)

    def fwd(i):
        q, k, v, _ = sets[i % 2]
        with torch.no_grad():
            dense_causal_attention(q, k, v, None, backend)

    def fwd_bwd(i):
        q, k, v, dout = sets[i % 2]
        out = dense_causal_attention(q, k, v, None, backend)
        torch.autograd.grad(out, (q, k, v), dout)

    return time_ms(fwd, warmup, reps), time_ms(fwd_bwd, warmup, reps)


def bench_dense(args, n: int) -> dict:
    fwd, fwd_bwd = sdpa_times(args, n, "cudnn", 1, args.dense_reps)
    return {"dense_fwd_ms": fwd, "dense_fwd_bwd_ms": fwd_bwd}


def bench_lighthouse(args, n: int, topk: int, bandwidth: float) -> dict:
    cfg = layer_config(args, topk)
    cfg.validate(n)
    s_len = cfg.gathered_length(n)
    sets = random_inputs(args, n, 2, seed=n + topk)
    for x in sets:
        for t in x[:3]:
            t.requires_grad_(True)
    w, r = args.warmup, args.reps

    def fwd(i):
        q, k, v, _ = sets[i % 2]
        with torch.no_grad():
            lighthouse_attention(q, k, v, cfg)

    def fwd_bwd(i):
        q, k, v, dout = sets[i % 2]
        out = lighthouse_attention(q, k, v, cfg)
        torch.autograd.grad(out, (q, k, v), dout)

    res = {"N": n, "topk": topk, "S": s_len}
    res["fwd_ms"] = time_ms(fwd, w, r)
    res["fwd_bwd_ms"] = time_ms(fwd_bwd, w, r)

    # Peak memory of one forward+backward, over what the inputs already hold.
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd(0)
    torch.cuda.synchronize()
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res["peak_mem_over_inputs_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30

    # Per-stage breakdown, each stage timed alone on precomputed inputs of the same run.
    plans, gathered, outs = [], [], []
    with torch.no_grad():
        for q, k, v, _ in sets:
            plans.append(plan_selection(q, k, cfg))
            gathered.append([pool_segments(x, plans[-1]).requires_grad_(True) for x in (q, k, v)])
            outs.append(dense_causal_attention(*gathered[-1], None, cfg.backend))
    scores = [score_pyramids(q, k, cfg) for q, k, _, _ in sets]
    hkv = sets[0][1].shape[2]
    d_o = [torch.randn_like(o) for o in outs]

    def attn_fb(i):
        gq, gk, gv = gathered[i % 2]
        out = dense_causal_attention(gq, gk, gv, None, cfg.backend)
        torch.autograd.grad(out, (gq, gk, gv), d_o[i % 2])

    def attn_f(i):
        with torch.no_grad():
            dense_causal_attention(*gathered[i % 2], None, cfg.backend)

    stages = {
        "scores": lambda i: score_pyramids(sets[i % 2][0], sets[i % 2][1], cfg),
        "select": lambda i: select(*scores[i % 2], args.batch, hkv, n, cfg),
        "gather": lambda i: [pool_segments(x, plans[i % 2]) for x in sets[i % 2][:3]],
        "attention_fwd": attn_f,
        "scatter": lambda i: feed_tokens(outs[i % 2], plans[i % 2]),
        "scatter_bwd": lambda i: feed_segments(sets[i % 2][3], plans[i % 2]),
        "attention_fwd_bwd": attn_fb,
        "gather_bwd": lambda i: [pool_tokens(x, plans[i % 2]) for x in gathered[i % 2]],
    }
    res["stages_ms"] = {name: time_ms(fn, w, r) for name, fn in stages.items()}
    st = res["stages_ms"]
    st["attention_bwd"] = st["attention_fwd_bwd"] - st["attention_fwd"]
    around_fwd = st["scores"] + st["select"] + st["gather"] + st["scatter"]
    res["around_attention_fwd_ms"] = around_fwd
    res["around_attention_fwd_bwd_ms"] = around_fwd + st["scatter_bwd"] + st["gather_bwd"]
    res["around_attention_frac"] = res["around_attention_fwd_bwd_ms"] / res["fwd_bwd_ms"]

    # Floor (docs/performance.md): dense attention on S fresh tokens, same shapes and kernel, plus
    # the memory passes at this card's copy rate.
    one_pass = args.batch * n * args.heads * args.head_dim * DTYPES[args.dtype].itemsize / bandwidth
    res["pass_ms"] = one_pass
    res["sdpa_S_fwd_ms"], res["sdpa_S_fwd_bwd_ms"] = sdpa_times(args, s_len, cfg.backend, w, r)
    res["floor_fwd_ms"] = res["sdpa_S_fwd_ms"] + 4 * one_pass
    res["floor_fwd_bwd_ms"] = res["sdpa_S_fwd_bwd_ms"] + 9 * one_pass
    res["fwd_vs_floor"] = res["fwd_ms"] / res["floor_fwd_ms"]
    res["fwd_bwd_vs_floor"] = res["fwd_bwd_ms"] / res["floor_fwd_bwd_ms"]
    return res


# ------------------------------------------------------------------------ output


def print_stages(rows: list[dict]) -> None:
    names = ["scores", "select", "gather", "attention_fwd", "scatter",
             "scatter_bwd", "attention_bwd", "gather_bwd"]
    head = f"{'N':>6} {'k':>5} " + " ".join(f"{x:>13}" for x in names) + f" {'around%':>8}"
    print("\nper-stage ms (each stage alone; 'around%' = stages around attention / layer fwd+bwd)")
    print(head)
    for r in rows:
        st = r["stages_ms"]
        print(f"{format_length(r['N']):>6} {r['topk']:>5} " + " ".join(f"{st[x]:13.3f}" for x in names)
              + f" {100 * r['around_attention_frac']:7.1f}%")


def print_table(rows: list[dict], device: str) -> None:
    print(f"\nLighthouse layer vs dense cuDNN SDPA on {device} (ms, median; x = dense / Lighthouse; "
          "floor = SDPA(S) + passes; around = stages around attention / layer fwd+bwd)")
    print(f"{'N':>6} {'k':>5} {'S':>7} | {'LH fwd':>8} {'dense fwd':>10} {'x':>6} {'/floor':>6} | "
          f"{'LH f+b':>8} {'dense f+b':>10} {'x':>6} | {'floor f+b':>9} {'/floor':>6} | {'around':>6} | "
          f"{'peak GiB':>8}")
    for r in rows:
        dense_f = r.get("dense_fwd_ms")
        dense_fb = r.get("dense_fwd_bwd_ms")
        sf = f"{dense_f:10.1f} {dense_f / r['fwd_ms']:5.1f}x" if dense_f else f"{'-':>10} {'-':>6}"
        sfb = f"{dense_fb:10.1f} {dense_fb / r['fwd_bwd_ms']:5.1f}x" if dense_fb else f"{'-':>10} {'-':>6}"
        print(f"{format_length(r['N']):>6} {r['topk']:>5} {r['S']:>7} | "
              f"{r['fwd_ms']:8.2f} {sf} {r['fwd_vs_floor']:6.2f} | "
              f"{r['fwd_bwd_ms']:8.2f} {sfb} | {r['floor_fwd_bwd_ms']:9.2f} {r['fwd_bwd_vs_floor']:6.2f} | "
              f"{100 * r['around_attention_frac']:5.1f}% | {r['peak_mem_gib']:8.1f}")


def plot(rows: list[dict], dense: dict, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ns = sorted(dense)
    if ns:
        ax.plot(ns, [dense[n]["dense_fwd_bwd_ms"] for n in ns], "k-o", label="dense cuDNN SDPA fwd+bwd")
        ax.plot(ns, [dense[n]["dense_fwd_ms"] for n in ns], "k--o", label="dense cuDNN SDPA fwd", alpha=0.6)
    for topk in sorted({r["topk"] for r in rows}):
        sub = sorted((r for r in rows if r["topk"] == topk), key=lambda r: r["N"])
        line = ax.plot([r["N"] for r in sub], [r["fwd_bwd_ms"] for r in sub], "-s",
                       label=f"Lighthouse k={topk} fwd+bwd")
        ax.plot([r["N"] for r in sub], [r["fwd_ms"] for r in sub], "--s", color=line[0].get_color(),
                alpha=0.6, label=f"Lighthouse k={topk} fwd")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"One attention layer, {device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.cp > 1:
        from .cp import run_cp

        return run_cp(args)
    if not torch.cuda.is_available():
        print("error: bench layer needs a CUDA GPU", file=sys.stderr)
        return 2
    te_error = "not tried"
    if args.backend in ("te", "auto"):
        # Transformer Engine must load before torch first uses cuDNN (below: the cuDNN
        # version, the reference check): TE builds that link another cuDNN than torch's
        # fail to load, or break torch's cuDNN, in the other order.
        te_error = te_import_error()
        if args.backend == "te" and te_error is not None:
            print(f"error: --backend te needs transformer_engine.pytorch, which does not import here "
                  f"({te_error})", file=sys.stderr)
            return 2
    import triton

    device = torch.cuda.get_device_name()
    meta = {
        "command": "lighthouse-megatron " + " ".join(sys.argv[1:]) if sys.argv else "",
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn_version(),
        "triton": triton.__version__,
        "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
        "head_dim": args.head_dim, "dtype": args.dtype, "levels": args.levels,
        "pooling_factor": args.pooling_factor, "tile_topk": args.tile_topk, "backend": args.backend,
        "warmup": args.warmup, "reps": args.reps, "dense_reps": args.dense_reps,
        # Stage 5 runs TE's fused attention with "te", and with "auto" where TE imports.
        "transformer_engine": te_error is None, "transformer_engine_error": te_error,
    }
    print(f"device {device}, torch {torch.__version__}, triton {triton.__version__}, "
          f"cudnn {meta['cudnn']}", flush=True)
    if not args.no_check:
        meta["check"] = check_against_reference(args)
    bandwidth = copy_bandwidth()
    meta["copy_bandwidth_tb_s"] = bandwidth * 1e3 / 1e12
    print(f"copy bandwidth {meta['copy_bandwidth_tb_s']:.2f} TB/s (read + write)", flush=True)

    rows, dense, skipped = [], {}, []
    for n in args.seq_lens:
        for topk in args.topks:
            try:
                layer_config(args, topk).validate(n)
            except ValueError as e:
                skipped.append({"N": n, "topk": topk, "reason": str(e)})
                print(f"skip N={n} k={topk}: {e}", flush=True)
                continue
            row = bench_lighthouse(args, n, topk, bandwidth)
            torch.cuda.empty_cache()  # the row's inputs are gone; hand their memory back
            rows.append(row)
            print(f"N={format_length(n)} k={topk} S={row['S']}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd "
                  f"{row['fwd_bwd_ms']:.2f} ms, floor {row['floor_fwd_bwd_ms']:.2f} ms", flush=True)
        if 0 < n <= args.dense_max_len and any(r["N"] == n for r in rows):
            dense[n] = bench_dense(args, n)
            torch.cuda.empty_cache()
            print(f"N={format_length(n)} dense cuDNN: fwd {dense[n]['dense_fwd_ms']:.1f} ms, fwd+bwd "
                  f"{dense[n]['dense_fwd_bwd_ms']:.1f} ms", flush=True)
    for r in rows:
        if r["N"] in dense:
            r.update(dense[r["N"]])
            r["speedup_fwd"] = r["dense_fwd_ms"] / r["fwd_ms"]
            r["speedup_fwd_bwd"] = r["dense_fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["speedup_ceiling_fwd_bwd"] = r["dense_fwd_bwd_ms"] / r["floor_fwd_bwd_ms"]

    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "layer.json", args.out / "layer.png"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=1))
    tmp.replace(json_path)
    try:
        plot(rows, dense, png_path, device)
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print_stages(rows)
    print_table(rows, device)
    print(f"\nwrote {json_path} and {png_path}")
    return 0 if all(math.isfinite(r["fwd_bwd_ms"]) for r in rows) else 1
