"""Every Lighthouse stage in plain PyTorch: the twins of the Triton kernels, in stage order.

Each function computes what its kernel computes, in the same fp32 arithmetic (bitwise the same
plan and scatter, the same gather up to summation order), and is what runs on a CPU without the
Triton interpreter. The reference builds its selection on these; tests hold every kernel to its
twin (tests/test_ops.py). Layouts: q [b, n, Hq, d], k and v [b, n, Hkv, d]; a selection unit is
one (batch element, kv head); the plan is `plan.SelectionPlan`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import LighthouseConfig
from .plan import SelectionPlan, level_offsets

# ----------------------------------------------------------------- stage 2: scores


@torch.no_grad()
def base_scores(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 per-token scores [b, n, Hkv]: ||q|| (max over the GQA group's heads), ||k||.

    A NaN norm counts as +inf (ranked first, ties to the lower index like any other score):
    the selection stays well defined, and the attention then makes the unit's whole output NaN.
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


@torch.no_grad()
def score_pyramids(q: Tensor, k: Tensor, config: LighthouseConfig) -> tuple[Tensor, Tensor]:
    """The query and key score pyramids in the flat layout, [b * Hkv, total] fp32 each."""
    b, hkv = q.shape[0], k.shape[2]
    s_q, s_k = base_scores(q, k)
    flat = [torch.cat(score_pyramid(s, config), dim=-1).reshape(b * hkv, -1) for s in (s_q, s_k)]
    return flat[0], flat[1]


# ---------------------------------------------------- stages 3 and 4: selection, order


def topk_lower_index(scores: Tensor, count: int) -> Tensor:
    """Positions of the `count` largest values along the last dim, ties to the lower position."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]


@torch.no_grad()
def select(sq: Tensor, sk: Tensor, batch: int, kv_heads: int, n: int, config: LighthouseConfig
           ) -> SelectionPlan:
    """The per-tile cascade on the score pyramids, then every emitted entry in causal order."""
    p, levels, half = config.pooling_factor, config.levels, config.tile_topk // 2
    tiles = config.num_tiles
    units = sq.shape[0]
    offsets = level_offsets(n, p, levels)
    total = offsets[-1]
    dev = sq.device
    top = levels - 1
    per_tile = n // config.coarsest_block // tiles
    cand = torch.arange(n // config.coarsest_block, device=dev).reshape(tiles, per_tile)
    cand = cand.expand(units, tiles, per_tile)
    lvls, idxs = [], []
    sel_q = torch.zeros(units, max(levels - 1, 0), tiles, half, dtype=torch.int32, device=dev)
    sel_k = torch.zeros_like(sel_q)
    for level in range(top, 0, -1):
        flat = cand.reshape(units, -1)
        lo, hi = offsets[level], offsets[level + 1]
        s_q = sq[:, lo:hi].gather(-1, flat).reshape(cand.shape)
        s_k = sk[:, lo:hi].gather(-1, flat).reshape(cand.shape)
        pos_q = topk_lower_index(s_q, half)
        pos_k = topk_lower_index(s_k.scatter(-1, pos_q, float("-inf")), half)
        sel_q[:, level - 1] = cand.gather(-1, pos_q).int()
        sel_k[:, level - 1] = cand.gather(-1, pos_k).int()
        lvls.append(torch.full_like(cand, level))
        idxs.append(cand)
        chosen = torch.cat([pos_q, pos_k], dim=-1).sort(dim=-1).values
        cand = (cand.gather(-1, chosen).unsqueeze(-1) * p + torch.arange(p, device=dev)).flatten(-2)
    lvls.append(torch.zeros_like(cand))
    idxs.append(cand)
    lvl = torch.cat(lvls, dim=-1).reshape(units, -1)
    idx = torch.cat(idxs, dim=-1).reshape(units, -1)
    # Stage 4: sort by (last token, level), finer level first on ties.
    last = (idx + 1) * p**lvl - 1
    order = torch.argsort(last * levels + lvl, dim=-1)
    lvl, idx = lvl.gather(-1, order), idx.gather(-1, order)
    inverse = torch.full((units, total), -1, dtype=torch.int32, device=dev)
    slots = torch.arange(lvl.shape[-1], device=dev, dtype=torch.int32).expand(units, -1)
    flat_pos = torch.tensor(offsets[:-1], device=dev)[lvl] + idx
    inverse.scatter_(1, flat_pos, slots)

    def per_unit(x: Tensor) -> Tensor:
        return x.reshape(batch, kv_heads, *x.shape[1:])

    return SelectionPlan(per_unit(lvl.int()), per_unit(idx.int()), per_unit(inverse), per_unit(sel_q),
                         per_unit(sel_k), n, p, levels)


# ------------------------------------------- stage 5 input: the gather, and its backward


def pool_segments(x: Tensor, plan: SelectionPlan) -> Tensor:
    """The gather: [b, n, H, d] -> [b, S, H, d], per gathered slot the mean of the tokens its
    entry (l, i) pools, [i * c, (i + 1) * c - 1] with c = p**l."""
    return _segment_sum(x, plan, feed=False)


def feed_segments(g: Tensor, plan: SelectionPlan) -> Tensor:
    """The scatter's backward: [b, n, H, d] -> [b, S, H, d], per gathered slot the sum of `g`
    over the tokens its entry feeds, [e, e + c - 1] with e = (i + 1) * c - 1, clipped to n."""
    return _segment_sum(g, plan, feed=True)


def _segment_sum(x: Tensor, plan: SelectionPlan, feed: bool) -> Tensor:
    # Each range summed on its own in fp32, as the kernel does (a prefix sum would let one
    # huge token erase the digits of every later range).
    b, n, heads, d = x.shape
    group = heads // plan.kv_heads
    p = plan.pooling_factor
    tables = []
    for level in range(plan.levels):
        c = p**level
        # Fed ranges start c - 1 tokens later than pooled blocks: shift, then sum aligned blocks.
        shift = c - 1 if feed else 0
        xs = torch.nn.functional.pad(x[:, shift:].float(), (0, 0, 0, 0, 0, shift))
        sums = xs.reshape(b, n // c, c, heads, d).sum(dim=2)
        tables.append(sums if feed else sums / c)
    table = torch.cat(tables, dim=1)  # [b, sum of level lengths, H, d]
    lvl = plan.level.repeat_interleave(group, dim=1).transpose(1, 2).long()
    idx = plan.index.repeat_interleave(group, dim=1).transpose(1, 2).long()
    row = torch.tensor(level_offsets(n, p, plan.levels)[:-1], device=x.device)[lvl] + idx  # [b, S, H]
    return table.gather(1, row.unsqueeze(-1).expand(-1, -1, -1, d)).to(x.dtype)


# ----------------------------------------------- stage 6: the scatter, and its backward


def feed_tokens(o: Tensor, plan: SelectionPlan, halo: Tensor | None = None) -> Tensor:
    """The scatter: [b, S, H, d] -> [b, n, H, d], per base token the fp32 sum over levels of the
    rows of the entries feeding it (entry i = floor((t + 1) / c) - 1 of each level), plus
    `halo[:, t]` for the first tokens (what the chunk before feeds); in `o`'s dtype."""
    return _token_sum(o, plan, True, halo)


def pool_tokens(g: Tensor, plan: SelectionPlan) -> Tensor:
    """The gather's backward: [b, S, H, d] -> [b, n, H, d], per base token the fp32 sum over
    levels of the gradient / c of the entry pooling it (entry i = floor(t / c))."""
    return _token_sum(g, plan, False, None)


def _token_sum(g: Tensor, plan: SelectionPlan, feed: bool, halo: Tensor | None) -> Tensor:
    # One gather per base token and level through the inverse map, summed in level order in
    # fp32: the kernel's additions in the kernel's order, so the result is bitwise its own.
    b, _, heads, d = g.shape
    n, p = plan.seq_len, plan.pooling_factor
    group = heads // plan.kv_heads
    offsets = level_offsets(n, p, plan.levels)
    inv = plan.inverse.repeat_interleave(group, dim=1).transpose(1, 2)  # [b, total, H]
    t = torch.arange(n, device=g.device)
    out = torch.zeros(b, n, heads, d, dtype=torch.float32, device=g.device)
    for level in range(plan.levels):
        c = p**level
        i = (t + 1) // c - 1 if feed else t // c
        valid = i >= 0
        slot = inv[:, offsets[level] + i.clamp(min=0)].long()  # [b, n, H]
        ok = valid[None, :, None] & (slot >= 0)
        rows = g.float().gather(1, slot.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, d))
        rows = torch.where(ok.unsqueeze(-1), rows, 0.0)
        out += rows if feed else rows / c
    if halo is not None:
        out[:, : halo.shape[1]] += halo.float()
    return out.to(g.dtype)
