"""Slow, obviously-correct Lighthouse attention: docs/algorithm.md stages 1-6, one function each.

This is the oracle every fast kernel is tested against. It knows nothing of Megatron or
of context parallelism beyond working on whatever sequence (or CP chunk) it is given:
for a chunk, pass `config.chunk_config(cp_size)` and ask `scatter` for `out_len` rows
past the chunk's end to see what spills into the next chunk.
`lighthouse_attention_chunked_reference` states the context-parallel algorithm this way, on
one process: it must equal the unchunked reference up to rounding.

Layouts: q [b, n, Hq, d], k and v [b, n, Hkv, d]; a selection unit is one (batch, kv head).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import LighthouseConfig, check_inputs
from .ops import twins
from .ops.plan import SelectionPlan

# ---------------------------------------------------------------- stage 1: pyramid


def pool(x: Tensor, block: int) -> Tensor:
    """Mean over consecutive blocks of `block` tokens along dim 1, summed in fp32."""
    b, n, h, d = x.shape
    return x.float().reshape(b, n // block, block, h, d).mean(dim=2).to(x.dtype)


def pyramid(x: Tensor, config: LighthouseConfig) -> list[Tensor]:
    """Levels 0..L-1 of symmetric pooling; level l has n / p**l entries."""
    return [pool(x, config.pooling_factor**level) for level in range(config.levels)]


# --------------------------------------------------- stages 2, 3 and 4: the plan


@torch.no_grad()
def plan(q: Tensor, k: Tensor, config: LighthouseConfig) -> SelectionPlan:
    """Stages 2-4: score, run the chunked top-k cascade per tile, order causally. The package's
    one CPU implementation of these stages (ops/twins.py); tests check it against a literal
    formulation of the paper's steps."""
    sq, sk = twins.score_pyramids(q, k, config)
    return twins.select(sq, sk, q.shape[0], k.shape[2], q.shape[1], config)


# --------------------------------------------------------------- stage 5: gather


def gather(levels: list[Tensor], plan: SelectionPlan) -> Tensor:
    """Pooled rows of the planned entries: [b, S, H, d] with H query or kv heads."""
    b, _, h, d = levels[0].shape
    hkv = plan.level.shape[1]
    offsets = [0]
    for x in levels[:-1]:
        offsets.append(offsets[-1] + x.shape[1])
    flat = torch.cat(levels, dim=1)  # [b, sum of level lengths, h, d]
    row = (torch.tensor(offsets, device=flat.device)[plan.level] + plan.index)  # [b, Hkv, S]
    row = row.repeat_interleave(h // hkv, dim=1).transpose(1, 2)  # [b, S, h]
    return flat.gather(1, row.unsqueeze(-1).expand(-1, -1, -1, d))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float) -> Tensor:
    """Plain causal softmax attention in fp32 math, [b, s, Hq, d] -> [b, s, Hq, d]."""
    group = q.shape[2] // k.shape[2]
    qf = q.float()
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    logits = torch.einsum("bshd,bthd->bhst", qf, kf) * softmax_scale
    s = q.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    probs = logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhst,bthd->bshd", probs, vf).to(q.dtype)


# -------------------------------------------------------------- stage 6: scatter


def scatter(
    o: Tensor, plan: SelectionPlan, config: LighthouseConfig, seq_len: int, out_len: int | None = None
) -> Tensor:
    """out[t] = sum over levels of the output of the emitted entry covering t.

    Entry (l, i) feeds base positions [e(l, i), e(l, i) + p**l - 1]. Accumulates in fp32
    and returns the input dtype. `out_len` > seq_len keeps the rows that spill past the
    sequence end (what a CP chunk hands to the next one); by default they are clipped.
    """
    out_len = seq_len if out_len is None else out_len
    b, s, hq, d = o.shape
    group = hq // plan.level.shape[1]
    t = torch.arange(out_len, device=o.device)
    out = torch.zeros(b, out_len, hq, d, dtype=torch.float32, device=o.device)
    for level in range(config.levels):
        c = config.pooling_factor**level
        entries = seq_len // c
        # Per-level table of entry outputs; zero rows for entries that were not emitted.
        mine = (plan.level == level).repeat_interleave(group, dim=1).transpose(1, 2)  # [b, S, Hq]
        idx = plan.index.long().repeat_interleave(group, dim=1).transpose(1, 2)
        idx = torch.where(mine, idx, entries)  # dump row for other levels' entries
        table = torch.zeros(b, entries + 1, hq, d, dtype=torch.float32, device=o.device)
        table = table.scatter(1, idx.unsqueeze(-1).expand(-1, -1, -1, d), o.float())
        cover = (t + 1) // c - 1  # entry of this level covering base position t
        valid = (cover >= 0) & (cover < entries)
        rows = table[:, torch.where(valid, cover, entries)]  # invalid -> dump row
        out = out + torch.where(valid[None, :, None, None], rows, 0.0)
    return out.to(o.dtype)


def covering_counts(o: Tensor, plan: SelectionPlan, config: LighthouseConfig, seq_len: int,
                    out_len: int | None = None) -> Tensor:
    """How many emitted entries cover each base position: the scatter of ones, [b, out_len, Hq, 1]."""
    return scatter(torch.ones_like(o[..., :1], dtype=torch.float32), plan, config, seq_len, out_len)


def merge_levels(summed: Tensor, counts: Tensor, config: LighthouseConfig) -> Tensor:
    """level_merge: "sum" keeps the scatter's sum; "mean" divides each token's sum by `counts`, the
    number of emitted entries covering it (the scatter of ones, [b, n, Hq, 1]; a token none covers
    keeps its zero)."""
    if config.level_merge == "sum":
        return summed
    return (summed.float() / counts.float().clamp(min=1)).to(summed.dtype)


# ---------------------------------------------------------- non-finite inputs


def nan_where_not_finite(out: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """A NaN or inf anywhere in a selection unit's q, k or v makes all its outputs NaN."""
    b, n, hkv = k.shape[0], k.shape[1], k.shape[2]
    bad = torch.zeros(b, hkv, dtype=torch.bool, device=out.device)
    for x in (q, k, v):
        bad |= ~torch.isfinite(x.reshape(b, n, hkv, -1)).all(dim=-1).all(dim=1)
    group = out.shape[2] // hkv
    mask = bad.repeat_interleave(group, dim=1)[:, None, :, None]  # [b, 1, Hq, 1]
    return torch.where(mask, float("nan"), out)


# ----------------------------------------------------------------------- all


def lighthouse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, softmax_scale: float | None = None
) -> Tensor:
    """Lighthouse attention, stages 1-6 as docs/algorithm.md writes them.

    q [b, s, Hq, d], k and v [b, s, Hkv, d] (after RoPE) -> [b, s, Hq, d]; differentiable in
    q, k and v (the selection itself carries no gradient).
    """
    check_inputs(q, k, v, config)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    p = plan(q, k, config)
    o = causal_attention(
        gather(pyramid(q, config), p), gather(pyramid(k, config), p), gather(pyramid(v, config), p), scale
    )
    counts = covering_counts(o, p, config, q.shape[1])
    return nan_where_not_finite(merge_levels(scatter(o, p, config, q.shape[1]), counts, config), q, k, v)


def lighthouse_attention_chunked_reference(
    q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, cp_size: int,
    softmax_scale: float | None = None,
) -> Tensor:
    """Lighthouse attention the context-parallel way, on one process, over the full sequence.

    The sequence is cut into 2*cp_size chunks; each chunk is planned with
    `config.chunk_config(cp_size)` and gathered; causal attention runs on the concatenation
    of the gathered chunks; each chunk scatters its output with the rows that spill past its
    end, which are added to the next chunk's first tokens.
    """
    check_inputs(q, k, v, config)
    config.validate(q.shape[1], cp_size)
    if cp_size == 1:
        return lighthouse_attention_reference(q, k, v, config, softmax_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    chunk = config.chunk_config(cp_size)
    n = q.shape[1] // config.num_chunks(cp_size)
    pieces = [x.split(n, dim=1) for x in (q, k, v)]
    plans = [plan(qc, kc, chunk) for qc, kc in zip(pieces[0], pieces[1], strict=True)]
    gathered = [
        torch.cat([gather(pyramid(xc, chunk), p) for xc, p in zip(chunks, plans, strict=True)], dim=1)
        for chunks in pieces
    ]
    o = causal_attention(*gathered, scale)
    spill = config.coarsest_block - 1
    outs, counts = [], []
    for oc, p in zip(o.split([p.length for p in plans], dim=1), plans, strict=True):
        outs.append(scatter(oc, p, chunk, n, out_len=n + spill).float())
        counts.append(covering_counts(oc, p, chunk, n, out_len=n + spill))
    for j in range(1, len(outs)):  # what chunk j-1 fed past its end lands in chunk j
        outs[j][:, :spill] += outs[j - 1][:, n:]
        counts[j][:, :spill] += counts[j - 1][:, n:]
    summed = torch.cat([x[:, :n] for x in outs], dim=1)
    merged = merge_levels(summed, torch.cat([c[:, :n] for c in counts], dim=1), config).to(q.dtype)
    return nan_where_not_finite(merged, q, k, v)
