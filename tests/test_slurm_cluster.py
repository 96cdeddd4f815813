"""The two-stage chain under a real Slurm: `lighthouse-megatron slurm submit` on a one-node
cluster started on this machine (tests/local_slurm.py), with a tiny CPU model trained by
`lighthouse-megatron train` (gloo, two processes). Stage 1 is requeued mid-run.

Skipped where Slurm is not installed or cannot start (not root); .ci/run installs it and sets
LIGHTHOUSE_MEGATRON_CI=1, which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from lighthouse_megatron.cli import main

from .local_slurm import LocalSlurm, why_unavailable

REQUIRED = os.environ.get("LIGHTHOUSE_MEGATRON_CI") == "1"
REPO = Path(__file__).resolve().parents[1]
# Stage 1 trains to STOP, stage 2 from there to TOTAL. Stage 1 is requeued at its first
# checkpoint (iteration 2); it keeps training while Slurm kills it (SIGTERM, then torchrun
# stops its workers), so STOP leaves room for that.
STOP, TOTAL = 40, 44


def _unavailable(why: str):
    if REQUIRED:
        pytest.fail(f"{why} (required in CI)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def cluster():
    why = why_unavailable()
    if why:
        _unavailable(why)
    # Not under pytest's 0700 temporary folder: munged needs its socket folder reachable.
    root = Path(tempfile.mkdtemp(prefix="lighthouse-slurm-", dir="/tmp"))
    slurm = LocalSlurm(root)
    try:
        try:
            slurm.start()
        except RuntimeError as e:
            _unavailable(f"could not start a local Slurm: {e}")
        yield slurm
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)


def tiny_recipe(root: Path) -> dict:
    """Site settings for the chain of slurm/stage1.yaml, convert.yaml, stage2.yaml, with the
    98K recipe shrunk to a CPU: 2 layers, 256 tokens, two processes (DP 2, gloo)."""
    venv = sys.prefix if sys.prefix != sys.base_prefix else ""
    return {
        "engine": "trainer", "nodes": 1, "gpus_per_node": 0, "nproc_per_node": 2,
        "tensor_model_parallel_size": 1, "context_parallel_size": 1,
        "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
        "num_query_groups": 2, "seq_length": 256, "micro_batch_size": 1, "global_batch_size": 2,
        "train_iters": TOTAL, "lr": 1e-3, "lr_warmup_iters": 2, "save_interval": 2,
        "eval_interval": 100, "eval_iters": 0, "bf16": None, "mock_data": True,
        "lighthouse_levels": 2, "lighthouse_pooling_factor": 4, "lighthouse_topk": 32,
        "lighthouse_tile_topk": 8, "lighthouse_dense_layers": [0], "lighthouse_until_iter": STOP,
        "checkpoint_root": str(root / "ckpt"), "log_dir": str(root / "logs"),
        "venv": venv, "time": "00:15:00", "extra_args": "--log-interval 1",
    }


def wait_for(what: str, predicate, timeout: float, slurm: LocalSlurm, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{slurm.logs()}\n"
                         f"{_job_logs(slurm)}")


def _job_logs(slurm: LocalSlurm) -> str:
    logs = sorted((slurm.root / "logs").glob("*.out"))
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in logs)


def tracker(path: Path) -> int:
    f = path / "latest_checkpointed_iteration.txt"
    return int(f.read_text()) if f.exists() else 0


def train_iterations(metrics: Path) -> list[int]:
    return [r["iteration"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"]


def when(record: dict, key: str) -> datetime:
    return datetime.fromisoformat(record[key])


def test_chain_with_requeue_under_slurm(cluster, tmp_path, monkeypatch, capsys):
    root = cluster.root
    cfg = root / "recipe.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(tiny_recipe(root)))
    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # conftest turns on Triton's interpreter for the kernel tests; the jobs use the PyTorch twins.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["slurm", "submit", "--config", str(cfg), "--output-dir", str(root / "jobs")]) == 0
    ids = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert list(ids) == ["stage1", "convert", "stage2"]
    stage1_dir, converted, stage2_dir = (root / "ckpt" / d for d in ("stage1-lighthouse", "stage1-dense",
                                                                     "stage2-dense"))

    # Requeue stage 1 mid-run, and let it start again at once (Slurm delays a requeued job
    # by two minutes).
    s1 = ids["stage1"]
    wait_for("stage 1's first checkpoint", lambda: tracker(stage1_dir) >= 2, 300, cluster, interval=0.05)
    cluster.run("scontrol", "requeue", s1)
    wait_for("stage 1 back in the queue", lambda: cluster.job(s1)["JobState"] == "PENDING", 60, cluster)
    # The job is pending once its batch step has ended; its srun step (torchrun stopping its
    # workers) may still be ending. Restarted before the node is idle, the new run's step 1.0
    # can collide with the old one and the job fails: wait for the node as Slurm's delay does.
    wait_for("the node to end stage 1's first run",
             lambda: cluster.run("sinfo", "-h", "-o", "%T").strip() == "idle", 100, cluster)
    cluster.run("scontrol", "update", f"JobId={s1}", "StartTime=now")

    def finished():
        jobs = {name: cluster.job(i) for name, i in ids.items()}
        ended_badly = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        bad = {n: j["JobState"] for n, j in jobs.items() if j["JobState"] in ended_badly}
        assert not bad, f"jobs ended badly: {bad}\n{cluster.logs()}\n{_job_logs(cluster)}"
        return jobs if all(j["JobState"] == "COMPLETED" for j in jobs.values()) else None

    jobs = wait_for("the chain to complete", finished, 600, cluster, interval=1)

    # In order: each stage started after the one it depends on ended (seconds resolution).
    assert when(jobs["stage1"], "EndTime") <= when(jobs["convert"], "StartTime")
    assert when(jobs["convert"], "EndTime") <= when(jobs["stage2"], "StartTime")
    assert jobs["stage1"]["Restarts"] == "1" and jobs["convert"]["Restarts"] == "0"
    assert jobs["convert"]["Dependency"] == "(null)"  # satisfied and cleared

    logs = {name: (root / "logs" / f"lighthouse-{name}-{i}.out").read_text() for name, i in ids.items()}
    # Stage 1: one log for both runs (append mode); the second resumed from its checkpoint.
    assert "restart 0" in logs["stage1"] and "restart 1" in logs["stage1"], logs["stage1"]
    resumed = re.findall(r"resuming from (\S+) at iteration (\d+)", logs["stage1"])
    assert [path for path, _ in resumed] == [str(stage1_dir)], logs["stage1"]
    at = int(resumed[0][1])
    assert 2 <= at < STOP, f"stage 1 was requeued at iteration {at}, not mid-run"
    # The first run trained (at least) to the checkpoint, the second from there to STOP.
    iters = train_iterations(stage1_dir / "metrics.jsonl")
    assert iters[:at] == list(range(1, at + 1)), iters
    assert iters[-(STOP - at):] == list(range(at + 1, STOP + 1)), iters
    assert tracker(stage1_dir) == STOP

    # The conversion read stage 1's last checkpoint and wrote the dense one.
    assert f"converting {stage1_dir} -> {converted}" in logs["convert"], logs["convert"]
    assert tracker(converted) == STOP

    # Stage 2 started from the converted checkpoint and trained densely to the end.
    assert f"starting from {converted} at iteration {STOP}" in logs["stage2"], logs["stage2"]
    assert "resuming" not in logs["stage2"]
    records = [json.loads(line) for line in (stage2_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == list(range(STOP + 1, TOTAL + 1))
    assert {r["attention"] for r in train} == {"dense"}
    assert tracker(stage2_dir) == TOTAL
    # Stage 1 trained with Lighthouse, so the chain did switch attention.
    stage1_train = [json.loads(line) for line in (stage1_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["attention"] for r in stage1_train if r["kind"] == "train"} == {"lighthouse"}
