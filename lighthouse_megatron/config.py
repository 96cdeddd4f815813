"""LighthouseConfig: the knobs of Lighthouse attention, their validation and derived sizes.

Every size rule of docs/algorithm.md lives here, so that a bad configuration fails before a
job starts, with the numbers that broke it and the nearest values that would work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

SCORERS = ("norm",)
BACKENDS = ("auto", "te", "cudnn", "flash", "math")
GPU_BACKENDS = ("te", "cudnn", "flash")  # the kernels that need CUDA tensors


def backend_problem(backend: str, device_type: str) -> str | None:
    """Why stage-5 kernel `backend` cannot run on `device_type` ("cuda", "cpu"); None if it can."""
    if backend not in BACKENDS:
        return f"lighthouse backend must be one of {list(BACKENDS)}, got {backend!r}"
    if device_type != "cuda" and backend in GPU_BACKENDS:
        valid = [b for b in BACKENDS if b not in GPU_BACKENDS]
        return (f"lighthouse backend {backend!r} needs CUDA tensors, got {device_type} tensors; "
                f"valid on {device_type}: {valid}")
    return None
LEVEL_MERGES = ("sum", "mean")


def nearest_multiples(value: int, base: int) -> str:
    """'a or b': the positive multiples of `base` nearest to `value`; the smallest, `base`,
    alone when value is below it (zero and negative values are never valid)."""
    lo = (value // base) * base
    return f"{base}" if lo <= 0 else f"{lo} or {lo + base}"


def _is_power_of_two(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def nearest(values: list[int], target: int) -> str:
    """'a or b': the values (ascending) nearest to `target` from below and above; one when
    the target is outside their range or one of them."""
    below = [v for v in values if v <= target]
    above = [v for v in values if v >= target]
    picks = sorted({v for v in (below[-1:] + above[:1])})
    return " or ".join(map(str, picks))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def valid_topks(levels: int, pooling_factor: int, tile_topk: int, seq_len: int,
                cp_size: int = 1) -> list[int]:
    """Every top-k budget that passes all of the size rules together with these settings,
    ascending; empty when none does. k = T x tiles, where the tiles divide the N / p**(L-1)
    coarsest entries, each tile keeps at least T of them, and with context parallelism the
    tiles split evenly over the 2 x CP chunks."""
    block = pooling_factor ** (levels - 1)
    if levels < 2 or tile_topk < 2 or tile_topk % 2 or seq_len % block:
        return []
    coarse, chunks = seq_len // block, LighthouseConfig.num_chunks(cp_size)
    return [tile_topk * t for t in _divisors(coarse) if coarse // t >= tile_topk and t % chunks == 0]


def topk_fits(levels: int, pooling_factor: int, tile_topk: int, seq_len: int, cp_size: int,
              topk: int) -> bool:
    """`topk in valid_topks(...)` without listing them: the check inputs pass on every call
    (traceable by torch.compile, where the sequence length may be symbolic)."""
    block = pooling_factor ** (levels - 1)
    if levels < 2 or tile_topk < 2 or tile_topk % 2 or seq_len % block or topk % tile_topk:
        return False
    coarse, tiles = seq_len // block, topk // tile_topk
    return tiles >= 1 and coarse % tiles == 0 and coarse // tiles >= tile_topk \
        and tiles % LighthouseConfig.num_chunks(cp_size) == 0


def topk_hint(levels: int, pooling_factor: int, tile_topk: int, seq_len: int, cp_size: int, topk: int) -> str:
    """What to suggest for a top-k budget that does not fit: the nearest budgets that pass
    every rule with the other settings, or, when there is none, which other settings do."""
    ks = valid_topks(levels, pooling_factor, tile_topk, seq_len, cp_size)
    if ks:
        return f"nearest valid: {nearest(ks, topk)}"
    block, chunks = pooling_factor ** (levels - 1), LighthouseConfig.num_chunks(cp_size)
    cp = f" and context-parallel size {cp_size}" if cp_size > 1 else ""
    why = (f"the length is not a multiple of pooling_factor**(levels-1)={block}" if seq_len % block else
           f"a tile keeps tile_topk={tile_topk} of the {seq_len // block} coarsest entries"
           + (f", and there are at least {chunks} tiles" if chunks > 1 else ""))
    fixes = []
    for t in range(tile_topk - 2, 1, -2):
        if ks := valid_topks(levels, pooling_factor, t, seq_len, cp_size):
            fixes.append(f"tile_topk={t} (then topk={ks[-1]})")
            break
    fewer = [lv for lv in range(levels - 1, 1, -1)
             if valid_topks(lv, pooling_factor, tile_topk, seq_len, cp_size)]
    fixes.append(f"levels={fewer[0]}" if fewer else "levels=1 (dense attention)")
    longer = tile_topk * block * chunks  # one tile per chunk, tile_topk coarsest entries each
    fixes.append(f"a sequence length that is a multiple of {longer} (then topk={tile_topk * chunks})")
    return (f"no topk is valid with sequence length {seq_len}, levels={levels}, "
            f"pooling_factor={pooling_factor} and tile_topk={tile_topk}{cp} ({why}); change another "
            f"setting: {', '.join(fixes[:-1])} or {fixes[-1]}")


class SizeError(ValueError):
    """A size rule that fails for one field; `rule` is the message without its suggestion, so
    that a caller that knows the sequence length can suggest values that pass every rule."""

    def __init__(self, field: str, rule: str, hint: str):
        super().__init__(f"{rule}; {hint}")
        self.field, self.rule = field, rule


@dataclass(frozen=True)
class LighthouseConfig:
    """Lighthouse attention settings (docs/algorithm.md notation in brackets).

    levels          [L] pyramid levels; 1 is plain dense causal attention.
    pooling_factor  [p] block growth per level, a power of two >= 2.
    topk            [k] global top-k budget per selection unit, a multiple of tile_topk.
    tile_topk       [T] entries kept per refined level per tile, even (half by query norm,
                    half by key norm). topk and tile_topk are unused (and unchecked) when
                    levels is 1.
    dense_layers    0-based global layer indices that keep dense attention; negative
                    indices count from the last layer.
    scorer          "norm": parameter-free L2-norm scoring.
    backend         stage-5 dense kernel: "auto", "te", "cudnn", "flash" or "math".
    level_merge     stage 6: "sum" (the paper's: a token adds the outputs of the emitted entries
                    covering it, one per level) or "mean" (their average, a convex combination
                    like dense attention's single output; a research option, not the paper's).
    """

    # The metadata is the launch flags' help (`--lighthouse-levels`, ...: settings/lighthouse.py).
    levels: int = field(default=3, metadata={"help": "pyramid levels L; 1 is dense attention"})
    pooling_factor: int = field(default=4, metadata={"help": "pooling factor p, a power of two"})
    topk: int = field(default=2048, metadata={"help": "global top-k budget k per level"})
    tile_topk: int = field(default=128, metadata={"help": "entries kept per tile and level T, even"})
    dense_layers: tuple[int, ...] = field(default=(), metadata={
        "help": "0-based global layer indices that keep dense attention; negative counts from the last layer "
                "(e.g. 0 1 -2 -1)", "metavar": "I", "nargs": "*"})
    scorer: str = field(default="norm", metadata={"help": "selection scorer", "choices": SCORERS})
    backend: str = field(default="auto", metadata={"help": "dense kernel inside Lighthouse",
                                                   "choices": BACKENDS})
    level_merge: str = field(default="sum", metadata={
        "help": "how a token combines the outputs of the entries covering it, one per level: 'sum' (the "
                "paper's) or 'mean' (their average, scaled like dense attention's one output)",
        "choices": LEVEL_MERGES})

    def __post_init__(self) -> None:
        # Accept lists (YAML, argparse) but keep the frozen dataclass hashable.
        if isinstance(self.dense_layers, (str, bytes)) or not isinstance(self.dense_layers, Iterable):
            raise ValueError(f"lighthouse dense_layers must be a sequence of 0-based layer indices, e.g. "
                             f"(0, -1) or (), got {self.dense_layers!r}")
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        self._check_settings()

    # ----------------------------------------------------------------- validation

    def _check_settings(self) -> None:
        """Checks that need no sequence length."""
        for name in ("levels", "pooling_factor", "topk", "tile_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"lighthouse {name} must be an integer, got {value!r}")
        if self.levels < 1:
            raise ValueError(
                f"lighthouse levels must be >= 1 (1 = dense attention), got {self.levels}; "
                "the paper uses 3"
            )
        if self.pooling_factor < 2 or not _is_power_of_two(self.pooling_factor):
            p = self.pooling_factor
            below = 1 << max(p.bit_length() - 1, 1)
            above = max(below << 1, 2) if p > 2 else 2
            near = f"{below} or {above}" if p > 2 else "2"
            raise ValueError(
                f"lighthouse pooling_factor must be a power of two >= 2, got {p}; nearest valid: {near}"
            )
        if self.levels == 1:
            # Dense attention: nothing is selected, so topk and tile_topk are unused and not checked.
            pass
        elif self.tile_topk < 2 or self.tile_topk % 2:
            raise SizeError("tile_topk", "lighthouse tile_topk must be even and >= 2 (half by query norm, "
                            f"half by key norm), got {self.tile_topk}",
                            f"nearest valid: {nearest_multiples(self.tile_topk, 2)}")
        elif self.topk < self.tile_topk or self.topk % self.tile_topk:
            # Without a sequence length; `validate` and the launch flags suggest with one.
            raise SizeError("topk", "lighthouse topk must be a positive multiple of "
                            f"tile_topk={self.tile_topk}, got {self.topk}",
                            f"nearest valid: {nearest_multiples(self.topk, self.tile_topk)}")
        for i in self.dense_layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"lighthouse dense_layers must be integers, got {self.dense_layers!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"lighthouse scorer must be one of {list(SCORERS)}, got {self.scorer!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"lighthouse backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.level_merge not in LEVEL_MERGES:
            raise ValueError(f"lighthouse level_merge must be one of {list(LEVEL_MERGES)}, "
                             f"got {self.level_merge!r}")

    def validate(self, seq_len: int, cp_size: int = 1) -> None:
        """Raise ValueError unless a sequence of `seq_len` tokens split over `cp_size`
        context-parallel ranks (2*cp_size chunks when cp_size > 1) is a valid input."""
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"sequence length must be a positive integer, got {seq_len!r}")
        if not isinstance(cp_size, int) or cp_size < 1:
            raise ValueError(f"context-parallel size must be a positive integer, got {cp_size!r}")
        if self.levels == 1:  # dense: no tiles, no budget, any length
            return
        args = (self.levels, self.pooling_factor, self.tile_topk, seq_len, cp_size)
        if topk_fits(*args, self.topk):
            return
        # The first rule that fails is named; the suggestion passes all of them.
        hint = topk_hint(*args, self.topk)
        chunks = self.num_chunks(cp_size)
        if cp_size > 1 and self.topk % (chunks * self.tile_topk):
            raise ValueError(
                f"lighthouse topk={self.topk} must be a multiple of 2*cp_size*tile_topk="
                f"2*{cp_size}*{self.tile_topk}={chunks * self.tile_topk} with context parallelism (each of "
                f"the {chunks} chunks keeps topk/{chunks} entries); {hint}"
            )
        # Tiles never straddle chunks (k_chunk / T tiles per chunk), so the chunk rules
        # reduce to the global ones: N divisible by p**(L-1) * (k/T).
        block = self.coarsest_block * self.num_tiles
        if seq_len % block:
            # Lengths this budget fits: multiples of the block with at least T coarsest entries per tile.
            lengths = [m * block for m in sorted({max(seq_len // block, self.tile_topk),
                                                  max(seq_len // block + 1, self.tile_topk)})]
            other = f"; or, for this length, topk {hint.removeprefix('nearest valid: ')}" \
                if hint.startswith("nearest valid") else ""
            raise ValueError(
                f"sequence length {seq_len} must be divisible by pooling_factor**(levels-1)="
                f"{self.coarsest_block} x tiles (topk/tile_topk={self.num_tiles}) = {block}; "
                f"nearest valid: {' or '.join(map(str, lengths))}{other}"
            )
        coarse_per_tile = seq_len // block
        problem = (f"lighthouse: each tile has only {coarse_per_tile} coarsest entries (sequence length "
                   f"{seq_len} / pooling_factor**(levels-1)={self.coarsest_block} / {self.num_tiles} tiles) "
                   f"but tile_topk={self.tile_topk} are selected from them")
        smaller = [k for k in valid_topks(*args) if k < self.topk]
        if not smaller:
            raise ValueError(f"{problem}; {hint}")
        # Each fix keeps the other settings, and passes every rule with them.
        fixes = [f"topk={smaller[-1]}"]
        fixes += [f"levels={lv}" for lv in range(self.levels - 1, 1, -1)
                  if self.topk in valid_topks(lv, *args[1:])][:1]
        fixes.append(f"a sequence length >= {self.tile_topk * block} (a multiple of {block})")
        raise ValueError(f"{problem}; use {', '.join(fixes[:-1])} or {fixes[-1]}")

    def _check_cp_topk(self, cp_size: int) -> None:
        chunks = self.num_chunks(cp_size)
        if cp_size > 1 and self.topk % (chunks * self.tile_topk):
            step = chunks * self.tile_topk
            raise ValueError(
                f"lighthouse topk={self.topk} must be a multiple of 2*cp_size*tile_topk="
                f"2*{cp_size}*{self.tile_topk}={step} with context parallelism (each of the "
                f"{chunks} chunks keeps topk/{chunks} entries); nearest valid: "
                f"{nearest_multiples(self.topk, step)}"
            )

    def resolve_dense_layers(self, num_layers: int) -> frozenset[int]:
        """0-based global indices of the dense layers in a model of `num_layers` layers."""
        out = set()
        for i in self.dense_layers:
            if not -num_layers <= i < num_layers:
                raise ValueError(
                    f"lighthouse dense_layers entry {i} is out of range for a model of "
                    f"{num_layers} layers (valid: {-num_layers} .. {num_layers - 1})"
                )
            out.add(i % num_layers)
        return frozenset(out)

    # -------------------------------------------------------------- derived sizes

    @property
    def coarsest_block(self) -> int:
        """Base tokens per coarsest-level entry, p**(L-1)."""
        return self.pooling_factor ** (self.levels - 1)

    @property
    def num_tiles(self) -> int:
        """Tiles per sequence without context parallelism, k / T."""
        return self.topk // self.tile_topk

    @staticmethod
    def num_chunks(cp_size: int) -> int:
        """Megatron's load-balanced CP layout cuts a sequence into 2*CP chunks."""
        return 2 * cp_size if cp_size > 1 else 1

    def chunk_config(self, cp_size: int) -> LighthouseConfig:
        """The configuration one CP chunk runs with (k_chunk = k / (2*CP)): the same tile
        length N*T/k as without CP, so the chunks' selections are those of the whole sequence."""
        if cp_size == 1:
            return self
        self._check_cp_topk(cp_size)
        return dataclasses.replace(self, topk=self.topk // self.num_chunks(cp_size))

    def gathered_length(self, seq_len: int) -> int:
        """S = N / p**(L-1) + (L-1) * p * k: the length attention runs on."""
        return seq_len // self.coarsest_block + (self.levels - 1) * self.pooling_factor * self.topk

    def attention_flops_ratio(self, seq_len: int) -> float:
        """Dense causal attention FLOPs over Lighthouse's stage-5 FLOPs, (N / S)**2."""
        return (seq_len / self.gathered_length(seq_len)) ** 2

    # -------------------------------------------------------------------- dicts

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (YAML files, Megatron checkpoint args under weights_only loads)."""
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LighthouseConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown lighthouse settings {unknown}; valid settings: {names}")
        return cls(**d)

    @classmethod
    def field_names(cls) -> Iterable[str]:
        return [f.name for f in dataclasses.fields(cls)]


def check_inputs(q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, cp_size: int = 1) -> None:
    """Shape checks shared by every implementation, with the numbers in the message. With
    `cp_size` > 1 the inputs are one CP rank's two chunks of a cp_size times longer sequence."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"lighthouse attention expects q [b, s, Hq, d] and k, v [b, s, Hkv, d]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"lighthouse attention: q {tuple(q.shape)} and k, v {tuple(k.shape)}, {tuple(v.shape)} "
            "must agree in batch, sequence and head dim, and k, v must match"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"lighthouse attention: query heads {q.shape[2]} must be a multiple of key/value heads "
            f"{k.shape[2]} (GQA groups)"
        )
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(f"lighthouse attention: q {tuple(q.shape)} and k, v {tuple(k.shape)} must not "
                         "be empty (batch size, sequence length, heads and head dim >= 1)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"lighthouse attention: q, k and v must have one dtype, got q {q.dtype}, "
                         f"k {k.dtype}, v {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"lighthouse attention: q, k and v must be floating point (float32, bfloat16, "
                         f"float16), got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"lighthouse attention: q, k and v must be on one device, got q on {q.device}, "
                         f"k on {k.device}, v on {v.device}")
    config.validate(q.shape[1] * cp_size, cp_size)
