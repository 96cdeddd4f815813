"""The stages the attention composes, registered as torch.library custom ops; the one place that
picks a Triton kernel or its plain-PyTorch twin.

  score_pyramids  stage 2     q, k -> fp32 score pyramids, [b * Hkv, total] each  (no gradient)
  select          stages 3-4  score pyramids -> SelectionPlan                     (no gradient)
  gather          stage 5 in  x [b, n, H, d] -> [b, S, H, d]   backward: lighthouse::gather_backward
  scatter         stage 6     o [b, S, H, d] -> [b, n, H, d]   backward: lighthouse::scatter_backward
  spill_rows      what a context-parallel chunk's scatter feeds past its end (plain PyTorch)
  covering_counts how many emitted entries feed each token (level_merge "mean"; plain PyTorch)

Each op has a fake implementation (output shapes and dtypes from input shapes alone) and, for
gather and scatter, an autograd formula, as flash-attention registers its kernels: torch.compile
then sees each stage as one node of known shape and traces a Lighthouse layer without graph
breaks, and never looks inside the Triton launches or their data-dependent indexing. The ops take
tensors and ints only, so the config and the plan travel as their fields (`plan.tensors()`).

Kernels run for CUDA tensors, and for CPU tensors while TRITON_INTERPRET=1 was set before the
kernels were defined (`_triton.use_triton`); the twins everywhere else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import LighthouseConfig
from . import scores, segments, tiles, tokens, twins
from ._triton import use_triton
from .plan import SelectionPlan, level_offsets


def _selection(config: LighthouseConfig) -> tuple[int, int, int, int]:
    """The settings stages 2-4 read, as the ints an op takes in place of the config."""
    return config.levels, config.pooling_factor, config.topk, config.tile_topk


def _config(levels: int, pooling_factor: int, topk: int, tile_topk: int) -> LighthouseConfig:
    return LighthouseConfig(levels=levels, pooling_factor=pooling_factor, topk=topk, tile_topk=tile_topk)


def _plan_args(plan: SelectionPlan) -> tuple:
    """A plan as the arguments of an op that takes one: its tensors, then its sizes."""
    return (*plan.tensors(), plan.seq_len, plan.pooling_factor, plan.levels)


# ------------------------------------------------------------------- stage 2: scores


@torch.library.custom_op("lighthouse::score_pyramids", mutates_args=())
def _score_pyramids(q: Tensor, k: Tensor, levels: int, pooling_factor: int, topk: int,
                    tile_topk: int) -> tuple[Tensor, Tensor]:
    impl = scores.score_pyramids if use_triton(q) else twins.score_pyramids
    return impl(q, k, _config(levels, pooling_factor, topk, tile_topk))


@_score_pyramids.register_fake
def _(q, k, levels, pooling_factor, topk, tile_topk):
    total = level_offsets(q.shape[1], pooling_factor, levels)[-1]
    sq = q.new_empty(q.shape[0] * k.shape[2], total, dtype=torch.float32)
    return sq, torch.empty_like(sq)


@torch.no_grad()
def score_pyramids(q: Tensor, k: Tensor, config: LighthouseConfig) -> tuple[Tensor, Tensor]:
    """fp32 score pyramids ([b * Hkv, total] each) of q (max over the GQA group) and k."""
    return _score_pyramids(q, k, *_selection(config))


# ---------------------------------------------------------- stages 3-4: the selection


@torch.library.custom_op("lighthouse::select", mutates_args=())
def _select(sq: Tensor, sk: Tensor, batch: int, kv_heads: int, seq_len: int, levels: int,
            pooling_factor: int, topk: int, tile_topk: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    config = _config(levels, pooling_factor, topk, tile_topk)
    # One level selects nothing: the twin's trivial plan, no kernel written for it.
    impl = tiles.select if use_triton(sq) and levels > 1 else twins.select
    return impl(sq, sk, batch, kv_heads, seq_len, config).tensors()


@_select.register_fake
def _(sq, sk, batch, kv_heads, seq_len, levels, pooling_factor, topk, tile_topk):
    config = _config(levels, pooling_factor, topk, tile_topk)
    unit = (batch, kv_heads)
    level = sq.new_empty(*unit, config.gathered_length(seq_len), dtype=torch.int32)
    inverse = sq.new_empty(*unit, level_offsets(seq_len, pooling_factor, levels)[-1], dtype=torch.int32)
    selected = sq.new_empty(*unit, levels - 1, config.num_tiles, tile_topk // 2, dtype=torch.int32)
    return level, torch.empty_like(level), inverse, selected, torch.empty_like(selected)


@torch.no_grad()
def select(sq: Tensor, sk: Tensor, batch: int, kv_heads: int, n: int, config: LighthouseConfig
           ) -> SelectionPlan:
    """The per-tile cascade on the score pyramids and the causal order: the plan."""
    tensors = _select(sq, sk, batch, kv_heads, n, *_selection(config))
    return SelectionPlan(*tensors, n, config.pooling_factor, config.levels)


# ------------------------------------------------------- stages 5 input and 6, backward passes


def _plan_op(name: str, kernel, twin, to_slots: bool):
    """The custom op `lighthouse::name`: `kernel` (Triton) or `twin` applied to a tensor
    [b, n or S, H, d] and a plan, giving [b, S, H, d] (`to_slots`: one row per gathered slot)
    or [b, n, H, d] (one row per base token)."""

    @torch.library.custom_op(f"lighthouse::{name}", mutates_args=())
    def op(x: Tensor, level: Tensor, index: Tensor, inverse: Tensor, selected_q: Tensor, selected_k: Tensor,
           seq_len: int, pooling_factor: int, levels: int) -> Tensor:
        plan = SelectionPlan(level, index, inverse, selected_q, selected_k, seq_len, pooling_factor, levels)
        return (kernel if use_triton(x) else twin)(x, plan)

    @op.register_fake
    def _(x, level, index, inverse, selected_q, selected_k, seq_len, pooling_factor, levels):
        return x.new_empty(x.shape[0], level.shape[-1] if to_slots else seq_len, *x.shape[2:])

    return op


_gather = _plan_op("gather", segments.pool_segments, twins.pool_segments, to_slots=True)
_gather_backward = _plan_op("gather_backward", tokens.pool_tokens, twins.pool_tokens, to_slots=False)
_scatter_backward = _plan_op("scatter_backward", segments.feed_segments, twins.feed_segments, to_slots=True)


# The scatter alone takes a halo: a plan op of its own.
@torch.library.custom_op("lighthouse::scatter", mutates_args=())
def _scatter(o: Tensor, level: Tensor, index: Tensor, inverse: Tensor, selected_q: Tensor, selected_k: Tensor,
             seq_len: int, pooling_factor: int, levels: int, halo: Tensor | None = None) -> Tensor:
    plan = SelectionPlan(level, index, inverse, selected_q, selected_k, seq_len, pooling_factor, levels)
    return (tokens.feed_tokens if use_triton(o) else twins.feed_tokens)(o, plan, halo)


@_scatter.register_fake
def _(o, level, index, inverse, selected_q, selected_k, seq_len, pooling_factor, levels, halo=None):
    return o.new_empty(o.shape[0], seq_len, *o.shape[2:])


def _save_plan(ctx, inputs, output) -> None:
    # inputs: the tensor, the plan's five tensors and three sizes, then (the scatter's) the halo.
    ctx.save_for_backward(*inputs[1:6])
    ctx.sizes = inputs[6:9]
    halo = inputs[9] if len(inputs) > 9 else None
    ctx.halo_rows = None if halo is None else halo.shape[1]


def _gather_grad(ctx, grad):
    # Each base token receives grad / c_l from the entry pooling it at every level.
    return _gather_backward(grad, *ctx.saved_tensors, *ctx.sizes), *[None] * 8


def _scatter_grad(ctx, grad):
    # An entry's gradient is the sum of the output gradient over the range it fed; a halo row's
    # is the gradient of the tokens it fed.
    rows = ctx.halo_rows
    halo_grad = None if rows is None else grad[:, :rows].float()
    return _scatter_backward(grad, *ctx.saved_tensors, *ctx.sizes), *[None] * 8, halo_grad


torch.library.register_autograd("lighthouse::gather", _gather_grad, setup_context=_save_plan)
torch.library.register_autograd("lighthouse::scatter", _scatter_grad, setup_context=_save_plan)


def gather(x: Tensor, plan: SelectionPlan) -> Tensor:
    """[b, n, H, d] -> [b, S, H, d]: per gathered slot the mean of its entry's block of tokens,
    summed in fp32. Differentiable in `x`."""
    return _gather(x, *_plan_args(plan))


def scatter(o: Tensor, plan: SelectionPlan, halo: Tensor | None = None) -> Tensor:
    """[b, S, H, d] -> [b, n, H, d]: per base token the fp32 sum of the rows of the entries
    feeding it, plus `halo[:, t]` (what the chunk before feeds, context parallelism) for the
    first tokens; in `o`'s dtype, bitwise reproducible. Differentiable in `o` and `halo`."""
    return _scatter(o, *_plan_args(plan), halo)


# -------------------------------------------------------------- context parallelism


def spill_rows(o: Tensor, plan: SelectionPlan) -> Tensor:
    """What a chunk's scatter feeds past its end: [b, p**(L-1) - 1, Hq, d], the rows its last
    entry of each level l >= 1 feeds in the next chunk's first p**l - 1 tokens (zero where that
    entry was not emitted). Differentiable in `o`; fp32, so that the receiving chunk's sum is
    that of the unsplit sequence up to fp32 rounding. A handful of launches for every level at
    once, and no host synchronisation (it runs while the attention before it is queued)."""
    b, _, heads, d = o.shape
    n, p, levels = plan.seq_len, plan.pooling_factor, plan.levels
    offsets = level_offsets(n, p, levels)
    # The slot of the last entry of each level l >= 1: [b, Hkv, L-1] (-1: not emitted).
    slot = torch.stack([plan.inverse[..., offsets[lv] + n // p**lv - 1] for lv in range(1, levels)], dim=-1)
    slot = slot.transpose(1, 2).repeat_interleave(heads // plan.kv_heads, dim=2)  # [b, L-1, Hq]
    rows = o.gather(1, slot.clamp(min=0).long().unsqueeze(-1).expand(-1, -1, -1, d)).float()
    rows = torch.where((slot >= 0).unsqueeze(-1), rows, 0.0)
    # Level l's row feeds spill row t when t < p**l - 1.
    t = torch.arange(p ** (levels - 1) - 1, device=o.device)
    reach = p ** torch.arange(1, levels, device=o.device) - 1
    feeds = (t[:, None] < reach[None, :]).to(rows.dtype)
    return torch.einsum("tl,blhd->bthd", feeds, rows)


@torch.no_grad()
def covering_counts(plan: SelectionPlan, halo: Tensor | None = None) -> Tensor:
    """How many emitted entries feed each base token, one per level at most: the scatter of ones,
    [b, n, Hkv, 1] fp32 (0 where no entry does), plus `halo`, the counts the chunk before feeds
    (`spill_rows` of ones, exchanged). Plain PyTorch on every device: one column, no gradient."""
    ones = torch.ones(plan.batch, plan.length, plan.kv_heads, 1, device=plan.level.device)
    return twins.feed_tokens(ones, plan, halo)
