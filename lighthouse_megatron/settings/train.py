"""`lighthouse-megatron train` arguments: Megatron-LM's flag names, a YAML file, a recipe,
validation.

Precedence: a flag on the command line > the `--config` YAML file > the recipe (`--recipe`, or
`recipe:` in the --config file: one the package ships by name, or a YAML file) > the defaults
(the fields of the settings tree, `tree`). YAML keys are the flags' destinations (`num_layers`,
`lighthouse_topk`, ...; dashes are accepted too), typed by their field. Everything is checked
(`checks`) before a process group, a model or a dataset is built; errors are ValueErrors
naming the flag, the value and what would be valid.
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path
from typing import Any

from .. import recipes
from . import fields
from .checks import validate_args
from .fields import OFF, SWITCH, VALUE, Spec, add_arguments, merged, specs
from .lighthouse import add_lighthouse_args, lighthouse_specs
from .tree import GROUPS, train_specs
from .yaml_file import read_mapping


@functools.cache
def all_specs() -> dict[str, Spec]:
    """Every setting of `lighthouse-megatron train`: the tree's and the Lighthouse launch settings."""
    return merged(train_specs(), lighthouse_specs())


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The trainer's flags (every default None: the merge fills them, see module doc); each
    flag's help ends with its default."""
    p = parser or argparse.ArgumentParser(prog="lighthouse-megatron train")
    p.add_argument("--config", metavar="FILE", help="YAML file with any of the settings below "
                   "(keys: the flag names with '_', e.g. num_layers) and `recipe`; flags override it "
                   "(default: none)")
    p.add_argument("--recipe", metavar="NAME", help=f"the settings to start from: a recipe the package ships "
                   f"({', '.join(recipes.RECIPES)}) or a YAML file of settings; --config and flags override "
                   "it (default: the --config file's recipe, else none)")
    for group in GROUPS:
        add_arguments(p.add_argument_group(group.TITLE), specs(group))
    return add_lighthouse_args(p)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a GPT model with Lighthouse attention on this machine "
                       "(megatron-core; torchrun for several processes)")
    build_parser(p)
    p.set_defaults(run="lighthouse_megatron.training:run_cli")


# ----------------------------------------------------------------------------- typing


def typed_value(name: str, value: Any, where: str) -> Any:
    """`value` as setting `name`'s type (its field's annotation), when it clearly means one: YAML
    1.1 reads `3e-4` as a string and `no` as false, and `swiglu: "false"` must not build a SwiGLU
    model. ValueError naming `where`, the setting and the valid values otherwise; None stays
    None (the default), and a name that is no setting here keeps its value."""
    return fields.typed_value(all_specs().get(name), value, where)


def typed_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """Every value of `settings` typed by its setting (`typed_value`)."""
    return {key: typed_value(key, value, where) for key, value in settings.items()}


# The --config key that names a recipe (a recipe itself names none).
RECIPE = "recipe"


def _read_yaml(path, what: str, *, recipe: bool) -> dict[str, Any]:
    """The typed settings of YAML file `path` (`what` names it in errors: --config, recipe);
    `recipe`: it may name a recipe."""
    data = read_mapping(path, what)
    where = f"{what} {recipes.shown(path)}"
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(all_specs()) - ({RECIPE} if recipe else set()))
    if unknown:
        raise ValueError(f"{where}: {fields.unknown_names(unknown, all_specs())}"
                         + ("" if recipe else " (a recipe names no other recipe)"))
    return typed_settings(data, where)


def recipe_file(recipe: str, beside: str | None = None):
    """The file of `recipe`: the package's, by name, else a YAML file (relative to the folder of
    `beside`, the file that names it, if any)."""
    if recipe in recipes.RECIPES:
        return recipes.recipe(recipe)
    path = Path(beside).parent / recipe if beside else Path(recipe)
    if not path.is_file():
        shipped = ", ".join(recipes.RECIPES)
        raise ValueError(f"recipe {recipe}: neither a recipe the package ships ({shipped}) nor a file "
                         f"({path} is not one)")
    return path


def _settings_given(cli: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """(settings, where each came from, the recipe) of the --config file and its recipe, or
    --recipe's. A value the --config file brings through its recipe is said to be in that file."""
    given = _read_yaml(cli.config, "--config", recipe=True) if cli.config else {}
    named = given.pop(RECIPE, None)
    recipe = cli.recipe or named
    if recipe is None:
        return given, dict.fromkeys(given, f"--config {cli.config}"), None
    path = recipe_file(str(recipe), None if cli.recipe else cli.config)
    base = _read_yaml(path, "recipe", recipe=False)
    where = dict.fromkeys(base, f"recipe {recipe}" if cli.recipe else f"--config {cli.config}")
    where.update(dict.fromkeys(given, f"--config {cli.config}"))
    return {**base, **given}, where, str(recipe)


# ------------------------------------------------------------------------------ merge


def parse_args(argv: list[str] | None = None, *, world_size: int | None = None) -> argparse.Namespace:
    """Parse, merge (flags > YAML > defaults), validate. Raises ValueError on bad settings
    (argparse itself exits with code 2 on malformed flags)."""
    return resolve_args(build_parser().parse_args(argv), world_size=world_size)


def resolve_args(cli: argparse.Namespace, *, world_size: int | None = None) -> argparse.Namespace:
    """Merge parsed flags (None: not given) with the `--config` file and the defaults, validate.
    The Lighthouse settings stay None where neither gives them: `--lighthouse-config` comes
    before their defaults (`lighthouse.resolve_lighthouse_args`)."""
    settings, where, recipe = _settings_given(cli)
    args = argparse.Namespace(config=cli.config, recipe=recipe)
    from_file = []
    for key, s in all_specs().items():
        value = getattr(cli, key, None)
        if value is None:
            value = settings.get(key, s.default if key in train_specs() else None)
            if settings.get(key) is not None:
                from_file.append(key)
        # A list setting written as one string in YAML: its items, split at white space.
        setattr(args, key, value.split() if s.kind is list and isinstance(value, str) else value)
    try:
        validate_args(args, world_size=world_size)
    except ValueError as e:
        # A setting the user did not type names the file it came from (one line, as always).
        named = [k for k in from_file if re.match(re.escape(all_specs()[k].flag) + r"(?![\w-])", str(e))]
        if named:
            value = settings[named[0]]
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ValueError(f"{e} ({named[0]}: {shown} is in {where[named[0]]})") from None
        raise
    return args


def settings_args(settings: dict[str, Any], *, world_size: int | None = None) -> argparse.Namespace:
    """Validated arguments from a mapping of settings (the YAML keys; None: the default), as
    `--config` would give them, typed the same way; other keys are ignored."""
    cli = build_parser().parse_args([])
    for key in vars(cli):
        if key in settings:
            setattr(cli, key, typed_value(key, settings[key], "settings"))
    cli.config = None
    return resolve_args(cli, world_size=world_size)


# ------------------------------------------------------------------- derived from fields


def megatron_lm_args(args: argparse.Namespace) -> list[str]:
    """Megatron-LM `pretrain_gpt.py` flags (with the plugin's entry point) that build the same
    model, data order, loss and schedule as these trainer settings, so Megatron-LM can
    continue a trainer checkpoint (add `--load DIR`, and `--no-load-rng` for a CPU one)."""
    lighthouse = args.attention_impl == "lighthouse"
    out: list[str] = []
    for s in all_specs().values():
        if s.flag.startswith("--lighthouse-") and not lighthouse:
            continue  # a dense model takes no --lighthouse-* setting
        value = getattr(args, s.name)
        if s.megatron == VALUE and value is not None and value != []:
            out += [s.flag, *map(str, value if isinstance(value, list) else [value])]
        elif s.megatron == SWITCH and value:
            out.append(s.flag)
        elif s.megatron == OFF and value is False:
            out.append(s.negation)
    # What Megatron-LM spells otherwise: RoPE's base only with RoPE, the query groups only with
    # GQA's switch, no "evaluate only at the end".
    if args.position_embedding_type == "rope":
        out += ["--rotary-base", str(args.rotary_base)]
    if args.num_query_groups != args.num_attention_heads:
        out += ["--group-query-attention", "--num-query-groups", str(args.num_query_groups)]
    # The trainer's loss is the per-token mean over the global batch; its held-out batches
    # are the first eval_iters of the validation split.
    out += ["--eval-interval", str(args.eval_interval or args.train_iters), "--calculate-per-token-loss",
            "--ckpt-format", "torch_dist"]
    return out


def as_flags(settings: dict[str, Any]) -> list[str]:
    """Settings as the command line that gives them: each setting's own flag, which is
    Megatron-LM's (the trainer takes the same). A false bool needs a flag that turns it off in
    Megatron-LM too (--disable-bias-linear): Megatron-LM has no --no-FLAG."""
    out: list[str] = []
    for key, value in settings.items():
        spec = all_specs()[key]
        if value is None:
            continue
        if value is True:
            out.append(spec.flag)
        elif value is False:
            if not spec.negation:
                raise ValueError(f"{key}: false is not supported in a Slurm job (leave the key out)")
            out.append(spec.negation)
        elif isinstance(value, (list, tuple)):
            out += [spec.flag, *map(str, value)]
        else:
            out += [spec.flag, str(value)]
    return out


def changed_settings(args: argparse.Namespace) -> list[str]:
    """`name=value` for each setting of the (validated) `args` that is not its default. A setting
    whose default is derived from others (ffn_hidden_size, global_batch_size, ...) counts as
    changed only when it differs from what the other settings derive; the data source is not
    compared (every run has one), only mock data is named."""
    table, world = all_specs(), args.world_size
    source = dict(mock_data=True)
    given = {k: getattr(args, k) for k, s in table.items()
             if s.default is not None or k in lighthouse_specs()}
    try:
        derived = settings_args({**given, **source}, world_size=world)
        defaults = settings_args(source, world_size=world)
    except ValueError:  # the defaults do not fit this world size: compare with the raw defaults
        derived = defaults = argparse.Namespace(**{k: s.default for k, s in table.items()})
    derives = {k for k, s in train_specs().items() if s.default is None}
    changed = [f"{k}={getattr(args, k)}" for k in table
               if k not in source and getattr(args, k) != getattr(derived if k in derives else defaults, k)]
    return changed + [f"{k}=True" for k in source if getattr(args, k)]
