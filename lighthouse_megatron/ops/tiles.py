"""Stages 3 and 4 kernel, one program per tile: the top-k cascade, emitting entries already in
causal order (twin: `twins.select`).

Every tile of a selection unit emits the same number of entries, all of them inside the
tile's token range, so tile j owns the slots [j * per_tile, (j + 1) * per_tile) of the
gathered sequence. Inside a tile, an entry's slot is the number of emitted entries that
precede it in (last token, level) order, counted directly (a closed form for the coarsest
level, whose entries are all emitted; a binary search in each finer level's sorted list):
no sort of the whole sequence.

Top-k without sorting: the T/2-th largest score is found by bisection on the int32 bit
patterns of the (non-negative) fp32 scores, 31 counting passes over the candidates; the
selection is everything above it plus the lowest-index entries equal to it, which is
exactly the reference's stable sort (ties to the lower index). Only the T/2 chosen entries
are ranked among themselves, for the rank-ordered `selected_q/_k` outputs. The cost is
linear in the number of candidates per tile (M / n_tiles can be thousands at 1M tokens).

Output: a `plan.SelectionPlan` (level, index, inverse, selected_q/_k), each unit's rows
written at unit * row length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import LighthouseConfig
from ._triton import interpreting, tl, triton
from .plan import SelectionPlan, level_offsets


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
        cand = first + pos
    else:
        cand = tl.load(list_ptr + LEVEL * PT + pos, mask=ok, other=0)
    return cand


@triton.jit
def _top_half(keys, flags, picked, out_ptr, cand_ptr, count,
              HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK: tl.constexpr):
    """Select the HALF largest of keys[0:count] (int32 bit patterns of non-negative fp32
    scores, so integer order is float order; excluded entries hold -1), ties to the lower
    position. Sets flags[pos] to 1 for the selected, 0 otherwise, and writes their
    candidate indices (cand_ptr[pos]) to out_ptr in rank order."""
    ab = tl.arange(0, BLOCK)
    # 1. Bisection for tau, the HALF-th largest key: the largest v with #{key >= v} >= HALF.
    #    31 counting passes over `count` keys instead of count**2 comparisons.
    lo = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    hi = lo + 0x7F800000  # +inf: norms are finite, and hi - lo + 1 must not overflow
    for _ in range(31):
        mid = lo + (hi - lo + 1) // 2
        above = lo * 0
        for b0 in range(0, count, BLOCK):
            pos = b0 + ab
            key = tl.load(keys + pos, mask=pos < count, other=-1)
            above += tl.sum((key >= mid).to(tl.int32), axis=0)
        take = above >= HALF
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    tau = lo
    # 2. Everything above tau, then the lowest positions among the keys equal to tau.
    greater = lo * 0
    for b0 in range(0, count, BLOCK):
        pos = b0 + ab
        key = tl.load(keys + pos, mask=pos < count, other=-1)
        greater += tl.sum((key > tau).to(tl.int32), axis=0)
    ties_wanted = HALF - greater
    ties_seen = lo * 0
    written = lo * 0
    for b0 in range(0, count, BLOCK):
        pos = b0 + ab
        ok = pos < count
        key = tl.load(keys + pos, mask=ok, other=-1)
        tie = (key == tau) & ok
        tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0) - 1
        chosen = ok & ((key > tau) | (tie & (tie_rank < ties_wanted)))
        tl.store(flags + pos, chosen.to(tl.int32), mask=ok)
        slot = written + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(picked + slot, pos, mask=chosen & (slot < HALF))  # the bound: NaN inputs only
        ties_seen += tl.sum(tie.to(tl.int32), axis=0)
        written += tl.sum(chosen.to(tl.int32), axis=0)
    tl.debug_barrier()
    # 3. Rank order among the HALF chosen (the only entries that can beat a chosen one).
    ai = tl.arange(0, HALF_P2)
    ok_i = ai < HALF
    pos_i = tl.load(picked + ai, mask=ok_i, other=0)
    key_i = tl.load(keys + pos_i, mask=ok_i, other=-1)
    ties = (key_i[None, :] == key_i[:, None]) & (pos_i[None, :] < pos_i[:, None])
    beats = (key_i[None, :] > key_i[:, None]) | ties
    rank = tl.sum((beats & ok_i[None, :]).to(tl.int32), axis=1)
    tl.store(out_ptr + rank, tl.load(cand_ptr + pos_i, mask=ok_i, other=0), mask=ok_i)
    tl.debug_barrier()


@triton.jit
def _select_kernel(
    sq_ptr, sk_ptr, total,
    level_ptr, index_ptr, inv_ptr, S,
    selq_ptr, selk_ptr,
    scratch_ptr, scratch_len, list_ptr,
    n, n_tiles, m_tile,
    P: tl.constexpr, LEVELS: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
    BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    # One program per (tile, selection unit); the grid's y is batch * kv heads (< 65536).
    tile = tl.program_id(0)
    unit = tl.program_id(1)
    TOP: tl.constexpr = LEVELS - 1
    PT: tl.constexpr = 2 * HALF * P  # candidates at every level below the coarsest
    C: tl.constexpr = P**TOP
    prog = unit.to(tl.int64) * n_tiles + tile
    # Per-program scratch (global memory, L1/L2 resident): candidate indices, the q and k
    # keys, the two flag arrays and the chosen positions; then the candidate lists.
    cands = scratch_ptr + prog * (5 * scratch_len + 2 * HALF_P2)
    keys_q = cands + scratch_len
    keys_k = keys_q + scratch_len
    flags_q = keys_k + scratch_len
    flags_k = flags_q + scratch_len
    picked = flags_k + scratch_len
    lists = list_ptr + prog * (TOP * PT)
    scores_q = sq_ptr + unit.to(tl.int64) * total
    scores_k = sk_ptr + unit.to(tl.int64) * total
    first = tile * m_tile  # first coarsest entry of the tile
    ab = tl.arange(0, BLOCK)

    # ---------------------------------------------------------------- the cascade
    for LEVEL in tl.static_range(TOP, 0, -1):
        off = _level_offset(n, LEVEL, P)
        if LEVEL == TOP:
            count = m_tile
        else:
            count = PT
        sel_base = ((unit.to(tl.int64) * TOP + (LEVEL - 1)) * n_tiles + tile) * HALF
        # Candidates' scores as int32 keys, contiguous.
        for b0 in range(0, count, BLOCK):
            pos = b0 + ab
            ok = pos < count
            ci = _candidates(lists, first, pos, ok, LEVEL, TOP, PT)
            tl.store(cands + pos, ci, mask=ok)
            sq = tl.load(scores_q + off + ci, mask=ok, other=0.0)
            sk = tl.load(scores_k + off + ci, mask=ok, other=0.0)
            tl.store(keys_q + pos, sq.to(tl.int32, bitcast=True), mask=ok)
            tl.store(keys_k + pos, sk.to(tl.int32, bitcast=True), mask=ok)
        tl.debug_barrier()
        # A_q by query score; then A_k by key score among the rest (A_q's keys set to -1).
        _top_half(keys_q, flags_q, picked, selq_ptr + sel_base, cands, count, HALF, HALF_P2, BLOCK)
        for b0 in range(0, count, BLOCK):
            pos = b0 + ab
            ok = pos < count
            in_q = tl.load(flags_q + pos, mask=ok, other=0) != 0
            tl.store(keys_k + pos, tl.full([BLOCK], -1, tl.int32), mask=ok & in_q)
        tl.debug_barrier()
        _top_half(keys_k, flags_k, picked, selk_ptr + sel_base, cands, count, HALF, HALF_P2, BLOCK)

        # Children of A, in ascending index order, are the next level's candidates.
        written = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
        for b0 in range(0, count, BLOCK):
            pos = b0 + ab
            ok = pos < count
            ci = tl.load(cands + pos, mask=ok, other=0)
            fq = tl.load(flags_q + pos, mask=ok, other=0)
            fk = tl.load(flags_k + pos, mask=ok, other=0)
            chosen = ((fq + fk) > 0) & ok
            slot = written + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
            r = tl.arange(0, P)
            dst = lists + (LEVEL - 1) * PT + slot[:, None] * P + r[None, :]
            # slot < 2*HALF always holds for real scores; the bound only keeps NaN inputs
            # from writing past the list.
            tl.store(dst, ci[:, None] * P + r[None, :], mask=(chosen & (slot < 2 * HALF))[:, None])
            written += tl.sum(chosen.to(tl.int32), axis=0)
        tl.debug_barrier()

    # ------------------------------------------------- placement in causal order
    # An entry's slot in the tile = number of emitted entries before it in (e, level) order:
    # every coarsest entry of the tile is emitted (closed form), and each finer level's
    # list is sorted, so its count is a binary search.
    per_tile = m_tile + TOP * PT
    out_base = unit.to(tl.int64) * S + tile * per_tile
    for LEVEL in tl.static_range(LEVELS):
        off = _level_offset(n, LEVEL, P)
        if LEVEL == TOP:
            count = m_tile
        else:
            count = PT
        for b0 in range(0, count, BLOCK):
            pos_in = b0 + ab
            ok = pos_in < count
            ci = _candidates(lists, first, pos_in, ok, LEVEL, TOP, PT)
            e = (ci + 1) * (P**LEVEL) - 1
            slot = e // C - first  # coarsest entries ending before e
            for FINER in tl.static_range(TOP):
                lo = tl.zeros([BLOCK], dtype=tl.int32)
                hi = lo + PT
                for _ in tl.static_range(SEARCH_STEPS):
                    active = lo < hi
                    mid = (lo + hi) // 2
                    cm = tl.load(lists + FINER * PT + mid, mask=ok & active, other=0)
                    em = (cm + 1) * (P**FINER) - 1
                    if FINER < LEVEL:  # a finer entry ending at e comes first
                        before = em <= e
                    else:
                        before = em < e
                    lo = tl.where(active & before, mid + 1, lo)
                    hi = tl.where(active & (~before), mid, hi)
                slot += lo
            tl.store(level_ptr + out_base + slot, tl.full([BLOCK], LEVEL, tl.int32), mask=ok)
            tl.store(index_ptr + out_base + slot, ci, mask=ok)
            tl.store(inv_ptr + unit.to(tl.int64) * total + off + ci, tile * per_tile + slot, mask=ok)


def _check_sizes(n: int, config: LighthouseConfig) -> None:
    config.validate(n)
    # int32 slots and indices: per-unit buffers hold fewer than 2**31 entries.
    if n * 2 >= 2**31:
        raise ValueError(f"lighthouse kernels index tokens with int32; sequence length {n} is too long")


# Launch settings from the H100 sweep in benchmarks/layer/tune_kernels.log:
# block and warp counts moved each kernel by under 5% there; not swept on other GPUs.
SELECT_LAUNCH = {"block": 1024, "num_warps": 8}


def select(
    sq: Tensor, sk: Tensor, batch: int, kv_heads: int, n: int, config: LighthouseConfig, **launch
) -> SelectionPlan:
    """Run the cascade on score pyramids from `scores.score_pyramids` (levels >= 2)."""
    _check_sizes(n, config)
    p, levels, half = config.pooling_factor, config.levels, config.tile_topk // 2
    tiles = config.num_tiles
    m_tile = n // config.coarsest_block // tiles
    pt = p * config.tile_topk
    units = batch * kv_heads
    total = level_offsets(n, p, levels)[-1]
    s_len = config.gathered_length(n)
    dev = sq.device
    level = torch.empty(batch, kv_heads, s_len, dtype=torch.int32, device=dev)
    index = torch.empty(batch, kv_heads, s_len, dtype=torch.int32, device=dev)
    inverse = torch.full((batch, kv_heads, total), -1, dtype=torch.int32, device=dev)
    sel_q = torch.empty(batch, kv_heads, levels - 1, tiles, half, dtype=torch.int32, device=dev)
    sel_k = torch.empty_like(sel_q)
    opts = {**SELECT_LAUNCH, **launch}
    scratch_len = max(m_tile, pt)
    half_p2 = triton.next_power_of_2(half)
    scratch = torch.empty(units * tiles, 5 * scratch_len + 2 * half_p2, dtype=torch.int32, device=dev)
    lists = torch.empty(units * tiles, (levels - 1) * pt, dtype=torch.int32, device=dev)
    _select_kernel[(tiles, units)](
        sq, sk, total, level, index, inverse, s_len, sel_q, sel_k, scratch, scratch_len, lists,
        n, tiles, m_tile,
        P=p, LEVELS=levels, HALF=half, HALF_P2=half_p2,
        BLOCK=64 if interpreting() else opts["block"], SEARCH_STEPS=pt.bit_length(),
        num_warps=opts["num_warps"],
    )
    return SelectionPlan(level, index, inverse, sel_q, sel_k, n, p, levels)

