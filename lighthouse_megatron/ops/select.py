"""Stages 3 and 4: the per-tile top-k cascade, emitting entries already in causal order.

Every tile of a selection unit emits the same number of entries, all of them inside the
tile's token range, so tile j owns the slots [j * per_tile, (j + 1) * per_tile) of the
gathered sequence. Inside a tile, an entry's slot is the number of emitted entries that
precede it in (last token, level) order, counted directly: no sort of the whole sequence.

Top-k is done by rank counting: an entry's rank is the number of candidates with a larger
score, or an equal score and a lower index. Entries of rank < T/2 are selected. This is
exact (ties go to the lower index, as in the reference's stable sort), needs no shared
memory beyond one block pair, and works for any number of candidates per tile.

Outputs (a `SelectionPlan`):
  level, index   [b * Hkv, S] int32, causal order;
  inverse        [b * Hkv, total] int32 in the scores' flat pyramid layout: the slot of
                 every emitted entry, -1 for entries not emitted;
  selected_q/_k  [b * Hkv, L-1, tiles, T/2] int32: in-level indices chosen by query norm and
                 by key norm at levels 1..L-1 (index level-1), in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import LighthouseConfig
from .scores import _interpreting, level_offsets


@dataclass
class SelectionPlan:
    level: Tensor
    index: Tensor
    inverse: Tensor
    selected_q: Tensor
    selected_k: Tensor
    batch: int
    kv_heads: int
    seq_len: int
    pooling_factor: int
    levels: int

    @property
    def length(self) -> int:
        return self.level.shape[-1]

    def to_reference(self):
        """The same plan as a `reference.LighthousePlan` (int64, [b, Hkv, ...] views)."""
        from ..reference import LighthousePlan

        b, h = self.batch, self.kv_heads
        sel_q = {lv: self.selected_q[:, lv - 1].reshape(b, h, -1, self.selected_q.shape[-1]).long()
                 for lv in range(1, self.levels)}
        sel_k = {lv: self.selected_k[:, lv - 1].reshape(b, h, -1, self.selected_k.shape[-1]).long()
                 for lv in range(1, self.levels)}
        return LighthousePlan(
            level=self.level.reshape(b, h, -1).long(),
            index=self.index.reshape(b, h, -1).long(),
            selected_q=sel_q,
            selected_k=sel_k,
            pooling_factor=self.pooling_factor,
        )


@triton.jit
def _level_offset(n, LEVEL: tl.constexpr, P: tl.constexpr):
    off = n * 0
    for j in tl.static_range(LEVEL):
        off += n // (P**j)
    return off


@triton.jit
def _candidates(list_ptr, first, pos, ok, LEVEL: tl.constexpr, TOP: tl.constexpr, PT: tl.constexpr):
    """In-level indices of the candidates at positions `pos`: a contiguous range at the
    coarsest level, else the list the level above wrote to scratch."""
    if LEVEL == TOP:
        return first + pos
    else:
        return tl.load(list_ptr + LEVEL * PT + pos, mask=ok, other=0)


@triton.jit
def _select_kernel(
    sq_ptr, sk_ptr, total,
    level_ptr, index_ptr, inv_ptr, S,
    selq_ptr, selk_ptr,
    flag_ptr, list_ptr, flag_len,
    n, n_tiles, m_tile,
    P: tl.constexpr, LEVELS: tl.constexpr, HALF: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr,
):
    tile = tl.program_id(0)
    unit = tl.program_id(1)
    TOP: tl.constexpr = LEVELS - 1
    PT: tl.constexpr = 2 * HALF * P  # candidates at every level below the coarsest
    C: tl.constexpr = P**TOP
    prog = unit.to(tl.int64) * n_tiles + tile
    flags_q = flag_ptr + prog * (2 * flag_len)
    flags_k = flags_q + flag_len
    lists = list_ptr + prog * (TOP * PT)
    scores_q = sq_ptr + unit.to(tl.int64) * total
    scores_k = sk_ptr + unit.to(tl.int64) * total
    first = tile * m_tile  # first coarsest entry of the tile
    ai = tl.arange(0, BI)
    aj = tl.arange(0, BJ)

    # ---------------------------------------------------------------- the cascade
    for step in tl.static_range(TOP):
        LEVEL: tl.constexpr = TOP - step
        off = _level_offset(n, LEVEL, P)
        if LEVEL == TOP:
            count = m_tile
        else:
            count = PT
        sel_base = ((unit.to(tl.int64) * TOP + (LEVEL - 1)) * n_tiles + tile) * HALF

        # A_q: rank by query score among all candidates.
        for i0 in range(0, count, BI):
            pi = i0 + ai
            oki = pi < count
            ci = _candidates(lists, first, pi, oki, LEVEL, TOP, PT)
            si = tl.load(scores_q + off + ci, mask=oki, other=0.0)
            rank = tl.zeros([BI], dtype=tl.int32)
            for j0 in range(0, count, BJ):
                pj = j0 + aj
                okj = pj < count
                cj = _candidates(lists, first, pj, okj, LEVEL, TOP, PT)
                sj = tl.load(scores_q + off + cj, mask=okj, other=0.0)
                beats = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (pj[None, :] < pi[:, None]))
                rank += tl.sum((beats & okj[None, :]).to(tl.int32), axis=1)
            chosen = oki & (rank < HALF)
            tl.store(flags_q + pi, chosen.to(tl.int32), mask=oki)
            tl.store(selq_ptr + sel_base + rank, ci, mask=chosen)
        tl.debug_barrier()  # flags_q is read back by other threads of this program

        # A_k: rank by key score among the candidates not in A_q.
        for i0 in range(0, count, BI):
            pi = i0 + ai
            oki = pi < count
            ci = _candidates(lists, first, pi, oki, LEVEL, TOP, PT)
            si = tl.load(scores_k + off + ci, mask=oki, other=0.0)
            in_q = tl.load(flags_q + pi, mask=oki, other=1) != 0
            rank = tl.zeros([BI], dtype=tl.int32)
            for j0 in range(0, count, BJ):
                pj = j0 + aj
                okj = pj < count
                cj = _candidates(lists, first, pj, okj, LEVEL, TOP, PT)
                sj = tl.load(scores_k + off + cj, mask=okj, other=0.0)
                free_j = okj & (tl.load(flags_q + pj, mask=okj, other=1) == 0)
                beats = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (pj[None, :] < pi[:, None]))
                rank += tl.sum((beats & free_j[None, :]).to(tl.int32), axis=1)
            chosen = oki & (~in_q) & (rank < HALF)
            tl.store(flags_k + pi, chosen.to(tl.int32), mask=oki)
            tl.store(selk_ptr + sel_base + rank, ci, mask=chosen)
        tl.debug_barrier()

        # Children of A, in ascending index order, are the next level's candidates.
        written = tl.sum(tl.zeros([BI], dtype=tl.int32), axis=0)
        for i0 in range(0, count, BI):
            pi = i0 + ai
            oki = pi < count
            ci = _candidates(lists, first, pi, oki, LEVEL, TOP, PT)
            fq = tl.load(flags_q + pi, mask=oki, other=0)
            fk = tl.load(flags_k + pi, mask=oki, other=0)
            picked = ((fq + fk) > 0) & oki
            picked32 = picked.to(tl.int32)
            slot = written + tl.cumsum(picked32, axis=0) - 1
            r = tl.arange(0, P)
            dst = lists + (LEVEL - 1) * PT + slot[:, None] * P + r[None, :]
            tl.store(dst, ci[:, None] * P + r[None, :], mask=picked[:, None])
            written += tl.sum(picked32, axis=0)
        tl.debug_barrier()

    # ------------------------------------------------- placement in causal order
    per_tile = m_tile + TOP * PT
    out_base = unit.to(tl.int64) * S + tile * per_tile
    for LEVEL in tl.static_range(LEVELS):
        off = _level_offset(n, LEVEL, P)
        if LEVEL == TOP:
            count = m_tile
        else:
            count = PT
        for i0 in range(0, count, BI):
            pi = i0 + ai
            oki = pi < count
            ci = _candidates(lists, first, pi, oki, LEVEL, TOP, PT)
            e = (ci + 1) * (P**LEVEL) - 1
            # Coarsest entries before e: every coarsest entry of the tile is emitted.
            pos = e // C - first
            for FINER in tl.static_range(TOP):
                for j0 in range(0, PT, BJ):
                    cj = tl.load(lists + FINER * PT + j0 + aj)
                    ej = (cj + 1) * (P**FINER) - 1
                    if FINER < LEVEL:  # a finer entry ending at e comes first
                        before = ej[None, :] <= e[:, None]
                    else:
                        before = ej[None, :] < e[:, None]
                    pos += tl.sum(before.to(tl.int32), axis=1)
            tl.store(level_ptr + out_base + pos, tl.full([BI], LEVEL, tl.int32), mask=oki)
            tl.store(index_ptr + out_base + pos, ci, mask=oki)
            tl.store(inv_ptr + unit.to(tl.int64) * total + off + ci, tile * per_tile + pos, mask=oki)


def _check_sizes(n: int, config: LighthouseConfig) -> None:
    config.validate(n)
    # int32 slots and indices: per-unit buffers hold fewer than 2**31 entries.
    if n * 2 >= 2**31:
        raise ValueError(f"lighthouse kernels index tokens with int32; sequence length {n} is too long")


def select(sq: Tensor, sk: Tensor, batch: int, kv_heads: int, n: int, config: LighthouseConfig) -> SelectionPlan:
    """Run the cascade on score pyramids from `scores.score_pyramids`."""
    if not sq.is_cuda and not _interpreting():
        return select_torch(sq, sk, batch, kv_heads, n, config)
    _check_sizes(n, config)
    if config.levels == 1:
        return select_torch(sq, sk, batch, kv_heads, n, config)
    p, levels, half = config.pooling_factor, config.levels, config.tile_topk // 2
    tiles = config.num_tiles
    m_tile = n // config.coarsest_block // tiles
    pt = p * config.tile_topk
    units = batch * kv_heads
    total = level_offsets(n, p, levels)[-1]
    s_len = config.gathered_length(n)
    dev = sq.device
    level = torch.empty(units, s_len, dtype=torch.int32, device=dev)
    index = torch.empty(units, s_len, dtype=torch.int32, device=dev)
    inverse = torch.full((units, total), -1, dtype=torch.int32, device=dev)
    sel_q = torch.empty(units, levels - 1, tiles, half, dtype=torch.int32, device=dev)
    sel_k = torch.empty_like(sel_q)
    flag_len = max(m_tile, pt)
    flags = torch.empty(units * tiles, 2 * flag_len, dtype=torch.int32, device=dev)
    lists = torch.empty(units * tiles, (levels - 1) * pt, dtype=torch.int32, device=dev)
    block = 64 if _interpreting() else 128
    _select_kernel[(tiles, units)](
        sq, sk, total, level, index, inverse, s_len, sel_q, sel_k, flags, lists, flag_len,
        n, tiles, m_tile,
        P=p, LEVELS=levels, HALF=half, BI=block, BJ=block, num_warps=8,
    )
    return SelectionPlan(level, index, inverse, sel_q, sel_k, batch, kv_heads, n, p, levels)


# ------------------------------------------------------------------ PyTorch twin


def _topk_lower_index(scores: Tensor, count: int) -> Tensor:
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]


@torch.no_grad()
def select_torch(sq: Tensor, sk: Tensor, batch: int, kv_heads: int, n: int, config: LighthouseConfig) -> SelectionPlan:
    """Plain-PyTorch twin of `select`: the reference's cascade and causal sort, same outputs."""
    p, levels, half = config.pooling_factor, config.levels, config.tile_topk // 2
    tiles = config.num_tiles
    units = sq.shape[0]
    offsets = level_offsets(n, p, levels)
    total = offsets[-1]
    dev = sq.device
    top = levels - 1
    per_tile = n // config.coarsest_block // tiles
    cand = torch.arange(n // config.coarsest_block, device=dev).reshape(tiles, per_tile).expand(units, tiles, per_tile)
    lvls, idxs = [], []
    sel_q = torch.zeros(units, max(levels - 1, 0), tiles, half, dtype=torch.int32, device=dev)
    sel_k = torch.zeros_like(sel_q)
    for level in range(top, 0, -1):
        flat = cand.reshape(units, -1)
        lo, hi = offsets[level], offsets[level + 1]
        s_q = sq[:, lo:hi].gather(-1, flat).reshape(cand.shape)
        s_k = sk[:, lo:hi].gather(-1, flat).reshape(cand.shape)
        pos_q = _topk_lower_index(s_q, half)
        pos_k = _topk_lower_index(s_k.scatter(-1, pos_q, float("-inf")), half)
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
    last = (idx + 1) * p**lvl - 1
    order = torch.argsort(last * levels + lvl, dim=-1)
    lvl, idx = lvl.gather(-1, order), idx.gather(-1, order)
    inverse = torch.full((units, total), -1, dtype=torch.int32, device=dev)
    slots = torch.arange(lvl.shape[-1], device=dev, dtype=torch.int32).expand(units, -1)
    flat_pos = torch.tensor(offsets[:-1], device=dev)[lvl] + idx
    inverse.scatter_(1, flat_pos, slots)
    return SelectionPlan(lvl.int(), idx.int(), inverse, sel_q, sel_k, batch, kv_heads, n, p, levels)
