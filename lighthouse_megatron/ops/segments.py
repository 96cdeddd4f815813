"""Kernel walking the gathered slots: stages 1 and 5 input (pooled q, k, v of the planned
entries, pooling on the fly) and the scatter's backward. Twins: `twins.pool_segments`,
`twins.feed_segments`.

No pyramid of q, k, v is ever stored: each gathered row is the fp32 sum of its entry's
block of base rows, read straight from the base tensor. One "segment sum" kernel serves two
functions, each summing a token range of every slot's entry (l, i), block size c = p**l:

  pool_segments   [i * c, (i + 1) * c - 1], the tokens it pools: their mean (the gather);
  feed_segments   [e, e + c - 1] with e = (i + 1) * c - 1, the tokens its output feeds,
                  clipped to the sequence: their sum (the scatter's backward).

The gather's backward (spread each gathered gradient over its block, divided by c_l) walks
the base tokens: `tokens.pool_tokens`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import program_head, tl, triton
from .plan import SelectionPlan


@triton.jit
def _segment_sum_kernel(
    x_ptr, out_ptr, level_ptr, index_ptr,
    n, S, heads, kv_heads,
    stride_xb, stride_xt, stride_xh,
    stride_ob, stride_os, stride_oh,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    LOG2P: tl.constexpr, C: tl.constexpr, FEED: tl.constexpr, UNROLL: tl.constexpr,
):
    # One program per (block of gathered slots, batch * head); slots are axis 0 (unbounded).
    pid = tl.program_id(0)
    b, h, unit = program_head(heads, kv_heads, GROUP)
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    lvl = tl.load(level_ptr + unit * S + s, mask=s_ok, other=0)
    idx = tl.load(index_ptr + unit * S + s, mask=s_ok, other=0)
    c = 1 << (lvl * LOG2P)
    if FEED:
        start = (idx + 1) * c - 1
    else:
        start = idx * c
    dd = tl.arange(0, BLOCK_D)
    d_ok = (dd < D)[None, :]
    x_base = x_ptr + b * stride_xb + h * stride_xh + dd[None, :]
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    # Mixed levels share a block, so loop to the coarsest block size and mask per row:
    # masked rows issue no memory traffic. Unrolled, the loads of all rows are in flight
    # at once instead of one row per round trip.
    if UNROLL:
        for r in tl.static_range(C):
            t = start + r
            ok = s_ok & (r < c) & (t < n)
            rows = tl.load(x_base + t.to(tl.int64)[:, None] * stride_xt, mask=ok[:, None] & d_ok, other=0.0)
            acc += rows.to(tl.float32)
    else:
        for r in range(C):
            t = start + r
            ok = s_ok & (r < c) & (t < n)
            rows = tl.load(x_base + t.to(tl.int64)[:, None] * stride_xt, mask=ok[:, None] & d_ok, other=0.0)
            acc += rows.to(tl.float32)
    if not FEED:
        acc = acc / c.to(tl.float32)[:, None]
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + dd[None, :]
    o_ptrs += s.to(tl.int64)[:, None] * stride_os
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=s_ok[:, None] & d_ok)


# Launch settings from the H100 sweep in benchmarks/layer/tune_kernels.log (128K-512K tokens, d = 128):
# block and warp counts moved each kernel by under 5% there; not swept on other GPUs.
SEGMENT_SUM_LAUNCH = {"block_s": 16, "num_warps": 4, "unroll": True}


def pool_segments(x: Tensor, plan: SelectionPlan, **launch) -> Tensor:
    """The gather: [b, n, H, d] -> [b, S, H, d], per gathered slot the mean of the tokens its
    entry pools."""
    return _segment_sum(x, plan, False, launch)


def feed_segments(g: Tensor, plan: SelectionPlan, **launch) -> Tensor:
    """The scatter's backward: [b, n, H, d] -> [b, S, H, d], per gathered slot the sum of `g`
    over the tokens its entry feeds."""
    return _segment_sum(g, plan, True, launch)


def _segment_sum(x: Tensor, plan: SelectionPlan, feed: bool, launch: dict) -> Tensor:
    b, n, heads, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    s_len = plan.length
    out = torch.empty(b, s_len, heads, d, dtype=x.dtype, device=x.device)
    opts = {**SEGMENT_SUM_LAUNCH, **launch}
    block_d = triton.next_power_of_2(d)
    block_s = max(1, min(opts["block_s"], 8192 // block_d))
    coarsest = plan.pooling_factor ** (plan.levels - 1)
    grid = (triton.cdiv(s_len, block_s), b * heads)
    _segment_sum_kernel[grid](
        x, out, plan.level, plan.index, n, s_len, heads, plan.kv_heads,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        GROUP=heads // plan.kv_heads, D=d, BLOCK_D=block_d, BLOCK_S=block_s,
        LOG2P=plan.pooling_factor.bit_length() - 1, C=coarsest, FEED=feed,
        UNROLL=opts["unroll"] and coarsest <= 64, num_warps=opts["num_warps"],
    )
    return out

