"""Launch arguments: `--attention-impl` and the `--lighthouse-*` flags, for Megatron-LM's parser.

Precedence: an explicit flag > the `--lighthouse-config` YAML file > the defaults
(`--attention-impl dense`, LighthouseConfig's defaults). Every flag defaults to None so
that an explicit value can be told apart; `resolve_lighthouse_args` writes the merged,
plain-typed values back, so checkpoints store what actually ran.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import BACKENDS, SCORERS, LighthouseConfig, SizeError, nearest, topk_hint, valid_topks
from ..recipe import FLAGS as RECIPE_FLAGS
from ..recipe import RecipeSchedule
from . import rules
from .rules import ATTENTION_IMPLS
from .yaml_file import read_mapping

# LighthouseConfig field -> its flag, one spelling derived from the dataclass: `topk` is
# --lighthouse-topk, dest lighthouse_topk (the trainer's YAML key), `topk` in --lighthouse-config.
_FLAGS = {name: f"--lighthouse-{name.replace('_', '-')}" for name in LighthouseConfig.field_names()}
# YAML keys beyond LighthouseConfig's fields.
_LAUNCH_KEYS = {"attention_impl": "--attention-impl", **RECIPE_FLAGS,
                "eval_attention": "--lighthouse-eval-attention"}
# What Megatron-LM's validation evaluates during a Lighthouse stage: the model as it trains,
# the same weights with dense attention, or both (each under its own name in the logs).
EVAL_ATTENTIONS = ("model", "dense", "both")


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def lighthouse_dests() -> list[str]:
    """The argument names (`args` attributes) of --attention-impl and the --lighthouse-* settings."""
    return [_dest(flag) for flag in {**_LAUNCH_KEYS, **_FLAGS}.values()]


def add_lighthouse_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Lighthouse flags to `parser` (Megatron-LM's `extra_args_provider` form)."""
    defaults = LighthouseConfig()
    group = parser.add_argument_group(title="lighthouse attention")
    group.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default=None,
                       help="Core attention of the GPT layers (default: dense).")
    group.add_argument("--lighthouse-config", type=str, default=None, metavar="FILE",
                       help="YAML file with Lighthouse settings (keys: attention_impl, until_iter, "
                            "eval_attention, "
                            f"{', '.join(LighthouseConfig.field_names())}); explicit flags override it.")
    group.add_argument("--lighthouse-levels", type=int, default=None,
                       help=f"Pyramid levels L; 1 is dense attention (default {defaults.levels}).")
    group.add_argument("--lighthouse-pooling-factor", type=int, default=None,
                       help=f"Pooling factor p, a power of two (default {defaults.pooling_factor}).")
    group.add_argument("--lighthouse-topk", type=int, default=None,
                       help=f"Global top-k budget k per level (default {defaults.topk}).")
    group.add_argument("--lighthouse-tile-topk", type=int, default=None,
                       help=f"Entries kept per tile and level T, even (default {defaults.tile_topk}).")
    group.add_argument("--lighthouse-dense-layers", type=int, nargs="*", default=None, metavar="I",
                       help="0-based global layer indices that keep dense attention; negative "
                            "counts from the last layer (e.g. 0 1 -2 -1). Default: none.")
    group.add_argument("--lighthouse-scorer", choices=SCORERS, default=None,
                       help=f"Selection scorer (default {defaults.scorer}).")
    group.add_argument("--lighthouse-backend", choices=BACKENDS, default=None,
                       help=f"Dense kernel inside Lighthouse (default {defaults.backend}).")
    group.add_argument("--lighthouse-until-iter", type=int, default=None, metavar="N",
                       help="From training iteration N on, every layer runs dense attention "
                            "(in-run recovery stage). Default: never.")
    group.add_argument("--lighthouse-dense-every", type=int, default=None, metavar="M",
                       help="Recipe variant: during the Lighthouse stage every M-th training iteration "
                            "runs every layer dense (M >= 2). Default: off.")
    group.add_argument("--lighthouse-progressive-iters", type=int, default=None, metavar="W",
                       help="Recipe variant: over the W iterations before --lighthouse-until-iter the "
                            "Lighthouse layers turn dense one at a time, first to last. Default: 0 (off).")
    group.add_argument("--lighthouse-grow-topk-iters", type=int, default=None, metavar="W",
                       help="Recipe variant: over the W iterations before --lighthouse-until-iter the "
                            "budget k doubles in equal steps up to the largest valid k. Default: 0 (off).")
    group.add_argument("--lighthouse-eval-attention", choices=EVAL_ATTENTIONS, default=None,
                       help="Validation during a Lighthouse stage: 'model' (the attention the model "
                            "trains with, Megatron-LM's 'lm loss'), 'dense' (the same weights with dense "
                            "attention, logged as 'lm loss dense'), or 'both' on the same batches. "
                            "Default: both (dense with pipeline parallelism). The entry point and the "
                            "patches hook Megatron-LM's forward step for it; the --spec route cannot "
                            "(it refuses eval_attention other than model).")
    return parser


def load_lighthouse_yaml(path: str) -> dict[str, Any]:
    """Read a `--lighthouse-config` file: a mapping of LighthouseConfig fields plus
    attention_impl and until_iter. Unknown keys fail with the valid ones."""
    data = read_mapping(path, "--lighthouse-config")
    valid = [*_LAUNCH_KEYS, *LighthouseConfig.field_names()]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"--lighthouse-config {path}: unknown settings {unknown}; valid: {valid}")
    if data.get("attention_impl", "dense") not in ATTENTION_IMPLS:
        raise ValueError(f"--lighthouse-config {path}: attention_impl must be one of "
                         f"{list(ATTENTION_IMPLS)}, got {data['attention_impl']!r}")
    if data.get("eval_attention", "both") not in EVAL_ATTENTIONS:
        raise ValueError(f"--lighthouse-config {path}: eval_attention must be one of "
                         f"{list(EVAL_ATTENTIONS)}, got {data['eval_attention']!r}")
    return dict(data)


def resolve_lighthouse_args(args: argparse.Namespace) -> argparse.Namespace:
    """Merge flags, the YAML file and defaults into `args` in place (idempotent)."""
    path = getattr(args, "lighthouse_config", None)
    settings = load_lighthouse_yaml(path) if path else {}
    defaults = LighthouseConfig().to_dict()
    for key, flag in {**_LAUNCH_KEYS, **_FLAGS}.items():
        dest = _dest(flag)
        if getattr(args, dest, None) is None:
            value = settings.get(key, defaults.get(key))
            if key == "attention_impl" and value is None:
                value = "dense"
            if key in ("progressive_iters", "grow_topk_iters") and value is None:
                value = 0
            if key == "eval_attention" and value is None:
                pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
                value = "both" if pp == 1 else "dense"
            setattr(args, dest, list(value) if isinstance(value, (list, tuple)) else value)
    return args


# Field order of LighthouseConfig's own checks: tile_topk before topk, whose rule needs it.
_CHECK_ORDER = ("levels", "pooling_factor", "tile_topk", "topk", "dense_layers", "scorer", "backend")


def lighthouse_config_from_args(args: argparse.Namespace, seq_len: int | None = None,
                                cp_size: int = 1) -> LighthouseConfig:
    """The LighthouseConfig the (resolved) arguments describe; errors name the flag. With the
    sequence length, a bad topk or tile_topk gets suggestions that pass every rule together."""
    resolve_lighthouse_args(args)
    values: dict[str, Any] = {}
    # Add one setting at a time: the first one that fails is the flag to blame.
    for key in _CHECK_ORDER:
        values[key] = getattr(args, _dest(_FLAGS[key]))
        try:
            config = LighthouseConfig(**values)
        except SizeError as e:
            hint = None if seq_len is None else _sized_hint(args, e.field, seq_len, cp_size)
            message = str(e) if hint is None else f"{e.rule}; {hint}"
            raise ValueError(f"{_FLAGS[key]} {_shown(values[key])}: {message}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{_FLAGS[key]} {_shown(values[key])}: {e}") from e
    return config


def _sized_hint(args: argparse.Namespace, field: str, seq_len: int, cp_size: int) -> str:
    """Values of `field` (topk or tile_topk) that fit this sequence length with the other
    Lighthouse flags, or what else to change."""
    levels, pooling, topk, tile = (getattr(args, _dest(_FLAGS[k])) for k in ("levels", "pooling_factor",
                                                                             "topk", "tile_topk"))
    if field == "topk":
        return topk_hint(levels, pooling, tile, seq_len, cp_size, topk)
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 2:
        return None
    given = f"{_FLAGS['topk']} {topk} and --seq-length {seq_len}"
    tiles = [t for t in range(2, topk + 1, 2) if topk in valid_topks(levels, pooling, t, seq_len, cp_size)]
    if tiles:
        return f"nearest valid with {given}: {nearest(tiles, tile)}"
    even = max(2, tile - 1 if tile % 2 else tile)
    return (f"no tile_topk is valid with {given}: change {_FLAGS['topk']} too (with {_FLAGS['tile_topk']} "
            f"{even}: {topk_hint(levels, pooling, even, seq_len, cp_size, topk)})")


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _lighthouse_flags(args: argparse.Namespace) -> str:
    return " ".join(f"{_FLAGS[key]} {getattr(args, _dest(_FLAGS[key]))}"
                    for key in ("levels", "pooling_factor", "topk", "tile_topk"))


def recipe_schedule_from_args(args: argparse.Namespace) -> RecipeSchedule:
    """The recipe's schedule (--lighthouse-until-iter and its variants); errors name the flag."""
    resolve_lighthouse_args(args)
    return RecipeSchedule(**{key: getattr(args, _dest(flag)) for key, flag in RECIPE_FLAGS.items()})


def until_iter_warning(args: argparse.Namespace) -> str | None:
    """The start-up warning (trainer and Megatron-LM entry point alike) when
    --lighthouse-until-iter never switches this run to dense attention; None otherwise.
    Iteration N is the (N+1)-th: with N >= --train-iters no iteration runs dense."""
    until, total = getattr(args, "lighthouse_until_iter", None), getattr(args, "train_iters", None)
    lighthouse = getattr(args, "attention_impl", None) == "lighthouse"
    if not lighthouse or until is None or total is None or until < total:
        return None
    return (f"warning: --lighthouse-until-iter {until} is not below --train-iters {total}: every iteration "
            f"runs Lighthouse attention and the dense recovery never happens in this run; set it below "
            f"{total} (the paper switches at 62.5%: {round(0.625 * total)}), or relaunch with "
            "--attention-impl dense from a checkpoint")


def validate_lighthouse_args(args: argparse.Namespace) -> LighthouseConfig | None:
    """Check the Lighthouse arguments against the model and parallel settings.

    Returns the LighthouseConfig (None with `--attention-impl dense`). Raises ValueError
    naming the flags, the numbers and the valid values.
    Call it after Megatron's own parsing, before anything is built.
    """
    resolve_lighthouse_args(args)
    schedule = recipe_schedule_from_args(args)
    if args.attention_impl == "dense":
        rules.check_dense_local(args)
        return None
    seq, cp = getattr(args, "seq_length", None), getattr(args, "context_parallel_size", 1) or 1
    config = lighthouse_config_from_args(args, seq if isinstance(seq, int) and seq > 0 else None, cp)
    rules.check_args(args)
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if args.lighthouse_eval_attention == "both" and pp > 1:
        raise ValueError(f"--lighthouse-eval-attention both with --pipeline-model-parallel-size {pp}: "
                         "both evaluations run on the same batch inside one forward step, which "
                         "only a single pipeline stage can do; use dense or model")

    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    cp = get("context_parallel_size", 1) or 1
    seq = get("seq_length")
    if seq is not None:
        try:
            config.validate(seq, cp_size=cp)
        except ValueError as e:
            cp_flag = f" --context-parallel-size {cp}" if cp > 1 else ""
            raise ValueError(f"--seq-length {seq} with {_lighthouse_flags(args)}{cp_flag}: {e}") from e
        schedule.check_against(config, seq, cp)
    num_layers = get("num_layers")
    if num_layers is not None:
        try:
            config.resolve_dense_layers(num_layers)
        except ValueError as e:
            raise ValueError(f"--lighthouse-dense-layers with --num-layers {num_layers}: {e}") from e
    groups = get("num_query_groups") if get("group_query_attention", True) else None
    rules.check_heads(get("num_attention_heads"), groups, get("tensor_model_parallel_size", 1) or 1,
                      rules.flag_named)
    rules.warn_qk_layernorm(config.scorer, get("qk_layernorm", False),
                            "--lighthouse-scorer norm with --qk-layernorm")
    return config
