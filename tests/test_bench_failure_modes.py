"""`python -m benchmarks.failure_modes.run` on CPU at tiny sizes: every part end to end, and
the properties its numbers rest on."""

from __future__ import annotations

import json

import pytest

from benchmarks._common import main as study_main
from benchmarks.failure_modes import run as failure_modes
from lighthouse_megatron import LighthouseConfig


def main(argv):
    return study_main(failure_modes.add_failure_modes_parser, "benchmarks.failure_modes.run", argv)

TINY = ["--device", "cpu", "--heads", "2", "--head-dim", "16", "--dtype", "fp32", "--levels", "2",
        "--pooling-factor", "2", "--tile-topk", "4", "--short-lens", "256", "--short-topks", "16,24",
        "--memory-lens", "512", "--memory-topk", "32", "--topk-len", "256", "--warmup", "0", "--reps", "1",
        "--probe-len", "512", "--probe-heads", "2", "--probe-head-dim", "16", "--probe-topk", "32",
        "--probe-tile-topk", "8", "--probe-seeds", "1"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm")
    with pytest.MonkeyPatch.context() as mp:
        # The PyTorch twins, not the Triton interpreter: the kernels have their own tests.
        mp.setenv("TRITON_INTERPRET", "0")
        assert main([*TINY, "--out", str(out)]) == 0
    return json.loads((out / "failure_modes.json").read_text())


def test_timed_parts(result):
    short = result["short"]
    assert [r["topk"] for r in short["rows"]] == [16]  # k=24 is not a multiple of T=4... recorded
    assert short["skipped"][0]["topk"] == 24 and "tile" in short["skipped"][0]["reason"]
    row = short["rows"][0]
    assert row["S"] == LighthouseConfig(levels=2, pooling_factor=2, topk=16, tile_topk=4).gathered_length(256)
    assert row["speedup"] == pytest.approx(row["dense_fwd_bwd_ms"] / row["fwd_bwd_ms"])
    assert result["memory"]["rows"][0]["S"] == 512 // 2 + 2 * 32
    # k from T up to N / p^(L-1), doubling: the largest makes S = N / 2 + 2 * N / 2.
    timings = result["topk"]["timings"]
    assert [r["topk"] for r in timings] == [4, 8, 16, 32, 64, 128]
    assert timings[-1]["S_over_N"] == 1.5


def test_qknorm_flattens_the_scores(result):
    mean = result["qknorm"]["mean"]
    assert mean["norm_cv_q"] > 0.05 and mean["norm_cv_k"] > 0.05  # real text: norms vary
    assert mean["norm_cv_q_layernormed"] < 1e-3 and mean["norm_cv_k_layernormed"] < 1e-3
    assert 0 <= mean["overlap_raw_vs_random"] <= 1 and 0 <= mean["overlap_raw_vs_layernormed"] <= 1


def test_selection_leaks_the_future_only_within_a_tile(result):
    causality = result["causality"]
    rows = causality["rows"]
    tile = rows[0]["tile_length"]
    for r in rows:
        assert r["dense_rel_change_out_upto_t"] == 0.0  # the control is exactly causal
        if r["position_in_tile"] == tile - 1:
            # Tiles select independently: the future beyond t's own tile changes nothing.
            assert r["rel_change_out_upto_t"] == 0.0
    assert any(r["rel_change_out_upto_t"] > 1e-3 for r in rows if r["position_in_tile"] < tile - 1)


def test_bad_parts_and_probe_sizes(tmp_path, capsys):
    assert main([*TINY, "--parts", "short,speed", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --parts 'short,speed': valid parts are short")
    assert main([*TINY, "--probe-len", "500", "--out", str(tmp_path)]) == 2
    assert "error: --probe-len" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_timed_parts(tmp_path):
    """On a GPU: the timed parts at small sizes, peak memory recorded."""
    args = ["--parts", "short,memory,topk", "--short-lens", "8K,16K",
            "--memory-lens", "64K", "--topk-len", "16K", "--reps", "3", "--out", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / "failure_modes.json").read_text())
    assert data["meta"]["nvidia_smi"] and {r["N"] for r in data["short"]["rows"]} == {8192, 16384}
    mem = data["memory"]["rows"][0]
    assert mem["peak_mem_gib"] > mem["inputs_gib"] > 0
    assert [r["topk"] for r in data["topk"]["timings"]] == [128, 256, 512, 1024]
