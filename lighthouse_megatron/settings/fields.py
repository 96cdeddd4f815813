"""What a setting is: a dataclass field that carries everything said about it, so that the
parsers, the typing of YAML values, the checks of types and ranges, Megatron-LM's command
line and the sets that checkpoints and Slurm jobs compare are read off the fields instead of
being listed again.

    num_layers: int = setting(2, "transformer layers", minimum=1, roles={SHAPE})

The field's name is the setting's name everywhere: the `args` attribute, the YAML key, the
Python API's key and, with '-' for '_', the flag (`--num-layers`, Megatron-LM's spelling; a
field names another flag where Megatron-LM spells it otherwise). Its annotation is its type
(`int | None`: an integer, None while unset or derived). `specs(cls)` gives a dataclass's
settings as `Spec`s, in field order.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

# Roles: what a setting means to the code that compares settings (more than one may apply).
SHAPE = "shape"  # fixes the shapes of the weights: a checkpoint and the run loading it must agree
SCHEDULE = "schedule"  # Megatron's optimizer-parameter scheduler refuses a change on resume
# Megatron-LM's default differs from the trainer's (or may): a Slurm job writes it out, so that
# both engines train the same model from the same recipe.
SAME_MODEL = "same-model"
CONTINUED = "continued"  # stage 2 of the Slurm chain continues stage 1 with the same value
SUMMARY = "summary"  # what `inspect` shows of a checkpoint's arguments
MACHINE = "machine"  # a setting of the machine, not of the model: a checkpoint does not store it
ROLES = (SHAPE, SCHEDULE, SAME_MODEL, CONTINUED, SUMMARY, MACHINE)

# How Megatron-LM's pretrain_gpt.py gets a trainer setting (`megatron`): as `--flag value`
# (unless the value is None or empty), as a bare `--flag` when true, as the `negation` flag
# when false; None: a setting of this trainer only (or one the command line builds itself).
VALUE, SWITCH, OFF = "value", "switch", "off"

_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


@dataclass(frozen=True)
class Spec:
    """One setting, read off its dataclass field (see `setting` for the meaning of each entry)."""

    name: str
    kind: type  # bool, int, float, str or list
    item: type | None  # a list's items
    default: Any
    help: str
    flag: str
    aliases: tuple[str, ...] = ()
    derived: str | None = None
    choices: tuple | None = None
    metavar: str | None = None
    nargs: str = "+"
    minimum: float | None = None
    above: float | None = None
    below: float | None = None
    roles: frozenset = frozenset()
    negatable: bool = True
    negation: str | None = None
    megatron: str | None = None
    stored_as: str | None = None
    render: bool = False
    render_help: str | None = None
    kinds: tuple[str, ...] | None = None

    def default_text(self) -> str:
        """The default as the help shows it."""
        if self.derived:
            return self.derived
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, (list, tuple)):
            return " ".join(map(str, self.default)) or "none"
        return str(self.default)

    def help_text(self) -> str:
        return f"{self.help} (default: {self.default_text()})"


def setting(default: Any = None, help: str = "", *, flag: str | None = None, aliases: tuple[str, ...] = (),
            derived: str | None = None, choices: tuple | None = None, metavar: str | None = None,
            nargs: str = "+", minimum: float | None = None, above: float | None = None,
            below: float | None = None,
            roles: set[str] | frozenset = frozenset(), negatable: bool = True, negation: str | None = None,
            megatron: str | None = None, stored_as: str | None = None, render: bool = False,
            render_help: str | None = None, kinds: tuple[str, ...] | None = None) -> Any:
    """A dataclass field that is a setting.

    help        what it does; the help adds "(default: ...)" from `default` or `derived`
    flag        the flag when it is not `--` + the name with '-' (Megatron-LM's odd spellings)
    aliases     more flags for it
    derived     what a None default means ("= --seq-length"): the checks fill it in
    choices, metavar, nargs ("+" or "*" for a list)
    minimum     the smallest valid value of a number (when it is set); `above`: the exclusive
                bottom (a value that must be positive); `below`: the exclusive top
    roles       SHAPE, SCHEDULE, SAME_MODEL, CONTINUED, SUMMARY, MACHINE
    negatable   a bool gets --no-FLAG too (off: a switch that only turns it on)
    negation    another flag that sets it false (Megatron-LM's --disable-bias-linear)
    megatron    how Megatron-LM's command line takes it: VALUE, SWITCH, OFF or None
    stored_as   the stored argument a checkpoint comparison reads instead (a derived one)
    render      also a flag of `slurm render` / `slurm submit`; `render_help` its help there
    kinds       the Slurm job kinds ("train", "convert") that take it (a job setting; None: all)
    """
    info = dict(help=help, flag=flag, aliases=tuple(aliases), derived=derived, choices=choices,
                metavar=metavar, nargs=nargs, minimum=minimum, above=above, below=below,
                roles=frozenset(roles),
                negatable=negatable, negation=negation, megatron=megatron, stored_as=stored_as, render=render,
                render_help=render_help, kinds=kinds)
    unknown = set(info["roles"]) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; valid: {ROLES}")
    if isinstance(default, (list, dict, set)):
        raise TypeError("a setting's default must be immutable (a tuple, not a list)")
    return dataclasses.field(default=default, metadata={"setting": info})


def _kind(annotation) -> tuple[type, type | None]:
    """(kind, item) of an annotation: `int | None` -> (int, None); `list[str] | None` and
    `tuple[int, ...]` -> (list, str / int)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = args
        args = list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (list, tuple):
        return list, args[0]
    return annotation, None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def specs(cls: type, prefix: str = "") -> dict[str, Spec]:
    """The settings of dataclass `cls` by name, in field order. `prefix` names them in a larger
    namespace (LighthouseConfig's `topk` is the trainer's `lighthouse_topk`, flag
    --lighthouse-topk). A field without `setting`'s metadata takes its help and the rest from its
    own `metadata` (LighthouseConfig's fields)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        info = dict(f.metadata.get("setting") or f.metadata)
        name = prefix + f.name
        kind, item = _kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = info.pop("flag", None) or _flag(name)
        out[name] = Spec(name=name, kind=kind, item=item, default=default, flag=flag, **info)
    return out


def merged(*tables: dict[str, Spec]) -> dict[str, Spec]:
    """Several groups' settings as one table; a name given twice is a bug."""
    out: dict[str, Spec] = {}
    for table in tables:
        twice = set(out) & set(table)
        if twice:
            raise ValueError(f"settings named twice: {sorted(twice)}")
        out.update(table)
    return out


# ------------------------------------------------------------------------------- parser


def add_arguments(group, table: dict[str, Spec], *, defaults: bool = False) -> None:
    """A flag for each setting of `table` on an argparse parser or group. Every default is None
    (`defaults` off) so that an explicit flag can be told apart from a YAML file's value and
    the setting's default, which the merge applies in that order."""
    for s in table.values():
        kw: dict[str, Any] = dict(dest=s.name, default=s.default if defaults else None, help=s.help_text())
        if s.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction if s.negatable else "store_true"
        else:
            kw.update(type=s.item if s.kind is list else s.kind if s.kind is not str else None,
                      choices=s.choices, metavar=s.metavar)
            if s.kind is list:
                kw["nargs"] = s.nargs
        group.add_argument(s.flag, *s.aliases, **kw)
        if s.negation:
            group.add_argument(s.negation, dest=s.name, action="store_false", default=None,
                               help=f"Megatron-LM's spelling of --no-{s.flag[2:]} (default: "
                                    f"{s.default_text()})")


# ------------------------------------------------------------------------------- typing


def as_number(text: str) -> float | None:
    """The number `text` spells, or None."""
    try:
        return float(text)
    except ValueError:
        return None


def typed_value(spec: Spec | None, value: Any, where: str) -> Any:
    """`value` as the setting's type, when it clearly means one (YAML 1.1 reads `3e-4` as a
    string, `no` as false) and one of its choices; ValueError naming `where`, the setting and
    the valid values otherwise. None (YAML's null) stays None where that is the setting's
    default or false; anything of a setting not known here stays as it is."""
    if spec is None or value is None and (spec.default is None or spec.kind is bool):
        return value
    if value is None:
        raise ValueError(f"{where}: {spec.name} must be set (leave it out for the default, "
                         f"{spec.default_text()}), got null")
    if spec.kind is list:
        items = value.split() if isinstance(value, str) else value if isinstance(value, (list, tuple)) \
            else [value]
        return [_typed_item(spec.name, v, spec.item, where) for v in items]
    typed = _typed_item(spec.name, value, spec.kind, where)
    if spec.choices is not None and typed not in spec.choices:
        raise ValueError(f"{where}: {spec.name} must be one of {list(spec.choices)}, got {value!r}")
    return typed


def _typed_item(name: str, value: Any, kind: type, where: str) -> Any:
    def refuse(what: str):
        return ValueError(f"{where}: {name} must be {what}, got {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if isinstance(value, str) else None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise refuse("true or false (also yes/no, on/off)")
    if kind is int:
        number = as_number(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != number \
                or number in (float("inf"), float("-inf")) or int(number) != number:
            raise refuse("an integer")
        return int(number)
    if kind is float:
        number = as_number(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise refuse("a number")
        return float(number)
    if isinstance(value, (bool, list, tuple, dict)):
        raise refuse("a string")
    return str(value)


# ------------------------------------------------------------------------------- checks


def unknown_names(unknown, valid) -> str:
    """The error text for setting names `unknown`, none of them in `valid`: each with the valid
    name it most likely means (the same in another case, a near spelling, the same with or
    without a prefix such as `lighthouse_`) or, where it is the prefix of several
    (`lighthouse:` for lighthouse_levels, ...), the first three of those; then every valid
    name."""
    valid = sorted(valid)
    folded = {v.lower(): v for v in valid}

    def meant(name: str) -> str | None:
        if name.lower() in folded:
            return folded[name.lower()]
        near = difflib.get_close_matches(name, valid, n=1, cutoff=0.8)
        if near:
            return near[0]
        affixed = [v for v in valid if v.endswith(f"_{name}") or name.endswith(f"_{v}")]
        return affixed[0] if len(affixed) == 1 else None

    named = []
    for name in map(str, unknown):
        group = [v for v in valid if v.startswith(f"{name}_")]
        if len(group) > 1:
            shown = ", ".join(map(repr, group[:3])) + ", ..." * (len(group) > 3)
            named.append(f"{name!r} (did you mean one of {shown}? settings are flat keys, not sections)")
        elif guess := meant(name):
            named.append(f"{name!r} (did you mean {guess!r}?)")
        else:
            named.append(repr(name))
    return f"unknown setting{'s' * (len(named) > 1)} {', '.join(named)}; valid: {', '.join(valid)}"


def check_value(args, spec: Spec) -> None:
    """The setting's value on `args` against its type, range and choices; ValueError naming the
    flag. None is fine for a setting whose default is None (unset, or derived later) and for a
    bool (false). A whole number given for a float becomes that float."""
    value = getattr(args, spec.name)
    if value is None and (spec.default is None or spec.kind is bool):
        return
    if spec.kind in (int, float):
        if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(args, spec.name, value)
        if not isinstance(value, spec.kind) or isinstance(value, bool):
            raise ValueError(f"{spec.flag} must be {'an integer' if spec.kind is int else 'a number'}, "
                             f"got {value!r}")
        if spec.kind is float and not math.isfinite(value):
            raise ValueError(f"{spec.flag} must be a finite number, got {value}")
        if spec.minimum is not None and value < spec.minimum:
            raise ValueError(f"{spec.flag} must be >= {spec.minimum}, got {value}")
        if spec.above is not None and value <= spec.above:
            raise ValueError(f"{spec.flag} must be > {spec.above:g}, got {value}")
        if spec.below is not None and value >= spec.below:  # e.g. dropout: torch would name neither
            raise ValueError(f"{spec.flag} must be in [{spec.minimum:g}, {spec.below:g}), got {value}")
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"{spec.flag} must be one of {list(spec.choices)}, got {value!r}")


def with_role(table: dict[str, Spec], role: str) -> tuple[str, ...]:
    """The settings of `table` that have `role`, as the arguments compared (`stored_as`)."""
    return tuple(s.stored_as or s.name for s in table.values() if role in s.roles)


class Values(dict):
    """Settings by name, as a dict and as attributes: `values.lr` is `values.get(...)` of that
    name (None when absent), `values.lr = x` sets it. The
    stored arguments of a Megatron-LM checkpoint and a Slurm job's training settings are
    read like `args`, by the settings' names."""

    @classmethod
    def of(cls, args) -> Values:
        """`args` (an argparse.Namespace, a dict, Values or None) as Values."""
        if isinstance(args, cls):
            return args
        return cls({} if args is None else args if isinstance(args, dict) else vars(args))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        self.pop(name, None)


def given(value, default):
    """`value`, or `default` when it is None (an argument absent from, or unset in, stored
    arguments means its default)."""
    return default if value is None else value
