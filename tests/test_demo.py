"""`lighthouse-megatron demo`: the two-stage workflow end to end at the --tiny size, its checks
(which must be able to fail), and the single-layer mode."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lighthouse_megatron.cli import main
from lighthouse_megatron.demo import report
from lighthouse_megatron.demo.workflow import MODEL, PRESETS

REPO = Path(__file__).resolve().parents[1]


def test_two_stage_workflow_tiny(tmp_path, capsys, monkeypatch):
    # The PyTorch twins, not the Triton interpreter the kernel tests run on CPU: this test
    # trains, and the interpreter is a hundred times slower.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "demo"
    rc = main(["demo", "--tiny", "--out", str(out), "--device", "cpu"])
    stdout, stderr = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["stage"]: r for r in summary["rows"]}
    start, final = rows["stage1"]["start_loss"], rows["stage2"]["eval_dense"]
    assert math.isfinite(final) and final < start, (start, final)
    # stage 2 is its own run that loaded the converted checkpoint: it starts after stage 1
    assert rows["stage2"]["iterations"] == f"{PRESETS['tiny'].stage1_iters + 1}-{summary['total_iters']}"
    assert rows["control"]["tokens"] == rows["two-stage"]["tokens"]  # the same token budget
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "stage1-dense" / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
    labels = ("stage 1: Lighthouse", "stage 2: dense recovery", "control: dense from scratch", "tokens/s")
    assert all(label in stdout for label in labels)
    check_lines = [line for line in stdout.splitlines() if line.startswith("check ")]
    assert len(check_lines) == len(summary["checks"]) == 3
    verdicts = [line.endswith(" ok") for line in check_lines]
    assert verdicts == [c["ok"] for c in summary["checks"]]
    assert rc == (0 if all(c["ok"] for c in summary["checks"]) else 1)
    assert rc == 0, stdout[-3000:]
    # Not on a terminal (no progress bar): a compact log, every iteration in each stage's train.log.
    shown = [line for line in stdout.splitlines() if line.startswith("[train] ")]
    assert shown == [line for line in shown if " iteration=25 " in line] and len(shown) == 2, shown
    for stage, iterations in (("stage1", range(1, 21)), ("stage2", range(21, 33)), ("control", range(1, 33))):
        logged = [line for line in (out / stage / "train.log").read_text().splitlines()
                  if line.startswith("[train] ")]
        assert [int(line.split()[1].split("=")[1]) for line in logged] == list(iterations)

    # A second run refuses to replace the first one's results without --force.
    before = (out / "summary.json").read_bytes()
    assert main(["demo", "--tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "--force" in err[0]
    assert (out / "summary.json").read_bytes() == before


def test_a_stopped_demo_says_so_in_one_line(tmp_path):
    """SIGTERM while stage 1 trains: the trainer stops at the end of an iteration and the demo
    prints one line and exits 128 + 15, as a shell reports a process ended by the signal."""
    out = tmp_path / "demo"
    env = dict(os.environ, TRITON_INTERPRET="0")
    command = [sys.executable, "-m", "lighthouse_megatron.cli", "demo", "--tiny", "--device", "cpu",
               "--out", out]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    log = out / "stage1" / "train.log"
    deadline = time.monotonic() + 300
    while not (log.exists() and "[train] " in log.read_text()) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if "demo" in line or "Traceback" in line]
    assert lines == [f"lighthouse-megatron demo: stopped by SIGTERM; what it wrote so far is in {out} "
                     "(a rerun starts over with --force)"]
    assert not (out / "summary.json").exists()


def _records(losses, first_iteration=1, attention="dense", evals=()):
    recs = [{"kind": "train", "iteration": first_iteration + i, "loss": loss, "tokens_per_s": 1000.0,
             "attention": attention} for i, loss in enumerate(losses)]
    recs += [{"kind": "eval", "iteration": it, "loss": loss, "attention": att} for it, att, loss in evals]
    return recs


def _rows(stage2_losses, stage2_eval, control_eval):
    metrics = {
        "stage1": _records([5.5, 5.0, 4.5, 4.0], attention="lighthouse",
                           evals=[(4, "lighthouse", 4.1), (4, "dense", 4.3)]),
        "stage2": _records(stage2_losses, first_iteration=5, evals=[(6, "dense", stage2_eval)]),
        "control": _records([5.5, 5.0, 4.5, 4.0, 3.9, 3.8], evals=[(6, "dense", control_eval)]),
    }
    config = {**MODEL, "global_batch_size": 1, "seq_length": 512}
    seconds = dict.fromkeys(["stage1", "convert", "stage2", "control"], 1.0)
    return report.summarize(metrics, seconds, 4, 6, config), config


def test_checks_pass_and_fail_on_the_numbers(capsys):
    rows, config = _rows([3.95, 3.85], stage2_eval=3.80, control_eval=3.82)
    assert [c["ok"] for c in report.check_results(rows)] == [True, True, True]
    # Stage 2 that started from fresh weights, ends worse than the control, and a NaN.
    rows, _ = _rows([5.5, 5.2], stage2_eval=3.80 + report.MATCH_TOLERANCE + 0.01 + 0.02, control_eval=3.80)
    assert [c["ok"] for c in report.check_results(rows)] == [False, True, False]
    rows, _ = _rows([3.95, 3.85], stage2_eval=float("nan"), control_eval=3.82)
    checks = report.check_results(rows)
    assert [c["ok"] for c in checks] == [True, False, False]
    report.print_checks(checks, rows, config)
    out = capsys.readouterr().out
    assert out.count("FAILED") == 2 and "info " in out


def test_demo_model_is_examples_tiny():
    assert yaml.safe_load((REPO / "lighthouse_megatron" / "recipes" / "tiny.yaml").read_text()) == MODEL
    assert PRESETS["default"].config() == MODEL


def test_layer_mode(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the twins: test_ops covers the kernels
    rc = main(["demo", "--layer", "--seq-len", "1024", "--topk", "64", "--tile-topk", "16"])
    out = capsys.readouterr().out
    assert rc == 0
    checks = [line for line in out.splitlines() if line.strip().startswith("check")]
    assert len(checks) == 2 and all(line.endswith("ok") for line in checks)
    assert "info" in out and "gathered length S" in out


@pytest.mark.parametrize("argv, needle", [(["--seq-len", "1000"], "sequence length 1000")])
def test_layer_mode_bad_sizes(capsys, argv, needle):
    assert main(["demo", "--layer", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lighthouse-megatron demo: error:") and needle in err[0]


@pytest.mark.gpu
def test_two_stage_workflow_on_gpu(tmp_path, capsys):
    """The default demo on a GPU (bf16): all checks pass, stage 2 resumed stage 1."""
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--device", "cuda"])
    stdout = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["device"] == "cuda"
    assert rc == 0 and all(c["ok"] for c in summary["checks"]), stdout[-3000:]
    assert (out / "loss.png").is_file()
