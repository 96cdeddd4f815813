"""lighthouse_attention: the public entry point, composing the stages.

Forward: scores and selection (no gradient) -> pooled gather of q, k, v -> dense causal
attention on the S gathered entries -> scatter back. The stages are custom ops (ops/stages.py)
whose backward passes are the matching deterministic kernels, so torch.compile traces the whole
function; the dense kernel brings its own backward. On CUDA the stages are Triton kernels,
elsewhere their PyTorch twins.

Under context parallelism the rank's sequence is two chunks (Megatron's load-balanced layout):
each is planned on its own with topk / (2*CP) (the two chunks are the batch of one plan), the
gathered chunks keep that layout for the attention across the CP group (parallel/), and each
chunk's scatter also adds the halo that the chunk before it feeds (parallel/halo.py).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import check_backend
from .config import LighthouseConfig, check_inputs
from .ops import SelectionPlan, covering_counts, gather, scatter, score_pyramids, select, spill_rows
from .parallel import ContextParallel, SplitGroups, causal_attention, exchange_halo


def _nan_where_not_finite(out: Tensor, q: Tensor, k: Tensor, v: Tensor, cp: ContextParallel | None,
                          split: SplitGroups | None) -> Tensor:
    """docs/algorithm.md's rule for non-finite inputs: a NaN or inf anywhere in a selection
    unit's q, k or v (one sequence, one GQA group) makes that unit's whole output NaN, on every
    path. Without it the pattern would be the kernel's: a masked NaN key or value reaches earlier
    queries through the math kernel's additive mask and 0 * NaN, not through flash kernels that
    skip masked tiles, nor across CP chunks. q, k, v may be the gathered rows: every token is in
    a coarsest entry, and every coarsest entry is gathered."""
    hkv = k.shape[2]
    with torch.no_grad():
        bad = torch.stack([(~x.isfinite()).unflatten(2, (hkv, -1)).flatten(3).any(-1).any(1)
                           for x in (q, k, v)]).any(0)  # [b, Hkv]
        bad = bad.to(torch.int32)
        if cp is not None:  # the unit spans the CP group
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=cp.group)
        if split is not None:  # and the TP ranks holding the group's other query heads
            bad = split.max(bad)
        bad = bad.bool()[:, None, :, None, None]
    return out.unflatten(2, (hkv, -1)).masked_fill(bad, float("nan")).flatten(2, 3)


def _merge_levels(out: Tensor, plan: SelectionPlan, config: LighthouseConfig,
                  cp: ContextParallel | None) -> Tensor:
    """level_merge "mean": each token's sum over levels divided by how many emitted entries feed it
    (a token none feeds keeps its zero). The counts come from the same plan and, under CP, the same
    halo exchange as the outputs, so they are the CP = 1 run's. The scatter's output (its fp32 sums
    already in the input dtype) is divided in fp32: in bf16 one more rounding than the sum."""
    if config.level_merge == "sum":
        return out
    with torch.no_grad():
        halo = None
        if cp is not None:
            ones = torch.ones(plan.batch, plan.length, plan.kv_heads, 1, device=out.device)
            spill = spill_rows(ones, plan)
            halo = exchange_halo(spill, cp) if cp.halo else torch.zeros_like(spill)
        counts = covering_counts(plan, halo).view(*out.shape[:2], plan.kv_heads, 1)
        counts = counts.repeat_interleave(out.shape[2] // plan.kv_heads, dim=2).clamp(min=1)
    return (out.float() / counts).to(out.dtype)


@torch.no_grad()
def plan_selection(q: Tensor, k: Tensor, config: LighthouseConfig, split: SplitGroups | None = None
                   ) -> SelectionPlan:
    """Stages 2-4: scores, the per-tile cascade, causal order (no gradient). With `split`, the
    query scores are max-reduced over the ranks holding the group's other query heads (max
    pooling commutes with the max over ranks, so the pyramids can be reduced whole)."""
    sq, sk = score_pyramids(q, k, config)
    if split is not None:
        sq = split.max(sq)
    return select(sq, sk, q.shape[0], k.shape[2], q.shape[1], config)


def lighthouse_attention(
    q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, softmax_scale: float | None = None,
    *, context_parallel: ContextParallel | None = None, split_groups: SplitGroups | None = None,
) -> Tensor:
    """Lighthouse attention. q [b, s, Hq, d], k and v [b, s, Hkv, d] -> [b, s, Hq, d].

    Causal; GQA when Hq > Hkv; `softmax_scale` defaults to 1/sqrt(d). Differentiable in q, k, v.
    With `context_parallel` (a group of CP > 1 ranks), q, k, v are this rank's part of the
    sequence in Megatron's load-balanced layout (chunks r and 2*CP-1-r of 2*CP, see
    `parallel.split_chunks`), and the result is this rank's part of the CP = 1 result. With
    `split_groups` (fewer GQA groups than TP ranks), k and v are this rank's replica of its
    group's KV head and q its share of the group's query heads; the result is those heads' part
    of the TP = 1 result.
    """
    cp = context_parallel if context_parallel is not None and context_parallel.size > 1 else None
    if cp is not None:
        cp.check_local_shape(q)  # first: the local checks below must not pass on some ranks only
    check_inputs(q, k, v, config, cp_size=1 if cp is None else cp.size)
    check_backend(config.backend, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if config.levels == 1:  # nothing is pooled or selected: S = N
        out = causal_attention(q, k, v, scale, config.backend, cp)
        return _nan_where_not_finite(out, q, k, v, cp, split_groups)
    if cp is None:
        plan = plan_selection(q, k, config, split_groups)
        gathered = [gather(x, plan) for x in (q, k, v)]
        o = causal_attention(*gathered, scale, config.backend)
        out = _merge_levels(scatter(o, plan), plan, config, None)
        return _nan_where_not_finite(out, *gathered, None, split_groups)
    # The rank's two chunks are the batch of one plan, [b, 2c, H, d] -> [2b, c, H, d]: a view
    # for b = 1 (a copy otherwise), so that every stage is one launch for both chunks.
    b, n = q.shape[:2]
    q2, k2, v2 = (x.reshape(2 * b, n // 2, *x.shape[2:]) for x in (q, k, v))
    plan = plan_selection(q2, k2, config.chunk_config(cp.size), split_groups)
    gathered = [gather(x, plan).view(b, 2 * plan.length, *x.shape[2:]) for x in (q2, k2, v2)]
    o = causal_attention(*gathered, scale, config.backend, cp).reshape(2 * b, plan.length, *q.shape[2:])
    spill = spill_rows(o, plan)
    halo = exchange_halo(spill, cp) if cp.halo else torch.zeros_like(spill)
    out = _merge_levels(scatter(o, plan, halo).view(b, n, *q.shape[2:]), plan, config, cp)
    return _nan_where_not_finite(out, *gathered, cp, split_groups)
