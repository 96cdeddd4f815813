"""Stage 6: scatter back, written as one deterministic gather per base token.

Base token t reads, at each level l, the gathered row of the entry covering it, found
through the plan's inverse map (slot or -1), and sums them in fp32: no atomics, so the
result is bitwise reproducible. The cover differs between the two users of the kernel:

  scatter forward   entry i = floor((t + 1) / c_l) - 1 fed t (its block ended at or before t);
  gather backward   entry i = floor(t / c_l) pooled t, so t receives grad / c_l.

The scatter's backward (sum of the output gradient over each entry's range) is the segment
sum kernel of `gather.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import tl, triton, use_triton
from .scores import level_offsets
from .select import SelectionPlan


@triton.jit
def _token_gather_kernel(
    g_ptr, out_ptr, inv_ptr,
    n, total, heads, kv_heads,
    stride_gb, stride_gs, stride_gh,
    stride_ob, stride_ot, stride_oh,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    P: tl.constexpr, LEVELS: tl.constexpr, SCATTER_FWD: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    unit = (b * kv_heads + h // GROUP).to(tl.int64)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n
    dd = tl.arange(0, BLOCK_D)
    d_ok = (dd < D)[None, :]
    g_base = g_ptr + b.to(tl.int64) * stride_gb + h * stride_gh + dd[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    offset = n * 0
    c = 1  # block size of the level, a compile-time constant in the unrolled loop
    for _level in tl.static_range(LEVELS):
        if SCATTER_FWD:
            i = (t + 1) // c - 1
        else:
            i = t // c
        ok = t_ok & (i >= 0)
        slot = tl.load(inv_ptr + unit * total + offset + i, mask=ok, other=-1)
        ok = ok & (slot >= 0)
        rows = tl.load(g_base + slot.to(tl.int64)[:, None] * stride_gs, mask=ok[:, None] & d_ok, other=0.0)
        if SCATTER_FWD:
            acc += rows.to(tl.float32)
        else:
            acc += rows.to(tl.float32) * (1.0 / c)
        offset += n // c
        c = c * P
    o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + dd[None, :]
    o_ptrs += t.to(tl.int64)[:, None] * stride_ot
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok)


# Launch settings (tuned on an H100 at 128K-512K tokens, d = 128; see benchmarks/layer/NOTES.md).
TOKEN_GATHER_LAUNCH = {"block_t": 16, "num_warps": 2}


def token_gather(g: Tensor, plan: SelectionPlan, scatter_fwd: bool, **launch) -> Tensor:
    """[b, S, H, d] -> [b, n, H, d]: per base token, the fp32 sum over levels of the rows of
    the covering emitted entries (scatter forward), or of their gradients / c_l (gather
    backward)."""
    if not use_triton(g):
        return token_gather_torch(g, plan, scatter_fwd)
    b, s_len, heads, d = g.shape
    n = plan.seq_len
    if g.stride(-1) != 1:
        g = g.contiguous()
    out = torch.empty(b, n, heads, d, dtype=g.dtype, device=g.device)
    opts = {**TOKEN_GATHER_LAUNCH, **launch}
    block_d = triton.next_power_of_2(d)
    block_t = max(1, min(opts["block_t"], 8192 // block_d))
    grid = (triton.cdiv(n, block_t), b * heads)
    _token_gather_kernel[grid](
        g, out, plan.inverse, n, plan.inverse.shape[1], heads, plan.kv_heads,
        g.stride(0), g.stride(1), g.stride(2), out.stride(0), out.stride(1), out.stride(2),
        GROUP=heads // plan.kv_heads, D=d, BLOCK_D=block_d, BLOCK_T=block_t,
        P=plan.pooling_factor, LEVELS=plan.levels, SCATTER_FWD=scatter_fwd, num_warps=opts["num_warps"],
    )
    return out


def scatter_back(o: Tensor, plan: SelectionPlan) -> Tensor:
    """Stage 6: [b, S, Hq, d] attention output -> [b, n, Hq, d] in the input dtype."""
    return token_gather(o, plan, scatter_fwd=True)


def token_gather_torch(g: Tensor, plan: SelectionPlan, scatter_fwd: bool) -> Tensor:
    """Plain-PyTorch twin of `token_gather`."""
    b, _, heads, d = g.shape
    n, p = plan.seq_len, plan.pooling_factor
    group = heads // plan.kv_heads
    offsets = level_offsets(n, p, plan.levels)
    inv = plan.inverse.reshape(b, plan.kv_heads, -1).repeat_interleave(group, dim=1)
    inv = inv.transpose(1, 2)  # [b, total, H]
    t = torch.arange(n, device=g.device)
    out = torch.zeros(b, n, heads, d, dtype=torch.float32, device=g.device)
    for level in range(plan.levels):
        c = p**level
        i = (t + 1) // c - 1 if scatter_fwd else t // c
        valid = i >= 0
        slot = inv[:, offsets[level] + i.clamp(min=0)].long()  # [b, n, H]
        ok = valid[None, :, None] & (slot >= 0)
        rows = g.float().gather(1, slot.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, d))
        rows = torch.where(ok.unsqueeze(-1), rows, 0.0)
        out += rows if scatter_fwd else rows / c
    return out.to(g.dtype)
