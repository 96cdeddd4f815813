"""`python -m benchmarks.failure_modes.run`: where Lighthouse attention is weak, measured.

Parts (--parts, any subset, in this order):

  short      one layer fwd+bwd at short lengths (default 8K-64K): Lighthouse against dense
             cuDNN SDPA in the same process; a speed-up below 1 is where Lighthouse loses
  memory     peak memory of one Lighthouse layer fwd+bwd at 1M and 2M tokens
  topk       k up to its largest valid value N/p^(L-1) at one length: gathered length S/N,
             output error against dense attention, and (on a GPU) fwd+bwd time against dense
  qknorm     what QK layer-norm does to the norm scores: spread of the norms, overlap of the
             tokens selected with and without layer-normed q/k, and the output error against
             dense attention of each, beside a random-selection control
  causality  the selection is not causal: scale the norms of the tokens after t and
             measure how much out[..t] moves (dense attention: exactly zero)

`short` and `memory` time the fast path (`lighthouse_attention`) and need a GPU for real
numbers (on the CPU they run the code path at the sizes given). `qknorm`, `causality` and
the error columns of `topk` are exact fp32 computations at small sizes (--probe-*), on the
CPU by default. The probe inputs are "realistic" in a cheap way: bytes of the Python
standard library's own source files (real structured text, on every machine) embedded by
a random table, mixed with the previous byte, projected to q, k, v by random matrices,
with RoPE on q and k.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from lighthouse_megatron import reference
from lighthouse_megatron.attention import lighthouse_attention
from lighthouse_megatron.backends import dense_causal_attention
from lighthouse_megatron.config import LighthouseConfig

from .._common import (
    K,
    UsageError,
    check_writable,
    main,
    median,
    run_meta,
    sync,
    time_ms,
    usage_errors_as_exit_2,
    write_json,
)
from .._common import format_length as _fmt_len
from .._common import parse_length as _int
from .._common import parse_lengths as _int_list

PARTS = ("short", "memory", "topk", "qknorm", "causality")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_failure_modes_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("failure-modes", help="where Lighthouse is slower, heavier or off (GPU and CPU parts)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device of the timed parts")
    layer = p.add_argument_group("timed parts (short, memory, topk timing): one attention layer")
    layer.add_argument("--heads", type=int, default=8)
    layer.add_argument("--head-dim", type=int, default=128)
    layer.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    layer.add_argument("--levels", type=int, default=3)
    layer.add_argument("--pooling-factor", type=int, default=4)
    layer.add_argument("--tile-topk", type=int, default=128)
    layer.add_argument("--short-lens", type=_int_list, default=[8 * K, 16 * K, 32 * K, 64 * K])
    layer.add_argument("--short-topks", type=_int_list, default=[512, 1024, 2048],
                       help="budgets tried at each short length (invalid pairs are recorded and skipped)")
    layer.add_argument("--memory-lens", type=_int_list, default=[1024 * K, 2048 * K])
    layer.add_argument("--memory-topk", type=int, default=4096)
    layer.add_argument("--topk-len", type=_int, default=32 * K,
                       help="length of the timed k sweep (0: untimed)")
    layer.add_argument("--warmup", type=int, default=2)
    layer.add_argument("--reps", type=int, default=5)
    probe = p.add_argument_group("probes (qknorm, causality, topk errors): exact fp32")
    probe.add_argument("--probe-device", choices=("cpu", "cuda"), default="cpu")
    probe.add_argument("--probe-len", type=_int, default=4096)
    probe.add_argument("--probe-heads", type=int, default=2)
    probe.add_argument("--probe-head-dim", type=int, default=64)
    probe.add_argument("--probe-topk", type=int, default=128)
    probe.add_argument("--probe-tile-topk", type=int, default=16)
    probe.add_argument("--probe-seeds", type=int, default=3, help="independent draws averaged")
    p.add_argument("--out", type=Path, default=Path("benchmarks/failure_modes/results"))
    p.add_argument("--name", default="failure_modes")
    p.add_argument("--force", action="store_true", help="overwrite an existing NAME.json")
    p.set_defaults(func=run_cli)


# ----------------------------------------------------------------------- inputs


def _random_qkv(args, n: int, device, seed: int, grad: bool = True):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, n, args.heads, args.head_dim)
    out = [torch.randn(shape, device=device, dtype=DTYPES[args.dtype], generator=g) for _ in range(4)]
    for t in out[:3]:
        t.requires_grad_(grad)
    return out


def text_bytes(n: int, seed: int) -> torch.Tensor:
    """n bytes of real text: the standard library's Python sources, from a seeded offset."""
    root = Path(os.__file__).parent
    files = sorted(root.glob("*.py"))
    data = b"".join(f.read_bytes() for f in files[:60])
    if len(data) < n:
        raise UsageError(f"--probe-len {n}: only {len(data)} bytes of text found under {root}")
    g = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, len(data) - n + 1, (1,), generator=g))
    return torch.frombuffer(bytearray(data[offset : offset + n]), dtype=torch.uint8).long()


def _rope(x: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    b, n, h, d = x.shape
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * freq
    cos, sin = ang.cos().to(x)[None, :, None], ang.sin().to(x)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def text_qkv(args, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [1, n, H, d] fp32: random projections of embedded real text, RoPE on q and k."""
    n, h, d = args.probe_len, args.probe_heads, args.probe_head_dim
    width = h * d
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(256, width, generator=g)
    ids = text_bytes(n, seed)
    prev = torch.cat([ids[:1], ids[:-1]])
    x = table[ids] + 0.5 * table[prev]
    q, k, v = ((x @ (torch.randn(width, width, generator=g) / math.sqrt(width))).reshape(1, n, h, d)
               for _ in range(3))
    return _rope(q).to(device), _rope(k).to(device), v.to(device)


def layer_norm_heads(x: torch.Tensor) -> torch.Tensor:
    """Megatron's qk_layernorm: LayerNorm over each head's d channels (unit gain, zero bias)."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:])


def _probe_config(args, topk: int | None = None) -> LighthouseConfig:
    return LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor,
                            topk=topk or args.probe_topk, tile_topk=args.probe_tile_topk, backend="math")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _with_plan(q, k, v, plan, cfg) -> torch.Tensor:
    """Reference stages 1, 5 and 6 under a given selection plan."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    o = reference.causal_attention(*(reference.gather(reference.pyramid(x, cfg), plan) for x in (q, k, v)),
                                   scale)
    return reference.scatter(o, plan, cfg, q.shape[1])


def _base_tokens(plan) -> list[set[int]]:
    """Per selection unit: the tokens attended at full resolution (level 0)."""
    lvl, idx = plan.level.flatten(0, 1), plan.index.flatten(0, 1)
    return [set(i[lv == 0].tolist()) for lv, i in zip(lvl, idx, strict=True)]


def _jaccard(a: list[set[int]], b: list[set[int]]) -> float:
    return sum(len(x & y) / len(x | y) for x, y in zip(a, b, strict=True)) / len(a)


# ------------------------------------------------------------------------ parts


def _fwd_bwd_ms(fn, args, n: int, device, seed: int) -> float:
    sets = [_random_qkv(args, n, device, seed + i) for i in range(2)]

    def run(i):
        q, k, v, dout = sets[i % 2]
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)

    return median(time_ms(run, args.warmup, args.reps, device))


def _dense_fn(device):
    backend = "cudnn" if device.type == "cuda" else "auto"  # the baseline of bench layer
    return lambda q, k, v: dense_causal_attention(q, k, v, None, backend)


def _lighthouse_fn(cfg):
    return lambda q, k, v: lighthouse_attention(q, k, v, cfg)


def _stage5(device) -> str:
    """What backend "auto" runs stage 5 with here."""
    from lighthouse_megatron.backends import te_available

    if device.type != "cuda":
        return "sdpa"
    return "te" if te_available() else "sdpa (cudnn first)"


def _layer_config(args, n: int, topk: int) -> LighthouseConfig:
    cfg = LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=topk,
                           tile_topk=args.tile_topk)
    cfg.validate(n)
    return cfg


def part_short(args, device) -> dict:
    rows, skipped = [], []
    for n in args.short_lens:
        dense = _fwd_bwd_ms(_dense_fn(device), args, n, device, n)
        for topk in args.short_topks:
            try:
                cfg = _layer_config(args, n, topk)
            except ValueError as e:
                skipped.append({"N": n, "topk": topk, "reason": str(e)})
                continue
            ms = _fwd_bwd_ms(_lighthouse_fn(cfg), args, n, device, n + 1)
            rows.append({"N": n, "topk": topk, "S": cfg.gathered_length(n), "fwd_bwd_ms": ms,
                         "dense_fwd_bwd_ms": dense, "speedup": dense / ms})
            print(f"short N={_fmt_len(n)} k={topk} S={cfg.gathered_length(n)}: Lighthouse {ms:.2f} ms, "
                  f"dense {dense:.2f} ms, x{dense / ms:.2f}", flush=True)
    return {"rows": rows, "skipped": skipped}


def part_memory(args, device) -> dict:
    rows = []
    for n in args.memory_lens:
        row = {"N": n, "topk": args.memory_topk}
        try:
            cfg = _layer_config(args, n, args.memory_topk)
            row["S"] = cfg.gathered_length(n)
            q, k, v, dout = _random_qkv(args, n, device, n)
            sync(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out = lighthouse_attention(q, k, v, cfg)
            torch.autograd.grad(out, (q, k, v), dout)
            sync(device)
            row["fwd_bwd_s_first_call"] = time.perf_counter() - t0
            row["inputs_gib"] = 4 * q.numel() * q.element_size() / 2**30
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                row["peak_over_inputs_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            del q, k, v, dout, out
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        except ValueError as e:
            row["error"] = str(e)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"memory N={_fmt_len(n)} k={args.memory_topk}: "
              + (row.get("error") or f"peak {row.get('peak_mem_gib', float('nan')):.1f} GiB"), flush=True)
    return {"rows": rows}


def part_topk(args, device, probe_device) -> dict:
    """k from small to N / p^(L-1): error against dense (probe sizes) and time (timed sizes)."""
    def budgets(n: int, tile: int) -> list[int]:
        top = n // args.pooling_factor ** (args.levels - 1)
        ks, k = [], tile
        while k <= top:
            ks.append(k)
            k *= 2
        return ks if ks and ks[-1] == top else ks + [top]

    errors = []
    q, k, v = text_qkv(args, 0, probe_device)
    dense = reference.causal_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    for topk in budgets(args.probe_len, args.probe_tile_topk):
        cfg = _probe_config(args, topk)
        try:
            cfg.validate(args.probe_len)
        except ValueError:
            continue
        out = reference.lighthouse_attention_reference(q, k, v, cfg)
        errors.append({"N": args.probe_len, "topk": topk, "S": cfg.gathered_length(args.probe_len),
                       "S_over_N": cfg.gathered_length(args.probe_len) / args.probe_len,
                       "rel_err_vs_dense": _rel(out, dense)})
        print(f"topk N={args.probe_len} k={topk} S/N={errors[-1]['S_over_N']:.2f}: rel err vs dense "
              f"{errors[-1]['rel_err_vs_dense']:.3f}", flush=True)
    timings = []
    n = args.topk_len
    if n == 0:
        return {"errors": errors, "timings": timings}
    dense_ms = _fwd_bwd_ms(_dense_fn(device), args, n, device, n)
    for topk in budgets(n, args.tile_topk):
        try:
            cfg = _layer_config(args, n, topk)
        except ValueError:
            continue
        ms = _fwd_bwd_ms(_lighthouse_fn(cfg), args, n, device, n + 1)
        s_len = cfg.gathered_length(n)
        timings.append({"N": n, "topk": topk, "S": s_len, "S_over_N": s_len / n, "fwd_bwd_ms": ms,
                        "dense_fwd_bwd_ms": dense_ms, "speedup": dense_ms / ms})
        print(f"topk N={_fmt_len(n)} k={topk} S/N={timings[-1]['S_over_N']:.2f}: {ms:.2f} ms, dense "
              f"{dense_ms:.2f} ms", flush=True)
    return {"errors": errors, "timings": timings}


def part_qknorm(args, probe_device) -> dict:
    cfg = _probe_config(args)
    cfg.validate(args.probe_len)
    draws = []
    for seed in range(args.probe_seeds):
        q, k, v = text_qkv(args, seed, probe_device)
        qn, kn = layer_norm_heads(q), layer_norm_heads(k)
        scale = 1.0 / math.sqrt(q.shape[-1])
        g = torch.Generator().manual_seed(10_000 + seed)
        noise = [torch.rand(q.shape, generator=g).to(probe_device) for _ in range(2)]
        random_plan = reference.plan(*noise, cfg)  # scores of random tensors: a random selection
        raw_plan, normed_plan = reference.plan(q, k, cfg), reference.plan(qn, kn, cfg)
        # In fp32 LayerNorm's epsilon leaves norms that differ by ~1e-6 and still rank by each
        # token's spread; a bf16 model's q and k round those differences away.
        bf16_plan = reference.plan(qn.bfloat16(), kn.bfloat16(), cfg)
        dense_raw = reference.causal_attention(q, k, v, scale)
        dense_normed = reference.causal_attention(qn, kn, v, scale)

        def spread(x):
            norms = torch.linalg.vector_norm(x.float(), dim=-1)
            return (norms.std() / norms.mean()).item()

        draws.append({
            "seed": seed,
            "norm_cv_q": spread(q), "norm_cv_k": spread(k),
            "norm_cv_q_layernormed": spread(qn), "norm_cv_k_layernormed": spread(kn),
            "overlap_raw_vs_layernormed": _jaccard(_base_tokens(raw_plan), _base_tokens(normed_plan)),
            "overlap_raw_vs_random": _jaccard(_base_tokens(raw_plan), _base_tokens(random_plan)),
            "rel_err_raw": _rel(_with_plan(q, k, v, raw_plan, cfg), dense_raw),
            "rel_err_raw_random_selection": _rel(_with_plan(q, k, v, random_plan, cfg), dense_raw),
            "overlap_raw_vs_layernormed_bf16": _jaccard(_base_tokens(raw_plan), _base_tokens(bf16_plan)),
            "rel_err_layernormed": _rel(_with_plan(qn, kn, v, normed_plan, cfg), dense_normed),
            "rel_err_layernormed_bf16": _rel(_with_plan(qn, kn, v, bf16_plan, cfg), dense_normed),
            "rel_err_layernormed_random_selection":
                _rel(_with_plan(qn, kn, v, random_plan, cfg), dense_normed),
        })
    mean = {key: sum(d[key] for d in draws) / len(draws) for key in draws[0] if key != "seed"}
    print("qknorm (mean of draws): " + ", ".join(f"{key} {val:.3f}" for key, val in mean.items()), flush=True)
    return {"N": args.probe_len, "S": cfg.gathered_length(args.probe_len), "config": cfg.to_dict(),
            "mean": mean, "draws": draws}


def part_causality(args, probe_device, factor: float = 3.0) -> dict:
    """Scale q and k of the tokens after t by `factor` (their norms change, nothing before t
    does) and measure the change of out[..t], for Lighthouse and, as control, dense attention."""
    cfg = _probe_config(args)
    cfg.validate(args.probe_len)
    n = args.probe_len
    tile = n // cfg.num_tiles  # base tokens per tile
    ts = sorted({tile // 2, tile - 1, n // 2 + tile // 3, n - tile // 4})
    rows = []
    q, k, v = text_qkv(args, 0, probe_device)
    out = lighthouse_attention(q, k, v, cfg)
    dense = dense_causal_attention(q, k, v, None, "math")
    for t in ts:
        scale = torch.ones(1, n, 1, 1, device=probe_device)
        scale[:, t + 1 :] = factor
        out2 = lighthouse_attention(q * scale, k * scale, v, cfg)
        dense2 = dense_causal_attention(q * scale, k * scale, v, None, "math")
        before, after = out[:, : t + 1].float(), out2[:, : t + 1].float()
        # Relative to the mean token norm: Lighthouse may give a token no output at all.
        token_change = ((after - before).norm(dim=(2, 3)) / before.norm(dim=(2, 3)).mean()).squeeze(0)
        moved = token_change > 1e-6
        first = int(moved.nonzero().min()) if moved.any() else None
        rows.append({
            "t": t, "tile_length": tile, "position_in_tile": t % tile,
            "rel_change_out_upto_t": _rel(after, before),
            "max_token_rel_change": token_change.max().item(),
            "tokens_changed_frac": moved.float().mean().item(),
            "earliest_changed_token": first,
            "dense_rel_change_out_upto_t": _rel(dense2[:, : t + 1], dense[:, : t + 1]),
        })
        r = rows[-1]
        print(f"causality t={t} (tile {t // tile}, offset {t % tile}): out[..t] moved "
              f"{r['rel_change_out_upto_t']:.2e} "
              f"(max token {r['max_token_rel_change']:.2e}, {100 * r['tokens_changed_frac']:.1f}% of tokens, "
              f"earliest {first}); dense {r['dense_rel_change_out_upto_t']:.1e}", flush=True)
    return {"N": n, "factor": factor, "config": cfg.to_dict(), "rows": rows}


# ------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not parts or any(x not in PARTS for x in parts):
        raise UsageError(f"--parts {args.parts!r}: valid parts are {', '.join(PARTS)}")
    device, probe_device = torch.device(args.device), torch.device(args.probe_device)
    timed = {"short", "memory"} & set(parts) or ("topk" in parts and args.topk_len > 0)
    for d, flag, needed in ((device, "--device", timed), (probe_device, "--probe-device", True)):
        if needed and d.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"{flag} cuda: no CUDA GPU here; use {flag} cpu")
    try:
        _probe_config(args).validate(args.probe_len)
    except ValueError as e:
        raise UsageError(f"--probe-len/--probe-topk/--probe-tile-topk: {e}") from None
    out_path = args.out / f"{args.name}.json"
    check_writable(out_path, args.force)
    if device.type == "cuda":
        # Transformer Engine (stage 5 under "auto") must load before torch first uses cuDNN.
        from lighthouse_megatron.backends import te_available

        te_available()
    meta = run_meta(device if timed else probe_device)
    meta["stage5_kernel"] = _stage5(device)
    meta.update(parts=parts, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, levels=args.levels,
                pooling_factor=args.pooling_factor, tile_topk=args.tile_topk, probe_device=args.probe_device,
                probe={"N": args.probe_len, "heads": args.probe_heads, "head_dim": args.probe_head_dim,
                       "topk": args.probe_topk, "tile_topk": args.probe_tile_topk, "dtype": "fp32",
                       "inputs": "stdlib Python source bytes, random embeddings and projections, RoPE"})
    print(f"device {meta['device']} ({meta['nvidia_smi']}); probes on {args.probe_device}", flush=True)
    results = {}
    start = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        if part == "short":
            results[part] = part_short(args, device)
        elif part == "memory":
            results[part] = part_memory(args, device)
        elif part == "topk":
            results[part] = part_topk(args, device, probe_device)
        elif part == "qknorm":
            results[part] = part_qknorm(args, probe_device)
        else:
            results[part] = part_causality(args, probe_device)
        results[part]["seconds"] = time.perf_counter() - t0
        meta["wall_s"] = time.perf_counter() - start
        # After every part: a run cut short by a time limit keeps what it measured.
        write_json(out_path, {"meta": meta, **results})
    print(f"\nwrote {out_path}")
    return 0


run_cli = usage_errors_as_exit_2(run)


if __name__ == "__main__":
    sys.exit(main(add_failure_modes_parser, "benchmarks.failure_modes.run"))
