"""Stages 1 and 5 input: pooled q, k, v of the planned entries, pooling on the fly.

No pyramid of q, k, v is ever stored: each gathered row is the fp32 sum of its entry's
block of base rows, read straight from the base tensor. The same "segment sum" kernel also
serves the scatter's backward pass, so both live here. Its mode names the token range of a
slot's entry (l, i) with block size c = p**l:

  "pool"   [i * c, (i + 1) * c - 1], the tokens it pools: the slot gets their mean (gather);
  "feed"   [e, e + c - 1] with e = (i + 1) * c - 1, the tokens its output feeds, clipped to
           the sequence: the slot gets their sum (the scatter's backward).

The gather's backward (spread each gathered gradient over its block, divided by c_l) is the
per-token kernel of `scatter.py` in "pool" mode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import tl, triton, use_triton
from .scores import level_offsets
from .select import SelectionPlan


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
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    unit = (b * kv_heads + h // GROUP).to(tl.int64)
    b = b.to(tl.int64)  # head-major inputs: h * stride_h can pass 2**31
    h = h.to(tl.int64)
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


MODES = ("pool", "feed")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"segment mode must be one of {list(MODES)}, got {mode!r}")


def segment_sum(x: Tensor, plan: SelectionPlan, mode: str, out: Tensor | None = None, **launch) -> Tensor:
    """[b, n, H, d] -> [b, S, H, d]: per gathered slot, the mean of the tokens its entry pools
    (mode "pool") or the sum over the tokens it feeds (mode "feed"); see the module docstring.
    `out` may be a strided view (a chunk of a larger buffer) to write into."""
    _check_mode(mode)
    if not use_triton(x):
        result = segment_sum_torch(x, plan, mode)
        return result if out is None else out.copy_(result)
    b, n, heads, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    s_len = plan.length
    if out is None:
        out = torch.empty(b, s_len, heads, d, dtype=x.dtype, device=x.device)
    assert out.shape == (b, s_len, heads, d) and out.stride(-1) == 1
    opts = {**SEGMENT_SUM_LAUNCH, **launch}
    block_d = triton.next_power_of_2(d)
    block_s = max(1, min(opts["block_s"], 8192 // block_d))
    coarsest = plan.pooling_factor ** (plan.levels - 1)
    grid = (triton.cdiv(s_len, block_s), b * heads)
    _segment_sum_kernel[grid](
        x, out, plan.level, plan.index, n, s_len, heads, plan.kv_heads,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        GROUP=heads // plan.kv_heads, D=d, BLOCK_D=block_d, BLOCK_S=block_s,
        LOG2P=plan.pooling_factor.bit_length() - 1, C=coarsest, FEED=mode == "feed",
        UNROLL=opts["unroll"] and coarsest <= 64, num_warps=opts["num_warps"],
    )
    return out


def gather_pooled(x: Tensor, plan: SelectionPlan, out: Tensor | None = None) -> Tensor:
    """Pooled rows of the planned entries, [b, n, H, d] -> [b, S, H, d] (model dtype)."""
    return segment_sum(x, plan, "pool", out=out)


def segment_sum_torch(x: Tensor, plan: SelectionPlan, mode: str) -> Tensor:
    """Plain-PyTorch twin of `segment_sum`: each range summed on its own in fp32, as the kernel
    does (a prefix sum would let one huge token erase the digits of every later range)."""
    b, n, heads, d = x.shape
    group = heads // plan.kv_heads
    p = plan.pooling_factor
    tables = []
    for level in range(plan.levels):
        c = p**level
        # "feed" ranges start c - 1 tokens later than "pool" blocks: shift, then sum aligned blocks.
        shift = c - 1 if mode == "feed" else 0
        xs = torch.nn.functional.pad(x[:, shift:].float(), (0, 0, 0, 0, 0, shift))
        sums = xs.reshape(b, n // c, c, heads, d).sum(dim=2)
        tables.append(sums / c if mode == "pool" else sums)
    table = torch.cat(tables, dim=1)  # [b, sum of level lengths, H, d]
    lvl = plan.level.reshape(b, plan.kv_heads, -1).repeat_interleave(group, dim=1).transpose(1, 2).long()
    idx = plan.index.reshape(b, plan.kv_heads, -1).repeat_interleave(group, dim=1).transpose(1, 2).long()
    row = torch.tensor(level_offsets(n, p, plan.levels)[:-1], device=x.device)[lvl] + idx  # [b, S, H]
    return table.gather(1, row.unsqueeze(-1).expand(-1, -1, -1, d)).to(x.dtype)
