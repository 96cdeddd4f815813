"""claims.yaml: the paper's figures (each defined once) and the claims tables, as data.

A claim names its text, the paper's figure (a key of `paper.figures`, or none: "not reported"), the
target in words, the measure (a function of extract.py, with its arguments), the pass rule and
the command that measures it. Pass rules are a small language, never evaluated as code:

    >= 3.0    > 1    <= 0.55    < 79    == 0      the value against a number, or against the
    >= low    <= high                             paper figure's `low` / `high` numbers
    in beats, matches                             the value (a word) is one of these words
    (absent)                                      context: the row carries no verdict

A comparison judges a number directly and an interval by its two ends: it holds when both ends
hold, fails when neither does, and gives no verdict otherwise. Everything is checked when the
file is read; a mistake is one error naming the claim.
"""

from __future__ import annotations

import inspect
import operator
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from .._common import UsageError
from .extract import EXTRACTORS, Interval, Measured

CLAIMS_YAML = Path(__file__).with_name("claims.yaml")
OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_COMPARE = re.compile(r"^(>=|<=|==|>|<)\s*(\S+)$")
CLAIM_KEYS = {"claim", "paper", "target", "measure", "args", "pass", "command"}


@dataclass(frozen=True)
class Rule:
    text: str
    op: str | None = None  # a comparison ...
    number: float | None = None
    words: tuple[str, ...] = ()  # ... or membership

    def judge(self, value) -> bool | None:
        """True, False, or None (no verdict) for one measured value."""
        if value is None:
            return None
        if self.words:
            if not isinstance(value, str):
                raise UsageError(f"pass rule {self.text!r} judges words, got {value!r}")
            return value in self.words
        if isinstance(value, str):
            raise UsageError(f"pass rule {self.text!r} judges numbers, got {value!r}")
        op = OPS[self.op]
        if isinstance(value, Interval):
            if value.lower is None or value.upper is None:
                return None
            ends = {op(value.lower, self.number), op(value.upper, self.number)}
            return ends.pop() if len(ends) == 1 else None
        return op(value, self.number)


@dataclass(frozen=True)
class Claim:
    claim: str
    paper: str  # the figure's text
    target: str
    measure: str
    args: dict
    rule: Rule | None
    command: str

    def measured(self, results) -> list[Measured]:
        return EXTRACTORS[self.measure](results, **self.args)


@dataclass(frozen=True)
class Table:
    title: str
    note: str
    label: str  # in the gaps section, after "Did not reproduce"
    claims: tuple[Claim, ...]


@dataclass(frozen=True)
class Claims:
    source: str  # the paper
    tables: tuple[Table, ...]


def parse_rule(text, figure: dict | None, where: str) -> Rule | None:
    if text is None:
        return None
    text = str(text).strip()
    if text.startswith("in "):
        words = tuple(w.strip() for w in text[3:].split(",") if w.strip())
        if words:
            return Rule(text, words=words)
    elif m := _COMPARE.match(text):
        op, num = m.groups()
        if num in ("low", "high"):
            if not figure or num not in figure:
                raise UsageError(
                    f"{where}: pass rule {text!r} names the paper figure's {num!r}, which it lacks"
                )
            return Rule(text, op, float(figure[num]))
        try:
            return Rule(text, op, float(num))
        except ValueError:
            pass
    raise UsageError(
        f"{where}: pass rule {text!r}: expected '>= NUMBER' (or >, <=, <, ==; NUMBER may be "
        "'low' or 'high' of the paper figure), 'in WORD, WORD', or no rule"
    )


def _check_measure(entry: dict, where: str) -> None:
    name, args = entry["measure"], entry.get("args") or {}
    if name not in EXTRACTORS:
        raise UsageError(
            f"{where}: measure {name!r} is not an extractor (known: {', '.join(sorted(EXTRACTORS))})"
        )
    if not isinstance(args, dict):
        raise UsageError(f"{where}: args must be a mapping, got {args!r}")
    fn = EXTRACTORS[name]
    try:
        inspect.signature(fn).bind(None, **args)
    except TypeError as e:
        params = list(inspect.signature(fn).parameters)[1:]
        raise UsageError(
            f"{where}: measure {name}: {e} (it takes {', '.join(params) or 'no arguments'})"
        ) from None
    for arg, hint in typing.get_type_hints(fn).items():  # Literal[...] arguments: one of their values
        allowed = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
        if allowed and arg in args and args[arg] not in allowed:
            raise UsageError(
                f"{where}: measure {name}: {arg}={args[arg]!r} is not one of {', '.join(allowed)}"
            )


def parse_claim(entry, figures: dict, where: str) -> Claim:
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: a claim is a mapping, got {entry!r}")
    missing = sorted({"claim", "target", "measure", "command"} - entry.keys())
    unknown = sorted(entry.keys() - CLAIM_KEYS)
    if missing or unknown:
        raise UsageError(
            f"{where}: "
            + "; ".join(
                [f"missing {', '.join(missing)}"] * bool(missing)
                + [f"unknown key {', '.join(unknown)}"] * bool(unknown)
            )
        )
    where = f"{where} ({entry['claim']!r})"
    key = entry.get("paper")
    if key is not None and key not in figures:
        raise UsageError(
            f"{where}: paper figure {key!r} is not in paper.figures ({', '.join(sorted(figures))})"
        )
    figure = figures.get(key)
    _check_measure(entry, where)
    return Claim(
        entry["claim"],
        figure["text"] if figure else "not reported",
        entry["target"],
        entry["measure"],
        entry.get("args") or {},
        parse_rule(entry.get("pass"), figure, where),
        entry["command"],
    )


def parse_claims(data, where: str) -> Claims:
    if not isinstance(data, dict) or not {"paper", "tables"} <= data.keys():
        raise UsageError(f"{where}: expected a mapping with 'paper' and 'tables'")
    figures = data["paper"].get("figures") or {}
    for key, fig in figures.items():
        if not isinstance(fig, dict) or "text" not in fig:
            raise UsageError(f"{where}: paper figure {key!r} needs a 'text'")
    tables = []
    for i, t in enumerate(data["tables"]):
        if not isinstance(t, dict) or "title" not in t or not t.get("claims"):
            raise UsageError(f"{where}: table {i + 1} needs a 'title' and 'claims'")
        claims = tuple(
            parse_claim(c, figures, f"{where}: table {t['title']!r}, claim {j + 1}")
            for j, c in enumerate(t["claims"])
        )
        tables.append(Table(t["title"], (t.get("note") or "").strip(), t.get("label", ""), claims))
    return Claims(data["paper"]["source"], tuple(tables))


def load_claims(path: Path = CLAIMS_YAML) -> Claims:
    """claims.yaml read and checked: every measure an extractor taking the given arguments (an
    argument typed Literal[...] one of its values), every paper figure defined, every rule in the
    language above."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path}: not a readable claims file ({' '.join(str(e).split())})") from None
    return parse_claims(data, str(path))


# ----------------------------------------------------------------------- rendering


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def _how(command: str) -> str:
    return f"`{command}`" if command.startswith(("lighthouse-megatron", "python", "bash")) else command


def _judge(claim: Claim, m: Measured) -> bool | None:
    if claim.rule is None:
        return None
    try:
        return claim.rule.judge(m.value)
    except UsageError as e:
        raise UsageError(f"claim {claim.claim!r}, {m.result.path.as_posix()}: {e}") from None


def render_table(table: Table, results: dict) -> tuple[list[str], list[str]]:
    """One claims table, and its lines of the 'did not reproduce / not measured' section."""
    lines = [
        f"### {table.title}",
        "",
        *([table.note, ""] if table.note else []),
        "| claim | paper | target | ours | card | command |",
        "|---|---|---|---|---|---|",
    ]
    gaps = []
    label = f" ({table.label})" if table.label else ""
    for c in table.claims:
        measured = c.measured(results)
        if not measured:
            lines.append(
                f"| {cell(c.claim)} | {c.paper} | {c.target} | not yet measured | | {cell(_how(c.command))} |"
            )
            gaps.append(f"- **Not yet measured**{label}: {c.claim} (run {_how(c.command)}).")
        for m in measured:
            link = f"([json]({m.result.path.as_posix()}))"
            lines.append(
                f"| {cell(c.claim)} | {c.paper} | {c.target} | {cell(m.text)} | {m.result.card} | "
                f"`{cell(m.result.command)}` {link} |"
            )
            if _judge(c, m) is False:
                gaps.append(
                    f"- **Did not reproduce**{label}: {c.claim}: {m.text} on {m.result.card}; target: "
                    f"{c.target} {link}."
                )
    return lines + [""], gaps
