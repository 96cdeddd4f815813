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


def log(iters, loss, extra=""):
    lines = [extra]
    for i in iters:
        lines.append(f" [2026-11-28 02:00:00] iteration {i:8d}/      40 | consumed samples: {4 * i} | "
                     f"elapsed time per iteration (ms): 50.0 | learning rate: 1.0E-03 | "
                     f"lm loss: {loss(i):.6E} | loss scale: 1.0 | grad norm: 1.000 |")
    return "\n".join(lines)


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
    return f" validation loss at iteration {it} on validation set | {fields}"


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
    assert "differ by 0.0500" in checker.check_same(s2, log(range(21, 41), lambda i: falling(i) + 0.05),
                                                    21, 3, 0.02)[0]
    assert "missing" in checker.check_same(s2, log(range(30, 41), falling), 21, 3, 0.02)[0]
