"""`python -m benchmarks.quality.analyze`: every committed run of the study -> metrics, verdicts and
the headline, time to dense quality.

    python -m benchmarks.quality.analyze [--runs benchmarks/quality/runs] [--out benchmarks/quality/results]

Reads every run JSON under --runs (several leases' batches together: a batch is a preset and a run
length, `<preset>-<iters>`), pairs the arms by seed and writes --out/summary.json, summary.md (the
tables REPORT.md and the README quote) and curves.png. Per seed and switch S (N iterations, held-out
evaluations every E):

  train_gap        recovered - dense training loss, mean over the last 5% of the iterations (the
                   paper's metric; the same batches in both arms)
  heldout_gap      recovered - dense held-out loss, mean of the last 3 evaluations (the held-out set
                   is the same sequences for every seed and arm)
  lag              N - E minus the iteration at which the dense control first reached the recovered
                   model's held-out loss of the last 3 evaluations (centred on N - E): 'interp' by
                   interpolating the control's running minimum, 'fit' by inverting a power law
                   a + b i^-c fitted to the control's curve from N/4 on
  lag_per_lh_iter  lag / S: control iterations lost per Lighthouse iteration (the 'fit' lag when the
                   interpolation has none, i.e. when the recovered model is ahead of the control)
  quality_lag_per_lh_iter
                   what time to quality takes: lag_per_lh_iter, except where the recovered model ends
                   ahead of the control: then (crossing - (N - E)) / S, the crossing being where the
                   recovered run itself reached the control's final held-out loss (`crossing`)
  spike            the first dense iteration's batch: loss under dense - loss under Lighthouse
                   attention, same weights, before the update (the switch probe)
  stage1_gap       stage 1's held-out loss at S under Lighthouse (and under dense) attention minus the
                   control's at S
  end_slope        the control's dL / d ln(iteration) over the last quarter of the run

Verdicts follow stats.RULE (one-sided 95% Student-t bounds, tolerance 0.02), stated before the runs.
Time to dense quality: stats.time_to_quality with the step-time ratio of a Lighthouse and a dense
step from `bench e2e` (the 530M shape at 98K tokens, --e2e). Scale: the lag's line in ln(tokens)
over the default preset's run lengths (`scale_trend`), a wider preset against the default one paired
by seed (`width_effect`), and both carried to the paper's 530M model and 50B tokens (`paper_point`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from .._common import UsageError, main, seeds_text, usage_errors_as_exit_2, write_json
from . import stats
from .run import chained

HERE = Path(__file__).resolve().parent
LAST_SHARE = 0.05  # the paper's metric: training loss over the last 5% of the iterations
LAST_EVALS = 3
# The study's GPU kind, and one run that times every recipe's stage-1 steps beside the dense and the
# Lighthouse step (ratios are quoted within one run)
E2E_DEFAULT = HERE.parent / "e2e" / "e2e_98k_vocab128256_recipes.json"
SWITCHES_REPORTED = (0.5, 0.625, 0.75, 0.8)
PAPER_TOKENS = 50e9  # the paper's 530M model was trained on 50B tokens
PAPER_E2E = (1.40, 1.69)  # the paper's end-to-end speed-ups (B200), the anchor
POWER = 0.8  # the planning figure: seeds that decide a comparison with this probability
QUALITY_LAG = "quality_lag_per_lh_iter"  # the lag time to quality, best switch and recipe shares take


def load_runs(root: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(root.rglob("*.json"))]
    runs = [r for r in runs if r.get("study") == "quality"]
    if not runs:
        raise UsageError(f"--runs {root}: no run JSONs of the study (python -m benchmarks.quality.run)")
    digests = {r["corpus"] for r in runs}
    if len(digests) > 1:
        raise UsageError(f"--runs {root}: runs of different corpora ({sorted(digests)}); analyse them apart")
    for batch in sorted({r["batch"] for r in runs}):
        te = {(r.get("versions") or {}).get("transformer_engine") is not None
              for r in runs if r["batch"] == batch}
        if len(te) > 1:
            raise UsageError(f"--runs {root}: batch {batch} mixes runs with and without Transformer Engine "
                             "(the trainer builds TE layers where TE is installed, so the models differ); "
                             "run a batch where TE is absent throughout, or present throughout")
    return runs


def _curve(pairs) -> dict[int, float]:
    return {int(i): float(v) for i, v in pairs}


def seed_metrics(dense: dict, chain: list[dict], rec: dict) -> dict:
    """One seed's numbers for one switch (chain: the Lighthouse segments up to the switch)."""
    n, s = rec["iters"], rec["switch"]
    e = dense["settings"]["eval_interval"]
    d_train, d_eval = _curve(dense["train"]), _curve(dense["eval"]["dense"])
    r_train = {**{i: v for seg in chain for i, v in _curve(seg["train"]).items()}, **_curve(rec["train"])}
    r_eval = _curve(rec["eval"]["dense"])
    first = n - max(1, round(LAST_SHARE * n)) + 1
    tail = sorted(r_eval)[-LAST_EVALS:]
    target = statistics.fmean(r_eval[i] for i in tail)
    control_final = statistics.fmean(d_eval[i] for i in tail)
    at = statistics.fmean(tail)
    its = sorted(d_eval)
    lag = stats.lag(its, [d_eval[i] for i in its], at, target, fit_from=n // 4)
    per = (lag["interp"] if lag["interp"] is not None else lag["fit"])
    quality = per if lag["interp"] is not None else crossing(r_eval, s, control_final) - at
    s1 = {kind: _curve(pairs) for kind, pairs in chain[-1]["eval"].items()}
    probe = rec.get("switch_probe")
    # No probe, or the last stage-1 iteration already ran dense attention everywhere (a progressive
    # window): then its losses all come from one computation, bit for bit the same, and say nothing.
    probed = probe is not None and probe["loss_dense"] != probe["loss_lighthouse"]
    return {
        "seed": rec["seed"], "switch": s, "switch_frac": s / n,
        "train_gap": stats.window_mean(r_train, first, n) - stats.window_mean(d_train, first, n),
        "heldout_gap": target - control_final,
        "lag_interp": lag["interp"], "lag_fit": lag["fit"], "lag": per, "lag_from_fit": lag["interp"] is None,
        "lag_per_lh_iter": None if per is None else per / s,
        # time to quality's lag: the interpolated one, or where the recovered run ends below all the
        # control reached, the iteration at which the recovered run itself reached the control's end
        "quality_lag_per_lh_iter": None if quality is None else quality / s,
        "quality_from_crossing": lag["interp"] is None,
        "spike": probe["loss_dense"] - probe["loss_lighthouse"] if probed else None,
        # None where the schedule has no Lighthouse layer left at the switch (a progressive window)
        "stage1_gap_lighthouse": s1["lighthouse"][s] - d_eval[s] if s in s1.get("lighthouse", {}) else None,
        "stage1_gap_dense": s1["dense"][s] - d_eval[s],
        # the spike's parts: only the r-th Lighthouse layer dense, minus stage 1's loss (runs since 12-07)
        "spike_per_layer": [x - probe["loss_lighthouse"] for x in probe["loss_one_dense"]]
        if probed and "loss_one_dense" in probe else None,
        "end_slope": stats.end_slope(its, [d_eval[i] for i in its]),
        "last_iters": [first, n], "eval_interval": e,
    }


def crossing(r_eval: dict[int, float], switch: int, goal: float) -> float:
    """The iteration at which the recovered run, after the switch, first reached `goal`, the control's
    final held-out loss (both as means of 3 consecutive evaluations, each centred on its mean iteration,
    as the lag's targets are): measured, where the lag would extrapolate the control's curve. Only
    called where the recovered run ends below the control, so its last window gets there."""
    after = sorted(i for i in r_eval if i > switch)
    windows = [after[j:j + LAST_EVALS] for j in range(len(after) - LAST_EVALS + 1)]
    return stats.first_reached([statistics.fmean(w) for w in windows],
                               [statistics.fmean(r_eval[i] for i in w) for w in windows], goal)


def batch_rows(runs: list[dict]) -> list[dict]:
    """Per-seed rows of every (batch, seed, recipe, switch) with all its runs present."""
    by = defaultdict(dict)
    for r in runs:
        by[(r["batch"], r["seed"])][(r["arm"], r.get("recipe", "paper"), r["switch"])] = r
    rows = []
    for (batch, _), arms in sorted(by.items()):
        dense = arms.get(("dense", "paper", None))
        for (arm, recipe, sw), rec in sorted(arms.items(), key=lambda kv: str(kv[0])):
            if arm != "recovered" or dense is None:
                continue
            chain = sorted((r for (a, rc, x), r in arms.items()
                            if a == "lighthouse" and rc == recipe and x <= sw), key=lambda r: r["switch"])
            if not chain or chain[-1]["switch"] != sw:
                continue
            if not chained(recipe):
                chain = chain[-1:]  # window recipes run stage 1 from scratch for each switch
            rows.append({"batch": batch, "recipe": recipe, "preset": rec["preset"], "iters": rec["iters"],
                         "tokens": rec["iters"] * rec["settings"]["global_batch_size"]
                         * rec["settings"]["seq_length"],
                         "parameters": transformer_parameters(rec["settings"]),
                         **seed_metrics(dense, chain, rec)})
    return rows


def transformer_parameters(settings: dict) -> int | None:
    """The weight matrices of a run's transformer layers (no embeddings), its shape completed as the
    trainer completes it; None for settings that name no shape (synthetic runs)."""
    if "num_layers" not in settings:
        return None
    from lighthouse_megatron.settings import checks, tree

    args = argparse.Namespace(**{**tree.defaults(), **settings})
    checks.check_model_shape(args)
    return args.num_layers * checks.layer_parameters(args)


VERDICTS = {"train_gap": stats.TOLERANCE, "heldout_gap": stats.TOLERANCE, "lag_per_lh_iter": stats.TOLERANCE}
SUMMARIES = ("lag", "lag_interp", "lag_fit", "spike", "stage1_gap_lighthouse", "stage1_gap_dense",
             "end_slope")


def _paper_first(key: tuple) -> tuple:
    """(batch, recipe, ...) in batch order, the paper's recipe first, then the variants by name."""
    return (key[0], key[1] != "paper", *key[1:])


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (batch, switch): verdicts on the gaps and the lag, summaries of the rest."""
    out = []
    for key in sorted({(r["batch"], r["recipe"], r["switch"]) for r in rows}, key=_paper_first):
        group = [r for r in rows if (r["batch"], r["recipe"], r["switch"]) == key]
        row = {"batch": key[0], "recipe": key[1], "switch": key[2], "switch_frac": group[0]["switch_frac"],
               "preset": group[0]["preset"], "iters": group[0]["iters"], "tokens": group[0]["tokens"],
               "seeds": [r["seed"] for r in group]}
        for m, tol in VERDICTS.items():
            row[m] = stats.verdict([r[m] for r in group], tol)
        for m in SUMMARIES:
            row[m] = stats.summary([r[m] for r in group])
        row["lag_from_fit"] = sum(r["lag_from_fit"] for r in group)
        layers = [r["spike_per_layer"] for r in group if r.get("spike_per_layer")]
        row["spike_per_layer"] = [stats.summary(v) for v in zip(*layers, strict=True)] if layers else None
        out.append(row)
    return out


def step_ratio(e2e_path: Path) -> dict:
    """Lighthouse step time / dense step time from a `bench e2e` JSON (same run, same card), with the
    recipe variants' steps where it timed them (`--recipe-steps`)."""
    data = json.loads(e2e_path.read_text())
    ms = {r["mode"]: r["step_ms"] for r in data["rows"] if "step_ms" in r}
    summary = next((s for s in data.get("summary", []) if s["N"] == data["rows"][0]["N"]), {})
    measured = {k: summary[k] for k in ("grow_cost_vs_dense", "mixed_cost_vs_dense",
                                        "mixed_lighthouse_layers_dense", "mean_merge_cost_vs_dense")
                if k in summary}
    return {"ratio": ms["lighthouse"] / ms["dense"], "lighthouse_ms": ms["lighthouse"],
            "dense_ms": ms["dense"],
            "card": data["meta"]["device"], "command": data["meta"]["command"], "file": e2e_path.name,
            "parameters": data["rows"][0].get("parameters"), "N": data["rows"][0]["N"],
            "transformer_parameters": _e2e_transformer_parameters(data["meta"].get("model")),
            **({"recipe_steps": measured} if measured else {})}


def _e2e_transformer_parameters(model: dict | None) -> int | None:
    """The transformer layers' weight matrices of the model `bench e2e` timed (its JSON's meta.model)."""
    if not model:
        return None
    return transformer_parameters({
        "num_layers": model["layers"], "hidden_size": model["hidden"], "num_attention_heads": model["heads"],
        "num_query_groups": model["kv_heads"], "ffn_hidden_size": model["ffn"],
        "swiglu": model["mlp"] == "SwiGLU"})


def _window_cost(kind: str, ratio: float, steps: dict) -> tuple[float, str] | None:
    """The mean step cost over a progressive or growth window, from `bench e2e --recipe-steps`."""
    if kind == "grow" and "grow_cost_vs_dense" in steps:
        # lighthouse_megatron.recipe: the window's iterations split evenly over the ladder's larger k.
        costs = steps["grow_cost_vs_dense"]
        return statistics.fmean(costs.values()), "measured steps at k " + ", ".join(costs)
    if kind == "progressive" and "mixed_cost_vs_dense" in steps:
        # The window's iterations split evenly over 1..G layers dense (lighthouse_megatron.recipe); the
        # step cost with d of G dense runs through the measured points (0, r), (d_m, mixed), (G, 1).
        d_m, g = steps["mixed_lighthouse_layers_dense"]
        mixed = steps["mixed_cost_vs_dense"]

        def cost(d: int) -> float:
            if d <= d_m:
                return ratio + (mixed - ratio) * d / d_m
            return mixed + (1 - mixed) * (d - d_m) / (g - d_m)

        mean = statistics.fmean(cost(d) for d in range(1, g + 1))
        return mean, f"measured steps with 0, {d_m} and {g} of {g} layers dense, linear between"
    return None


def stage1_cost(recipe: str, ratio: float, steps: dict | None = None, window_layers: int = 26
                ) -> tuple[float, str]:
    """A stage-1 step's cost over a dense step under `recipe`, and how it was obtained. An
    interleaved dense step costs a dense step; a window's steps, a larger k's and the averaged
    levels' come from `steps` (the e2e run's `recipe_steps`) where it has them. Without: inside a
    progressive window a layer costs what its attention runs (attention time additive over layers,
    `window_layers` Lighthouse layers: the 530M shape's 26); a grown k's cost is not known (the
    paper's ratio: a lower bound)."""
    if recipe == "paper":
        return ratio, "measured"
    if recipe == "mean-merge":
        if "mean_merge_cost_vs_dense" in (steps or {}):
            return steps["mean_merge_cost_vs_dense"], "measured step with the levels averaged"
        # The Lighthouse step and one division per token and head.
        return ratio, "the Lighthouse step's (plus one division per token; not timed on its own)"
    kind, _, value = recipe.rpartition("-")
    if kind == "dense-every":
        return ratio + (1 - ratio) / int(value), "measured steps, mixed 1 dense in " + value
    if kind == "topk":  # every stage-1 step at M k: the growth ladder's rung M (2 k, 4 k, ...)
        ladder = sorted((steps or {}).get("grow_cost_vs_dense", {}).items(), key=lambda kv: int(kv[0]))
        rung = int(value).bit_length() - 2
        if rung < len(ladder):
            return ladder[rung][1], f"measured step at k {ladder[rung][0]}"
        return ratio, f"not measured: a step at {value} times k (the paper's ratio, a lower bound)"
    share = int(value) / 100  # of stage 1 in the window
    window = _window_cost(kind, ratio, steps or {})
    if window is not None:
        return ratio + share * (window[0] - ratio), window[1]
    if kind == "progressive":
        mean_dense = (window_layers + 1) / (2 * window_layers)  # layers dense on average in the window
        return (ratio + (1 - ratio) * share * mean_dense,
                "modelled: attention time additive over layers inside the window")
    return ratio, "not measured: a larger k's step cost (the paper's ratio, a lower bound)"


def time_to_quality(rows: list[dict], batch: str, ratio: float, recipe: str = "paper",
                    steps: dict | None = None) -> list[dict]:
    """dense / two-stage wall-clock to the control's final loss at each reported switch, from the seeds'
    lags (stats.time_to_quality_interval): each seed's lag at that switch when it was run, else its
    mean lag over the measured switches (marked 'assumed: lag constant in the switch point')."""
    mine = [r for r in rows
            if r["batch"] == batch and r["recipe"] == recipe and r[QUALITY_LAG] is not None]
    measured = sorted({r["switch_frac"] for r in mine})
    seeds = sorted({r["seed"] for r in mine})
    cost, how = stage1_cost(recipe, ratio, steps)
    out = []
    for f in sorted({*SWITCHES_REPORTED, *measured}):
        exact = any(math.isclose(f, m) for m in measured)
        lags, crossed = [], 0
        for seed in seeds:
            used = [r for r in mine if r["seed"] == seed and (not exact or math.isclose(r["switch_frac"], f))]
            if used:
                lags.append(statistics.fmean(r[QUALITY_LAG] for r in used))
                crossed += any(r["quality_from_crossing"] for r in used)
        where = ("measured at this switch" if exact
                 else "assumed: each seed's mean lag over the measured switches")
        if crossed:
            where += f" ({crossed} of {len(lags)} from the recovered run's crossing)"
        out.append({"switch_frac": f, "lag_from": where, "crossings": crossed, "stage1_cost": cost,
                    "stage1_cost_from": how, **stats.time_to_quality_interval(f, lags, cost)})
    return out


def _shares(rows: list[dict], batch: str, recipe: str, cost: float) -> dict[tuple[int, float], float]:
    """(seed, switch) -> the share of the dense run's time the two-stage run saves, f (1 - c - λ_f)
    with c the stage-1 step cost (time to quality is 1 / (1 - share))."""
    mine = [r for r in rows if r["batch"] == batch and r["recipe"] == recipe and r[QUALITY_LAG] is not None]
    return {(r["seed"], r["switch_frac"]): r["switch_frac"] * (1 - cost - r[QUALITY_LAG]) for r in mine}


def best_switch(rows: list[dict], batch: str, ratio: float, recipe: str = "paper",
                steps: dict | None = None) -> dict | None:
    """The measured switch that saves the most time, and whether the seeds decide it. Per seed, the
    share of the dense run's time a switch at f saves is f (1 - r - λ_f) (time to quality is
    1 / (1 - share); the share is linear in λ, so a seed whose λ comes from the fit weighs in
    linearly, not through the ratio's pole). The leader has the largest mean share over the seeds
    measured at every switch; it is decided where the two-sided 95% t interval of the paired
    difference (leader - other) lies above 0 against every other switch."""
    share = _shares(rows, batch, recipe, stage1_cost(recipe, ratio, steps)[0])
    switches = sorted({f for _, f in share})
    seeds = sorted(s for s in {s for s, _ in share} if all((s, f) in share for f in switches))
    if len(switches) < 2 or len(seeds) < 2:
        return None
    mean = {f: statistics.fmean(share[s, f] for s in seeds) for f in switches}
    lead = max(switches, key=mean.get)
    diff = {f: [share[s, lead] - share[s, f] for s in seeds] for f in switches if f != lead}
    against = [_paired({"switch_frac": f, "share": mean[f]}, d) for f, d in diff.items()]
    return {"switch_frac": lead, "share": mean[lead], "seeds": seeds, "against": against,
            "decided": all(stats.side_of_zero(a["lower"], a["upper"]) == "above" for a in against)}


def against_paper(rows: list[dict], batch: str, ratio: float, recipe: str,
                  steps: dict | None = None) -> list[dict]:
    """A recipe variant against the paper's hard switch, per switch where both ran, paired by seed:
    the share of the dense run's time each saves, f (1 - c - λ) with c its stage-1 step cost (as in
    best_switch). The variant *wins* where the two-sided 95% t interval of the paired difference
    (variant - paper) lies above 0, *loses* where it lies below, and otherwise *cannot tell*."""
    mine = _shares(rows, batch, recipe, stage1_cost(recipe, ratio, steps)[0])
    paper = _shares(rows, batch, "paper", ratio)
    out = []
    for f in sorted({f for _, f in mine}):
        seeds = sorted(s for s, g in mine if g == f and (s, f) in paper)
        if not seeds:
            continue
        d = _paired({"switch_frac": f, "seeds": seeds, "share": statistics.fmean(mine[s, f] for s in seeds),
                     "paper_share": statistics.fmean(paper[s, f] for s in seeds)},
                    [mine[s, f] - paper[s, f] for s in seeds])
        d["verdict"] = {None: "cannot tell", "above": "wins", "below": "loses"}[
            stats.side_of_zero(d["lower"], d["upper"])]
        out.append(d)
    return out


def _paired(row: dict, diffs: list[float]) -> dict:
    """`row` with the paired differences' two-sided 95% t interval and, for planning, the seeds that
    would exclude 0 with 80% probability at this mean and spread (stats.seeds_for_power)."""
    d = stats.interval(diffs)
    return {**row, **d, "seeds_for_power": stats.seeds_for_power(d["mean"], d["std"], POWER), "power": POWER}


def _line_fit(x, y, at: float) -> dict:
    """Least squares y = a + b x with its standard errors, and its value at `at` with a two-sided 95%
    t interval (n - 2 degrees of freedom)."""
    import numpy as np

    (slope, icpt), cov = np.polyfit(x, y, 1, cov=True)
    value = icpt + slope * at
    se = math.sqrt(cov[1, 1] + at**2 * cov[0, 0] + 2 * at * cov[0, 1])
    t = stats.t_quantile(len(x) - 1, 0.975)
    slope_se = math.sqrt(cov[0, 0])
    return {"slope": float(slope), "slope_se": slope_se, "slope_lower": float(slope - t * slope_se),
            "slope_upper": float(slope + t * slope_se), "intercept": float(icpt),
            "at": float(value), "at_se": se, "lower": float(value - t * se), "upper": float(value + t * se)}


def scale_trend(rows: list[dict], key: str = "lag_per_lh_iter") -> dict | None:
    """Lag per Lighthouse iteration (`key`: the lag, or time to quality's) against training tokens,
    one point per seed and run length (the preset's own switch closest to 62.5%), projected to the
    paper's 50B tokens two ways: linear in ln(tokens), which has no floor and so must cross zero
    somewhere, and a power law a * tokens^b (a line in log-log; positive by construction, fitted only
    when every point is positive). Both are extrapolations far beyond the runs: see the README."""
    import numpy as np

    pts = [(math.log(r["tokens"]), r[key]) for r in rows
           if r["preset"] == "default" and r["recipe"] == "paper" and r[key] is not None
           and abs(r["switch_frac"] - 0.625) < 0.02]
    if len({x for x, _ in pts}) < 2 or len(pts) < 4:
        return None
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    xp = math.log(PAPER_TOKENS)
    linear = _line_fit(x, y, xp)
    power = None
    if (y > 0).all():
        fit = _line_fit(x, np.log(y), xp)
        power = {"exponent": fit["slope"], "exponent_se": fit["slope_se"], "at": math.exp(fit["at"]),
                 "lower": math.exp(fit["lower"]), "upper": math.exp(fit["upper"])}
    return {"points": len(pts), "run_lengths_tokens": sorted({int(round(math.exp(v))) for v in x}),
            "seeds_per_length": [int((x == v).sum()) for v in sorted(set(x))],
            "linear": linear, "power_law": power, "extrapolation_factor": PAPER_TOKENS / math.exp(x.max())}


def width_effect(rows: list[dict], key: str = QUALITY_LAG) -> list[dict]:
    """Each wider preset against the default preset at the same run length and switch (the paper's
    recipe), paired by seed (the seed fixes the data order in both): the wider model's lag per
    Lighthouse iteration (`key`) minus the default's, its two-sided 95% t interval, and the same per
    e-fold of transformer parameters. The lag is "smaller" or "larger" with width where the interval
    excludes 0, else "cannot tell"."""
    paper = [r for r in rows if r["recipe"] == "paper" and r[key] is not None and r.get("parameters")]
    base = {(r["iters"], r["switch_frac"], r["seed"]): r for r in paper if r["preset"] == "default"}
    groups = defaultdict(list)
    for r in paper:
        pair = base.get((r["iters"], r["switch_frac"], r["seed"]))
        if r["preset"] != "default" and pair is not None:
            groups[(r["preset"], r["iters"], r["switch_frac"])].append((r, pair))
    out = []
    for (preset, iters, frac), pairs in sorted(groups.items()):
        diff = stats.interval([w[key] - d[key] for w, d in pairs])
        efolds = math.log(pairs[0][0]["parameters"] / pairs[0][1]["parameters"])
        out.append({"preset": preset, "iters": iters, "switch_frac": frac,
                    "seeds": [w["seed"] for w, _ in pairs], "parameters": pairs[0][0]["parameters"],
                    "default_parameters": pairs[0][1]["parameters"],
                    "wider": stats.summary([w[key] for w, _ in pairs]),
                    "default": stats.summary([d[key] for _, d in pairs]), "difference": diff,
                    "per_efold": {k: None if diff[k] is None else diff[k] / efolds
                                  for k in ("mean", "lower", "upper")},
                    "lag_is": {None: "cannot tell", "below": "smaller", "above": "larger"}[
                        stats.side_of_zero(diff["lower"], diff["upper"])]})
    return out


def paper_point(trend: dict | None, width: list[dict], parameters: int | None) -> dict | None:
    """The lag per Lighthouse iteration at the paper's point (50B tokens, the 530M model's
    `parameters` in its transformer layers): the run-length line's value at 50B (switch 62.5%) plus
    the width effect at 62.5% per e-fold of parameters times the e-folds from the default preset to
    the 530M model. The two intervals add end to end (wider than combining them, as befits two
    extrapolations stacked)."""
    effect = next((w for w in width if abs(w["switch_frac"] - 0.625) < 0.02 and w["per_efold"]["lower"]
                   is not None), None)
    if not trend or effect is None or not parameters:
        return None
    lin, per = trend["linear"], effect["per_efold"]
    efolds = math.log(parameters / effect["default_parameters"])
    return {"tokens": PAPER_TOKENS, "parameters": parameters, "parameter_efolds": efolds,
            "from_tokens": lin["at"], "from_width": per["mean"] * efolds,
            "at": lin["at"] + per["mean"] * efolds,
            "lower": lin["lower"] + per["lower"] * efolds, "upper": lin["upper"] + per["upper"] * efolds}


# --------------------------------------------------------------------------- output


def _pm(s: dict, spec: str = "+.3f") -> str:
    if not s.get("n"):
        return "-"
    if s["n"] < 2:
        return f"{s['mean']:{spec}} (n=1)"
    return f"{s['mean']:{spec}} ± {s['std']:{spec.lstrip('+')}}"


def _bounds(v: dict, spec: str = "+.3f") -> str:
    if v["upper"] is None:
        return "-"
    return f"[{v['lower']:{spec}}, {v['upper']:{spec}}]"


def _from_fit(a: dict) -> str:
    """Which seeds' lag comes from the control's fitted curve (the recovered run ended below every
    loss the control reached, so interpolation has nothing to find)."""
    k = a["lag_from_fit"]
    return f" ({k} of {len(a['seeds'])} from the fit)" if k else ""


def _best_text(b: dict) -> str:
    f = b["switch_frac"]
    vs = "; ".join(f"against {a['switch_frac']:.1%} (saving {a['share']:.2f}): {a['mean']:+.3f} "
                   f"{_bounds(a)}{_needs(a)}" for a in b["against"])
    word = f"decided: {f:.1%} is the switch to use" if b["decided"] else "not decided: no switch to recommend"
    return (f"Best measured switch ({len(b['seeds'])} seeds measured at every switch): {f:.1%}, saving "
            f"{b['share']:.2f} of the dense run's time on average; the paired difference in the share "
            f"saved, 95% t interval, {vs}; {word}.")


def _against_text(vs: list[dict]) -> str:
    parts = "; ".join(
        f"at {a['switch_frac']:.1%} ({len(a['seeds'])} seeds) it saves {a['share']:.2f} of the dense run's "
        f"time against {a['paper_share']:.2f}, difference {a['mean']:+.3f} {_bounds(a)}: "
        f"**{a['verdict']}**{_needs(a)}" for a in vs)
    return f"Against the paper's hard switch on the same seeds (paired share of time saved, 95% t): {parts}."


def _needs(a: dict) -> str:
    """Where the interval includes 0: the seeds that would decide it with 80% probability if the
    mean and spread seen so far were the true ones."""
    if a["lower"] is None or stats.side_of_zero(a["lower"], a["upper"]):
        return ""
    n, chance = a.get("seeds_for_power"), f"{a['power']:.0%}"
    return (f" (at this mean and spread, {n} seeds would decide it with {chance} probability)" if n
            else f" (at this mean and spread, not with {chance} probability within 100 seeds)")


def markdown(summary: dict) -> str:
    """The tables REPORT.md and the README quote (generated: edit analyze.py, not the file)."""
    lines = ["<!-- generated by python -m benchmarks.quality.analyze; do not edit -->", "",
             f"Verdict rule (stated before the runs): {summary['rule']}", ""]
    n_max = max((len(a["seeds"]) for a in summary["aggregates"]), default=0)
    lines += ["| runs | switch | seeds | train gap (last 5%) | verdict | held-out gap (last 3 evals) "
              "| verdict | lag per Lighthouse iteration, one-sided 95% bounds | verdict "
              "| lag (control iterations) | spike (paired) | control end slope dL/dln i |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in summary["aggregates"]:
        few = "" if len(a["seeds"]) == n_max else " (fewer seeds)"
        lines.append(
            f"| {a['batch']}{'' if a['recipe'] == 'paper' else ' ' + a['recipe']} "
            f"({a['tokens'] / 1e6:.0f}M tokens) | {a['switch_frac']:.1%} (it. {a['switch']}) "
            f"| {len(a['seeds'])}{few} | {_pm(a['train_gap'])} | {a['train_gap']['verdict']} "
            f"| {_pm(a['heldout_gap'])} | {a['heldout_gap']['verdict']} "
            f"| {_pm(a['lag_per_lh_iter'])} {_bounds(a['lag_per_lh_iter'])} "
            f"| {a['lag_per_lh_iter']['verdict']} "
            f"| {_pm(a['lag'], '+.0f')}{_from_fit(a)} | {_pm(a['spike'])} | {_pm(a['end_slope'])} |")
    for a in summary["aggregates"]:
        if a.get("spike_per_layer"):
            parts = ", ".join(_pm(v) for v in a["spike_per_layer"])
            lines += ["", f"Spike per Lighthouse layer, {a['batch']}"
                      f"{'' if a['recipe'] == 'paper' else ' ' + a['recipe']} at {a['switch_frac']:.1%} "
                      f"({seeds_text(a['spike_per_layer'][0]['n'])}; only that layer dense at the switch, "
                      f"minus the stage-1 loss, in depth order): {parts}."]
    st = summary["step_ratio"]
    lines += ["", f"Time to dense quality (dense / two-stage wall-clock to the dense control's final loss), "
              f"with a Lighthouse step at {st['ratio']:.3f} of a dense one ({st['file']}: "
              f"{st['lighthouse_ms']:.0f} / {st['dense_ms']:.0f} ms per step, {st['card']}, "
              f"`{st['command']}`). At the seeds' mean lag per Lighthouse iteration, with that mean's "
              "two-sided 95% t interval carried through the formula (the ratio falls as the lag grows; "
              "'inf': the lag's lower end would make stage 2 free). A seed whose recovered run ends below "
              "all its control reached counts the iterations to where the recovered run itself reached "
              "the control's final loss (its 'crossing'), not the fitted curve's extrapolation; the paper "
              "reports "
              f"{PAPER_E2E[0]:.2f}-{PAPER_E2E[1]:.2f}x end to end.", ""]
    for batch, ttq in summary["time_to_quality"].items():
        lines += [f"| {batch}: switch | dense / two-stage | 95% interval | seeds | lag from |",
                  "|---|---|---|---|---|"]
        for t in ttq:
            lines.append(f"| {t['switch_frac']:.1%} | {t['value']:.2f}x | {_bounds(t, '.2f')} | {t['n']} "
                         f"| {t['lag_from']} |")
        if ttq and not math.isclose(ttq[0]["stage1_cost"], st["ratio"]):
            lines += ["", f"A stage-1 step of this recipe costs {ttq[0]['stage1_cost']:.3f} of a dense one "
                          f"({ttq[0]['stage1_cost_from']})."]
        best = summary.get("best_switch", {}).get(batch)
        lines += ["", _best_text(best)] if best else []
        vs = summary.get("against_paper", {}).get(batch)
        lines += ["", _against_text(vs)] if vs else []
        lines.append("")
    trend = summary.get("scale_trend")
    if trend:
        lin, pw = trend["linear"], trend["power_law"]
        per_length = zip(trend["run_lengths_tokens"], trend["seeds_per_length"], strict=True)
        lengths = ", ".join(f"{t / 1e6:.0f}M ({seeds_text(n)})" for t, n in per_length)
        if stats.side_of_zero(lin["slope_lower"], lin["slope_upper"]):
            way = f"the lag per iteration {'shrinks' if lin['slope'] < 0 else 'grows'} as runs lengthen"
        else:
            way = "the interval includes zero: these runs do not yet tell which way the lag moves"
        lines += [f"Trend with run length (default preset, switch 62.5%; {lengths} tokens): lag per "
                  f"Lighthouse iteration changes by {lin['slope']:+.3f} per e-fold of tokens, 95% "
                  f"[{lin['slope_lower']:+.3f}, {lin['slope_upper']:+.3f}]: {way}. "
                  f"At the paper's 50B tokens, {trend['extrapolation_factor']:.0f}x "
                  f"beyond the longest run and with {_model_factor(summary)}, a line in ln(tokens) gives "
                  f"{lin['at']:+.2f} [{lin['lower']:+.2f}, {lin['upper']:+.2f}] (95%; a line has no floor, "
                  "so this form must cross zero somewhere)"
                  + (f"; a power law (exponent {pw['exponent']:+.2f} ± {pw['exponent_se']:.2f}) gives "
                     f"{pw['at']:.3f} [{pw['lower']:.3f}, {pw['upper']:.3f}]" if pw else
                     "; no power law (a point is not positive)")
                  + ". Neither is a forecast of the lag at the paper's scale.", ""]
        q = (summary.get("scale_trend_quality") or {}).get("linear")
        if q and q != lin:
            lines += [f"The same line with time to quality's lag (a seed that ends below its control counts "
                      f"its crossing, not the fit's extrapolation): {q['slope']:+.3f} per e-fold, 95% "
                      f"[{q['slope_lower']:+.3f}, {q['slope_upper']:+.3f}].", ""]
    lines += _width_text(summary.get("width_effect") or [], summary.get("paper_point"))
    return "\n".join(lines)


def _model_factor(summary: dict) -> str:
    """How much larger the 530M model's transformer layers are than the default preset's."""
    big = summary.get("step_ratio", {}).get("transformer_parameters")
    defaults = (r.get("parameters") for r in summary.get("rows", []) if r["preset"] == "default")
    small = next((n for n in defaults if n), None)
    if not big or not small:
        return "a larger model"
    return f"a model whose transformer layers are {big / small:.0f}x larger"


def _width_text(width: list[dict], point: dict | None) -> list[str]:
    lines = []
    for w in width:
        d, per = w["difference"], w["per_efold"]
        verdict = " at this length." if w["lag_is"] != "cannot tell" else "; these seeds cannot tell."
        lines += [f"Width ({w['preset']} against default, {w['iters']:,} iterations, switch "
                  f"{w['switch_frac']:.1%}, {seeds_text(len(w['seeds']))} paired; "
                  f"{w['parameters'] / 1e6:.1f}M against {w['default_parameters'] / 1e6:.1f}M parameters in "
                  f"the transformer layers): time to quality's lag per Lighthouse iteration "
                  f"{_pm(w['wider'])} against {_pm(w['default'])}, difference {d['mean']:+.3f} {_bounds(d)} "
                  f"(95% t), {per['mean']:+.3f} {_bounds(per)} per e-fold of parameters: the lag is "
                  f"{w['lag_is']} in the wider model{verdict}", ""]
    if point:
        lines += [f"At the paper's point (50B tokens; the 530M model's {point['parameters'] / 1e6:.0f}M "
                  f"transformer parameters, {point['parameter_efolds']:.1f} e-folds above the default "
                  f"preset's): the run-length line gives {point['from_tokens']:+.2f} and the width effect "
                  f"adds {point['from_width']:+.2f}, together {point['at']:+.2f} "
                  f"[{point['lower']:+.2f}, {point['upper']:+.2f}] (the two 95% intervals added end to end). "
                  "Two straight lines carried far past their data: a statement of what these runs "
                  "imply if nothing bends, not a forecast.", ""]
    return lines


def plot(rows: list[dict], runs: list[dict], out: Path) -> Path | None:
    """Top: per batch, the held-out loss of each seed's dense control (solid) and the paper's
    recovered runs (dashed, one per switch), a colour per seed. Bottom: time to quality's lag per
    Lighthouse iteration, one dot per seed and a bar at the mean, per batch, recipe and switch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def by_length(batch: str) -> tuple[str, int]:  # "default-640" before "default-2560"
        preset, _, iters = batch.rpartition("-")
        return preset, int(iters)

    batches = sorted({r["batch"] for r in runs}, key=by_length)
    keys = sorted({(r["batch"], r["recipe"], r["switch_frac"]) for r in rows},
                  key=lambda k: (by_length(k[0]), k[1] != "paper", k[1], k[2]))
    fig = plt.figure(figsize=(5 * len(batches), 4 + 0.22 * len(keys)))
    grid = fig.add_gridspec(2, len(batches), height_ratios=[4, 0.5 + 0.22 * len(keys)])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, batch in enumerate(batches):
        ax = fig.add_subplot(grid[0, i])
        paper = (r for r in runs if r["batch"] == batch and r.get("recipe", "paper") == "paper")
        for r in (r for r in paper if r["arm"] in ("dense", "recovered")):
            xs, ys = zip(*r["eval"]["dense"], strict=True)
            ax.plot(xs, ys, "-" if r["arm"] == "dense" else "--", lw=1,
                    color=colours[(r["seed"] - 1) % len(colours)],
                    label=f"seed {r['seed']}" if r["arm"] == "dense" else None)
        ax.set(title=f"{batch}: dense (solid), recovered (dashed)", xlabel="iteration",
               ylabel="held-out loss (dense attention)")
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        ax.legend(fontsize=7, ncol=2)
    ax = fig.add_subplot(grid[1, :])
    for i, key in enumerate(keys):
        mine = (r for r in rows if (r["batch"], r["recipe"], r["switch_frac"]) == key)
        ys = [r["quality_lag_per_lh_iter"] for r in mine if r["quality_lag_per_lh_iter"] is not None]
        ax.scatter(ys, [i] * len(ys), s=14, color=colours[0])
        if ys:
            ax.plot([statistics.fmean(ys)] * 2, [i - 0.35, i + 0.35], color="k", lw=1.5)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([f"{b} {'' if rc == 'paper' else rc + ' '}{f:.1%}" for b, rc, f in keys], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set(xlabel="control iterations lost per Lighthouse iteration (time to quality's lag; bar: mean)")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _key(batch: str, recipe: str) -> str:
    """A (batch, recipe)'s name in the summary: the batch alone for the paper's recipe."""
    return batch if recipe == "paper" else f"{batch} {recipe}"


def analyze(args) -> int:
    runs = load_runs(Path(args.runs))
    rows = batch_rows(runs)
    if not rows:
        raise UsageError(f"--runs {args.runs}: no seed has its dense, Lighthouse and recovered runs yet")
    ratio = step_ratio(Path(args.e2e))
    r, steps = ratio["ratio"], ratio.get("recipe_steps")
    pairs = sorted({(r["batch"], r["recipe"]) for r in rows}, key=_paper_first)
    summary = {
        "rule": stats.RULE.format(conf=stats.CONFIDENCE, tol=stats.TOLERANCE),
        "runs": len(runs), "cards": sorted({r["device"] for r in runs}),
        "commands": sorted({" ".join(r["command"][-3:]) for r in runs})[:3],
        "step_ratio": ratio, "rows": rows, "aggregates": aggregate(rows),
        "time_to_quality": {_key(b, rc): time_to_quality(rows, b, r, rc, steps) for b, rc in pairs},
        "best_switch": {_key(b, rc): best_switch(rows, b, r, rc, steps) for b, rc in pairs},
        "against_paper": {_key(b, rc): against_paper(rows, b, r, rc, steps)
                          for b, rc in pairs if rc != "paper"},
        "scale_trend": scale_trend(rows),
        "scale_trend_quality": scale_trend(rows, QUALITY_LAG),
        "width_effect": width_effect(rows),
    }
    summary["paper_point"] = paper_point(summary["scale_trend_quality"], summary["width_effect"],
                                         ratio.get("transformer_parameters"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary) + "\n")
    png = plot(rows, runs, out)
    print(markdown(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}" + (f", {png}" if png else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(HERE / "runs"), help="folder of run JSONs (searched recursively)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--e2e", default=str(E2E_DEFAULT), help="bench e2e JSON giving the step-time ratio")
    p.set_defaults(func=usage_errors_as_exit_2(analyze))


if __name__ == "__main__":
    sys.exit(main(add_parser, "benchmarks.quality.analyze"))
