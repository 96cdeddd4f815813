"""Context parallelism (CP) for Lighthouse attention: Megatron's load-balanced chunk layout, causal
attention across the CP group, and the halo exchange of the scatter.

Megatron cuts a sequence into 2*CP chunks and CP rank r holds chunks r and 2*CP-1-r, in that order.
Lighthouse runs stages 1-4 on each chunk with topk / (2*CP) and the tiles of the non-CP run, so the
global gathered sequence is the concatenation of the chunks' gathered sequences and rank r holds
gathered chunks r and 2*CP-1-r: the same layout for length S, on which stage 5 runs as
context-parallel causal attention. Stage 6 is local except for the rows each chunk feeds into the
next chunk's first tokens, exchanged as a small halo. CP = 1, 2, 4 give the same outputs and
gradients up to rounding. Nothing here knows Megatron: the group comes from the caller.
"""

from .attention import causal_attention
from .context import ContextParallel, SplitGroups, merge_chunks, split_chunks
from .halo import exchange_halo

__all__ = ["ContextParallel", "SplitGroups", "causal_attention", "exchange_halo", "merge_chunks",
           "split_chunks"]
