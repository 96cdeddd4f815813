"""`python -m benchmarks.quality` at the tiny size on CPU: the per-seed numbers recomputed
from the trainer's metrics files, the aggregates and verdicts recomputed independently, the leak
probe (exactly 0 under dense attention, not under Lighthouse), the passkey generator, the job
runner, the switch and schedule flags, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("megatron.core")

from benchmarks import passkey, quality, retrieval  # noqa: E402
from benchmarks._common import main as study_main  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def main(argv):
    return study_main(quality.add_quality_parser, "benchmarks.quality", argv)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study: 2 seeds, the paper's protocol (switch at 25 of 40), leak probe and retrieval."""
    tmp = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}  # the PyTorch twins: this trains
    argv = [sys.executable, "-m", "benchmarks.quality", "--preset", "tiny", "--seeds", "2", "--jobs", "2",
            "--device", "cpu", "--retrieval-trials", "1", "--out", str(tmp / "out"), "--work-dir",
            str(tmp / "work")]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, json.loads((tmp / "out" / "paper_protocol_tiny.json").read_text()), proc.stdout


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_seed_rows_come_from_the_metrics_files(study):
    tmp, data, _ = study
    iters, switch = 40, 25  # 62.5% of 40
    assert data["meta"]["iters"] == iters and data["meta"]["seeds"] == 2
    rows = {r["seed"]: r for r in data["rows"]}
    assert sorted(rows) == [1, 2] and all(r["switch"] == switch for r in rows.values())
    first_losses = []
    for seed, row in rows.items():
        base = tmp / "work" / "constant" / f"seed{seed}"
        dense = _records(base / "dense" / "metrics.jsonl")
        s1 = _records(base / f"lighthouse_{switch}" / "metrics.jsonl")
        s2 = _records(base / f"recovered_{switch}" / "metrics.jsonl")
        train = lambda recs: {r["iteration"]: r["loss"] for r in recs if r["kind"] == "train"}  # noqa: E731
        ev = lambda recs, a="dense": {r["iteration"]: r["loss"] for r in recs  # noqa: E731
                                      if r["kind"] == "eval" and r["attention"] == a}
        # Stage 1 is Lighthouse up to the switch; stage 2 resumes right after it, dense.
        assert sorted(train(s1)) == list(range(1, switch + 1))
        assert sorted(train(s2)) == list(range(switch + 1, iters + 1))
        assert {r["attention"] for r in s1 if r["kind"] == "train"} == {"lighthouse"}
        assert {r["attention"] for r in s2 if r["kind"] == "train"} == {"dense"}
        # The last 5% of 40 iterations: 39 and 40.
        want = np.mean([train(s2)[i] - train(dense)[i] for i in (39, 40)])
        assert row["final_train_gap"] == pytest.approx(want, abs=1e-12)
        assert row["final_heldout_gap"] == pytest.approx(ev(s2)[iters] - ev(dense)[iters], abs=1e-12)
        assert row["spike"] == pytest.approx(train(s2)[switch + 1] - train(s1)[switch], abs=1e-12)
        assert row["stage1_gap"] == pytest.approx(ev(s1, "lighthouse")[switch] - ev(dense)[switch], abs=1e-12)
        first_losses.append(train(dense)[1])
    assert first_losses[0] != first_losses[1]  # each seed its own initialisation and data


def test_aggregates_and_verdicts(study):
    _, data, out = study
    paper = data["paper_protocol"]
    gaps = np.array([r["final_train_gap"] for r in sorted(data["rows"], key=lambda r: r["seed"])])
    sd = float(np.std(gaps, ddof=1))
    se = sd / math.sqrt(2)
    assert paper["final_train_gap"]["mean"] == pytest.approx(gaps.mean(), abs=1e-12)
    assert paper["final_train_gap"]["std"] == pytest.approx(sd, rel=1e-9)
    threshold = max(0.02, 2 * se)
    word = "beats" if gaps.mean() < -threshold else "matches" if gaps.mean() <= threshold else "worse"
    assert paper["verdict_train"]["verdict"] == word
    assert paper["verdict_train"]["threshold"] == pytest.approx(threshold, rel=1e-9)
    assert "max(0.02, 2 x standard error" in data["meta"]["verdict_rule"]
    assert data["meta"]["command"].startswith("python -m benchmarks.quality --preset tiny")
    assert f"paper protocol (constant, switch at 25): recovered vs dense {word}" in out
    assert (study[0] / "out" / "paper_protocol_tiny.png").read_bytes()[:8] == PNG
    assert all(j["status"] == "ok" for j in data["jobs"])


@pytest.mark.parametrize("gaps, word", [
    ([0.01], "cannot tell"),
    ([-0.10, -0.11, -0.09], "beats"),
    ([0.10, 0.12, 0.11], "worse"),
    ([0.05, -0.05, 0.06], "matches"),  # noisy: 2 x se = 0.071 > 0.02
    ([0.015, 0.018, 0.016], "matches"),
])
def test_verdict_rule(gaps, word):
    v = quality.verdict(gaps, 0.02)
    assert v["verdict"] == word
    if len(gaps) > 1:
        se = float(np.std(gaps, ddof=1)) / math.sqrt(len(gaps))
        assert v["threshold"] == pytest.approx(max(0.02, 2 * se))


def test_leak_probe_is_zero_under_dense_attention_only(study):
    _, data, _ = study
    lp = data["leak_probe"]
    assert [r["seed"] for r in lp["rows"]] == [1, 2]
    for row in lp["rows"]:
        for model in ("lighthouse_trained", "dense_trained"):
            assert row[model]["dense"]["max_abs"] == 0.0  # causal: exactly 0
        # Lighthouse's per-tile selection sees the tile's later tokens: the loss before t moves.
        assert row["lighthouse_trained"]["lighthouse"]["max_abs"] > 0
        assert row["check"]["ok"] and all(0 < t % row["tile_length"] for t in row["positions"])
    assert lp["aggregate"]["dense_exactly_zero"] is True


def test_retrieval_rows_for_every_seed(study):
    _, data, _ = study
    rows = data["retrieval"]["rows"]
    assert [r["seed"] for r in rows] == [1, 2]
    for r in rows:
        assert r["accuracy_gap"] == pytest.approx(r["recovered"]["summary"]["token_accuracy"]
                                                  - r["dense"]["summary"]["token_accuracy"])
    pk = data["meta"]["data"]["passkey"]
    assert pk["documents"] > 0 and 0.03 < pk["fraction_of_bytes"] < 0.08 and pk["lengths"] == [96, 200]


def test_passkey_document():
    text = bytes(range(32, 127)) * 50
    docs = passkey.passkey_documents(text, 20, 96, 200, seed=3)
    assert len(docs) == 20 and all(96 <= len(d.document) <= 200 for d in docs)
    for d in docs:
        needle = retrieval.NEEDLE.format(word=d.word, value=d.value).encode()
        assert d.document[d.needle_start:d.needle_start + len(needle)] == needle
        assert d.document[d.value_start:] == d.value.encode() and len(d.value) == 6
        assert d.document[:d.value_start].endswith(retrieval.QUERY.format(word=d.word).encode())
        # Byte tokens, as prepare-data writes them, decode back to the document.
        assert bytes(retrieval.encode(d.document.decode()).astype(np.uint8)) == d.document
        rest = d.document[:d.needle_start] + d.document[d.needle_start + len(needle):d.value_start - len(
            retrieval.QUERY.format(word=d.word))]
        assert rest in text  # the haystack is one window of the text
    assert len({d.value for d in docs}) > 15  # random values
    with pytest.raises(ValueError, match="passkey documents"):
        passkey.passkey_documents(text, 1, 50, 60, seed=0)


def test_job_runner_skips_after_a_failure_and_past_the_budget(tmp_path):
    py = sys.executable
    jobs = [quality.Job("a", [py, "-c", "print('a')"], tmp_path / "a.log", 1),
            quality.Job("b", [py, "-c", "raise SystemExit(3)"], tmp_path / "b.log", 1),
            quality.Job("c", [py, "-c", "print('c')"], tmp_path / "c.log", 1, deps=["b"]),
            quality.Job("d", [py, "-c", "print('d')"], tmp_path / "d.log", 1, deps=["a"]),
            quality.Job("e", [py, "-c", "print('e')"], tmp_path / "e.log", 10_000)]
    import time

    quality.run_jobs(jobs, 2, time.monotonic() + 60, dict(os.environ))
    status = {j.name: (j.status, j.rc) for j in jobs}
    assert status == {"a": ("ok", 0), "b": ("failed", 3), "c": ("skipped", None), "d": ("ok", 0),
                      "e": ("skipped", None)}
    assert (tmp_path / "d.log").read_text().splitlines()[-1] == "d"
    assert jobs[2].why == "b failed" and jobs[4].why == "time budget"


def test_switch_flag():
    assert {quality.parse_switch(s) for s in ("62.5", "62.5%", "0.625")} == {0.625}
    assert quality.parse_switch("80") == 0.8
    for bad in ("0", "100", "150%", "x", "-5"):
        with pytest.raises(quality.UsageError, match="--switch"):
            quality.parse_switch(bad)
    assert quality.switch_iteration(0.625, 1000, 25) == 625
    assert quality.switch_iteration(0.8, 40, 1) == 32


@pytest.mark.parametrize("schedule", quality.SCHEDULES)
def test_schedules_are_valid_trainer_settings(schedule):
    from lighthouse_megatron.training import settings_args

    s = quality.schedule_settings(schedule, 1000, 1.5e-3, 0.2)
    args = settings_args({**quality.PRESETS["tiny"].model, **quality.OPTIMIZER, **s, "train_iters": 1000,
                          "mock_data": True, "device": "cpu"}, world_size=1)
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert args.lr_warmup_iters == 125  # the paper's 2,000 of 16,000
    style = {"constant": "constant", "cosine": "cosine", "wsd": "WSD"}[schedule]
    assert args.lr_decay_style == style
    if schedule == "wsd":
        assert args.lr_wsd_decay_iters == 200


@pytest.mark.parametrize("argv, needle", [
    (["--switch", "0"], "--switch"),
    (["--switches", "50,abc"], "--switch"),
    (["--schedules", "constant,step"], "--schedules"),
    (["--seeds", "0"], "--seeds"),
    (["--passkey-fraction", "0.7"], "--passkey-fraction"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, needle):
    capsys.readouterr()
    rc = main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_package_imports_no_benchmark():
    code = ("import sys, lighthouse_megatron; "
            "print([m for m in sys.modules if m.startswith(('benchmarks', 'lighthouse_megatron.bench'))])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_needle_placement():
    hay = np.arange(1000, 1200)  # ids no byte has: easy to tell apart
    for depth in (0.0, 0.3, 1.0):
        s = retrieval.plant(hay, depth, "bakotu", "123456")
        needle = retrieval.encode(retrieval.NEEDLE.format(word="bakotu", value="123456"))
        d = round(depth * len(hay))
        assert s.needle_start == d
        assert np.array_equal(s.tokens[:d], hay[:d])
        assert np.array_equal(s.tokens[d:d + len(needle)], needle)
        assert np.array_equal(s.tokens[d + len(needle):d + len(needle) + len(hay) - d], hay[d:])
        assert bytes(s.tokens[s.value_start:].astype(np.uint8)).decode() == "123456"
        query = bytes(s.tokens[s.value_start - 31:s.value_start].astype(np.uint8)).decode()
        assert query.endswith("# The secret key for bakotu is ")
    # Whole samples: the requested length, the value last, seeded.
    text = np.arange(5000) % 200 + 1000
    s = retrieval.make_sample(text, 300, 0.5, trial=1, seed=7, digits=4)
    room = 300 - retrieval.fixed_tokens(4)
    assert len(s.tokens) == 300 and s.value_start == 296 and s.needle_start == round(0.5 * room)
    assert bytes(s.tokens[296:].astype(np.uint8)).decode() == s.value and len(s.word) == 6
    again = retrieval.make_sample(text, 300, 0.5, trial=1, seed=7, digits=4)
    other = retrieval.make_sample(text, 300, 0.5, trial=2, seed=7, digits=4)
    assert np.array_equal(s.tokens, again.tokens) and (other.word, other.value) != (s.word, s.value)


@pytest.mark.gpu
def test_quality_study_on_gpu(tmp_path):
    """A short default-preset study on the GPU (bf16, TE where it imports): 2 seeds, 160 iterations."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    argv = [sys.executable, "-m", "benchmarks.quality", "--iters", "160", "--eval-interval", "20",
            "--seeds", "2", "--no-retrieval", "--device", "cuda", "--out", str(tmp_path / "out")]
    subprocess.run(argv, cwd=REPO, check=True, timeout=900)
    data = json.loads((tmp_path / "out" / "paper_protocol.json").read_text())
    assert data["paper_protocol"] is not None and data["leak_probe"]["aggregate"]["dense_exactly_zero"]
