"""The halo of the scatter: rows a chunk feeds into the next chunk's first tokens.

Chunk j's last entry at each level l >= 1 feeds the first p**l - 1 tokens of chunk j+1, which
another rank may hold. Every rank contributes the spill of its two chunks (p**(L-1) - 1 rows
each, fp32) to one all-gather and takes the spill of the chunk before each of its own: a few
kilobytes, whatever the sequence length. The backward pass is the same exchange in the other
direction (the gradient of a halo is the gradient of the spill that produced it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .context import ContextParallel


def _take(pairs: Tensor, cp: ContextParallel, step: int) -> Tensor:
    """[2b, ...] of this rank's chunks (batch-major: b, then chunk) -> for each of its chunks j,
    the rows of chunk j - step from the rank holding it (zeros past either end)."""
    parts = [torch.empty_like(pairs) for _ in range(cp.size)]
    dist.all_gather(parts, pairs.contiguous(), group=cp.group)
    where = {}  # chunk id -> (rank, position)
    for r in range(cp.size):
        for pos, j in enumerate(cp.chunk_ids(r)):
            where[j] = (r, pos)
    out = []
    for j in cp.chunk_ids():
        if j - step not in where:
            out.append(torch.zeros_like(pairs[0::2]))
        else:
            r, pos = where[j - step]
            out.append(parts[r][pos::2])
    return torch.stack(out, dim=1).flatten(0, 1)


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spill: Tensor, cp: ContextParallel):
        ctx.cp = cp
        return _take(spill, cp, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _take(grad, ctx.cp, -1), None


def exchange_halo(spill: Tensor, cp: ContextParallel) -> Tensor:
    """Halos of this rank's two chunks, differentiable: `spill` [2b, rows, H, d] holds what each
    chunk (batch-major: b, then the rank's chunk r and 2*CP-1-r) feeds past its end; the result,
    in the same layout, what the chunk before each feeds into it (zeros for the first chunk)."""
    return _HaloExchange.apply(spill, cp)
