"""The two-stage recipe: which attention each Lighthouse layer runs at each training iteration.

The paper's recipe is one hard switch: Lighthouse until iteration `until_iter`, then every layer
dense. Three variants approach dense attention during stage 1 instead, each meant to shrink the
lag the hard switch leaves (benchmarks/quality measures whether they do):

- `dense_every` m: every m-th training iteration of stage 1 (iterations m-1, 2m-1, ...) runs every
  layer dense, so the weights keep working with dense attention. Evaluation (the model in eval
  mode) is not such a step: it sees the stage-1 attention.
- `progressive_iters` W: over the W iterations before `until_iter`, the Lighthouse layers turn dense
  one at a time, first to last: of G Lighthouse layers, the j-th (0-based, in depth order) is dense
  from iteration until_iter - W + floor(j * W / G).
- `grow_topk_iters` W: over the W iterations before `until_iter`, the budget k doubles in equal
  steps from `topk` up to the largest k valid at the sequence length (the gathered sequence grows
  towards the full one).

A schedule is a pure function of the iteration, so a run resumed from any checkpoint continues the
same schedule, and every rank and micro-batch of an iteration agrees.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import LighthouseConfig


@dataclass(frozen=True)
class RecipeSchedule:
    # The metadata is the launch flags' help (`--lighthouse-until-iter`, ...: settings/lighthouse.py).
    until_iter: int | None = field(default=None, metadata={
        "help": "from training iteration N on, every layer runs dense attention (in-run recovery stage)",
        "metavar": "N", "derived": "never"})
    dense_every: int | None = field(default=None, metadata={
        "help": "recipe variant: during the Lighthouse stage every M-th training iteration runs every layer "
                "dense (M >= 2)", "metavar": "M", "derived": "off"})
    progressive_iters: int = field(default=0, metadata={
        "help": "recipe variant: over the W iterations before --lighthouse-until-iter the Lighthouse layers "
                "turn dense one at a time, first to last (0: off)", "metavar": "W"})
    grow_topk_iters: int = field(default=0, metadata={
        "help": "recipe variant: over the W iterations before --lighthouse-until-iter the budget k doubles "
                "in equal steps up to the largest valid k (0: off)", "metavar": "W"})

    def __post_init__(self) -> None:
        for name in FLAGS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                what = "an iteration >= 0" if name == "until_iter" else "an integer"
                raise ValueError(f"{FLAGS[name]} must be {what}, got {value!r}")
        if self.until_iter is not None and self.until_iter < 0:
            raise ValueError(f"{FLAGS['until_iter']} must be an iteration >= 0, got {self.until_iter!r}")
        if self.dense_every is not None and self.dense_every < 2:
            raise ValueError(f"{FLAGS['dense_every']} must be >= 2 (every m-th iteration dense; 1 would be "
                             f"dense training), got {self.dense_every}")
        for name in ("progressive_iters", "grow_topk_iters"):
            window = getattr(self, name)
            if window < 0:
                raise ValueError(f"{FLAGS[name]} must be >= 0 (0: off), got {window}")
            if window and self.until_iter is None:
                raise ValueError(f"{FLAGS[name]} {window} needs {FLAGS['until_iter']} "
                                 "(the window ends there)")
            if window and window > self.until_iter:
                raise ValueError(f"{FLAGS[name]} {window} is longer than stage 1 ({FLAGS['until_iter']} "
                                 f"{self.until_iter}); use at most {self.until_iter}")

    @property
    def is_hard_switch(self) -> bool:
        return self.dense_every is None and not self.progressive_iters and not self.grow_topk_iters

    def all_dense(self, iteration: int) -> bool:
        """Every layer dense at this iteration whatever its rank: stage 2."""
        return self.until_iter is not None and iteration >= self.until_iter

    def layer_dense(self, iteration: int, rank: int, count: int, training: bool = True) -> bool:
        """Does the `rank`-th of `count` Lighthouse layers (0-based, depth order) run dense?"""
        if self.all_dense(iteration):
            return True
        if self.progressive_iters:
            start = self.until_iter - self.progressive_iters
            if iteration >= start + (rank * self.progressive_iters) // count:
                return True
        m = self.dense_every
        return training and m is not None and iteration % m == m - 1

    def topk_ladder(self, config: LighthouseConfig, seq_len: int, cp_size: int = 1) -> list[int]:
        """topk, 2 topk, 4 topk, ... while valid at this sequence length (one entry without growth)."""
        ladder = [config.topk]
        while self.grow_topk_iters:
            try:
                config.__class__(**{**config.to_dict(), "topk": ladder[-1] * 2}).validate(seq_len, cp_size)
            except ValueError:
                break
            ladder.append(ladder[-1] * 2)
        return ladder

    def config_at(self, config: LighthouseConfig, iteration: int, ladder: list[int]) -> LighthouseConfig:
        """The Lighthouse settings at this iteration (k from the ladder inside the growth window)."""
        if len(ladder) == 1 or self.all_dense(iteration):
            return config
        start = self.until_iter - self.grow_topk_iters
        if iteration < start:
            return config
        step = min(len(ladder) - 1, 1 + (iteration - start) * (len(ladder) - 1) // self.grow_topk_iters)
        return dataclasses.replace(config, topk=ladder[step])

    def check_against(self, config: LighthouseConfig, seq_len: int, cp_size: int = 1) -> list[int]:
        """Start-up check with the sizes: growth needs a larger valid k. Returns the k ladder."""
        ladder = self.topk_ladder(config, seq_len, cp_size)
        if self.grow_topk_iters and len(ladder) == 1:
            raise ValueError(f"{FLAGS['grow_topk_iters']} {self.grow_topk_iters}: no valid k above "
                             f"--lighthouse-topk {config.topk} at --seq-length {seq_len} (2x{config.topk} "
                             "fails the size rules); lower --lighthouse-topk or leave the growth off")
        return ladder

    def describe(self, iteration: int, count: int) -> str:
        """'lighthouse', 'dense' or 'mixed (d of count layers dense)' for training iteration `iteration`."""
        dense = sum(self.layer_dense(iteration, r, count) for r in range(count))
        return "dense" if dense == count else "lighthouse" if dense == 0 else f"mixed ({dense}/{count} dense)"


# Field -> its launch flag, as settings/lighthouse.py derives it, for the errors above.
FLAGS = {f.name: "--lighthouse-" + f.name.replace("_", "-") for f in dataclasses.fields(RecipeSchedule)}
