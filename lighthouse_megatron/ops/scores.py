"""Stage 2: fp32 norm scores and their max-pyramid, in one pass over q and k.

Output layout (shared by the selection, gather and scatter kernels): one flat fp32 buffer
per score kind, [b * Hkv, total] with total = sum over levels of n / p**l, level l starting
at `level_offsets(n, p, L)[l]`. Level 0 holds the base scores s[t]; level l holds the max
of s over each block of p**l tokens (docs/algorithm.md: max-pooling of the base norms).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import LighthouseConfig
from ._triton import tl, triton, use_triton


def level_offsets(n: int, pooling_factor: int, levels: int) -> list[int]:
    """Start of each level in a flat per-unit pyramid buffer, plus the total length last."""
    offsets = [0]
    for level in range(levels):
        offsets.append(offsets[-1] + n // pooling_factor**level)
    return offsets


@triton.jit
def _finite_or_inf(s):
    # NaN norms count as +inf, as in `base_scores`: one rule for both paths.
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
    if not use_triton(q):
        return score_pyramids_torch(q, k, config)
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


@torch.no_grad()
def score_pyramids_torch(q: Tensor, k: Tensor, config: LighthouseConfig) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch twin of `score_pyramids`: `base_scores` and `score_pyramid`, flat layout."""
    b, hkv = q.shape[0], k.shape[2]
    s_q, s_k = base_scores(q, k)
    flat = [torch.cat(score_pyramid(s, config), dim=-1).reshape(b * hkv, -1) for s in (s_q, s_k)]
    return flat[0], flat[1]


@torch.no_grad()
def base_scores(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 per-token scores [b, n, Hkv]: ||q|| (max over the GQA group's heads), ||k||.

    A NaN norm counts as +inf (ranked first, ties to the lower index like any other score):
    the selection stays well defined, and `nan_where_not_finite` then makes the unit's whole
    output NaN.
    """
    b, n, hq, d = q.shape
    hkv = k.shape[2]

    def norm(x):
        return torch.linalg.vector_norm(x.float(), dim=-1).nan_to_num(nan=float("inf"), posinf=float("inf"))

    s_q = norm(q).reshape(b, n, hkv, hq // hkv).amax(dim=-1)
    s_k = norm(k)
    return s_q, s_k


def score_pyramid(s: Tensor, config: LighthouseConfig) -> list[Tensor]:
    """Max-pool base scores [b, n, Hkv] to every level, as [b, Hkv, n / p**l]."""
    b, n, h = s.shape
    out = []
    for level in range(config.levels):
        c = config.pooling_factor**level
        out.append(s.reshape(b, n // c, c, h).amax(dim=2).transpose(1, 2).contiguous())
    return out
