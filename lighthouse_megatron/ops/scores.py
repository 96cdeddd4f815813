"""Stage 2 kernel, walking blocks of base tokens: fp32 norm scores and their max-pyramid, in
one pass over q and k (twin: `twins.score_pyramids`).

Output layout (shared by the selection, gather and scatter kernels): one flat fp32 buffer
per score kind, [b * Hkv, total] with total = sum over levels of n / p**l, level l starting
at `plan.level_offsets(n, p, L)[l]`. Level 0 holds the base scores s[t]; level l holds the max
of s over each block of p**l tokens (docs/algorithm.md: max-pooling of the base norms).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import LighthouseConfig
from ._triton import tl, triton
from .plan import level_offsets


@triton.jit
def _finite_or_inf(s):
    # NaN norms count as +inf, as in `twins.base_scores`: one rule for both paths.
    return tl.where(s != s, float("inf"), s)


@triton.jit
def _scores_kernel(
    q_ptr, k_ptr, sq_ptr, sk_ptr,
    n, hkv, total,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    P: tl.constexpr, LEVELS: tl.constexpr,
):
    # One program per (block of BLOCK_N tokens, batch * kv head). The grid's large dimension
    # is axis 0 (up to 2**31 - 1 programs), so 1M tokens never hit the 65535 limit of y.
    pid_n = tl.program_id(0)
    unit = tl.program_id(1)
    b = (unit // hkv).to(tl.int64)
    h = (unit % hkv).to(tl.int64)  # head-major inputs: h * stride_h can pass 2**31
    t = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = t < n
    dd = tl.arange(0, BLOCK_D)
    mask = t_ok[:, None] & (dd < D)[None, :]
    rows = t.to(tl.int64)[:, None]

    kx = tl.load(k_ptr + b * stride_kb + h * stride_kh + rows * stride_kt + dd[None, :], mask=mask, other=0.0)
    kx = kx.to(tl.float32)
    s_k = _finite_or_inf(tl.sqrt(tl.sum(kx * kx, axis=1)))
    s_q = tl.zeros([BLOCK_N], dtype=tl.float32)  # norms are >= 0, so 0 is the max's identity
    for g in tl.static_range(GROUP):
        qh = h * GROUP + g
        q_ptrs = q_ptr + b * stride_qb + qh * stride_qh + rows * stride_qt + dd[None, :]
        qx = tl.load(q_ptrs, mask=mask, other=0.0).to(tl.float32)
        s_q = tl.maximum(s_q, _finite_or_inf(tl.sqrt(tl.sum(qx * qx, axis=1))))

    base = unit.to(tl.int64) * total
    tl.store(sq_ptr + base + t, s_q, mask=t_ok)
    tl.store(sk_ptr + base + t, s_k, mask=t_ok)

    # BLOCK_N is a multiple of the coarsest block and n a multiple of it too, so every pooled
    # block lies wholly inside one program: the pyramid needs no second pass.
    offset = n
    entries = n
    pq = s_q
    pk = s_k
    for level in tl.static_range(1, LEVELS):
        # Each level pools the previous one by P (max is associative). Shapes are written
        # inline: a constexpr assigned to a name inside the loop would become a tensor.
        pq = tl.max(tl.reshape(pq, [BLOCK_N // P**level, P]), axis=1)
        pk = tl.max(tl.reshape(pk, [BLOCK_N // P**level, P]), axis=1)
        entries = entries // P
        i = pid_n * (BLOCK_N // P**level) + tl.arange(0, BLOCK_N // P**level)
        i_ok = i < entries
        tl.store(sq_ptr + base + offset + i, pq, mask=i_ok)
        tl.store(sk_ptr + base + offset + i, pk, mask=i_ok)
        offset += entries


# Launch settings from the H100 sweep in benchmarks/layer/tune_kernels.log (d = 128):
# block and warp counts moved each kernel by under 5% there; not swept on other GPUs.
SCORES_LAUNCH = {"block_elems": 8192, "num_warps": 4}


def score_pyramids(q: Tensor, k: Tensor, config: LighthouseConfig, **launch) -> tuple[Tensor, Tensor]:
    """fp32 score pyramids ([b * Hkv, total] each) of q (max over the GQA group) and k."""
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    p, levels = config.pooling_factor, config.levels
    total = level_offsets(n, p, levels)[-1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    sq = torch.empty(b * hkv, total, dtype=torch.float32, device=q.device)
    sk = torch.empty_like(sq)
    opts = {**SCORES_LAUNCH, **launch}
    block_d = triton.next_power_of_2(d)
    # ~block_elems elements per load; at least one coarsest block per program.
    block_n = max(config.coarsest_block, max(16, opts["block_elems"] // block_d))
    grid = (triton.cdiv(n, block_n), b * hkv)
    _scores_kernel[grid](
        q, k, sq, sk, n, hkv, total,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        GROUP=hq // hkv, D=d, BLOCK_D=block_d, BLOCK_N=block_n, P=p, LEVELS=levels,
        num_warps=opts["num_warps"],
    )
    return sq, sk

