"""The training clock that `--lighthouse-until-iter` reads.

Lighthouse layers switch to dense attention from a given iteration on (the in-run
recovery stage). The switch must be the same on every rank and in every microbatch of
an iteration, so the modules do not count calls themselves: they read the trainer's
iteration. Megatron-LM keeps it in `get_args().curr_iteration`; the entry point and the
patches install that as the source (megatron_lm/launch.py). Other loops call
`set_iteration(i)` before each step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

_iteration: int = 0
_source: Callable[[], int] | None = None
_dense_forced: bool | frozenset[int] = False  # True: every Lighthouse layer; a set: those ranks


def set_iteration(iteration: int) -> None:
    """Tell the Lighthouse layers which training iteration runs next (0-based)."""
    global _iteration, _source
    _iteration = int(iteration)
    _source = None


def set_iteration_source(source: Callable[[], int] | None) -> None:
    """Read the iteration from `source()` on each forward (None: back to `set_iteration`)."""
    global _source
    _source = source


def get_iteration() -> int:
    if _source is not None:
        value = _source()
        return _iteration if value is None else int(value)
    return _iteration



@contextlib.contextmanager
def forced_dense(ranks: Iterable[int] | None = None) -> Iterator[None]:
    """Every Lighthouse layer computes dense causal attention inside this block, whatever the
    iteration (evaluating the same weights with dense attention during a Lighthouse stage). With
    `ranks`, only the Lighthouse layers of those ranks do (a layer's rank: its place among the
    model's Lighthouse layers in depth order, 0-based); the others follow the schedule."""
    global _dense_forced
    saved, _dense_forced = _dense_forced, True if ranks is None else frozenset(int(r) for r in ranks)
    try:
        yield
    finally:
        _dense_forced = saved


def dense_forced(rank: int | None = None) -> bool:
    """Is the Lighthouse layer of this rank (any layer: None) forced dense now?"""
    if _dense_forced is True:
        return True
    return bool(_dense_forced) and rank in _dense_forced
