"""Launch arguments: `--attention-impl` and the `--lighthouse-*` flags, for Megatron-LM's parser.

The settings are the fields of LighthouseConfig and RecipeSchedule (`levels` is
`--lighthouse-levels`, the trainer's `lighthouse_levels`, `levels` in a `--lighthouse-config`
file; their help is the fields' metadata) and of `LighthouseLaunch` (--attention-impl, the file,
what validation evaluates).

Precedence: an explicit flag > the `--lighthouse-config` YAML file > the defaults
(`--attention-impl dense`, the dataclasses' defaults). Every flag defaults to None so
that an explicit value can be told apart; `resolve_lighthouse_args` writes the merged,
plain-typed values back, so checkpoints store what actually ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from ..config import LighthouseConfig, SizeError, nearest, topk_hint, valid_topks
from ..recipe import RecipeSchedule
from . import rules
from .fields import (
    MACHINE,
    SUMMARY,
    VALUE,
    Spec,
    Values,
    add_arguments,
    given,
    merged,
    setting,
    specs,
    typed_value,
    unknown_names,
)
from .rules import ATTENTION_IMPLS
from .yaml_file import read_mapping

# What Megatron-LM's validation evaluates during a Lighthouse stage: the model as it trains,
# the same weights with dense attention, or both (each under its own name in the logs).
EVAL_ATTENTIONS = ("model", "dense", "both")
PREFIX = "lighthouse_"


@dataclass
class LighthouseLaunch:
    """The launch settings beyond LighthouseConfig's and RecipeSchedule's fields."""

    attention_impl: str = setting("dense", "core attention of the GPT layers", choices=ATTENTION_IMPLS,
                                  roles={SUMMARY}, megatron=VALUE)
    lighthouse_config: str | None = setting(
        None, "YAML file with Lighthouse settings (keys: the --lighthouse-* flags' names without "
        "'lighthouse-', with '_', and attention_impl); explicit flags override it", metavar="FILE")
    lighthouse_eval_attention: str | None = setting(
        None, "validation during a Lighthouse stage: 'model' (the attention the model trains with, "
        "Megatron-LM's 'lm loss'), 'dense' (the same weights with dense attention, logged as 'lm loss "
        "dense'), or 'both' on the same batches. The entry point and the patches hook Megatron-LM's forward "
        "step for it; the --spec route cannot (it refuses eval_attention other than model)",
        choices=EVAL_ATTENTIONS, derived="both (dense with pipeline parallelism)", megatron=VALUE)


def _config_specs() -> dict[str, Spec]:
    """LighthouseConfig's fields as settings: `topk` is --lighthouse-topk, dest lighthouse_topk (the
    trainer's YAML key), `topk` in --lighthouse-config."""
    table = {n: dataclasses.replace(s, megatron=VALUE) for n, s in specs(LighthouseConfig, PREFIX).items()}
    # The dense kernel is the machine's choice: whoever loads a checkpoint picks their own.
    backend = PREFIX + "backend"
    table[backend] = dataclasses.replace(table[backend], roles=frozenset({MACHINE}))
    return table


@functools.cache
def lighthouse_specs() -> dict[str, Spec]:
    """--attention-impl and every --lighthouse-* setting, in --help order."""
    launch = specs(LighthouseLaunch)
    recipe = {n: dataclasses.replace(s, megatron=VALUE) for n, s in specs(RecipeSchedule, PREFIX).items()}
    return merged(launch, _config_specs(), recipe)


def _yaml_key(name: str) -> str:
    """A setting's key in a --lighthouse-config file (`until_iter` for lighthouse_until_iter)."""
    return name.removeprefix(PREFIX)


def lighthouse_dests() -> list[str]:
    """The argument names (`args` attributes) of --attention-impl and the --lighthouse-* settings."""
    return list(lighthouse_specs())


def add_lighthouse_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Lighthouse flags to `parser` (Megatron-LM's `extra_args_provider` form)."""
    add_arguments(parser.add_argument_group(title="lighthouse attention"), lighthouse_specs())
    return parser


@functools.cache
def _file_settings() -> dict[str, Spec]:
    """What a --lighthouse-config file may set, by its key: every setting but the file itself."""
    return {_yaml_key(n): s for n, s in lighthouse_specs().items() if n != "lighthouse_config"}


def load_lighthouse_yaml(path: str) -> dict[str, Any]:
    """Read a `--lighthouse-config` file: a mapping of LighthouseConfig fields plus
    attention_impl and until_iter. Unknown keys fail with the valid ones."""
    data = read_mapping(path, "--lighthouse-config")
    valid = list(_file_settings())
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"--lighthouse-config {path}: {unknown_names(unknown, valid)}")
    # Typed and checked against their choices here, so that an error names the file and its key.
    where, settings = f"--lighthouse-config {path}", _file_settings()
    return {key: typed_value(dataclasses.replace(settings[key], name=key), value, where)
            for key, value in data.items()}


def resolve_lighthouse_args(args: argparse.Namespace) -> argparse.Namespace:
    """Merge flags, the YAML file and defaults into `args` in place (idempotent)."""
    path = getattr(args, "lighthouse_config", None)
    settings = load_lighthouse_yaml(path) if path else {}
    for key, s in _file_settings().items():
        if getattr(args, s.name, None) is None:
            value = settings.get(key, s.default)
            if value is None and s.name == "lighthouse_eval_attention":
                pp = Values.of(args).pipeline_model_parallel_size or 1
                value = "both" if pp == 1 else "dense"
            setattr(args, s.name, list(value) if isinstance(value, (list, tuple)) else value)
    return args


# Field order of LighthouseConfig's own checks: tile_topk before topk, whose rule needs it.
_CHECK_ORDER = ("levels", "pooling_factor", "tile_topk", "topk", "dense_layers", "scorer", "backend",
                "level_merge")


def _config_value(args: argparse.Namespace, field: str) -> Any:
    return getattr(args, PREFIX + field)


def _config_flag(field: str) -> str:
    return _config_specs()[PREFIX + field].flag


def lighthouse_config_from_args(args: argparse.Namespace, seq_len: int | None = None,
                                cp_size: int = 1) -> LighthouseConfig:
    """The LighthouseConfig the (resolved) arguments describe; errors name the flag. With the
    sequence length, a bad topk or tile_topk gets suggestions that pass every rule together."""
    resolve_lighthouse_args(args)
    values: dict[str, Any] = {}
    # Add one setting at a time: the first one that fails is the flag to blame.
    for key in _CHECK_ORDER:
        values[key] = _config_value(args, key)
        try:
            config = LighthouseConfig(**values)
        except SizeError as e:
            hint = None if seq_len is None else _sized_hint(args, e.field, seq_len, cp_size)
            message = str(e) if hint is None else f"{e.rule}; {hint}"
            raise ValueError(f"{_config_flag(key)} {_shown(values[key])}: {message}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{_config_flag(key)} {_shown(values[key])}: {e}") from e
    return config


def _sized_hint(args: argparse.Namespace, field: str, seq_len: int, cp_size: int) -> str:
    """Values of `field` (topk or tile_topk) that fit this sequence length with the other
    Lighthouse flags, or what else to change."""
    levels, pooling, topk, tile = (_config_value(args, k) for k in ("levels", "pooling_factor", "topk",
                                                                    "tile_topk"))
    if field == "topk":
        return topk_hint(levels, pooling, tile, seq_len, cp_size, topk)
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 2:
        return None
    given = f"{_config_flag('topk')} {topk} and --seq-length {seq_len}"
    tiles = [t for t in range(2, topk + 1, 2) if topk in valid_topks(levels, pooling, t, seq_len, cp_size)]
    if tiles:
        return f"nearest valid with {given}: {nearest(tiles, tile)}"
    even = max(2, tile - 1 if tile % 2 else tile)
    hint = topk_hint(levels, pooling, even, seq_len, cp_size, topk)
    return (f"no tile_topk is valid with {given}: change {_config_flag('topk')} too (with "
            f"{_config_flag('tile_topk')} {even}: {hint})")


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _lighthouse_flags(args: argparse.Namespace) -> str:
    return " ".join(f"{_config_flag(key)} {_config_value(args, key)}"
                    for key in ("levels", "pooling_factor", "topk", "tile_topk"))


def recipe_schedule_from_args(args: argparse.Namespace) -> RecipeSchedule:
    """The recipe's schedule (--lighthouse-until-iter and its variants); errors name the flag."""
    resolve_lighthouse_args(args)
    fields = dataclasses.fields(RecipeSchedule)
    return RecipeSchedule(**{f.name: getattr(args, PREFIX + f.name) for f in fields})


def until_iter_warning(args: argparse.Namespace) -> str | None:
    """The start-up warning (trainer and Megatron-LM entry point alike) when
    --lighthouse-until-iter never switches this run to dense attention; None otherwise.
    Iteration N is the (N+1)-th: with N >= --train-iters no iteration runs dense."""
    a = Values.of(args)
    until, total = a.lighthouse_until_iter, a.train_iters
    lighthouse = a.attention_impl == "lighthouse"
    if not lighthouse or until is None or total is None or until < total:
        return None
    return (f"warning: --lighthouse-until-iter {until} is not below --train-iters {total}: every iteration "
            f"runs Lighthouse attention and the dense recovery never happens in this run; set it below "
            f"{total} (the paper switches at 62.5%: {round(0.625 * total)}), or relaunch with "
            "--attention-impl dense from a checkpoint")


def lighthouse_warnings(args: argparse.Namespace) -> list[str]:
    """The start-up warnings (trainer and Megatron-LM entry point alike) about valid Lighthouse
    settings that cannot do what they say: no switch to dense (`until_iter_warning`), no
    iteration with Lighthouse, no layer with Lighthouse. Call it after validation."""
    a = Values.of(args)
    if a.attention_impl != "lighthouse":
        return []
    found = [w for w in [until_iter_warning(args)] if w]
    if a.lighthouse_until_iter == 0:
        found.append("warning: --lighthouse-until-iter 0: no iteration runs Lighthouse attention "
                     "(Lighthouse runs iterations 0 to N-1, none for N = 0); leave it out to train with "
                     "Lighthouse throughout, or use --attention-impl dense")
    layers = a.num_layers
    if layers and len(lighthouse_config_from_args(args).resolve_dense_layers(layers)) == layers:
        found.append(f"warning: --lighthouse-dense-layers keeps all {layers} layers dense: no layer runs "
                     "Lighthouse attention; list fewer layers, or use --attention-impl dense")
    return found


def validate_lighthouse_args(args: argparse.Namespace) -> LighthouseConfig | None:
    """Check the Lighthouse arguments against the model and parallel settings.

    Returns the LighthouseConfig (None with `--attention-impl dense`). Raises ValueError
    naming the flags, the numbers and the valid values.
    Call it after Megatron's own parsing, before anything is built.
    """
    resolve_lighthouse_args(args)
    if args.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"--attention-impl must be one of {list(ATTENTION_IMPLS)}, "
                         f"got {args.attention_impl!r}")
    schedule = recipe_schedule_from_args(args)
    if args.attention_impl == "dense":
        # Values no run could use are refused in a dense run too (a later stage may use them).
        lighthouse_config_from_args(args)
        rules.check_dense_local(args)
        return None
    a = Values.of(args)  # Megatron-LM's namespace, or the trainer's: a setting may be absent
    seq, cp = a.seq_length, a.context_parallel_size or 1
    config = lighthouse_config_from_args(args, seq if isinstance(seq, int) and seq > 0 else None, cp)
    rules.check_args(args)
    pp = a.pipeline_model_parallel_size or 1
    if args.lighthouse_eval_attention == "both" and pp > 1:
        raise ValueError(f"--lighthouse-eval-attention both with --pipeline-model-parallel-size {pp}: "
                         "both evaluations run on the same batch inside one forward step, which "
                         "only a single pipeline stage can do; use dense or model")

    if seq is not None:
        try:
            config.validate(seq, cp_size=cp)
        except ValueError as e:
            cp_flag = f" --context-parallel-size {cp}" if cp > 1 else ""
            raise ValueError(f"--seq-length {seq} with {_lighthouse_flags(args)}{cp_flag}: {e}") from e
        schedule.check_against(config, seq, cp)
    num_layers = a.num_layers
    if num_layers is not None:
        try:
            config.resolve_dense_layers(num_layers)
        except ValueError as e:
            raise ValueError(f"--lighthouse-dense-layers with --num-layers {num_layers}: {e}") from e
    # Megatron-LM reads the groups only with --group-query-attention; the trainer has no such flag.
    groups = a.num_query_groups if given(a.group_query_attention, True) else None
    rules.check_heads(a.num_attention_heads, groups, a.tensor_model_parallel_size or 1, rules.flag_named)
    rules.warn_qk_layernorm(config.scorer, bool(a.qk_layernorm),
                            "--lighthouse-scorer norm with --qk-layernorm")
    return config
