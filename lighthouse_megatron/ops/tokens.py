"""Kernel walking the base tokens: stage 6 (scatter back) and the gather's backward, each
written as one deterministic gather per base token. Twins: `twins.feed_tokens`,
`twins.pool_tokens`.

Base token t reads, at each level l, the gathered row of the entry covering it, found
through the plan's inverse map (slot or -1), and sums them in fp32: no atomics, so the
result is bitwise reproducible. One kernel serves two functions, by which entry covers t:

  feed_tokens   entry i = floor((t + 1) / c_l) - 1 fed t (its block ended at or before t):
                the scatter, out[t] = sum of the rows;
  pool_tokens   entry i = floor(t / c_l) pooled t: the gather's backward, t receives
                grad / c_l.

Under context parallelism a chunk's first p**(L-1) - 1 tokens are also fed by the last
entries of the chunk before it, which another rank may hold: `feed_tokens` takes those rows
as a `halo` [b, p**(L-1) - 1, H, d] added to the first tokens (`stages.spill_rows` computes
what a chunk hands on). The scatter's backward (sum of the output gradient over each entry's
range) walks the gathered slots: `segments.feed_segments`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import program_head, tl, triton
from .plan import SelectionPlan


@triton.jit
def _token_sum_kernel(
    g_ptr, out_ptr, inv_ptr, halo_ptr,
    n, total, heads, kv_heads, halo_len,
    stride_gb, stride_gs, stride_gh,
    stride_ob, stride_ot, stride_oh,
    stride_hb, stride_ht, stride_hh,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    P: tl.constexpr, LEVELS: tl.constexpr, FEED: tl.constexpr, HAS_HALO: tl.constexpr,
):
    pid = tl.program_id(0)
    b, h, unit = program_head(heads, kv_heads, GROUP)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n
    dd = tl.arange(0, BLOCK_D)
    d_ok = (dd < D)[None, :]
    g_base = g_ptr + b * stride_gb + h * stride_gh + dd[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    offset = n * 0
    c = 1  # block size of the level, a compile-time constant in the unrolled loop
    for _level in tl.static_range(LEVELS):
        if FEED:
            i = (t + 1) // c - 1
        else:
            i = t // c
        ok = t_ok & (i >= 0)
        slot = tl.load(inv_ptr + unit * total + offset + i, mask=ok, other=-1)
        ok = ok & (slot >= 0)
        rows = tl.load(g_base + slot.to(tl.int64)[:, None] * stride_gs, mask=ok[:, None] & d_ok, other=0.0)
        if FEED:
            acc += rows.to(tl.float32)
        else:
            acc += rows.to(tl.float32) * (1.0 / c)
        offset += n // c
        c = c * P
    if HAS_HALO:
        h_ok = t_ok & (t < halo_len)
        h_ptrs = halo_ptr + b * stride_hb + h * stride_hh + t.to(tl.int64)[:, None] * stride_ht + dd[None, :]
        acc += tl.load(h_ptrs, mask=h_ok[:, None] & d_ok, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + dd[None, :]
    o_ptrs += t.to(tl.int64)[:, None] * stride_ot
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok)


# Launch settings from the H100 sweep in benchmarks/layer/tune_kernels.log (128K-512K tokens, d = 128):
# block and warp counts moved each kernel by under 5% there; not swept on other GPUs.
TOKEN_SUM_LAUNCH = {"block_t": 16, "num_warps": 2}


def feed_tokens(o: Tensor, plan: SelectionPlan, halo: Tensor | None = None, **launch) -> Tensor:
    """The scatter: [b, S, H, d] -> [b, n, H, d], per base token the fp32 sum over levels of the
    rows of the entries feeding it, plus `halo[:, t]` for the first tokens; in `o`'s dtype."""
    return _token_sum(o, plan, True, halo, launch)


def pool_tokens(g: Tensor, plan: SelectionPlan, **launch) -> Tensor:
    """The gather's backward: [b, S, H, d] -> [b, n, H, d], per base token the fp32 sum over
    levels of the gradient / c_l of the entry pooling it."""
    return _token_sum(g, plan, False, None, launch)


def _token_sum(g: Tensor, plan: SelectionPlan, feed: bool, halo: Tensor | None, launch: dict) -> Tensor:
    b, s_len, heads, d = g.shape
    n = plan.seq_len
    if g.stride(-1) != 1:
        g = g.contiguous()
    out = torch.empty(b, n, heads, d, dtype=g.dtype, device=g.device)
    if halo is not None and halo.stride(-1) != 1:
        halo = halo.contiguous()
    h_arg = out if halo is None else halo  # any pointer; unread without a halo
    opts = {**TOKEN_SUM_LAUNCH, **launch}
    block_d = triton.next_power_of_2(d)
    block_t = max(1, min(opts["block_t"], 8192 // block_d))
    grid = (triton.cdiv(n, block_t), b * heads)
    _token_sum_kernel[grid](
        g, out, plan.inverse, h_arg, n, plan.inverse.shape[-1], heads, plan.kv_heads,
        0 if halo is None else halo.shape[1],
        g.stride(0), g.stride(1), g.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h_arg.stride(0), h_arg.stride(1), h_arg.stride(2),
        GROUP=heads // plan.kv_heads, D=d, BLOCK_D=block_d, BLOCK_T=block_t,
        P=plan.pooling_factor, LEVELS=plan.levels, FEED=feed, HAS_HALO=halo is not None,
        num_warps=opts["num_warps"],
    )
    return out

