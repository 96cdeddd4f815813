"""Causal attention over a sequence held in Megatron's load-balanced CP layout.

Local q, k, v are [b, 2*c, H, d]: chunk r then chunk 2*CP-1-r of a sequence of 2*CP chunks of
c tokens. Two implementations of the same function:

- Transformer Engine's context-parallel fused attention (p2p ring, a2a, all_gather, a2a+p2p),
  fed the CP group, its global ranks and a side stream, as Megatron feeds TEDotProductAttention;
- a built-in exact one for machines without TE (CPU, gloo, tests): all-gather K and V (the
  backward pass sums their gradients back to their owners), then each local query chunk j
  attends to the keys of chunks 0..j with a bottom-right-aligned causal mask.

Which one runs, and on which SDPA kernels, is `backends.sdpa_kernels`'s rule for the backend
setting: the same rule as without CP.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ..backends import dense_causal_attention, sdpa_kernels, te_layout
from .context import ContextParallel, merge_chunks


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None, backend: str = "auto",
    context_parallel: ContextParallel | None = None,
) -> Tensor:
    """Causal attention [b, s, Hq, d] x [b, s, Hkv, d] -> [b, s, Hq, d]; with a CP group of
    more than one rank, over the whole sequence whose load-balanced part this rank holds."""
    cp = context_parallel
    if cp is None or cp.size == 1:
        return dense_causal_attention(q, k, v, softmax_scale, backend)
    cp.check_local_shape(q)  # first: the local checks below must not pass on some ranks only
    if q.shape[1] % 2:
        raise ValueError(
            f"a context-parallel rank holds two equal chunks; its local length {q.shape[1]} is odd"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    kernels = sdpa_kernels(backend, q)  # the same rule as without CP
    if kernels is None:
        return _te_cp_attention(q, k, v, scale, cp)
    return _builtin_cp_attention(q, k, v, scale, cp, kernels)


# ------------------------------------------------------------------ Transformer Engine


# One TE module per shape, dtype, layout and CP group, shared by the layers (as backends.py's
# `_te_module`): keyed by the group, not by the layer's ContextParallel, so any depth fits.
_TE_CP_MODULES: dict[tuple, Any] = {}


def te_cp_module_key(heads, groups, d, scale, dtype, device, fmt, cp: ContextParallel) -> tuple:
    return heads, groups, d, float(scale), dtype, device, fmt, cp.key


def _te_cp_module(heads, groups, d, scale, dtype, device, fmt, cp: ContextParallel):
    key = te_cp_module_key(heads, groups, d, scale, dtype, device, fmt, cp)
    module = _TE_CP_MODULES.get(key)
    if module is not None:
        return module
    from transformer_engine.pytorch import DotProductAttention

    module = DotProductAttention(
        num_attention_heads=heads, kv_channels=d, num_gqa_groups=groups, attention_dropout=0.0,
        qkv_format=fmt, attn_mask_type="causal", softmax_scale=scale,
    ).to(device=device, dtype=dtype)
    module.set_context_parallel_group(
        cp.te_group if cp.te_group is not None else cp.group, cp.global_ranks, cp.stream(device),
        cp.comm_type,
    )
    _TE_CP_MODULES[key] = module
    return module


def _te_cp_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, cp: ContextParallel) -> Tensor:
    b, s, hq, d = q.shape
    fmt, tensors = te_layout(q, k, v)
    module = _te_cp_module(hq, k.shape[2], d, float(scale), q.dtype, q.device, fmt, cp)
    out = module(*tensors)
    return out.view(s, b, hq, d).transpose(0, 1) if fmt == "sbhd" else out.view(b, s, hq, d)


# -------------------------------------------------------------------------- built-in


class _GatherSequence(torch.autograd.Function):
    """[b, 2c, H, d] local -> [b, 2*CP*c, H, d], the whole sequence in order. Backward: every
    rank's gradient for the whole sequence, summed, of this rank's two chunks."""

    @staticmethod
    def forward(ctx, x: Tensor, cp: ContextParallel) -> Tensor:
        ctx.cp = cp
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        return merge_chunks(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cp = ctx.cp
        c = grad.shape[1] // (2 * cp.size)
        chunks = grad.split(c, dim=1)
        # Rank r's slice of the reduction: its two chunks, side by side.
        per_rank = [torch.cat([chunks[a], chunks[b]], dim=1) for a, b in map(cp.chunk_ids, range(cp.size))]
        if dist.get_backend(cp.group) == "nccl":
            out = torch.empty_like(per_rank[0])
            dist.reduce_scatter_tensor(out, torch.stack(per_rank).contiguous(), group=cp.group)
        else:  # gloo has no reduce-scatter: reduce everything, keep ours
            full = torch.stack(per_rank).contiguous()
            dist.all_reduce(full, group=cp.group)
            out = full[cp.rank]
        return out, None


def _builtin_cp_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, cp: ContextParallel, kernels: list[SDPBackend]
) -> Tensor:
    c = q.shape[1] // 2
    k_all, v_all = _GatherSequence.apply(k, cp), _GatherSequence.apply(v, cp)
    group = q.shape[2] // k.shape[2]
    if group > 1:  # the bottom-right causal kernels take no GQA: expand the (short) keys
        k_all, v_all = (x.repeat_interleave(group, dim=2) for x in (k_all, v_all))
    outs = []
    for half, j in zip(q.split(c, dim=1), cp.chunk_ids(), strict=True):
        keys = (j + 1) * c  # chunks 0..j: every earlier chunk fully, chunk j causally
        qt = half.transpose(1, 2)
        kt, vt = k_all[:, :keys].transpose(1, 2), v_all[:, :keys].transpose(1, 2)
        mask = causal_lower_right(c, keys)
        with sdpa_kernel(kernels, set_priority=True):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=1)
