"""The time-to-dense-quality study (benchmarks/quality/): its arithmetic against hand-computed
cases and synthetic curves with a known answer, the read-once guard, the trainer features it relies
on (a held-out set independent of the seed, the paired switch probe), and the driver end to end at
the tiny size on CPU with the analysis of its runs recomputed from the trainer's own records."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from benchmarks._common import UsageError
from benchmarks.quality import stats
from benchmarks.quality.analyze import QUALITY_LAG
from benchmarks.quality.corpus import check_read_once, samples_per_epoch

REPO = Path(__file__).resolve().parent.parent

# One-sided 95% Student-t quantiles from a printed table (df = n - 1): 6.314, 2.920, 2.015.
T95 = {2: 6.3138, 3: 2.9200, 6: 2.0150}


@pytest.mark.parametrize("n", sorted(T95))
def test_t_quantiles_match_the_table(n):
    assert stats.t_quantile(n) == pytest.approx(T95[n], abs=1e-3)


@pytest.mark.parametrize("values, word", [
    ([0.010, 0.012], "matches"),              # m 0.011, SE 0.001: upper 0.0173 <= 0.02
    ([0.010, 0.020], "cannot tell"),          # m 0.015, SE 0.005: upper 0.047, lower -0.017
    ([-0.03, -0.031], "beats"),               # upper -0.0245 < 0
    ([0.20, 0.22, 0.24], "worse"),            # m 0.22, SE 0.01155: lower 0.186 > 0.02
    ([0.00, 0.01, 0.02, 0.0, 0.01, 0.02], "matches"),  # m 0.01, SE 0.00365: upper 0.0174
    ([0.00, 0.03, 0.06, 0.0, 0.03, 0.06], "cannot tell"),
    ([0.5], "cannot tell"),                   # one seed decides nothing
])
def test_verdict_by_the_t_rule(values, word):
    v = stats.verdict(values)
    assert v["verdict"] == word
    if len(values) > 1:  # the bounds it reports, computed by hand
        n, m = len(values), float(np.mean(values))
        se = float(np.std(values, ddof=1)) / math.sqrt(n)
        assert v["upper"] == pytest.approx(m + T95.get(n, stats.t_quantile(n)) * se, rel=1e-3)


def test_the_rule_gets_harder_to_pass_as_noise_grows():
    """The old rule (max(0.02, 2 SE)) let a noisier gap 'match'; this one does the opposite."""
    quiet, noisy = [0.01, 0.011, 0.012], [-0.05, 0.01, 0.07]
    assert stats.verdict(quiet)["verdict"] == "matches"
    assert stats.verdict(noisy)["verdict"] == "cannot tell"


def test_lag_of_a_shifted_power_law():
    """The 'recovered' curve is the control's shifted by 300 iterations: both estimates find it."""
    its = list(range(50, 2561, 64))
    control = [1.0 + 4.0 * i ** -0.4 for i in its]
    at, true_lag = 2496, 300.0
    target = 1.0 + 4.0 * (at - true_lag) ** -0.4
    lag = stats.lag(its, control, at, target, fit_from=640)
    assert lag["interp"] == pytest.approx(true_lag, rel=0.02)  # linear between points 64 apart
    assert lag["fit"] == pytest.approx(true_lag, rel=1e-3)


def test_lag_uses_the_running_minimum_and_none_when_never_reached():
    its, losses = [10, 20, 30, 40], [3.0, 2.0, 2.5, 1.0]
    # 2.0 is first reached at 20 (the bump at 30 does not count).
    assert stats.first_reached(its, losses, 2.0) == 20
    assert stats.first_reached(its, losses, 1.5) == pytest.approx(30 + 10 * (2.0 - 1.5) / (2.0 - 1.0))
    assert stats.first_reached(its, losses, 0.5) is None
    assert stats.lag(its, losses, 40, 0.5, fit_from=10)["interp"] is None


def test_end_slope_of_a_log_curve():
    its = np.arange(100, 2001, 50)
    assert stats.end_slope(its, 3.0 - 0.2 * np.log(its)) == pytest.approx(-0.2)


def test_time_to_quality_hand_computed():
    # f 0.625, a Lighthouse step 0.324 of a dense one, 0.27 control iterations lost per Lighthouse
    # iteration: 1 / (1 - 0.625 * (1 - 0.324 - 0.27)) = 1 / 0.74625 = 1.34003.
    assert stats.time_to_quality(0.625, 0.27, 0.324) == pytest.approx(1 / 0.74625)
    # No lag, free Lighthouse steps, switch at 50%: half the time.
    assert stats.time_to_quality(0.5, 0.0, 0.0) == pytest.approx(2.0)
    # A lag that eats all the saving: no gain.
    assert stats.time_to_quality(0.75, 0.676, 0.324) == pytest.approx(1.0)
    assert stats.time_to_quality(0.75, -0.71, 0.359) == math.inf  # 1 - 0.75 (1 - 0.359 + 0.71) < 0
    with pytest.raises(ValueError):
        stats.time_to_quality(1.0, 0.2, 0.3)


def test_seeds_for_power_matches_the_published_table_and_a_simulation():
    """Cohen's (1988) table for the paired / one-sample t test, two-sided 5%, 80% power: effect size
    d = mean / sd of 0.5 needs 34 pairs, 0.8 needs 15, 1.0 needs 10 (G*Power gives the same). Only d
    matters: the same at another scale and sign. The power itself against a simulation: the share of
    20,000 normal samples of 6 whose t interval (stats.interval, as the analysis uses it) excludes 0."""
    for d, n in ((0.5, 34), (0.8, 15), (1.0, 10)):
        assert stats.seeds_for_power(d, 1.0) == n
        assert stats.seeds_for_power(-0.05 * d, 0.05) == n
        assert stats.decision_power(d, 1.0, n) >= 0.8 > stats.decision_power(d, 1.0, n - 1)
    assert stats.seeds_for_power(0.5, 1.0, most=33) is None
    assert stats.seeds_for_power(0.0, 0.1) is None and stats.seeds_for_power(float("nan"), 0.1) is None
    assert stats.seeds_for_power(0.1, 0.0) == 2  # no spread: the smallest sample the interval needs
    rng = np.random.default_rng(0)
    samples = rng.normal(0.07, 0.1, size=(20000, 6))
    decided = [stats.side_of_zero(iv["lower"], iv["upper"]) is not None
               for iv in map(stats.interval, samples.tolist())]
    assert abs(np.mean(decided) - stats.decision_power(0.07, 0.1, 6)) < 0.015


def test_side_of_zero_reads_an_interval_the_way_every_paired_verdict_does():
    assert stats.side_of_zero(0.01, 0.2) == "above" and stats.side_of_zero(-0.3, -0.001) == "below"
    assert stats.side_of_zero(-0.1, 0.1) is None and stats.side_of_zero(0.0, 0.1) is None
    assert stats.side_of_zero(None, None) is None  # one seed: no interval


def test_time_to_quality_interval_carries_the_lags_interval_through_the_formula():
    """The ends come from the mean lag's two-sided t interval (scipy's), mapped through the formula:
    the ratio falls as the lag grows, so the lag's upper end gives the lower end. Where the lag's
    lower end would make stage 2 free, the upper end is unbounded, never negative."""
    f, r = 0.625, 0.324
    lags = [0.20, 0.36, 0.51]
    got = stats.time_to_quality_interval(f, lags, r)
    lo, hi = scipy.stats.t.interval(0.95, len(lags) - 1, loc=np.mean(lags), scale=scipy.stats.sem(lags))

    def formula(lam):
        return 1 / (1 - f * (1 - r - lam))

    assert got["value"] == pytest.approx(formula(np.mean(lags)))
    assert got["lower"] == pytest.approx(formula(hi)) and got["upper"] == pytest.approx(formula(lo))
    assert got["lower"] < got["value"] < got["upper"] and got["n"] == 3
    assert got["values"] == pytest.approx([formula(x) for x in lags])
    # Two seeds far apart: the t interval (1 degree of freedom) reaches a lag below -(1 - f (1 - r)) / f.
    wide = stats.time_to_quality_interval(f, [0.06, 0.31], r)
    assert wide["upper"] == math.inf and 0 < wide["lower"] < wide["value"]
    # A seed whose recovered model ends below the control (a negative lag from the fit) past the pole:
    # its own ratio is unbounded, while the mean lag still gives a finite one.
    past = stats.time_to_quality_interval(0.75, [0.28, 0.23, 0.14, -0.71], r)
    assert past["values"][3] == math.inf and math.isfinite(past["value"]) and past["upper"] == math.inf
    assert past["values"][:3] == pytest.approx([1 / (1 - 0.75 * (1 - r - x)) for x in (0.28, 0.23, 0.14)])
    one = stats.time_to_quality_interval(f, [0.2], r)
    assert one["lower"] is None and one["upper"] is None and one["value"] == pytest.approx(formula(0.2))
    with pytest.raises(ValueError, match="at least one seed"):
        stats.time_to_quality_interval(f, [], r)
    with pytest.raises(ValueError, match="switch fraction"):  # a bad input is not an unbounded end
        stats.time_to_quality_interval(1.0, lags, r)


def _trend_rows(value, seeds=(1, 2)):
    return [{"preset": "default", "recipe": "paper", "switch_frac": 0.625, "tokens": tokens,
             "lag_per_lh_iter": value(tokens, seed)} for tokens in (21e6, 42e6, 84e6) for seed in seeds]


def test_scale_trend_recovers_a_known_power_law_and_a_known_line():
    from benchmarks.quality.analyze import markdown, scale_trend

    # A power law with a seed factor the same at every length: the log-log slope is exact.
    trend = scale_trend(_trend_rows(lambda t, seed: 50.0 * t ** -0.3 * (1.05 if seed == 1 else 0.95)))
    assert trend["points"] == 6 and trend["seeds_per_length"] == [2, 2, 2]
    assert trend["power_law"]["exponent"] == pytest.approx(-0.3, abs=1e-9)
    assert trend["power_law"]["at"] == pytest.approx(50.0 * 50e9 ** -0.3 * math.sqrt(1.05 * 0.95))
    assert trend["power_law"]["lower"] < trend["power_law"]["at"] < trend["power_law"]["upper"]
    # A line in ln(tokens), 0.4 - 0.05 ln(t / 21M): slope and projection by hand.
    trend = scale_trend(_trend_rows(lambda t, seed: 0.4 - 0.05 * math.log(t / 21e6) + 0.01 * (seed - 1.5)))
    lin = trend["linear"]
    assert lin["slope"] == pytest.approx(-0.05, abs=1e-9)
    assert lin["at"] == pytest.approx(0.4 - 0.05 * math.log(50e9 / 21e6), abs=1e-9)
    assert lin["slope_upper"] < 0  # the offsets are small: the direction is decided
    assert trend["extrapolation_factor"] == pytest.approx(50e9 / 84e6)
    assert "shrinks as runs lengthen" in markdown(_summary_with(trend))
    # The same fit on time to quality's lag reads that column (here the lag less 0.1 everywhere: the
    # slope stays, the line moves down), and the summary prints it beside the lag's.
    rows = [{**r, QUALITY_LAG: r["lag_per_lh_iter"] - 0.1}
            for r in _trend_rows(lambda t, seed: 0.4 - 0.05 * math.log(t / 21e6) + 0.01 * (seed - 1.5))]
    quality = scale_trend(rows, QUALITY_LAG)["linear"]
    assert quality["slope"] == pytest.approx(-0.05, abs=1e-9)
    assert quality["at"] == pytest.approx(lin["at"] - 0.1)
    text = markdown({**_summary_with(trend), "scale_trend_quality": {"linear": quality}})
    assert f"time to quality's lag (a seed that ends below its control counts its crossing, not the fit's " \
           f"extrapolation): {quality['slope']:+.3f} per e-fold" in text
    # Noise larger than the trend: the direction is not decided, and a negative point drops the power law.
    noisy = _trend_rows(lambda t, seed: 0.1)
    for r, e in zip(noisy, (0.3, -0.3, -0.2, 0.2, 0.3, -0.3), strict=True):
        r["lag_per_lh_iter"] += e
    trend = scale_trend(noisy)
    assert trend["linear"]["slope_lower"] < 0 < trend["linear"]["slope_upper"]
    ref = scipy.stats.linregress([math.log(r["tokens"]) for r in noisy],
                                 [r["lag_per_lh_iter"] for r in noisy])
    half = scipy.stats.t.ppf(0.975, len(noisy) - 2) * ref.stderr
    assert trend["linear"]["slope_upper"] == pytest.approx(ref.slope + half)
    assert trend["power_law"] is None
    text = markdown(_summary_with(trend))
    assert "do not yet tell which way" in text and "no power law" in text


def _summary_with(trend):
    return {"rule": "r", "aggregates": [], "time_to_quality": {}, "scale_trend": trend,
            "step_ratio": {"ratio": 0.3, "file": "f", "lighthouse_ms": 1, "dense_ms": 3, "card": "c",
                           "command": "x"}}


def test_read_once_guard():
    # 16,384-token sequences: 1,000,001 tokens hold 61 of them.
    assert samples_per_epoch(1_000_001, 16384) == 61
    assert check_read_once(1_000_001, 16384, 61, allow_repeat=False) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="read tokens twice.*--allow-repeat"):
        check_read_once(1_000_001, 16384, 62, allow_repeat=False)
    assert check_read_once(1_000_001, 16384, 122, allow_repeat=True) == pytest.approx(2.0)


def test_recipe_jobs_and_their_settings(tmp_path):
    """The paper's recipe and dense-every chain one stage-1 run through the switches; a window
    recipe runs stage 1 from scratch for each switch, its window a share of that stage 1."""
    from benchmarks.quality.run import PRESETS, check_recipe, parse_recipe, plan_jobs

    common = {"eval_interval": 8}
    jobs = {j.name: j for j in plan_jobs(PRESETS["tiny"], 160, [1], [0.5, 0.75], common, tmp_path, "b",
                                         ("paper", "dense-every-4", "progressive-10", "topk-2"))}
    assert sorted(jobs) == sorted(["b/seed1/dense"] + [f"b/seed1/{arm}{tag}_{s}" for tag in
                                  ("", "-dense-every-4", "-progressive-10", "-topk-2")
                                  for arm in ("lighthouse", "recovered") for s in (80, 120)])
    chained = jobs["b/seed1/lighthouse-dense-every-4_120"]
    assert chained.deps == ["b/seed1/lighthouse-dense-every-4_80"] and chained.iters == 40
    assert chained.settings["lighthouse_dense_every"] == 4 and chained.settings["exit_interval"] == 120
    wider = jobs["b/seed1/lighthouse-topk-2_120"]  # all of stage 1 at twice the preset's k (16): chained
    assert wider.deps == ["b/seed1/lighthouse-topk-2_80"] and wider.settings["lighthouse_topk"] == 32
    assert jobs["b/seed1/recovered-topk-2_80"].settings["lighthouse_topk"] == 32
    assert "lighthouse_until_iter" not in wider.settings
    window = jobs["b/seed1/lighthouse-progressive-10_120"]
    assert window.deps == [] and window.iters == 120 and "load" not in window.settings
    assert window.settings["lighthouse_until_iter"] == 120
    assert window.settings["lighthouse_progressive_iters"] == 12
    rec = jobs["b/seed1/recovered-progressive-10_80"]
    assert rec.settings["lighthouse_progressive_iters"] == 8 and rec.settings["lighthouse_until_iter"] == 80
    assert rec.settings["load"] == jobs["b/seed1/lighthouse-progressive-10_80"].settings["save"]
    recipes = {j.recipe for j in jobs.values() if j.arm != "dense"}
    assert recipes == {"paper", "dense-every-4", "progressive-10", "topk-2"}
    for bad in ("dense-every-1", "progressive-0", "grow-150", "sometimes", "topk-1", "topk-3", "grow@75"):
        with pytest.raises(UsageError, match="--recipes.*topk-M"):
            parse_recipe(bad)
    # A recipe at its own switches beside the others' (one dense control for all).
    own = {j.name: j for j in plan_jobs(PRESETS["tiny"], 160, [1], [0.5, 0.75], common, tmp_path, "b",
                                        ("paper", "grow-10@75", "topk-2@50/75"))}
    assert sorted(own) == sorted(["b/seed1/dense"] + [
        f"b/seed1/{arm}{tag}_{s}" for tag, points in (("", (80, 120)), ("-grow-10", (120,)),
                                                      ("-topk-2", (80, 120)))
        for arm in ("lighthouse", "recovered") for s in points])
    assert own["b/seed1/recovered-grow-10_120"].recipe == "grow-10"
    assert own["b/seed1/lighthouse-grow-10_120"].settings["lighthouse_grow_topk_iters"] == 12
    # mean-merge: the hard switch with every stage-1 token averaging its levels' outputs; chained.
    merged = {j.name: j for j in plan_jobs(PRESETS["tiny"], 160, [1], [0.5, 0.75], common, tmp_path, "b",
                                           (parse_recipe("mean-merge"),))}
    later = merged["b/seed1/lighthouse-mean-merge_120"]
    assert later.deps == ["b/seed1/lighthouse-mean-merge_80"] and later.iters == 40
    assert later.settings["lighthouse_level_merge"] == "mean"
    assert merged["b/seed1/recovered-mean-merge_80"].settings["lighthouse_level_merge"] == "mean"
    assert "lighthouse_level_merge" not in jobs["b/seed1/lighthouse_80"].settings
    assert parse_recipe("grow-10@62.5/75") == "grow-10@62.5/75"
    for bad in ("grow-10@", "grow-10@0", "grow-10@75/100", "grow-10@late"):
        with pytest.raises(UsageError, match=f"--recipes '{bad}': .*switch|--recipes '{bad}': percentages"):
            parse_recipe(bad)
    # A k the preset's sequence cannot hold is refused at start-up, naming the recipe.
    check_recipe("topk-4", PRESETS["default"])  # k = 1024 at 16K tokens
    with pytest.raises(UsageError, match="--recipes topk-64: k = 1024 does not fit"):
        check_recipe("topk-64", PRESETS["tiny"])  # 256 tokens


def test_stage1_cost_of_each_recipe():
    from benchmarks.quality.analyze import stage1_cost, time_to_quality

    assert stage1_cost("paper", 0.3)[0] == 0.3
    cost, how = stage1_cost("mean-merge", 0.3)
    assert cost == 0.3 and "not timed on its own" in how
    assert stage1_cost("mean-merge", 0.3, {"mean_merge_cost_vs_dense": 0.31}) == (
        0.31, "measured step with the levels averaged")
    assert stage1_cost("dense-every-4", 0.3)[0] == pytest.approx(0.3 * 3 / 4 + 1 / 4)  # 0.475
    # 10% of stage 1 in the window, 26 layers: on average 27/52 of them dense there.
    assert stage1_cost("progressive-10", 0.3)[0] == pytest.approx(0.3 + 0.7 * 0.1 * 27 / 52)
    cost, how = stage1_cost("grow-10", 0.3)
    assert cost == 0.3 and "not measured" in how
    # Measured by `bench e2e --recipe-steps`: the growth window's iterations split evenly over k 3072
    # and 6144; a progressive window's over 1..26 layers dense, through the measured mixed point.
    cost, how = stage1_cost("grow-10", 0.3, {"grow_cost_vs_dense": {"3072": 0.4, "6144": 0.6}})
    assert cost == pytest.approx(0.3 + 0.1 * (0.5 - 0.3)) and "3072, 6144" in how
    additive = {"mixed_cost_vs_dense": 0.3 + 0.7 * 13 / 26, "mixed_lighthouse_layers_dense": [13, 26]}
    modelled = stage1_cost("progressive-10", 0.3)[0]
    assert stage1_cost("progressive-10", 0.3, additive)[0] == pytest.approx(modelled)
    dearer = {"mixed_cost_vs_dense": 0.8, "mixed_lighthouse_layers_dense": [2, 4]}
    by_hand = (0.55 + 0.8 + 0.9 + 1.0) / 4  # d = 1..4 dense: (0, .3)-(2, .8) then (2, .8)-(4, 1)
    assert stage1_cost("progressive-20", 0.3, dearer)[0] == pytest.approx(0.3 + 0.2 * (by_hand - 0.3))
    assert stage1_cost("dense-every-4", 0.3, dearer)[0] == pytest.approx(0.475)  # no window
    # topk-M: every stage-1 step at M times k, the growth ladder's rung for M (2 k: 3072, 4 k: 6144).
    ladder = {"grow_cost_vs_dense": {"6144": 0.6, "3072": 0.4}}
    assert stage1_cost("topk-2", 0.3, ladder) == (0.4, "measured step at k 3072")
    assert stage1_cost("topk-4", 0.3, ladder) == (0.6, "measured step at k 6144")
    cost, how = stage1_cost("topk-8", 0.3, ladder)
    assert cost == 0.3 and how.startswith("not measured")
    # The time-to-quality table takes the same cost from the e2e run's steps.
    rows = [{"batch": "b", "recipe": "grow-10", "seed": s, "switch_frac": 0.625, **_quality_lag(0.1)}
            for s in (1, 2)]
    steps = {"grow_cost_vs_dense": {"3072": 0.4, "6144": 0.6}}
    (ttq,) = [t for t in time_to_quality(rows, "b", 0.3, "grow-10", steps) if t["switch_frac"] == 0.625]
    assert ttq["stage1_cost"] == pytest.approx(0.32) and ttq["value"] == pytest.approx(1 / (1 - 0.625 * 0.58))


# ----------------------------------------------------------------- trainer features, real runs

pytest.importorskip("megatron.core")

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "256",
        "--micro-batch-size", "2", "--lr", "3e-3", "--device", "cpu"]
LIGHTHOUSE = ["--attention-impl", "lighthouse", "--lighthouse-levels", "2", "--lighthouse-topk", "16",
              "--lighthouse-tile-topk", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, pytorch_twins):
    from lighthouse_megatron.data import default_inputs, prepare_data

    d = tmp_path_factory.mktemp("qdata")
    files = default_inputs()
    prepare_data(files[:40], d / "held", progress=False)
    prepare_data(files[40:240], d / "train", progress=False)
    return d


def _train(argv):
    from lighthouse_megatron import training

    return training.run(training.parse_args([*TINY, *argv]))


def test_valid_data_path_evaluates_the_same_sequences_for_every_seed(data):
    from lighthouse_megatron import training
    from lighthouse_megatron.training.trainer import build_datasets

    def held(seed, split_valid):
        extra = ["--valid-data-path", str(data / "held")] if split_valid else ["--split", "90,10,0"]
        args = training.parse_args([*TINY, "--data-path", str(data / "train"), *extra, "--seed", str(seed),
                                    "--eval-iters", "3", "--train-iters", "4", "--eval-interval", "2"])
        _, valid = build_datasets(args)
        return [valid[i]["tokens"].tolist() for i in range(6)]

    assert held(1, True) == held(2, True)
    assert held(1, False) != held(2, False)  # the --split share is shuffled by the seed (below)


def test_switch_probe_is_paired_and_changes_nothing(data, tmp_path):
    """The probe's dense loss is the training loss of that iteration (same batch, same weights);
    its Lighthouse loss is that batch under the stage-1 attention; and the run continues exactly as
    a dense relaunch from the same checkpoint, which has no probe."""
    common = ["--data-path", str(data / "train"), "--valid-data-path", str(data / "held"),
              "--train-iters", "8", "--eval-iters", "1", "--eval-interval", "4", "--seed", "5"]
    _train([*common, *LIGHTHOUSE, "--save", str(tmp_path / "s1"), "--exit-interval", "4"])
    rec = _train([*common, *LIGHTHOUSE, "--lighthouse-until-iter", "4", "--load", str(tmp_path / "s1")])
    dense = _train([*common, "--attention-impl", "dense", "--load", str(tmp_path / "s1")])
    (probe,) = rec.switches
    assert probe["iteration"] == 5 and rec.train[0]["iteration"] == 5
    assert probe["loss_dense"] == pytest.approx(rec.train[0]["loss"], abs=1e-6)
    assert abs(probe["loss_lighthouse"] - probe["loss_dense"]) > 1e-4  # two attentions, two losses
    # Both layers are Lighthouse layers: one loss per layer with only that one dense, neither equal to
    # the all-Lighthouse or the all-dense loss (tests/test_megatron_model.py checks the forcing).
    one = probe["loss_one_dense"]
    assert len(one) == 2 and len({*one, probe["loss_lighthouse"], probe["loss_dense"]}) == 4
    assert [r["loss"] for r in rec.train] == [r["loss"] for r in dense.train]
    assert dense.switches == []
    # The Lighthouse loss of that batch, computed independently: the stage-1 run continued one
    # more Lighthouse iteration from the same checkpoint logs it as its training loss.
    more = _train([*common, *LIGHTHOUSE, "--load", str(tmp_path / "s1"), "--exit-interval", "5"])
    assert probe["loss_lighthouse"] == pytest.approx(more.train[0]["loss"], abs=1e-6)


# ------------------------------------------------------------------------- the driver


def _study(work: Path, iters: int, seeds: str, data_dir: Path, *extra: str, rc: int = 0) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "benchmarks.quality.run", "start", "--work", str(work), "--preset", "tiny",
            "--iters", str(iters), "--seeds", seeds, "--switches", "62.5", "--jobs", "2",
            "--data", str(data_dir), "--corpus-mb", "2", "--foreground", *extra]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    log = (work / "serve.log").read_text() if (work / "serve.log").is_file() else ""
    assert proc.returncode == rc, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-3000:]
    return log


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """One lease's worth: the tiny preset at 16 iterations, seed 1, a switch at 62.5% (iteration 10)."""
    tmp = tmp_path_factory.mktemp("study")
    _study(tmp / "a", 16, "1", tmp / "data")
    return tmp, tmp / "a" / "runs"


def test_driver_writes_one_json_per_run_from_the_trainers_records(one_batch):
    tmp, runs = one_batch
    names = sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*.json"))
    assert names == [f"tiny-16/seed1_{a}.json" for a in ("dense", "lighthouse_10", "recovered_10")]
    run = json.loads((runs / "tiny-16" / "seed1_recovered_10.json").read_text())
    job = tmp / "a" / "jobs" / "tiny-16" / "seed1" / "recovered_10"
    metrics = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    assert run["train"] == [[r["iteration"], r["loss"]] for r in metrics if r["kind"] == "train"]
    assert run["switch_probe"] == next(r for r in metrics if r["kind"] == "switch")
    assert run["settings"]["lighthouse_until_iter"] == 10 and run["settings"]["seed"] == 1
    assert run["allow_repeat"] is False and 0 < run["epochs"] < 1 and run["device"] == "cpu"
    assert run["command"][-3:] == ["--config", str(job / "config.yaml"), "--force"]


def test_a_second_start_runs_only_what_is_missing(one_batch, tmp_path):
    tmp, _ = one_batch
    work = tmp_path / "again"
    shutil.copytree(tmp / "a", work, ignore=shutil.ignore_patterns("src"))
    (work / "runs" / "tiny-16" / "seed1_recovered_10.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (work / "runs" / "tiny-16").iterdir()}
    _study(work, 16, "1", tmp / "data")
    after = {p.name: p.stat().st_mtime_ns for p in (work / "runs" / "tiny-16").iterdir()}
    assert sorted(after) == sorted([*before, "seed1_recovered_10.json"])
    assert all(after[k] == v for k, v in before.items())
    assert len((work / "plans.jsonl").read_text().splitlines()) == 2  # both starts' plans are kept


def test_reuse_takes_finished_jobs_from_a_runs_folder_of_the_same_corpus(one_batch, tmp_path):
    """--reuse: a planned job whose JSON the folder holds is copied in, not run (a recipe variant pairs
    with the committed control); the rest run, and so does a reused job whose checkpoint a job that
    runs resumes from (it stayed on another machine). A JSON from another corpus stops the scheduler
    before anything is copied or run."""
    tmp, runs = one_batch
    committed = tmp_path / "committed"
    shutil.copytree(runs, committed)
    (committed / "tiny-16" / "seed1_recovered_10.json").unlink()
    work = tmp_path / "work"
    log = _study(work, 16, "1", tmp / "data", "--reuse", str(committed))
    got = work / "runs" / "tiny-16"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in (runs / "tiny-16").iterdir())
    same = {n: (got / n).read_bytes() == (committed / "tiny-16" / n).read_bytes()
            for n in ("seed1_dense.json", "seed1_lighthouse_10.json")}
    assert same == {"seed1_dense.json": True, "seed1_lighthouse_10.json": False}  # run again: its checkpoint
    assert "2 jobs to run" in log and "taken from --reuse" in (work / "status.json").read_text()
    (plan,) = [json.loads(x) for x in (work / "plans.jsonl").read_text().splitlines()]
    assert plan["command"].endswith(f"--reuse {committed}") and plan["batch"] == "tiny-16"

    foreign = json.loads((committed / "tiny-16" / "seed1_dense.json").read_text())
    (committed / "tiny-16" / "seed1_dense.json").write_text(json.dumps({**foreign, "corpus": "another"}))
    other = tmp_path / "other"
    log = _study(other, 16, "1", tmp / "data", "--reuse", str(committed), rc=2)
    assert "seed1_dense.json: made on corpus another" in log
    assert not (other / "runs").exists() and not (other / "jobs").exists()
    bad = subprocess.run([sys.executable, "-m", "benchmarks.quality.run", "start", "--work", str(other),
                          "--reuse", str(tmp_path / "missing")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "--reuse" in bad.stderr and "not a folder" in bad.stderr
    fresh = tmp_path / "fresh"
    twice = subprocess.run([sys.executable, "-m", "benchmarks.quality.run", "start", "--work", str(fresh),
                            "--recipes", "paper,grow-10,grow-10@75"],
                           cwd=REPO, capture_output=True, text=True)
    assert twice.returncode == 2
    assert "--recipes 'paper,grow-10,grow-10@75': a recipe is named twice" in twice.stderr
    assert not fresh.exists()


def _analyze(runs: Path, out: Path) -> dict:
    from benchmarks._common import main
    from benchmarks.quality import analyze

    argv = ["--runs", str(runs), "--out", str(out)]
    assert main(analyze.add_parser, "benchmarks.quality.analyze", argv) == 0
    return json.loads((out / "summary.json").read_text())


def test_analysis_recomputed_from_the_run_records(one_batch, tmp_path):
    _, runs = one_batch
    summary = _analyze(runs, tmp_path)
    (row,) = summary["rows"]
    load = lambda name: json.loads((runs / "tiny-16" / name).read_text())  # noqa: E731
    dense, lh, rec = (load(f"seed1_{a}.json") for a in ("dense", "lighthouse_10", "recovered_10"))
    # The paper's metric over the last 5% of 16 iterations: iteration 16 alone.
    assert row["last_iters"] == [16, 16]
    assert row["train_gap"] == pytest.approx(rec["train"][-1][1] - dense["train"][-1][1])
    last3 = lambda run: np.mean([v for _, v in run["eval"]["dense"][-3:]])  # noqa: E731
    assert row["heldout_gap"] == pytest.approx(last3(rec) - last3(dense))
    probe = rec["switch_probe"]
    assert row["spike"] == pytest.approx(probe["loss_dense"] - probe["loss_lighthouse"])
    at_switch = dense["eval"]["dense"][9][1]  # iteration 10
    assert row["stage1_gap_lighthouse"] == pytest.approx(lh["eval"]["lighthouse"][-1][1] - at_switch)
    assert summary["aggregates"][0]["train_gap"]["verdict"] == "cannot tell"  # one seed decides nothing
    assert "generated" in (tmp_path / "summary.md").read_text()


def _write_runs(root: Path, iters: int, switch: int, lags: dict[int, float], preset: str = "synthetic",
                model: dict | None = None) -> None:
    """Run JSONs as the driver writes them, with curves of a known lag: the control's loss is
    1 + 4 i^-0.4 (seed s shifted by 0.01 s), the recovered run's is the control's lag * switch
    iterations earlier. `model`: the shape settings a preset adds (none: no parameter count)."""
    batch, every = f"{preset}-{iters}", iters // 40
    its = list(range(every, iters + 1, every))
    settings = {"eval_interval": every, "global_batch_size": 2, "seq_length": 256, **(model or {})}
    def control(i, seed):
        return 1 + 0.01 * seed + 4 * max(i, 1) ** -0.4

    for seed, lam in lags.items():
        loss = functools.partial(control, seed=seed)
        late = lambda i, lam=lam, loss=loss: loss(i - lam * switch)  # noqa: E731
        common = {"study": "quality", "batch": batch, "preset": preset, "iters": iters, "seed": seed,
                  "settings": settings, "corpus": "c0", "device": "card", "command": ["x"], "recipe": "paper"}
        runs = {
            "dense": {"arm": "dense", "switch": None, "train": [[i, loss(i)] for i in range(1, iters + 1)],
                      "eval": {"dense": [[i, loss(i)] for i in its]}},
            f"lighthouse_{switch}": {"arm": "lighthouse", "switch": switch,
                                     "train": [[i, loss(i) - 0.1] for i in range(1, switch + 1)],
                                     "eval": {"lighthouse": [[i, loss(i) - 0.1] for i in its if i <= switch],
                                              "dense": [[i, loss(i) + 1] for i in its if i <= switch]}},
            f"recovered_{switch}": {"arm": "recovered", "switch": switch,
                                    "train": [[i, late(i)] for i in range(switch + 1, iters + 1)],
                                    "eval": {"dense": [[i, late(i)] for i in its if i > switch]},
                                    "switch_probe": {"loss_dense": 3.0, "loss_lighthouse": 2.0,
                                                     "loss_one_dense": [2.5 + 0.1 * seed, 2.2]}},
        }
        for arm, run in runs.items():
            path = root / batch / f"seed{seed}_{arm}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**common, **run}))


def test_runs_of_two_batches_aggregate_apart_and_recover_the_known_lag(tmp_path):
    """Two leases' batches (different run lengths) in one folder: each gets its own rows, verdicts
    and time to quality, and the lag per Lighthouse iteration built into the curves comes back."""
    lags = {1: 0.20, 2: 0.25, 3: 0.30}
    _write_runs(tmp_path / "runs", 2560, 1600, lags)
    _write_runs(tmp_path / "runs", 1280, 800, {1: 0.10, 2: 0.12})
    summary = _analyze(tmp_path / "runs", tmp_path / "out")
    rows = {(r["batch"], r["seed"]): r for r in summary["rows"]}
    assert sorted(rows) == [("synthetic-1280", 1), ("synthetic-1280", 2), ("synthetic-2560", 1),
                            ("synthetic-2560", 2), ("synthetic-2560", 3)]
    for seed, lam in lags.items():
        assert rows[("synthetic-2560", seed)]["lag_per_lh_iter"] == pytest.approx(lam, abs=0.01)
        # The mean of the last 3 evaluations against their mean iteration: within an iteration or two.
        assert rows[("synthetic-2560", seed)]["lag_fit"] == pytest.approx(lam * 1600, abs=2)
    agg = {a["batch"]: a for a in summary["aggregates"]}
    per_seed = [rows[("synthetic-2560", s)]["lag_per_lh_iter"] for s in lags]
    verdict = agg["synthetic-2560"]["lag_per_lh_iter"]["verdict"]
    assert verdict == stats.verdict(per_seed)["verdict"] == "worse"
    assert agg["synthetic-1280"]["lag_per_lh_iter"]["n"] == 2
    ratio = summary["step_ratio"]["ratio"]
    ttq = {t["switch_frac"]: t for t in summary["time_to_quality"]["synthetic-2560"]}
    assert ttq[0.625]["value"] == pytest.approx(stats.time_to_quality(0.625, np.mean(per_seed), ratio))
    assert ttq[0.75]["lag_from"].startswith("assumed")
    assert rows[("synthetic-2560", 1)]["spike"] == 1.0
    # The spike's parts, layer by layer (only that layer dense), over the seeds: 0.5 + 0.1 s and 0.2.
    first, second = agg["synthetic-2560"]["spike_per_layer"]
    assert first["mean"] == pytest.approx(np.mean([0.5 + 0.1 * s for s in lags])) and first["n"] == 3
    assert second["mean"] == pytest.approx(0.2) and second["std"] == pytest.approx(0, abs=1e-12)
    text = (tmp_path / "out" / "summary.md").read_text()
    assert f"Spike per Lighthouse layer, synthetic-2560 at 62.5% (3 seeds; only that layer dense at the " \
           f"switch, minus the stage-1 loss, in depth order): +{first['mean']:.3f} ± {first['std']:.3f}, " \
           "+0.200 ± 0.000." in text


def test_width_effect_pairs_the_wider_preset_with_the_default_by_seed(tmp_path):
    """A wider preset beside the default one at the same length and switch: per seed the lag per
    Lighthouse iteration built into the curves, their paired difference with its t interval (scipy's),
    per e-fold of the transformer layers' parameters (counted as the trainer builds them: 6 x 512
    with SwiGLU's derived width 1,344 against 12 x 768 with 2,048); a seed without its default twin
    is left out."""
    narrow = {"num_layers": 6, "hidden_size": 512, "num_attention_heads": 8, "num_query_groups": 8}
    wide = {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "num_query_groups": 12}
    base, wider = {1: 0.30, 2: 0.26, 3: 0.34}, {1: 0.18, 2: 0.17, 3: 0.20, 4: 0.1}
    _write_runs(tmp_path / "runs", 1280, 800, base, "default", narrow)
    _write_runs(tmp_path / "runs", 1280, 800, wider, "wide", wide)
    summary = _analyze(tmp_path / "runs", tmp_path / "out")
    (w,) = summary["width_effect"]
    assert (w["preset"], w["iters"], w["switch_frac"], w["seeds"]) == ("wide", 1280, 0.625, [1, 2, 3])
    per_layer = {512: 512 * 24 * 64 + 8 * 64 * 512 + 512 * 1344 * 3, 768: 768 * 36 * 64 + 12 * 64 * 768
                 + 768 * 2048 * 3}
    assert (w["default_parameters"], w["parameters"]) == (6 * per_layer[512], 12 * per_layer[768])
    rows = {(r["preset"], r["seed"]): r["quality_lag_per_lh_iter"] for r in summary["rows"]}
    diffs = np.array([rows[("wide", s)] - rows[("default", s)] for s in (1, 2, 3)])
    assert diffs == pytest.approx([wider[s] - base[s] for s in (1, 2, 3)], abs=0.01)
    lo, hi = scipy.stats.t.interval(0.95, 2, loc=diffs.mean(), scale=scipy.stats.sem(diffs))
    assert (w["difference"]["lower"], w["difference"]["upper"]) == pytest.approx((lo, hi))
    efolds = np.log(w["parameters"] / w["default_parameters"])
    assert w["per_efold"]["mean"] == pytest.approx(diffs.mean() / efolds)
    assert w["lag_is"] == "smaller" and hi < 0
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "the lag is smaller in the wider model at this length." in text
    # The paper's 530M model (the committed bench e2e run: 30 x 1024, SwiGLU width 1,536) against 6 x 512.
    from benchmarks.quality.analyze import _model_factor

    big = 30 * (1024 * 24 * 128 + 8 * 128 * 1024 + 1024 * 1536 * 3)
    assert summary["step_ratio"]["transformer_parameters"] == big
    factor = big / (6 * per_layer[512])
    assert _model_factor(summary) == f"a model whose transformer layers are {factor:.0f}x larger"


def test_paper_point_adds_the_width_term_to_the_run_length_line():
    """The paper's point: the line's value at 50B tokens plus the width effect per e-fold times the
    e-folds to the 530M model's transformer layers; intervals added end to end; nothing without a
    width effect at 62.5%."""
    from benchmarks.quality.analyze import paper_point

    trend = {"linear": {"at": 0.10, "lower": -0.20, "upper": 0.40}}
    effect = {"switch_frac": 0.625, "default_parameters": 10e6,
              "per_efold": {"mean": -0.05, "lower": -0.08, "upper": -0.02}}
    got = paper_point(trend, [effect], int(10e6 * np.e ** 2))
    assert got["parameter_efolds"] == pytest.approx(2.0)
    assert (got["at"], got["lower"], got["upper"]) == pytest.approx((0.0, -0.36, 0.36), abs=1e-6)
    assert paper_point(trend, [{**effect, "switch_frac": 0.75}], 10**9) is None
    assert paper_point(None, [effect], 10**9) is None


def test_a_progressive_window_has_no_spike_or_lighthouse_gap_at_the_switch(tmp_path):
    """A progressive window ends with every layer dense: stage 1 logs no Lighthouse evaluation at the
    switch and the probe's two losses come from one computation. Both numbers are then undefined (not
    a spike of 0), and the paper's recipe still leads its batch's rows."""
    _write_runs(tmp_path / "runs", 2560, 1600, {1: 0.20, 2: 0.25})
    batch = tmp_path / "runs" / "synthetic-2560"
    for seed in (1, 2):
        for arm in ("lighthouse", "recovered"):
            run = json.loads((batch / f"seed{seed}_{arm}_1600.json").read_text())
            (batch / f"seed{seed}_{arm}-dense-every-4_1600.json").write_text(
                json.dumps({**run, "recipe": "dense-every-4"}))  # sorts before "paper" by name
            run["recipe"] = "progressive-10"
            if arm == "lighthouse":
                run["eval"]["lighthouse"] = [p for p in run["eval"]["lighthouse"] if p[0] < 1600]
            else:
                run["switch_probe"] = {"loss_dense": 2.5, "loss_lighthouse": 2.5,
                                       "loss_one_dense": [2.5, 2.5]}
            (batch / f"seed{seed}_{arm}-progressive-10_1600.json").write_text(json.dumps(run))
    summary = _analyze(tmp_path / "runs", tmp_path / "out")
    window = [r for r in summary["rows"] if r["recipe"] == "progressive-10"]
    paper = [r for r in summary["rows"] if r["recipe"] == "paper"]
    assert len(window) == len(paper) == 2
    assert all(r["spike"] is None and r["stage1_gap_lighthouse"] is None and r["spike_per_layer"] is None
               for r in window)
    assert all(r["spike"] == 1.0 and r["stage1_gap_lighthouse"] is not None for r in paper)
    assert [r["lag_per_lh_iter"] for r in window] == pytest.approx([r["lag_per_lh_iter"] for r in paper])
    assert [a["recipe"] for a in summary["aggregates"]] == ["paper", "dense-every-4", "progressive-10"]
    assert list(summary["time_to_quality"]) == ["synthetic-2560", "synthetic-2560 dense-every-4",
                                                "synthetic-2560 progressive-10"]
    r = summary["step_ratio"]["ratio"]
    text = (tmp_path / "out" / "summary.md").read_text()
    assert f"costs {r + (1 - r) / 4:.3f} of a dense one (measured steps, mixed 1 dense in 4)" in text
    assert text.count("A stage-1 step of this recipe costs") == 2  # the variants', not the paper's


def test_a_recovered_run_below_the_control_takes_its_lag_from_the_fit_and_says_so(tmp_path):
    """A seed whose recovered run ends below every loss its control reached has no interpolated lag;
    its (negative) lag comes from the control's fitted curve, and the table says how many did."""
    from benchmarks.quality.analyze import markdown

    _write_runs(tmp_path / "runs", 2560, 1600, {1: 0.20, 2: -0.10})
    summary = _analyze(tmp_path / "runs", tmp_path / "out")
    rows = {r["seed"]: r for r in summary["rows"]}
    assert rows[1]["lag_interp"] is not None and not rows[1]["lag_from_fit"]
    assert rows[2]["lag_interp"] is None and rows[2]["lag_from_fit"]
    assert rows[2]["lag"] == rows[2]["lag_fit"] == pytest.approx(-0.10 * 1600, abs=2)
    # A recovered curve that is the control's shifted in time: its crossing says the same as the fit.
    assert rows[2]["quality_from_crossing"]
    assert rows[2]["quality_lag_per_lh_iter"] == pytest.approx(-0.10, abs=0.005)
    (agg,) = summary["aggregates"]
    assert agg["lag_from_fit"] == 1
    assert agg["lag"]["mean"] == pytest.approx((rows[1]["lag_interp"] + rows[2]["lag_fit"]) / 2)
    line = next(x for x in markdown(summary).splitlines() if x.startswith("| synthetic-2560"))
    assert "(1 of 2 from the fit)" in line


def test_time_to_quality_takes_the_crossing_where_the_recovered_run_ends_below_its_control(tmp_path):
    """Where the recovered run ends below all its control reached, the lag extrapolates the control's
    fitted curve, whose flat end turns a small gain into many iterations. Time to quality counts
    instead the iterations to where the recovered run reached the control's final loss (3-evaluation
    means on both sides). Seed 2's recovered curve here falls linearly through that loss at iteration
    2,200, so the means of 3 points cross there too: 2,200 - 2,496 (the control's last 3 evaluations'
    mean iteration) = -296 iterations, -0.185 per Lighthouse iteration. Seed 1 keeps its lag."""
    _write_runs(tmp_path / "runs", 2560, 1600, {1: 0.20, 2: 0.20})
    path = tmp_path / "runs" / "synthetic-2560" / "seed2_recovered_1600.json"
    rec = json.loads(path.read_text())
    dense = json.loads(path.with_name("seed2_dense.json").read_text())
    goal = np.mean([v for _, v in dense["eval"]["dense"][-3:]])
    rec["eval"]["dense"] = [[i, goal - 0.01 * (i - 2200) / 64] for i, _ in rec["eval"]["dense"]]
    path.write_text(json.dumps(rec))
    summary = _analyze(tmp_path / "runs", tmp_path / "out")
    rows = {r["seed"]: r for r in summary["rows"]}
    assert rows[2]["quality_from_crossing"] and rows[2]["lag_from_fit"]
    assert rows[2]["quality_lag_per_lh_iter"] == pytest.approx(-296 / 1600)
    assert rows[2]["lag_per_lh_iter"] < 2 * rows[2]["quality_lag_per_lh_iter"]  # the fit's, far beyond
    assert not rows[1]["quality_from_crossing"]
    assert rows[1]["quality_lag_per_lh_iter"] == rows[1]["lag_per_lh_iter"] == pytest.approx(0.2, abs=0.01)
    ttq = {t["switch_frac"]: t for t in summary["time_to_quality"]["synthetic-2560"]}
    mean = (rows[1]["lag_per_lh_iter"] - 296 / 1600) / 2
    ratio = summary["step_ratio"]["ratio"]
    assert ttq[0.625]["value"] == pytest.approx(stats.time_to_quality(0.625, mean, ratio))
    assert ttq[0.625]["lag_from"] == "measured at this switch (1 of 2 from the recovered run's crossing)"


def test_a_batch_that_mixes_runs_with_and_without_te_is_refused(tmp_path):
    """The trainer builds TE layers wherever TE is installed: a batch half with, half without, pairs
    different models, and the analysis refuses it rather than averaging across them."""
    from benchmarks.quality.analyze import load_runs

    _write_runs(tmp_path, 2560, 1600, {1: 0.2, 2: 0.2})
    assert len(load_runs(tmp_path)) == 6
    path = tmp_path / "synthetic-2560" / "seed2_dense.json"
    run = json.loads(path.read_text())
    path.write_text(json.dumps({**run, "versions": {"transformer_engine": "2.20.2"}}))
    with pytest.raises(UsageError, match="batch synthetic-2560 mixes runs with and without Transformer"):
        load_runs(tmp_path)


def test_budget_gives_a_running_scheduler_a_new_deadline_and_speed(tmp_path):
    """A time budget set too short at `start` is corrected while the jobs run: the scheduler reads
    `budget`'s deadline and speed before it next starts or skips a job."""
    import time

    from benchmarks._common import main
    from benchmarks.quality import run as R

    job = R.Job("b/seed1/dense", "dense", 1, {}, iters=100)
    plan = {"sec_per_iter": 1.0}
    (tmp_path / "request.json").write_text(json.dumps(plan))
    sched = R.Scheduler(tmp_path, plan, [job], 1, deadline=time.time() + 60)
    assert "would not finish within the time budget" in sched.blocked(job)  # 100 s + 30 > 60 s

    def budget(*extra: str) -> int:
        return main(R.add_parser, "benchmarks.quality.run", ["budget", "--work", str(tmp_path), *extra])

    assert budget("--time-budget", "600") == 2  # no scheduler runs in tmp_path
    # A stand-in for the running scheduler: a live process whose command line names the module.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "benchmarks.quality.run"])
    try:
        (tmp_path / "serve.pid").write_text(str(proc.pid))
        assert budget("--time-budget", "600") == 0
        assert sched.blocked(job) is None
        assert budget("--time-budget", "600", "--sec-per-iter", "10") == 0
        assert "~1030 s" in sched.blocked(job)
        assert budget("--time-budget", "2000") == 0  # the speed estimate is kept
        assert sched.blocked(job) is None and R.read_budget(tmp_path, None, 1.0)[1] == 10
        assert budget("--time-budget", "-5") == 2
    finally:
        proc.kill()
        proc.wait()
    # A scheduler that has exited but is not yet reaped (a zombie: alive to kill(pid, 0), with an
    # empty command line) is not running.
    zombie = subprocess.Popen([sys.executable, "-c", "pass", "benchmarks.quality.run"])
    (tmp_path / "serve.pid").write_text(str(zombie.pid))
    while Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0] != "Z":
        time.sleep(0.05)
    assert budget("--time-budget", "600") == 2
    zombie.wait()


def _quality_lag(lam: float) -> dict:
    """A row's lag as time to quality reads it (an interpolated one: no crossing)."""
    return {QUALITY_LAG: lam, "quality_from_crossing": False}


def test_best_switch_by_the_paired_share_of_time_saved():
    """Per seed the share saved is f (1 - r - λ_f); the leader has the largest mean, decided only
    where the paired difference's two-sided 95% t interval (scipy's) lies above 0."""
    from benchmarks.quality.analyze import best_switch

    r = 0.324
    lams = {0.625: [0.15, 0.16, 0.14], 0.75: [0.28, 0.30, 0.27]}
    rows = [{"batch": "b", "recipe": "paper", "seed": s + 1, "switch_frac": f, **_quality_lag(lam)}
            for f, ls in lams.items() for s, lam in enumerate(ls)]
    got = best_switch(rows, "b", r)
    share = {f: [f * (1 - r - lam) for lam in ls] for f, ls in lams.items()}
    d = np.subtract(share[0.625], share[0.75])
    lo, hi = scipy.stats.t.interval(0.95, 2, loc=d.mean(), scale=scipy.stats.sem(d))
    assert got["switch_frac"] == 0.625 and got["seeds"] == [1, 2, 3]
    assert got["share"] == pytest.approx(np.mean(share[0.625]))
    (vs,) = got["against"]
    assert vs["switch_frac"] == 0.75 and vs["share"] == pytest.approx(np.mean(share[0.75]))
    assert (vs["mean"], vs["lower"], vs["upper"]) == pytest.approx((d.mean(), lo, hi))
    assert lo > 0 and got["decided"] is True
    # Seeds that disagree on the order leave it undecided; a seed missing one switch is left out.
    seed4 = [{**rows[0], "seed": 4, **_quality_lag(0.9)}, {**rows[3], "seed": 4, **_quality_lag(-0.5)}]
    noisy = rows + seed4 + [{**rows[0], "seed": 5}]
    undecided = best_switch(noisy, "b", r)
    assert undecided["seeds"] == [1, 2, 3, 4] and undecided["decided"] is False
    assert best_switch([x for x in rows if x["switch_frac"] == 0.75], "b", r) is None  # one switch


def test_recipe_against_the_paper_by_the_paired_share_of_time_saved():
    """A variant's share saved, f (1 - c - λ) with its own stage-1 cost c, minus the paper's
    f (1 - r - λ) on the same seed and switch; wins or loses only where scipy's two-sided 95% t
    interval of that difference excludes 0."""
    from benchmarks.quality.analyze import against_paper, markdown

    r, f = 0.324, 0.625
    c = r + (1 - r) / 4  # dense-every-4: one step in four costs a dense step
    paper, dense4 = [0.20, 0.25, 0.22], [0.02, 0.05, 0.01]
    rows = [{"batch": "b", "recipe": rc, "seed": s + 1, "switch_frac": f, **_quality_lag(lam)}
            for rc, lams in (("paper", paper), ("dense-every-4", dense4)) for s, lam in enumerate(lams)]
    (got,) = against_paper(rows, "b", r, "dense-every-4")
    d = np.array([f * (1 - c - x) - f * (1 - r - y) for x, y in zip(dense4, paper, strict=True)])
    lo, hi = scipy.stats.t.interval(0.95, 2, loc=d.mean(), scale=scipy.stats.sem(d))
    assert got["seeds"] == [1, 2, 3]
    assert (got["mean"], got["lower"], got["upper"]) == pytest.approx((d.mean(), lo, hi))
    assert got["share"] == pytest.approx(np.mean([f * (1 - c - x) for x in dense4]))
    assert lo < 0 < hi and got["verdict"] == "cannot tell"  # the dense steps cost about what they buy
    text = markdown(_summary_with(None) | {"time_to_quality": {"b dense-every-4": []},
                                           "against_paper": {"b dense-every-4": [got]}})
    assert f"difference {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]: **cannot tell**" in text

    def shifted(by: float) -> list[dict]:
        return [{**x, **_quality_lag(x[QUALITY_LAG] + by)} if x["recipe"] != "paper" else x
                for x in rows]

    assert against_paper(shifted(-0.1), "b", r, "dense-every-4")[0]["verdict"] == "wins"
    assert against_paper(shifted(+0.1), "b", r, "dense-every-4")[0]["verdict"] == "loses"
    # A seed without the paper's run at that switch is left out; one paired seed cannot tell.
    lone = [x for x in rows if x["seed"] == 1] + [{**rows[3], "seed": 7}]
    (one,) = against_paper(lone, "b", r, "dense-every-4")
    assert one["seeds"] == [1] and one["verdict"] == "cannot tell" and one["lower"] is None
