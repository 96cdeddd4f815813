"""The selection plan: what stages 3 and 4 decided, the one type every stage and the reference share.

Per selection unit (batch element, kv head), int32:

  level, index   [b, Hkv, S]: level and in-level index of every gathered entry, in causal
                 (last token, level) order;
  inverse        [b, Hkv, total]: the slot of every emitted entry, -1 for the others, in the
                 flat pyramid layout of the scores (level l starts at `level_offsets(...)[l]`);
  selected_q/_k  [b, Hkv, L-1, tiles, T/2]: in-level indices chosen by query norm and by key
                 norm at levels 1..L-1 (index level - 1), in the order the top-k ranked them.

int32 because the kernels read these with int32 arithmetic; a unit's buffers are contiguous,
so a kernel sees [b * Hkv, ...] rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


def level_offsets(n: int, pooling_factor: int, levels: int) -> list[int]:
    """Start of each level in a flat per-unit pyramid buffer, plus the total length last."""
    offsets = [0]
    for level in range(levels):
        offsets.append(offsets[-1] + n // pooling_factor**level)
    return offsets


@dataclass
class SelectionPlan:
    level: Tensor
    index: Tensor
    inverse: Tensor
    selected_q: Tensor
    selected_k: Tensor
    seq_len: int
    pooling_factor: int
    levels: int

    @property
    def batch(self) -> int:
        return self.level.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.level.shape[1]

    @property
    def length(self) -> int:
        """S, the gathered length."""
        return self.level.shape[-1]

    @property
    def last_token(self) -> Tensor:
        """e(l, i) = (i + 1) * p**l - 1 for every gathered entry (int64)."""
        return (self.index.long() + 1) * self.pooling_factor ** self.level.long() - 1

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The tensor fields in order: what a custom op takes in place of the plan."""
        return self.level, self.index, self.inverse, self.selected_q, self.selected_k
