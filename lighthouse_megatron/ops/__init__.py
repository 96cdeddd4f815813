"""The Lighthouse stages, each a Triton kernel with a plain-PyTorch twin (flash-linear-attention's
naive-beside-fused layout, one twins module for all stages):

plan.py      the selection plan every stage and the reference share, and its flat pyramid layout
twins.py     every stage in plain PyTorch, in stage order: the CPU path and the kernels' oracle
stages.py    the stages as torch.library custom ops (fake shapes, autograd): the one place that
             picks kernel or twin
kernels, one file per index space the grid walks:
  scores.py    blocks of base tokens: fp32 norms and their max-pyramids (stage 2)
  tiles.py     tiles: the top-k cascade and causal placement (stages 3-4)
  segments.py  gathered slots: the pooled gather (stage 5 input) and the scatter's backward
  tokens.py    base tokens: the scatter (stage 6) and the gather's backward
"""

from .plan import SelectionPlan

__all__ = ["SelectionPlan", "covering_counts", "gather", "scatter", "score_pyramids", "select", "spill_rows"]


def __getattr__(name: str):
    # The stages load Triton and register the custom ops; the reference imports `ops.plan` and
    # `ops.twins`, which load this module first, and must not pay for (or depend on) either.
    if name in __all__:
        from . import stages

        return getattr(stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
