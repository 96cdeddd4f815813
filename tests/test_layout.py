"""The one layout check: the trainer, `slurm render` and the Slurm launcher refuse a layout with
the same function and words."""

import subprocess
import sys

import pytest

from lighthouse_megatron import slurm
from lighthouse_megatron.settings.layout import check_flags, check_layout


@pytest.mark.parametrize("world, tp, cp, pp", [(32, 1, 2, 1), (16, 2, 2, 2), (8, 1, 8, 1), (6, 3, 1, 2)])
def test_derived_dp_fills_the_world(world, tp, cp, pp):
    dp = check_layout(world, tp, cp, pp)
    assert tp * cp * pp * dp == world
    assert check_layout(world, tp, cp, pp, dp) == dp


def test_mismatch_names_the_numbers_and_a_fit():
    with pytest.raises(ValueError, match=r"1 x 2 x 1 x 16 = 32, but the job has 16 processes; DP = 8 fits"):
        check_layout(16, 1, 2, 1, 16)
    with pytest.raises(ValueError, match=r"3 x 2 x 1 = 6 does not divide the job's 16 processes"):
        check_layout(16, 3, 2, 1)


def test_module_cli_prints_dp_or_one_error_without_torch():
    flags = ["--context-parallel-size", "2", "--global-batch-size", "32", "--seq-length", "98304",
             "--attention-impl", "lighthouse", "--lighthouse-topk", "1536", "--lighthouse-tile-topk", "128"]
    prog = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n"
            "    runpy.run_module('lighthouse_megatron.settings.layout', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "print('torch' in sys.modules)")
    ok = subprocess.run([sys.executable, "-c", prog, "layout", "--nodes", "4", "--nproc-per-node", "8", "--",
                         *flags], capture_output=True, text=True)
    assert ok.stdout.split() == ["16", "exit", "0", "False"], ok.stderr
    bad = subprocess.run([sys.executable, "-c", prog, "layout", "--nodes", "4", "--nproc-per-node", "8",
                          "--data-parallel-size", "8", "--", *flags], capture_output=True, text=True)
    assert bad.stdout.split()[-3:] == ["exit", "2", "False"]
    assert bad.stderr.strip() == ("error: TP x CP x PP x DP = 1 x 2 x 1 x 8 = 16, but the job has 4 nodes "
                                  "x 8 processes = 32 processes; DP = 16 fits")


def test_trainer_and_render_use_the_same_check():
    from lighthouse_megatron.training import parse_args

    with pytest.raises(ValueError) as trainer:
        parse_args(["--mock-data", "--tensor-model-parallel-size", "3"], world_size=4)
    with pytest.raises(ValueError) as direct:
        check_layout(4, 3, 1, 1)
    assert str(trainer.value) == str(direct.value)
    job = slurm.load_job("stage1")
    with pytest.raises(ValueError) as render:
        slurm.resolve(job, {"nodes": 1, "tensor_model_parallel_size": 3, "checkpoint_root": "/c",
                            "megatron_lm": "/m", "data_path": "/d"})
    with pytest.raises(ValueError) as direct:
        check_layout(8, 3, 2, 1, job="1 node x 8 GPUs = 8 GPUs")
    assert str(render.value) == f"stage1: {direct.value}"


def test_lighthouse_settings_are_checked_against_cp():
    with pytest.raises(ValueError, match="must be a multiple of 2\\*cp_size\\*tile_topk"):
        check_flags(["--context-parallel-size", "8", "--seq-length", "1048576", "--attention-impl",
                     "lighthouse", "--lighthouse-topk", "1536", "--lighthouse-tile-topk", "128"], world=32)
