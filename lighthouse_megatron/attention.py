"""lighthouse_attention: the public entry point, composing the stages.

Forward: scores and selection (no gradient) -> pooled gather of q, k, v -> dense causal
attention on the S gathered entries (backends.py) -> scatter back. The gather and the scatter
are autograd Functions whose backward passes are the matching deterministic kernels; the dense
kernel brings its own backward. On CUDA the stages are Triton kernels (ops/), elsewhere their
plain-PyTorch twins.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends import check_backend, dense_causal_attention
from .config import LighthouseConfig
from .ops import SelectionPlan, score_pyramids, segment_sum, select, token_gather
from .reference import check_inputs


class _PooledGather(torch.autograd.Function):
    """[b, n, H, d] -> [b, S, H, d]: mean of each planned entry's block."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: SelectionPlan) -> Tensor:
        ctx.plan = plan
        return segment_sum(x, plan, scatter_bwd=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Each base token receives grad / c_l from the entry pooling it at every level.
        return token_gather(grad, ctx.plan, scatter_fwd=False), None


class _ScatterBack(torch.autograd.Function):
    """[b, S, H, d] -> [b, n, H, d]: each base token sums its covering entries' rows."""

    @staticmethod
    def forward(ctx, o: Tensor, plan: SelectionPlan) -> Tensor:
        ctx.plan = plan
        return token_gather(o, plan, scatter_fwd=True)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # An entry's gradient is the sum of the output gradient over the range it fed.
        return segment_sum(grad, ctx.plan, scatter_bwd=True), None


@torch.no_grad()
def plan_selection(q: Tensor, k: Tensor, config: LighthouseConfig) -> SelectionPlan:
    """Stages 2-4: scores, the per-tile cascade, causal order (no gradient)."""
    sq, sk = score_pyramids(q, k, config)
    return select(sq, sk, q.shape[0], k.shape[2], q.shape[1], config)


def lighthouse_attention(
    q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, softmax_scale: float | None = None
) -> Tensor:
    """Lighthouse attention. q [b, s, Hq, d], k and v [b, s, Hkv, d] -> [b, s, Hq, d].

    Causal; GQA when Hq > Hkv; `softmax_scale` defaults to 1/sqrt(d). Differentiable in q, k, v.
    """
    check_inputs(q, k, v, config)
    check_backend(config.backend, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if config.levels == 1:  # nothing is pooled or selected: S = N
        return dense_causal_attention(q, k, v, scale, config.backend)
    plan = plan_selection(q, k, config)
    o = dense_causal_attention(
        _PooledGather.apply(q, plan), _PooledGather.apply(k, plan), _PooledGather.apply(v, plan),
        scale, config.backend,
    )
    return _ScatterBack.apply(o, plan)
