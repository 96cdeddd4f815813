"""The measures claims.yaml names: each reads the loaded results and returns what it found, one
`Measured` per matching row (none: not measured yet). A value is a number, a word (a verdict),
an `Interval`, or None when the measurement gives no verdict (too few seeds, an uninformative probe).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from .._common import format_length, parse_length, seeds_text
from ..quality.stats import summary as stats
from ..retrieval.needle import CHANCE
from .results import Result

E2E_LEN = 98_304
EXTRACTORS: dict[str, Callable[..., list[Measured]]] = {}


class Interval(NamedTuple):
    lower: float | None
    upper: float | None


@dataclass
class Measured:
    value: float | str | Interval | None
    text: str
    result: Result


def extractor(fn):
    """Registers `fn` under its name: claims.yaml's `measure` names it."""
    EXTRACTORS[fn.__name__] = fn
    return fn


def _fewer(n: int, most: int) -> str:
    return "" if n >= most else f" (fewer seeds: {n} of {most})"


# --------------------------------------------------------------------------- speed


def _layer_rows(results, n: int, topk: int) -> Iterator[tuple[Result, dict]]:
    for r in results.get("layer", []):
        for row in r.data.get("rows", []):
            if row.get("N") == n and row.get("topk") == topk:
                yield r, row


@extractor
def layer_speedup(
    results, key: Literal["speedup_fwd_bwd", "speedup_fwd"], n: str, topk: int
) -> list[Measured]:
    """One layer's speed-up over dense (`key`: speedup_fwd_bwd or speedup_fwd) at length n."""
    ms = "fwd_bwd_ms" if "bwd" in key else "fwd_ms"
    return [
        Measured(row[key], f"{row[key]:.1f}x ({row[ms]:.1f} ms)", r)
        for r, row in _layer_rows(results, parse_length(n), topk)
        if key in row
    ]


@extractor
def layer_memory(results, n: str, topk: int) -> list[Measured]:
    """Peak memory of one layer fwd+bwd at length n (`bench layer`) and at every length of the
    failure modes' memory part."""
    out = [
        Measured(
            row["peak_mem_gib"],
            f"{format_length(row['N'])}: {row['fwd_bwd_ms']:.0f} ms fwd+bwd, "
            f"peak {row['peak_mem_gib']:.0f} GiB (k={row['topk']})",
            r,
        )
        for r, row in _layer_rows(results, parse_length(n), topk)
        if "peak_mem_gib" in row
    ]
    for r in results.get("failure_modes", []):
        for row in r.data.get("memory", {}).get("rows", []):
            if "peak_mem_gib" in row:
                text = f"{format_length(row['N'])}: peak {row['peak_mem_gib']:.1f} GiB (k={row['topk']})"
                out.append(Measured(row["peak_mem_gib"], text, r))
    return out


def _e2e_summaries(results, n: int, vocab: int | None = None):
    for r in results.get("e2e", []):
        if vocab is not None and r.meta.get("model", {}).get("vocab") != vocab:
            continue
        rows = {row["mode"]: row for row in r.data.get("rows", []) if row.get("N") == n and "step_ms" in row}
        for s in r.data.get("summary", []):
            if s.get("N") == n:
                yield r, s, rows


def _precision(r: Result) -> str:
    fp8 = r.meta.get("fp8")
    return f"FP8 {fp8['format']} linear layers" if fp8 else "bf16"


@extractor
def e2e_speedup(results, vocab: int | None = None, te: bool = True, fp8: bool = False) -> list[Measured]:
    """Stage-1 tokens/s over dense at 98K of the runs with (te) or without Transformer Engine's
    spec, in bf16 or with FP8 linear layers (fp8)."""
    out = []
    for r, s, rows in _e2e_summaries(results, E2E_LEN, vocab):
        wanted = (r.meta.get("spec") == "te") == te and bool(r.meta.get("fp8")) == fp8
        if "speedup_vs_dense" in s and wanted:
            lh, dense = (rows[m]["tokens_per_s"] / 1e3 for m in ("lighthouse", "dense"))
            model = r.meta.get("model", {})
            out.append(
                Measured(
                    s["speedup_vs_dense"],
                    f"{s['speedup_vs_dense']:.2f}x ({lh:.1f}k vs {dense:.1f}k "
                    f"tok/s, {model.get('layers')} layers, vocab {model.get('vocab')}, "
                    f"{r.meta.get('spec')} spec, {_precision(r)})",
                    r,
                )
            )
    return out


SUMMARY_TEXT: dict[str, Callable[[dict, Any], str]] = {
    # Lighthouse's stage-1 throughput as a share of free selection's (the ceiling)
    "lighthouse_of_ceiling": lambda s, v: (
        f"{100 * s['lighthouse_of_ceiling']:.1f}% of the ceiling (vocab {v}; ceiling "
        f"{s.get('ceiling_speedup_vs_dense', float('nan')):.2f}x dense)"
    ),
    # attention's share of the dense and of the Lighthouse step
    "attention_share_dense": lambda s, v: (
        f"{100 * s['attention_share_dense']:.0f}% of the dense step, "
        f"{100 * s.get('attention_share_lighthouse', float('nan')):.0f}% of the Lighthouse step (vocab {v})"
    ),
}
SummaryKey = Literal[tuple(SUMMARY_TEXT)]


@extractor
def e2e_summary(results, key: SummaryKey) -> list[Measured]:
    """One measurement per e2e run at 98K whose summary has `key` (one of SUMMARY_TEXT)."""
    text = SUMMARY_TEXT[key]
    return [
        Measured(s[key], f"{text(s, r.meta.get('model', {}).get('vocab'))}, {_precision(r)}", r)
        for r, s, _ in _e2e_summaries(results, E2E_LEN)
        if key in s
    ]


@extractor
def break_even(results) -> list[Measured]:
    """Shortest sequence at which Lighthouse beats dense: one layer and end to end."""
    out = []
    for r in results.get("failure_modes", []):
        rows = r.data.get("short", {}).get("rows", [])
        if rows:
            best = {}
            for row in rows:
                best[row["N"]] = max(best.get(row["N"], 0), row["speedup"])
            wins = [n for n, s in sorted(best.items()) if s > 1]
            text = ", ".join(f"{format_length(n)} {s:.2f}x" for n, s in sorted(best.items()))
            out.append(Measured(min(wins) if wins else None, f"one layer (best k): {text}", r))
    for r in results.get("e2e", []):
        summ = [s for s in r.data.get("summary", []) if "speedup_vs_dense" in s]
        if len(summ) > 1:
            wins = [s["N"] for s in summ if s["speedup_vs_dense"] > 1]
            text = ", ".join(f"{format_length(s['N'])} {s['speedup_vs_dense']:.2f}x" for s in summ)
            out.append(Measured(min(wins) if wins else None, f"end to end: {text}", r))
    return out


@extractor
def cp(results, key: Literal["ratio_fwd_bwd", "cp_overhead_share"], n: str) -> list[Measured]:
    """CP = 2 against CP = 1 at length n with TE's p2p ring (Megatron's default; the other
    cp_comm_types are in benchmarks/cp/README.md): the ratio or the CP bookkeeping's share."""
    out = []
    for r in results.get("cp", []):
        for row in r.data.get("rows", []):
            if row.get("N") != parse_length(n) or key not in row or r.meta.get("cp_comm_type") != "p2p":
                continue
            if key == "ratio_fwd_bwd":
                text = f"{row[key]:.3f}x ({row['fwd_bwd_ms']:.1f} vs {row['cp1_fwd_bwd_ms']:.1f} ms, p2p)"
            else:
                text = f"{100 * row[key]:.1f}% ({row['cp_overhead_ms']:.2f} ms)"
            out.append(Measured(row[key], text, r))
    return out


# ------------------------------------------------------- time to dense quality (the study)


UNITS = {
    "train_gap": "nats/byte",
    "heldout_gap": "nats/byte",
    "lag_per_lh_iter": "control iterations per Lighthouse iteration",
}


def _at_switch(rows: list[dict], switch: float) -> dict:
    return min(rows, key=lambda a: abs(a["switch_frac"] - switch))


@extractor
def quality_verdict(results, metric: Literal[tuple(UNITS)], switch: float = 0.625) -> list[Measured]:
    """Per batch of the time-to-dense-quality study (preset and run length), the paper's recipe's
    aggregate at the switch closest to `switch`: recovered - dense by the t rule (`cannot tell` gives
    no verdict). The recipe variants are judged against the paper's switch (recipe_vs_paper)."""
    out = []
    for r in results.get("quality", []):
        aggs = [a for a in r.data["aggregates"] if a.get("recipe", "paper") == "paper"]
        most = max(len(a["seeds"]) for a in aggs)
        for batch in sorted({a["batch"] for a in aggs}):
            a = _at_switch([x for x in aggs if x["batch"] == batch], switch)
            v = a[metric]
            bounds = (
                "" if v["lower"] is None else f", one-sided 95% bounds [{v['lower']:+.3f}, {v['upper']:+.3f}]"
            )
            text = (
                f"{v['verdict']}: {v['mean']:+.3f} {UNITS[metric]}{bounds}; {seeds_text(v['n'])}"
                f"{_fewer(v['n'], most)}; {batch} "
                f"({a['tokens']:,} training tokens per run), switch "
                f"{a['switch_frac']:.1%} (it. {a['switch']})"
            )
            out.append(Measured(None if v["verdict"] == "cannot tell" else v["verdict"], text, r))
    return out


def _ttq_text(t: dict, most: int, batch: str, step: dict) -> str:
    spread = "" if t["lower"] is None else f" [{t['lower']:.2f}, {t['upper']:.2f}] (95% interval)"
    return (
        f"{t['value']:.2f}x{spread} at switch {t['switch_frac']:.1%} ({t['lag_from']}); {seeds_text(t['n'])}"
        f"{_fewer(t['n'], most)}; {batch}; a Lighthouse step {step['ratio']:.3f} of a dense one "
        f"({step['file']}, {step['card']})"
    )


@extractor
def time_to_quality(results) -> list[Measured]:
    """Dense / two-stage wall-clock to the dense control's final loss, per batch, at every switch
    that was measured (not the assumed ones). The value is the interval: a verdict only where all
    of it lies on one side of the target."""
    out = []
    for r in results.get("quality", []):
        step, variants = r.data["step_ratio"], r.data.get("against_paper", {})
        for batch, ttq in sorted(r.data["time_to_quality"].items()):
            if batch in variants:  # a recipe variant: recipe_vs_paper judges it
                continue
            most = max(t["n"] for t in ttq)
            out += [Measured(Interval(t["lower"], t["upper"]), _ttq_text(t, most, batch, step), r)
                    for t in ttq if t["lag_from"].startswith("measured")]
    return out


@extractor
def recipe_vs_paper(results) -> list[Measured]:
    """Each recipe variant against the paper's hard switch on the same seeds and switch: the paired
    share of the dense run's time saved, with its two-sided 95% t interval (analyze.against_paper's
    verdict; `cannot tell` gives none)."""
    out = []
    for r in results.get("quality", []):
        for key, judged in sorted(r.data.get("against_paper", {}).items()):
            cost = r.data["time_to_quality"][key][0]
            for v in judged:
                spread = "" if v["lower"] is None else f" [{v['lower']:+.2f}, {v['upper']:+.2f}]"
                text = (f"{v['verdict']}: saves {v['share']:.2f} of the dense run's time against "
                        f"{v['paper_share']:.2f}, difference {v['mean']:+.2f}{spread}; {seeds_text(v['n'])}; "
                        f"{key}, switch {v['switch_frac']:.1%}; a stage-1 step {cost['stage1_cost']:.3f} "
                        f"of a dense one ({cost['stage1_cost_from']})")
                out.append(Measured(None if v["verdict"] == "cannot tell" else v["verdict"], text, r))
    return out


# ----------------------------------------------------- the earlier protocol (quality/v1/)


def v1_studies(results) -> list[Result]:
    """The earlier protocol's seeded studies (paper_protocol*.json), default preset first."""
    return sorted(
        (r for r in results.get("quality_v1", []) if "protocols" in r.data),
        key=lambda r: (r.meta.get("preset") != "default", r.path.as_posix()),
    )


def describe_v1(r: Result) -> str:
    m = r.meta
    preset = m.get("preset_describe", m.get("preset"))
    return f"{preset}, {m['paper_schedule']} LR, switch at {m['main_switch']:.1%}"


@extractor
def v1_protocol(
    results, gap: Literal["train", "heldout"], preset: str, judged: bool = True
) -> list[Measured]:
    """The earlier protocol's main row at `preset`: the final training ("train") or held-out
    ("heldout") gap; with judged=False the row is context and carries no verdict."""
    out = []
    for r in v1_studies(results):
        p = r.data.get("paper_protocol")
        if p is None or r.meta.get("preset") != preset:
            continue
        v, g = p[f"verdict_{gap}"], p[f"final_{gap}_gap"]
        spread = "" if v["n"] < 2 else f" +- {v['std']:.3f} (std)"
        rule = f", threshold {v['threshold']:.3f}" if judged and v["n"] >= 2 else ""
        word = f"{v['verdict']}: " if judged else ""
        text = (
            f"{word}recovered - dense {g['mean']:+.3f}{spread}{rule}; {seeds_text(v['n'])}; spike "
            f"{p['spike']['mean']:+.2f}; {describe_v1(r)}"
        )
        value = v["verdict"] if judged and v["verdict"] != "cannot tell" else None
        out.append(Measured(value, text, r))
    return out


def _rerun_leak(results, study: Result) -> tuple[dict, str] | None:
    """The leak-probe aggregate (as the earlier driver built it) of the probes rerun on `study`'s
    checkpoints, and their manifest; None without any."""
    runs = [r for r in results.get("leak", []) if r.meta["study"].rsplit("/", 1)[-1] == study.path.name]
    if not runs:
        return None
    rows = [r.data for r in runs]
    agg = {
        m: {a: stats([x[m][a]["mean"] for x in rows]) for a in ("lighthouse", "dense")}
        for m in ("lighthouse_trained", "dense_trained")
    }
    return {**agg, "dense_exactly_zero": all(x["check"]["ok"] for x in rows)}, runs[0].meta["manifest"]


@extractor
def v1_leak(results) -> list[Measured]:
    """The leak probe on the earlier protocol's checkpoints: 'zero' when dense attention gives
    exactly 0 for every seed (the check)."""
    out = []
    for r in v1_studies(results):
        lp = r.data.get("leak_probe")
        rerun = None if lp else _rerun_leak(results, r)
        if not lp and rerun is None:
            continue
        a = lp["aggregate"] if lp else rerun[0]
        lt, dt = a["lighthouse_trained"]["lighthouse"], a["dense_trained"]["lighthouse"]
        zero = a["dense_exactly_zero"]
        text = (
            f"loss change before t: Lighthouse-trained {lt['mean']:+.2e} +- {lt['se']:.1e} (se), dense-"
            f"trained {dt['mean']:+.2e} +- {dt['se']:.1e}, both with Lighthouse attention; dense attention "
            f"{'exactly 0 (check ok)' if zero else 'NOT 0 (check failed)'}; {seeds_text(lt['n'])}; "
            f"{describe_v1(r)}"
        )
        if rerun:
            text += f"; probes rerun with the leak probe on the study's checkpoints ([manifest]({rerun[1]}))"
        out.append(Measured("zero" if zero else "not zero", text, r))
    return out


def retrieval_word(verdict: str, informative: bool) -> str:
    """The retrieval comparison's word: its verdict only where the dense control retrieves."""
    return verdict if informative else "uninformative (the dense control does not retrieve)"


@extractor
def v1_passkey(results) -> list[Measured]:
    """Passkey retrieval of the earlier protocol's models (passkey documents in training)."""
    out = []
    for r in v1_studies(results):
        rt = r.data.get("retrieval")
        if not rt:
            continue
        a = rt["aggregate"]
        v = a["accuracy_deficit"]
        word = retrieval_word(v["verdict"], a["informative"])
        text = (
            f"{word}: token accuracy recovered {a['recovered']['mean']:.2f} vs dense "
            f"{a['dense']['mean']:.2f} (chance {CHANCE}); {seeds_text(v['n'])}; passkey documents "
            f"{100 * r.meta['data']['passkey']['fraction_of_bytes']:.1f}% of training bytes; {describe_v1(r)}"
        )
        out.append(Measured(v["verdict"] if word == v["verdict"] != "cannot tell" else None, text, r))
    return out


@extractor
def v1_one_seed(results, key: Literal["loss", "cost"]) -> list[Measured]:
    """The one-seed run before the seeded protocol (quality.json): the final dense eval loss gap
    ("loss") or the training-step cost ratio ("cost")."""
    out = []
    for r in results.get("quality_v1", []):
        if "final_loss_gap" not in r.data:
            continue
        d, m = r.data, r.meta
        run = (f"{m['config']['seq_length']:,} tokens, {m['total_iters']} iterations, dense from "
               f"{m['stage1_iters'] + 1}")
        if key == "loss":
            f = d["final_dense_eval"]
            text = (
                f"{d['final_loss_gap']:+.3f} (recovered {f['recovered']:.3f} vs dense {f['dense']:.3f} "
                f"nats/byte; {run})"
            )
            out.append(Measured(d["final_loss_gap"], text, r))
        else:
            c = d["cost"]
            text = (
                f"{c['step_s_ratio']:.2f}x ({c['two_stage_step_s']:.1f} s vs {c['dense_step_s']:.1f} s of "
                f"training steps; {run})"
            )
            out.append(Measured(c["step_s_ratio"], text, r))
    return out


@extractor
def retrieval(results) -> list[Measured]:
    """The needle-in-a-haystack probe: 'no worse' or 'worse' by the rule its JSON records, no
    verdict where the dense model does not retrieve."""
    out = []
    for r in results.get("retrieval", []):
        d, m = r.data, r.meta
        acc = {k: v["summary"]["token_accuracy"] for k, v in d["models"].items()}
        v = d["verdict"]
        word = retrieval_word("no worse" if v["ok"] else "worse", v.get("informative", True))
        text = (
            f"{word}: {d['accuracy_gap']:+.3f} value token accuracy (recovered {acc['recovered']:.2f} vs "
            f"dense {acc['dense']:.2f}, chance {CHANCE}; rule: {v['threshold']}; "
            f"{', '.join(map(format_length, m['lengths']))} tokens)"
        )
        out.append(Measured(None if word.startswith("uninformative") else word, text, r))
    return out
