"""`lighthouse-megatron bench layer`: argument parsing and the report, without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from lighthouse_megatron.bench import layer
from lighthouse_megatron.cli import main
from lighthouse_megatron.settings.bench import format_length, parse_lengths


def test_sizes_parse_with_suffixes():
    assert parse_lengths("32K, 1M,4096") == [32768, 1 << 20, 4096]
    assert format_length(1 << 20) == "1M" and format_length(131072) == "128K" and format_length(100) == "100"


@pytest.mark.parametrize("command, flag, value, message", [
    ("layer", "--seq-lens", "-1", "expected a number of tokens such as 4096, 32K or 1M, got '-1'"),
    ("layer", "--seq-lens", "32K,0", "expected comma-separated positive numbers such as 4096, 32K or 1M, "
                                     "got '32K,0'"),
    ("layer", "--topks", ",", "expected comma-separated positive numbers"),
    ("e2e", "--seq-lens", "9x", "expected a number of tokens such as 4096, 32K or 1M, got '9x'"),
    ("e2e", "--dense-max-len", "1.5K", "expected a number of tokens such as 4096, 32K or 1M, got '1.5K'"),
])
def test_bad_lengths_fail_when_parsed_before_any_device_check(capsys, command, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", command, f"{flag}={value}"])
    assert exit_.value.code == 2
    assert f"error: argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_needs_a_gpu(capsys):
    assert main(["bench", "layer", "--seq-lens", "32K"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_report_from_rows(tmp_path, capsys):
    """The table and the plot from rows shaped like a real run's."""
    stages = dict.fromkeys(["scores", "select", "gather", "attention_fwd", "scatter", "scatter_bwd",
                            "attention_fwd_bwd", "gather_bwd", "attention_bwd"], 1.0)
    rows = []
    for n in (65536, 131072):
        rows.append({"N": n, "topk": 2048, "S": 20480, "fwd_ms": 2.0, "fwd_bwd_ms": 6.0,
                     "peak_mem_gib": 1.5, "floor_fwd_ms": 1.8, "floor_fwd_bwd_ms": 5.5, "fwd_vs_floor": 1.1,
                     "fwd_bwd_vs_floor": 1.09, "around_attention_frac": 0.15, "stages_ms": stages,
                     "dense_fwd_ms": 14.0, "dense_fwd_bwd_ms": 55.0})
    rows[1].pop("dense_fwd_ms")
    rows[1].pop("dense_fwd_bwd_ms")
    layer.print_stages(rows)
    layer.print_table(rows, "test card")
    out = capsys.readouterr().out
    assert "9.2x" in out and "test card" in out  # dense 55 ms / Lighthouse 6 ms
    pytest.importorskip("matplotlib")
    layer.plot(rows, {65536: {"dense_fwd_ms": 14.0, "dense_fwd_bwd_ms": 55.0}}, tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").stat().st_size > 0
    json.dumps(rows)  # rows stay JSON-serialisable


def test_version(capsys):
    from lighthouse_megatron import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lighthouse-megatron {__version__}"


def test_bad_settings_are_one_error_line(monkeypatch, capsys):
    def run(args):  # what a subcommand does with a bad setting: LighthouseConfig's ValueError
        from lighthouse_megatron import LighthouseConfig

        LighthouseConfig(topk=100)

    monkeypatch.setattr(layer, "run", run)
    assert main(["bench", "layer"]) == 2
    err = capsys.readouterr().err
    assert err == "error: lighthouse topk must be a positive multiple of tile_topk=128, got 100; " \
                  "nearest valid: 128\n"
    with pytest.raises(SystemExit) as e:
        main(["bench", "layer", "--backend", "cuda"])
    assert e.value.code == 2 and "invalid choice: 'cuda'" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_bench_layer_te_in_a_fresh_process(tmp_path):
    """`--backend te` loads Transformer Engine before torch first uses cuDNN, so TE's fused
    attention and torch's cuDNN work side by side (needs TE installed)."""
    import subprocess
    import sys

    from lighthouse_megatron.backends import te_available

    if not te_available():
        pytest.skip("transformer_engine.pytorch does not import here")
    argv = ["bench", "layer", "--backend", "te", "--seq-lens", "64K", "--topks", "2048",
            "--dense-max-len", "64K", "--reps", "3", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "lighthouse_megatron.cli", *argv], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "layer.json").read_text())
    assert report["meta"]["transformer_engine"] is True and report["meta"]["backend"] == "te"
    assert report["meta"]["check"]["out"] < 1e-2  # checked against the reference with TE in stage 5
    assert len(report["rows"]) == 1 and report["rows"][0]["fwd_bwd_ms"] > 0
