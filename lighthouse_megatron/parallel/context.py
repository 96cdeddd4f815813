"""The CP group a layer runs in, and Megatron's load-balanced chunk layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")


@dataclass(frozen=True, eq=False)
class ContextParallel:
    """A context-parallel group and how Transformer Engine should communicate in it.

    group       the CP process group (Megatron: `pg_collection.cp`).
    comm_type   TE's `cp_comm_type` for the attention on the gathered sequence: "p2p" (ring of
                K/V, overlapped with compute), "a2a", "all_gather" or "a2a+p2p".
    te_group    what TE takes as `cp_group` when it is not `group` (a2a+p2p: the list of the
                a2a and p2p groups, Megatron's hierarchical CP groups).
    halo        False only to time the halo's cost (`bench layer --cp`): each chunk gets zeros
                instead of what the chunk before it feeds, so the numbers are wrong.
    """

    group: Any
    comm_type: str = "p2p"
    te_group: Any = None
    halo: bool = True
    _streams: dict = field(default_factory=dict, repr=False)
    _checked_shapes: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.comm_type not in CP_COMM_TYPES:
            raise ValueError(f"cp_comm_type must be one of {list(CP_COMM_TYPES)}, got {self.comm_type!r}")
        if self.comm_type == "a2a+p2p" and self.te_group is None:
            raise ValueError("cp_comm_type 'a2a+p2p' needs te_group, the [a2a, p2p] hierarchical CP groups")

    @property
    def key(self) -> tuple:
        """What TE's CP attention depends on: the groups and the comm type. Every layer builds
        its own ContextParallel over the same groups; they share one key."""
        te_group = tuple(self.te_group) if isinstance(self.te_group, list) else self.te_group
        return self.group, self.comm_type, te_group

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def global_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.group)

    def chunk_ids(self, rank: int | None = None) -> tuple[int, int]:
        """The two chunks (of 2*size) that `rank` (default: this rank) holds, in order."""
        r = self.rank if rank is None else rank
        return r, 2 * self.size - 1 - r

    def check_local_shape(self, x: Tensor) -> None:
        """ValueError naming every rank's local length and batch size unless the ranks of the
        group hold equal ones (the collectives that follow need equal sizes: gloo aborts the
        process, NCCL may hang). Collective: one all-gather of two integers, at the first call
        with each local shape. Every rank changes shape together (Megatron's CP split), so a
        shape already checked needs no new exchange, and a steady run pays for it once."""
        key = (tuple(x.shape) + (0, 0))[:2]
        if key in self._checked_shapes:
            return
        mine = torch.tensor(key, dtype=torch.int64, device=x.device)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(parts, mine, group=self.group)
        batches, lengths = zip(*(p.tolist() for p in parts), strict=True)
        if len(set(zip(batches, lengths, strict=True))) > 1:
            raise ValueError(
                f"CP ranks must hold equal local sequences: local lengths {list(lengths)}, batch sizes "
                f"{list(batches)} on CP ranks 0..{self.size - 1} (Megatron's split gives every rank "
                "2 chunks of seq_length / (2*CP) tokens)"
            )
        self._checked_shapes.add(key)

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        """A side stream for TE's CP communication, one per device (as Megatron's)."""
        key = device.index if device.index is not None else torch.cuda.current_device()
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=key)
        return self._streams[key]


@dataclass(frozen=True, eq=False)
class SplitGroups:
    """Tensor-parallel ranks that share GQA groups: megatron-core's layout when there are fewer
    query groups than TP ranks (each rank computes one replicated KV head and its share of
    that group's query heads).

    group    the TP process group;
    groups   the number of GQA groups across it (fewer than its ranks, dividing their count);
    index    this rank's group, tp_rank // (tp_size / groups).

    A group's query score is the max over all its query heads, so the ranks sharing a group
    max-reduce their scores (`max`): then every one of them selects as TP = 1 would.
    """

    group: Any
    groups: int
    index: int

    def max(self, x: Tensor) -> Tensor:
        """Elementwise max of `x` (non-negative, e.g. norms) over the ranks holding this rank's
        group: one all-reduce over the TP group of `groups` slots, ours filled, the others 0."""
        slots = x.new_zeros(self.groups, *x.shape)
        slots[self.index] = x
        dist.all_reduce(slots, op=dist.ReduceOp.MAX, group=self.group)
        return slots[self.index]


def split_chunks(x: Tensor, dim: int, cp_size: int, cp_rank: int) -> Tensor:
    """The part of a full sequence that CP rank `cp_rank` holds: chunks r and 2*CP-1-r of 2*CP."""
    chunks = x.chunk(2 * cp_size, dim=dim)
    if len(chunks) != 2 * cp_size or x.shape[dim] % (2 * cp_size):
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by 2*cp_size={2 * cp_size}")
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def merge_chunks(parts: list[Tensor], dim: int) -> Tensor:
    """Inverse of `split_chunks`: the full sequence from every rank's part, in rank order."""
    cp = len(parts)
    chunks: list[Tensor | None] = [None] * (2 * cp)
    for r, part in enumerate(parts):
        first, second = part.chunk(2, dim=dim)
        chunks[r], chunks[2 * cp - 1 - r] = first, second
    return torch.cat(chunks, dim=dim)
