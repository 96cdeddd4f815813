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


def _all_chunks(pair: Tensor, cp: ContextParallel) -> list[Tensor]:
    """[2, ...] per rank (its two chunks) -> a list indexed by global chunk id."""
    parts = [torch.empty_like(pair) for _ in range(cp.size)]
    dist.all_gather(parts, pair.contiguous(), group=cp.group)
    chunks: list[Tensor] = [pair[0]] * (2 * cp.size)
    for r, part in enumerate(parts):
        first, second = cp.chunk_ids(r)
        chunks[first], chunks[second] = part[0], part[1]
    return chunks


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spill_first: Tensor, spill_second: Tensor, cp: ContextParallel):
        ctx.cp = cp
        spills = _all_chunks(torch.stack([spill_first, spill_second]), cp)
        # The first chunk of the sequence has nothing before it.
        return tuple(spills[j - 1] if j > 0 else torch.zeros_like(spill_first) for j in cp.chunk_ids())

    @staticmethod
    def backward(ctx, grad_first: Tensor, grad_second: Tensor):
        cp = ctx.cp
        grads = _all_chunks(torch.stack([grad_first, grad_second]), cp)
        last = 2 * cp.size - 1  # the last chunk's spill feeds nothing
        out = [grads[j + 1] if j < last else torch.zeros_like(grad_first) for j in cp.chunk_ids()]
        return out[0], out[1], None


def exchange_halo(spill_first: Tensor, spill_second: Tensor, cp: ContextParallel) -> tuple[Tensor, Tensor]:
    """Halos of this rank's two chunks (the spills of the chunks before them), differentiable."""
    return _HaloExchange.apply(spill_first, spill_second, cp)
