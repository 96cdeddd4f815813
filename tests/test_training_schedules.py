"""Learning-rate schedules as Megatron-LM runs them: the trainer's rate at every iteration
equals megatron-core's OptimizerParamScheduler built here, from Megatron-LM's
`get_optimizer_param_scheduler` semantics (steps are samples: iterations x global batch), and
`--override-opt_param-scheduler` changes the schedule of a resumed run on purpose."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402

from lighthouse_megatron import training  # noqa: E402
from lighthouse_megatron.megatron import set_iteration  # noqa: E402

ITERS, GBS, WARMUP, LR, MIN_LR = 12, 2, 2, 4e-3, 4e-4
MODEL = (f"--mock-data --num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 64 "
         f"--micro-batch-size 2 --global-batch-size {GBS} --train-iters {ITERS} --lr {LR} --min-lr {MIN_LR} "
         f"--lr-warmup-iters {WARMUP} --lr-warmup-init 1e-4 --eval-iters 0 --seed 3 --device cpu").split()


def _train(*argv) -> training.TrainResult:
    result = training.run(training.parse_args([*MODEL, *map(str, argv)]))
    set_iteration(0)
    return result


def _rates(result) -> dict[int, float]:
    return {r["iteration"]: r["lr"] for r in result.train}


def megatron_rates(style: str, wsd_style: str | None = None, wsd_iters: int | None = None,
                   first: int = 1) -> dict[int, float]:
    """Megatron-LM's rate for iterations first..ITERS: the scheduler after (i - 1) global batches."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.0)
    sched = OptimizerParamScheduler(
        opt, init_lr=1e-4, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=WARMUP * GBS, lr_decay_steps=ITERS * GBS,
        lr_decay_style=style, start_wd=0.01, end_wd=0.01, wd_incr_steps=ITERS * GBS, wd_incr_style="constant",
        wsd_decay_steps=None if wsd_iters is None else wsd_iters * GBS, lr_wsd_decay_style=wsd_style)
    rates = {}
    for i in range(1, ITERS + 1):
        if i >= first:
            rates[i] = opt.param_groups[0]["lr"]
        sched.step(GBS)
    return rates


SCHEDULES = [("constant", None), ("cosine", None), ("linear", None),
             *[("WSD", s) for s in ("exponential", "linear", "cosine", "minus_sqrt")]]


@pytest.mark.parametrize("style,wsd_style", SCHEDULES, ids=[f"{a}-{b}" if b else a for a, b in SCHEDULES])
def test_rate_per_iteration_is_megatron_lms(style, wsd_style):
    argv = ["--lr-decay-style", style]
    if wsd_style:
        argv += ["--lr-wsd-decay-style", wsd_style, "--lr-wsd-decay-iters", 5]
    got = _rates(_train(*argv))
    want = megatron_rates(style, wsd_style, 5 if wsd_style else None)
    assert list(got) == list(range(1, ITERS + 1))
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    if style == "WSD":  # flat at the peak until the anneal, then down to --min-lr
        assert got[ITERS - 5] == LR and got[ITERS] < LR


def test_wsd_default_anneal_is_exponential():
    args = training.parse_args([*MODEL, "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "4"])
    assert args.lr_wsd_decay_style == "exponential"  # Megatron-LM's default


def test_override_opt_param_scheduler_on_resume(tmp_path):
    """Stage 1 constant, stage 2 resumed with a WSD anneal: refused without the flag; with it
    the resumed run continues the weights, optimizer and data (iteration 7's loss is the
    uninterrupted run's) and follows the new schedule from the checkpoint's step on."""
    full = _train("--lr-decay-style", "constant")
    first = _train("--lr-decay-style", "constant", "--save", tmp_path, "--exit-interval", 6)
    wsd = ["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear", "--lr-wsd-decay-iters", 4]
    with pytest.raises(ValueError, match="schedule differs: --lr-decay-style WSD .checkpoint: constant.*"
                                         "--override-opt_param-scheduler"):
        training.run(training.parse_args([*MODEL, *map(str, wsd), "--load", str(tmp_path)]))
    second = _train(*wsd, "--load", tmp_path, "--override-opt_param-scheduler")
    assert second.start_iteration == 6
    assert _rates(second) == pytest.approx(megatron_rates("WSD", "linear", 4, first=7), rel=1e-12, abs=0)
    losses = {r["iteration"]: r["loss"] for r in first.train + second.train}
    uninterrupted = {r["iteration"]: r["loss"] for r in full.train}
    assert losses[7] == uninterrupted[7]  # same weights, optimizer state and next batch
    assert losses[ITERS] != uninterrupted[ITERS]  # the anneal really changed the run
    # Megatron-LM spells the flag this way; the trainer passes it on.
    args = training.parse_args([*MODEL, *map(str, wsd), "--override-opt-param-scheduler"])
    assert "--override-opt_param-scheduler" in training.megatron_lm_args(args)
