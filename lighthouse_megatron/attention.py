"""lighthouse_attention: the public entry point, composing the stages.

Forward: scores and selection (no gradient) -> pooled gather of q, k, v -> dense causal
attention on the S gathered entries -> scatter back. The gather and the scatter are autograd
Functions whose backward passes are the matching deterministic kernels; the dense kernel brings
its own backward. On CUDA the stages are Triton kernels (ops/), elsewhere their PyTorch twins.

Under context parallelism the rank's sequence is two chunks (Megatron's load-balanced layout):
each is planned on its own with topk / (2*CP), the gathered chunks keep that layout for the
attention across the CP group (parallel/), and each chunk's scatter also adds the halo that
the chunk before it feeds (parallel/halo.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends import check_backend
from .config import LighthouseConfig
from .ops import SelectionPlan, score_pyramids, segment_sum, select, spill_rows, token_sum
from .parallel import ContextParallel, causal_attention, exchange_halo
from .reference import check_inputs


def _spans(plans: list[SelectionPlan], length) -> list[slice]:
    """Consecutive slices of a dimension, one per plan, of `length(plan)` each."""
    out, start = [], 0
    for plan in plans:
        out.append(slice(start, start + length(plan)))
        start += length(plan)
    return out


def _tokens(plan: SelectionPlan) -> int:
    return plan.seq_len


def _slots(plan: SelectionPlan) -> int:
    return plan.length


class _PooledGather(torch.autograd.Function):
    """[b, n, H, d] -> [b, S, H, d]: mean of each planned entry's block, chunk by chunk."""

    @staticmethod
    def forward(ctx, x: Tensor, plans: list[SelectionPlan]) -> Tensor:
        ctx.plans = plans
        out = x.new_empty(x.shape[0], sum(map(_slots, plans)), *x.shape[2:])
        for plan, tok, slot in zip(plans, _spans(plans, _tokens), _spans(plans, _slots), strict=True):
            segment_sum(x[:, tok], plan, "pool", out=out[:, slot])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Each base token receives grad / c_l from the entry pooling it at every level.
        plans = ctx.plans
        out = grad.new_empty(grad.shape[0], sum(map(_tokens, plans)), *grad.shape[2:])
        for plan, tok, slot in zip(plans, _spans(plans, _tokens), _spans(plans, _slots), strict=True):
            token_sum(grad[:, slot], plan, "pool", out=out[:, tok])
        return out, None


class _ScatterBack(torch.autograd.Function):
    """[b, S, H, d] -> [b, n, H, d]: each base token sums its covering entries' rows, plus the
    halo fed by the chunk before (context parallelism)."""

    @staticmethod
    def forward(ctx, o: Tensor, plans: list[SelectionPlan], *halos: Tensor | None) -> Tensor:
        ctx.plans = plans
        ctx.halo_rows = [None if h is None else h.shape[1] for h in halos]
        out = o.new_empty(o.shape[0], sum(map(_tokens, plans)), *o.shape[2:])
        for plan, tok, slot, halo in zip(plans, _spans(plans, _tokens), _spans(plans, _slots), halos,
                                         strict=True):
            token_sum(o[:, slot], plan, "feed", out=out[:, tok], halo=halo)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # An entry's gradient is the sum of the output gradient over the range it fed; a
        # halo row's is the gradient of the tokens it fed.
        plans = ctx.plans
        grad_o = grad.new_empty(grad.shape[0], sum(map(_slots, plans)), *grad.shape[2:])
        grad_halos = []
        for plan, tok, slot, rows in zip(plans, _spans(plans, _tokens), _spans(plans, _slots),
                                         ctx.halo_rows, strict=True):
            segment_sum(grad[:, tok], plan, "feed", out=grad_o[:, slot])
            grad_halos.append(None if rows is None else grad[:, tok][:, :rows].float())
        return grad_o, None, *grad_halos


@torch.no_grad()
def plan_selection(q: Tensor, k: Tensor, config: LighthouseConfig) -> SelectionPlan:
    """Stages 2-4: scores, the per-tile cascade, causal order (no gradient)."""
    sq, sk = score_pyramids(q, k, config)
    return select(sq, sk, q.shape[0], k.shape[2], q.shape[1], config)


def lighthouse_attention(
    q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, softmax_scale: float | None = None,
    *, context_parallel: ContextParallel | None = None,
) -> Tensor:
    """Lighthouse attention. q [b, s, Hq, d], k and v [b, s, Hkv, d] -> [b, s, Hq, d].

    Causal; GQA when Hq > Hkv; `softmax_scale` defaults to 1/sqrt(d). Differentiable in q, k, v.
    With `context_parallel` (a group of CP > 1 ranks), q, k, v are this rank's part of the
    sequence in Megatron's load-balanced layout (chunks r and 2*CP-1-r of 2*CP, see
    `parallel.split_chunks`), and the result is this rank's part of the CP = 1 result.
    """
    cp = context_parallel if context_parallel is not None and context_parallel.size > 1 else None
    cp_size = 1 if cp is None else cp.size
    check_inputs(q, k, v, config, cp_size=cp_size)
    check_backend(config.backend, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if config.levels == 1:  # nothing is pooled or selected: S = N
        return causal_attention(q, k, v, scale, config.backend, cp)
    chunk_config = config.chunk_config(cp_size)
    chunks = [slice(None)] if cp is None else [slice(0, q.shape[1] // 2), slice(q.shape[1] // 2, None)]
    plans = [plan_selection(q[:, c], k[:, c], chunk_config) for c in chunks]
    o = causal_attention(*(_PooledGather.apply(x, plans) for x in (q, k, v)), scale, config.backend, cp)
    if cp is None:
        return _ScatterBack.apply(o, plans, None)
    first, second = o.split([plans[0].length, plans[1].length], dim=1)
    halos = exchange_halo(spill_rows(first, plans[0]), spill_rows(second, plans[1]), cp)
    return _ScatterBack.apply(o, plans, *halos)
