"""The study's arithmetic, free of I/O: verdicts, the lag, the end slope, time to dense quality.

Every function here is checked on the CPU against a hand-computed case or a synthetic curve with
a known answer (tests/test_quality_study.py).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence

import numpy as np

TOLERANCE = 0.02  # nats per byte for loss gaps; control iterations per Lighthouse iteration for the lag
CONFIDENCE = 0.95  # one-sided

RULE = (
    "Per-seed values x_1..x_n (paired by seed), mean m, standard error SE = sd / sqrt(n), t = the "
    "one-sided {conf:.0%} Student-t quantile with n - 1 degrees of freedom. 'beats' when m + t*SE < 0; "
    "'matches' when m + t*SE <= {tol}; 'worse' when m - t*SE > {tol}; otherwise 'cannot tell' "
    "(also with fewer than 2 seeds). For loss gaps x = recovered - dense (nats per byte); for the lag "
    "x = control iterations lost per Lighthouse iteration."
)


def summary(values: Sequence[float | None]) -> dict:
    """n, mean, sample standard deviation, standard error (NaN where undefined); None values dropped."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    sd = statistics.stdev(xs) if n > 1 else float("nan")
    return {"n": n, "mean": statistics.fmean(xs) if xs else float("nan"), "std": sd,
            "se": sd / math.sqrt(n) if n > 1 else float("nan"), "values": xs}


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided Student-t quantile for n samples (n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(confidence, n - 1))


def verdict(values: Sequence[float | None], tolerance: float = TOLERANCE,
            confidence: float = CONFIDENCE) -> dict:
    """RULE applied to per-seed values; the bounds it used are in the result."""
    s = summary(values)
    if s["n"] < 2:
        return {**s, "t": None, "lower": None, "upper": None, "tolerance": tolerance,
                "verdict": "cannot tell"}
    t = t_quantile(s["n"], confidence)
    lower, upper = s["mean"] - t * s["se"], s["mean"] + t * s["se"]
    if upper < 0:
        word = "beats"
    elif upper <= tolerance:
        word = "matches"
    elif lower > tolerance:
        word = "worse"
    else:
        word = "cannot tell"
    return {**s, "t": t, "lower": lower, "upper": upper, "tolerance": tolerance, "verdict": word}


def interval(values: Sequence[float | None], confidence: float = 0.95) -> dict:
    """Mean with a two-sided Student-t interval (for estimates that get no verdict)."""
    s = summary(values)
    if s["n"] < 2:
        return {**s, "lower": None, "upper": None}
    t = t_quantile(s["n"], 0.5 + confidence / 2)
    return {**s, "lower": s["mean"] - t * s["se"], "upper": s["mean"] + t * s["se"]}


def side_of_zero(lower: float | None, upper: float | None) -> str | None:
    """Where an interval lies: "above" or "below" 0 when it excludes 0, None when it includes 0 or is
    undefined (fewer than two values)."""
    if lower is None or upper is None or lower <= 0 <= upper:
        return None
    return "above" if lower > 0 else "below"


def decision_power(mean: float, sd: float, n: int, confidence: float = 0.95) -> float:
    """The chance that n seeds' two-sided t interval excludes 0 when the per-seed values are normal
    with this mean and standard deviation (the noncentral t distribution of the t statistic)."""
    from scipy.stats import nct, t

    crit = t.ppf(0.5 + confidence / 2, n - 1)
    shift = mean / (sd / math.sqrt(n))
    return float(nct.sf(crit, n - 1, shift) + nct.cdf(-crit, n - 1, shift))


def seeds_for_power(mean: float, sd: float, power: float = 0.8, confidence: float = 0.95,
                    most: int = 100) -> int | None:
    """For planning: the fewest seeds whose two-sided t interval excludes 0 with probability
    `power` if the mean and spread seen so far are the true ones (a power calculation on the
    observed effect: it sizes the next runs, it is no evidence for the effect); None beyond `most`
    seeds or with no mean to find."""
    if not mean or math.isnan(mean) or math.isnan(sd):
        return None
    if sd == 0:
        return 2
    return next((n for n in range(2, most + 1) if decision_power(mean, sd, n, confidence) >= power), None)


# ------------------------------------------------------------------------------ curves


def window_mean(curve: dict[int, float], first: int, last: int) -> float:
    """Mean of the curve's values at iterations first..last (inclusive)."""
    xs = [v for i, v in curve.items() if first <= i <= last]
    if not xs:
        raise ValueError(f"no values between iterations {first} and {last}")
    return statistics.fmean(xs)


def end_slope(iterations: Sequence[int], losses: Sequence[float], share: float = 0.25) -> float:
    """dL / d ln(iteration) over the last `share` of the iterations (least squares)."""
    its, ls = np.asarray(iterations, dtype=float), np.asarray(losses, dtype=float)
    keep = its >= its.max() * (1 - share)
    if keep.sum() < 2:
        raise ValueError("fewer than two points in the end window")
    return float(np.polyfit(np.log(its[keep]), ls[keep], 1)[0])


def first_reached(iterations: Sequence[int], losses: Sequence[float], target: float) -> float | None:
    """The first iteration at which the curve reaches `target` (linear interpolation between the
    points of its running minimum: 'by when had it got this good'); None when it never does."""
    best = math.inf
    prev_i, prev_l = None, None
    for i, loss in zip(iterations, losses, strict=True):
        loss = min(loss, best)
        if loss <= target:
            if prev_i is None or prev_l == loss:
                return float(i)
            return prev_i + (i - prev_i) * (prev_l - target) / (prev_l - loss)
        best, prev_i, prev_l = loss, i, loss
    return None


def fit_power_law(iterations: Sequence[int], losses: Sequence[float]) -> tuple[float, float, float]:
    """(a, b, c) of L(i) = a + b * i^-c, least squares over the points given (c in 0.02..3)."""
    from scipy.optimize import curve_fit

    its, ls = np.asarray(iterations, dtype=float), np.asarray(losses, dtype=float)
    scale = its.max()
    x = its / scale

    def f(x, a, b, c):
        return a + b * x ** (-c)

    p0 = (float(ls.min()) - 0.1, 0.1, 0.5)
    (a, b, c), _ = curve_fit(f, x, ls, p0=p0, bounds=([-np.inf, 0, 0.02], [np.inf, np.inf, 3.0]),
                             maxfev=20000)
    return float(a), float(b * scale**c), float(c)


def invert_power_law(params: tuple[float, float, float], loss: float) -> float | None:
    """The iteration at which a + b * i^-c equals `loss` (None when the curve never gets there)."""
    a, b, c = params
    if loss <= a or b <= 0:
        return None
    return float((b / (loss - a)) ** (1 / c))


def lag(control_its: Sequence[int], control_losses: Sequence[float], at: int, loss: float,
        fit_from: int) -> dict:
    """How many control iterations earlier than `at` the control first had `loss`:
    by interpolation of its running minimum ('interp'; None when the control never got that low,
    i.e. no lag measurable this way) and from a power-law fit of its curve from `fit_from` on
    ('fit'; may be negative: the control would need more than `at` iterations)."""
    reached = first_reached(control_its, control_losses, loss)
    pts = [(i, v) for i, v in zip(control_its, control_losses, strict=True) if i >= fit_from]
    fit_at = None
    params = None
    if len(pts) >= 4:
        params = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        fit_at = invert_power_law(params, loss)
    return {"interp": None if reached is None else at - reached,
            "fit": None if fit_at is None else at - fit_at,
            "fit_params": params}


# --------------------------------------------------------------------- time to quality


def time_to_quality(switch_frac: float, lag_per_lighthouse_iter: float, step_ratio: float) -> float:
    """Wall-clock ratio dense / two-stage for reaching the dense control's final loss.

    A two-stage run with S Lighthouse iterations lags the control by lag_per_lighthouse_iter * S
    iterations after the switch, and the lag stays (measured: stage 2 does not win it back). To reach
    the control's loss at N iterations it therefore needs S Lighthouse steps and N - S + lag*S dense
    ones. With S = f*N and a Lighthouse step costing `step_ratio` of a dense one:
        dense / two-stage = N / (f*N*r + N - f*N + lag*f*N) = 1 / (1 - f * (1 - r - lag)).
    """
    f, r, lam = switch_frac, step_ratio, lag_per_lighthouse_iter
    if not 0 < f < 1:
        raise ValueError(f"switch fraction must lie in (0, 1), got {f}")
    denominator = 1 - f * (1 - r - lam)
    return math.inf if denominator <= 0 else 1 / denominator  # inf: a lag this negative makes it free


def time_to_quality_interval(switch_frac: float, lags: Sequence[float], step_ratio: float,
                             confidence: float = 0.95) -> dict:
    """time_to_quality at the seeds' mean lag, with the mean lag's two-sided Student-t interval
    carried through the formula. The ratio falls monotonically in the lag, so the lag's upper end
    gives the lower end and its lower end the upper one (math.inf where that lag would make the
    two-stage run cost nothing). A t interval on the per-seed ratios instead would be symmetric and,
    with few seeds, could reach below zero, which no wall-clock ratio can."""
    lag = interval(lags, confidence)
    if not lag["n"]:
        raise ValueError("time to quality needs at least one seed's lag")

    ratio = functools.partial(time_to_quality, switch_frac, step_ratio=step_ratio)
    out = {"n": lag["n"], "value": ratio(lag["mean"]), "lower": None, "upper": None, "lag": lag,
           "values": [ratio(x) for x in lag["values"]]}
    if lag["lower"] is not None:
        out["lower"], out["upper"] = ratio(lag["upper"]), ratio(lag["lower"])
    return out
