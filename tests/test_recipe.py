"""The recipe's schedule (lighthouse_megatron/recipe.py): the hard switch and the three variants
that approach dense attention during stage 1, against hand-written schedules; their start-up
checks; and the trainer running each one, compared with the same schedule done by hand through
relaunches from checkpoints (which is how a user would run it without the settings)."""

from __future__ import annotations

import pytest

from lighthouse_megatron.config import LighthouseConfig
from lighthouse_megatron.recipe import RecipeSchedule


def _table(schedule, iterations, count, training=True):
    return [[int(schedule.layer_dense(i, r, count, training)) for r in range(count)] for i in iterations]


def test_hard_switch():
    s = RecipeSchedule(until_iter=3)
    assert s.is_hard_switch
    assert _table(s, range(5), 2) == [[0, 0], [0, 0], [0, 0], [1, 1], [1, 1]]


def test_dense_every_m_th_training_iteration_and_never_in_evaluation():
    s = RecipeSchedule(until_iter=10, dense_every=4)
    dense = [i for i in range(12) if s.layer_dense(i, 0, 1)]
    assert dense == [3, 7, 10, 11]
    assert [i for i in range(12) if s.layer_dense(i, 0, 1, training=False)] == [10, 11]


def test_progressive_switch_first_to_last():
    # 3 Lighthouse layers over the 4 iterations before 12: from 8, 8 + 4//3 = 9, 8 + 8//3 = 10.
    s = RecipeSchedule(until_iter=12, progressive_iters=4)
    assert _table(s, range(7, 13), 3) == [
        [0, 0, 0],  # 7
        [1, 0, 0],  # 8
        [1, 1, 0],  # 9
        [1, 1, 1],  # 10
        [1, 1, 1],  # 11
        [1, 1, 1],  # 12
    ]
    assert s.describe(9, 3) == "mixed (2/3 dense)" and s.describe(7, 3) == "lighthouse"


def test_grow_topk_ladder_and_steps():
    # 256 tokens, L=2, p=4, T=8: 64 coarsest entries; k/T tiles of at least T entries: k <= 64.
    config = LighthouseConfig(levels=2, pooling_factor=4, topk=16, tile_topk=8)
    s = RecipeSchedule(until_iter=10, grow_topk_iters=6)
    ladder = s.check_against(config, 256)
    assert ladder == [16, 32, 64]
    ks = {i: s.config_at(config, i, ladder).topk for i in range(11)}
    # Before the window 16; the window 4..9 in two equal steps (4-6: 32, 7-9: 64); stage 2 keeps the config.
    assert ks == {0: 16, 1: 16, 2: 16, 3: 16, 4: 32, 5: 32, 6: 32, 7: 64, 8: 64, 9: 64, 10: 16}
    for k in ladder:  # every rung is a valid configuration
        LighthouseConfig(levels=2, pooling_factor=4, topk=k, tile_topk=8).validate(256)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(dense_every=1), "--lighthouse-dense-every must be >= 2"),
    (dict(dense_every=2.5), "--lighthouse-dense-every must be an integer"),
    (dict(progressive_iters=4), "--lighthouse-progressive-iters 4 needs --lighthouse-until-iter"),
    (dict(until_iter=3, grow_topk_iters=4), "--lighthouse-grow-topk-iters 4 is longer than stage 1"),
    (dict(until_iter=-1), "--lighthouse-until-iter must be an iteration >= 0"),
    (dict(until_iter=5, progressive_iters=-2), "--lighthouse-progressive-iters must be >= 0"),
])
def test_bad_settings_name_the_flag(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        RecipeSchedule(**kwargs)


def test_growth_needs_a_larger_valid_k():
    config = LighthouseConfig(levels=2, pooling_factor=4, topk=64, tile_topk=8)
    with pytest.raises(ValueError, match="no valid k above --lighthouse-topk 64 at --seq-length 256"):
        RecipeSchedule(until_iter=10, grow_topk_iters=2).check_against(config, 256)


# ------------------------------------------------------------------ in the trainer

pytest.importorskip("megatron.core")

TINY = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "256",
        "--micro-batch-size", "2", "--lr", "3e-3", "--device", "cpu", "--mock-data", "--train-iters", "8",
        "--eval-iters", "0", "--seed", "3"]
LH = ["--attention-impl", "lighthouse", "--lighthouse-levels", "2", "--lighthouse-topk", "16",
      "--lighthouse-tile-topk", "8"]


def _train(*argv):
    from lighthouse_megatron import training

    return training.run(training.parse_args([*TINY, *argv]))


def _losses(result):
    return {r["iteration"]: r["loss"] for r in result.train}


@pytest.fixture(autouse=True)
def _twins(pytorch_twins):
    yield


def test_startup_check_names_the_flags():
    from lighthouse_megatron import training

    needle = "--lighthouse-grow-topk-iters 2: no valid k above --lighthouse-topk 64"
    with pytest.raises(ValueError, match=needle):
        training.parse_args([*TINY, *LH[:-4], "--lighthouse-topk", "64", "--lighthouse-tile-topk", "8",
                             "--lighthouse-until-iter", "6", "--lighthouse-grow-topk-iters", "2"])
    with pytest.raises(ValueError, match="--lighthouse-dense-every must be >= 2"):
        training.parse_args([*TINY, *LH, "--lighthouse-dense-every", "1"])


def test_dense_every_equals_the_same_alternation_by_relaunches(tmp_path):
    """Iterations 0 and 2 Lighthouse, 1 and 3 dense: in one run, and by four relaunches that each
    load the last checkpoint (a dense relaunch is --attention-impl dense: no recipe involved)."""
    run = _train(*LH, "--lighthouse-dense-every", "2", "--train-iters", "4")
    assert [r["attention"] for r in run.train] == ["lighthouse", "dense", "lighthouse", "dense"]
    ckpt = str(tmp_path / "ckpt")
    hand = {}
    for it, attention in enumerate(["lighthouse", "dense", "lighthouse", "dense"]):
        impl = LH if attention == "lighthouse" else ["--attention-impl", "dense"]
        load = ["--load", ckpt] if it else []
        part = _train(*impl, *load, "--save", ckpt, "--exit-interval", str(it + 1), "--train-iters", "4")
        hand.update(_losses(part))
    assert _losses(run) == hand


def test_progressive_window_resumed_midway_continues_the_same_schedule(tmp_path):
    """Stop inside the window (after iteration index 4 of the window 3..6; until 7), resume: the
    same losses as the run that never stopped; and the window really changes the run (against the
    hard switch)."""
    recipe = [*LH, "--lighthouse-until-iter", "7", "--lighthouse-progressive-iters", "4"]
    whole = _train(*recipe)
    assert [r["attention"] for r in whole.train][2:8] == [
        "lighthouse", "mixed (1/3 dense)", "mixed (2/3 dense)", "dense", "dense", "dense"]
    ckpt = str(tmp_path / "ckpt")
    first = _train(*recipe, "--save", ckpt, "--exit-interval", "5")
    second = _train(*recipe, "--load", ckpt)
    assert {**_losses(first), **_losses(second)} == _losses(whole)
    hard = _train(*LH, "--lighthouse-until-iter", "7")
    assert _losses(hard)[4] != _losses(whole)[4]  # iteration index 3: one layer already dense


def test_grown_k_equals_a_relaunch_with_that_k(tmp_path):
    """Inside the growth window the trainer's k is the ladder's: a relaunch from the same checkpoint
    with --lighthouse-topk set by hand gives the same loss."""
    recipe = [*LH, "--lighthouse-until-iter", "6", "--lighthouse-grow-topk-iters", "4"]
    ckpt = str(tmp_path / "ckpt")
    first = _train(*recipe, "--save", ckpt, "--exit-interval", "4")
    rest = _train(*recipe, "--load", ckpt)
    # 256 tokens, L=2, p=4, T=8: ladder 16, 32, 64; window 2..5: iterations 2-3 k=32, 4-5 k=64.
    assert [r["attention"] for r in first.train] == [f"lighthouse (k={k})" for k in (16, 16, 32, 32)]
    by_hand = _train(*LH[:-4], "--lighthouse-topk", "64", "--lighthouse-tile-topk", "8", "--load", ckpt,
                     "--exit-interval", "5")
    assert _losses(by_hand)[5] == _losses(rest)[5]
