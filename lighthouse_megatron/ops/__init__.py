"""Fast Lighthouse stages, one module per stage; each Triton kernel has a PyTorch twin beside it.

scores.py   stage 2: fp32 norms and their max-pyramid, one pass over q and k
select.py   stages 3-4: per-tile top-k cascade, entries emitted in causal order
gather.py   stage 1 + 5 input: pooled q, k, v of the planned entries (and the scatter's backward)
scatter.py  stage 6: per-token sum of the covering entries (and the gather's backward), and
            the rows a context-parallel chunk feeds into the next one
"""

from .gather import gather_pooled, segment_sum, segment_sum_torch
from .scatter import scatter_back, spill_rows, token_sum, token_sum_torch
from .scores import level_offsets, score_pyramids, score_pyramids_torch
from .select import SelectionPlan, select, select_torch

__all__ = [
    "SelectionPlan",
    "gather_pooled",
    "level_offsets",
    "scatter_back",
    "score_pyramids",
    "score_pyramids_torch",
    "segment_sum",
    "segment_sum_torch",
    "select",
    "select_torch",
    "spill_rows",
    "token_sum",
    "token_sum_torch",
]
