"""Fast Lighthouse stages, one module per stage; each Triton kernel has a PyTorch twin beside it.

scores.py   stage 2: fp32 norms and their max-pyramid, one pass over q and k
select.py   stages 3-4: per-tile top-k cascade, entries emitted in causal order
gather.py   stage 1 + 5 input: pooled q, k, v of the planned entries (pool_segments), and the
            scatter's backward (feed_segments)
scatter.py  stage 6: per-token sum of the feeding entries (feed_tokens), the gather's backward
            (pool_tokens), and
            the rows a context-parallel chunk feeds into the next one
"""

from .gather import feed_segments, feed_segments_torch, pool_segments, pool_segments_torch
from .scatter import feed_tokens, feed_tokens_torch, pool_tokens, pool_tokens_torch, spill_rows
from .scores import level_offsets, score_pyramids, score_pyramids_torch
from .select import SelectionPlan, select, select_torch

__all__ = [
    "SelectionPlan",
    "feed_segments",
    "feed_segments_torch",
    "feed_tokens",
    "feed_tokens_torch",
    "level_offsets",
    "pool_segments",
    "pool_segments_torch",
    "pool_tokens",
    "pool_tokens_torch",
    "score_pyramids",
    "score_pyramids_torch",
    "select",
    "select_torch",
    "spill_rows",
]
