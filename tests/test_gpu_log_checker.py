"""tests/gpu/check_megatron_lm_logs.py on log lines in Megatron-LM's format: it passes a
good two-stage run and fails each way a run can go wrong."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "check_megatron_lm_logs", Path(__file__).parent / "gpu" / "check_megatron_lm_logs.py")
checker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checker)


def log(iters, loss, extra="", interval=1):
    """One launch's log as Megatron-LM writes it: its first iteration is logged without resetting
    the running sum, so the next line holds the mean since the launch's first iteration."""
    lines, total, count = [extra], 0.0, 0
    iters = list(iters)
    for n, i in enumerate(iters):
        total, count = total + loss(i), count + 1
        if n and i % interval:
            continue
        lines.append(f" [2026-11-28 02:00:00] iteration {i:8d}/      40 | consumed samples: {4 * i} | "
                     f"elapsed time per iteration (ms): 50.0 | learning rate: 1.0E-03 | "
                     f"lm loss: {total / count:.6E} | loss scale: 1.0 | grad norm: 1.000 |")
        if n:
            total, count = 0.0, 0
    return "\n".join(lines)


def test_losses_are_per_iteration():
    """The second line after a launch prints the mean of its first two iterations: undone."""
    text = log(range(21, 26), lambda i: float(i))
    assert checker.logged_losses(text)[:2] == [(21, 21.0), (22, 21.5)]
    assert checker.losses(text) == pytest.approx({i: float(i) for i in range(21, 26)})
    two_launches = log(range(1, 4), lambda i: float(i)) + "\n" + log(range(3, 6), lambda i: 10.0 * i)
    assert checker.losses(two_launches) == pytest.approx({1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0, 5: 50.0})
    with pytest.raises(ValueError, match="--log-interval 1"):
        checker.losses(log(range(21, 31), lambda i: float(i), interval=5))


LH = "lighthouse-megatron: model of this stage (vp_stage=None), core attention: LighthouseCoreAttention x5"
SAVED = "  [2026] successfully saved checkpoint from iteration      20 to /ckpt [ t 1/1, p 1/1 ]"
LOADED = "  successfully loaded checkpoint from /ckpt [ t 1/1, p 1/1 ] at iteration 20"


def falling(i):
    return 5.5 - 0.05 * i


def test_good_run_passes():
    assert checker.check(log(range(1, 21), falling, LH + "\n" + SAVED),
                         log(range(21, 41), falling, LOADED), 20, 40) == []


def test_a_jump_at_the_switch_passes():
    """Dense attention on stage-1 weights starts higher than stage 1 ended (seen on an H200:
    stage 1 5.515 -> 5.239, stage 2 starting at 5.448), still well below a restart."""
    jump = lambda i: falling(i) + (0.75 * (falling(1) - falling(20)) if i > 20 else 0)  # noqa: E731
    assert checker.check(log(range(1, 21), jump, LH + "\n" + SAVED),
                         log(range(21, 41), jump, LOADED), 20, 40) == []


@pytest.mark.parametrize("case, match", [
    ("restart", "did not carry over"),
    ("nan", "non-finite"),
    ("not_loaded", "did not load"),
    ("no_lighthouse", "did not announce Lighthouse"),
    ("short", "expected 1..20"),
    ("flat", "did not fall"),
])
def test_bad_runs_fail(case, match):
    s1 = log(range(1, 21), falling, LH + "\n" + SAVED)
    s2 = log(range(21, 41), falling, LOADED)
    if case == "restart":
        s2 = log(range(21, 41), lambda i: falling(i - 20), LOADED)
    elif case == "nan":
        s2 = log(range(21, 41), lambda i: float("nan") if i == 30 else falling(i), LOADED)
    elif case == "not_loaded":
        s2 = log(range(21, 41), falling)
    elif case == "no_lighthouse":
        s1 = log(range(1, 21), falling, SAVED)
    elif case == "short":
        s1 = log(range(1, 11), falling, LH + "\n" + SAVED)
    elif case == "flat":
        s1 = log(range(1, 21), lambda i: 5.0, LH + "\n" + SAVED)
        s2 = log(range(21, 41), lambda i: 5.0, LOADED)
    problems = checker.check(s1, s2, 20, 40)
    assert any(match in p for p in problems), problems


def validation(it, **values):
    """Megatron-LM's validation line (training.py's evaluate_and_print_results)."""
    fields = "".join(f"{k.replace('_', ' ')} value: {v:.6E} | {k.replace('_', ' ')} PPL: 1.0E+02 | "
                     for k, v in values.items())
    return f" validation loss at iteration {it} | {fields}"


def test_dense_eval_lines():
    good1 = log(range(1, 21), falling, "\n".join([LH, SAVED, validation(10, lm_loss=5.0, lm_loss_dense=6.4)]))
    good2 = log(range(21, 41), falling, LOADED + "\n" + validation(30, lm_loss=4.0))
    assert checker.validations(good1) == {10: {"lm loss": 5.0, "lm loss dense": 6.4}}
    assert checker.check_dense_eval(good1, good2) == []
    only_model = log(range(1, 21), falling, "\n".join([LH, SAVED, validation(10, lm_loss=5.0)]))
    assert "expected finite 'lm loss' and 'lm loss dense'" in checker.check_dense_eval(only_model, good2)[0]
    assert "logged no validation line" in checker.check_dense_eval(log(range(1, 21), falling), good2)[0]
    nan = log(range(1, 21), falling, validation(10, lm_loss=5.0, lm_loss_dense=float("nan")))
    assert checker.check_dense_eval(nan, good2)
    dense_in_2 = log(range(21, 41), falling, validation(30, lm_loss=4.0, lm_loss_dense=4.0))
    assert "expected only 'lm loss'" in checker.check_dense_eval(good1, dense_in_2)[0]


def test_same_first_dense_losses():
    s2 = log(range(21, 41), falling, LOADED)
    assert checker.check_same(s2, log(range(21, 41), lambda i: falling(i) + 0.01), 21, 3, 0.02) == []
    assert "iteration 21 differ by 0.0500" in checker.check_same(
        s2, log(range(21, 41), lambda i: falling(i) + 0.05), 21, 3, 0.02)[0]
    assert "missing" in checker.check_same(s2, log(range(30, 41), falling), 21, 3, 0.02)[0]


def test_a_difference_in_the_averaged_line_is_not_halved():
    """Iteration 22 differs by 0.03, but Megatron-LM prints it averaged with 21 (0.015 apart):
    the comparison sees the per-iteration difference."""
    s2 = log(range(21, 41), falling, LOADED)
    other = log(range(21, 41), lambda i: falling(i) + (0.03 if i == 22 else 0.0))
    problems = checker.check_same(s2, other, 21, 3, 0.02)
    assert problems and "iteration 22 differ by 0.0300" in problems[0], problems


def test_final_validation_is_not_a_validation_during_training():
    text = "\n".join([validation(40, lm_loss=1.0), validation(40, lm_loss=2.0).replace(
        "iteration 40", "iteration 40 on validation set"), validation(40, lm_loss=3.0).replace(
        "iteration 40", "iteration 40 on test set")])
    assert checker.validations(text) == {40: {"lm loss": 1.0}}
    assert checker.final_validation(text) == {"lm loss": 2.0}
