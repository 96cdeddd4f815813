"""`bench quality` and `bench retrieval` at the tiny size on CPU: the numbers in their JSON
recomputed from the trainer's metrics files and from the models' own losses, the needle's
placement, the report rows built from them, and bad input."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from lighthouse_megatron import training  # noqa: E402
from lighthouse_megatron.bench import quality, retrieval  # noqa: E402
from lighthouse_megatron.cli import main  # noqa: E402
from lighthouse_megatron.demo.report import summarize  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
RETRIEVAL = ["--lengths", "128,256", "--depths", "0,0.5,1", "--trials", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny quality study (30 iterations, switch at 20) and the retrieval probe of its models."""
    tmp = tmp_path_factory.mktemp("quality")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # the PyTorch twins: this trains
        rc = main(["bench", "quality", "--preset", "tiny", "--device", "cpu", "--work-dir", str(tmp / "work"),
                   "--out", str(tmp / "out")])
        assert rc == 0
        rc = main(["bench", "retrieval", "--quality", str(tmp / "out" / "quality.json"), *RETRIEVAL,
                   "--out", str(tmp / "out")])
        assert rc == 0
        yield tmp


def _metrics(runs):
    return {name: training.read_metrics(runs / "work" / name / "metrics.jsonl")
            for name in ("stage1", "stage2", "control")}


def _evals(records, attention="dense"):
    return {r["iteration"]: r["loss"] for r in records if r["kind"] == "eval" and r["attention"] == attention}


def test_quality_numbers_come_from_the_metrics_files(runs):
    data = json.loads((runs / "out" / "quality.json").read_text())
    m = _metrics(runs)
    n1, total = 20, 30
    assert (data["meta"]["stage1_iters"], data["meta"]["total_iters"]) == (n1, total)
    dense, rec = _evals(m["control"]), {**_evals(m["stage1"]), **_evals(m["stage2"])}
    assert data["final_dense_eval"] == {"dense": dense[total], "recovered": rec[total]}
    assert data["final_loss_gap"] == pytest.approx(rec[total] - dense[total])
    lh = _evals(m["stage1"], "lighthouse")
    train = {name: {r["iteration"]: r["loss"] for r in m[name] if r["kind"] == "train"} for name in m}
    sw = data["switch"]
    assert sw["eval_jump"] == pytest.approx(rec[n1] - lh[n1])
    assert sw["train_jump"] == pytest.approx(train["stage2"][n1 + 1] - train["stage1"][n1])
    assert sorted(train["stage1"]) == list(range(1, n1 + 1))
    assert sorted(train["stage2"]) == list(range(n1 + 1, total + 1))
    tol = data["recovery"]["tolerance"]
    within = [i for i in sorted(dense) if i > n1 and rec[i] <= dense[i] + tol]
    assert data["recovery"]["iteration"] == (within[0] if within else None)
    step_s = {name: len(times) * statistics.median(times) for name in m
              for times in [[r["time_per_iter_s"] for r in m[name] if r["kind"] == "train"]]}
    c = data["cost"]
    assert c["two_stage_step_s"] == pytest.approx(step_s["stage1"] + step_s["stage2"])
    assert c["step_s_ratio"] == pytest.approx((step_s["stage1"] + step_s["stage2"]) / step_s["control"])
    speeds = [r["tokens_per_s"] for r in m["control"] if r["kind"] == "train"][1:]
    assert c["tokens_per_s"]["dense"] == pytest.approx(statistics.median(speeds))
    assert c["tokens"]["two_stage"] == c["tokens"]["dense"] == total * 2 * 256  # same token budget
    claim = data["claim"]
    assert claim["held"] == (data["final_loss_gap"] <= tol and c["step_s_ratio"] < 1)
    # The final models are kept where the JSON says, and the plot is written.
    for name, root in data["checkpoints"].items():
        assert training.checkpointing.read_tracker(root) == total, name
    assert (runs / "out" / "quality.png").read_bytes()[:8] == PNG


def test_quality_verdicts_follow_the_numbers(runs):
    """The same analysis with the recovered model's evaluations made worse: the loss check fails."""
    m = _metrics(runs)
    seconds = dict.fromkeys(("stage1", "convert", "stage2", "control"), 1.0)
    config = {"global_batch_size": 2, "seq_length": 256}
    res = quality.analyze(m, summarize(m, seconds, 20, 30, config), 20, 30, tolerance=0.02)
    worse = {**m, "stage2": [{**r, "loss": r["loss"] + 1.0} if r["kind"] == "eval" else r
                             for r in m["stage2"]]}
    bad = quality.analyze(worse, summarize(worse, seconds, 20, 30, config), 20, 30, tolerance=0.02)
    assert bad["final_loss_gap"] == pytest.approx(res["final_loss_gap"] + 1.0)
    assert not bad["claim"]["loss"]["ok"] and not bad["claim"]["held"] and bad["recovery"]["steps"] is None
    assert res["claim"]["loss"]["ok"] == (res["final_loss_gap"] <= 0.02)


def test_time_budget_skips_stages(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    data = json.loads((runs / "out" / "quality.json").read_text())["data_prefix"]
    rc = main(["bench", "quality", "--preset", "tiny", "--device", "cpu", "--data-path", data,
               "--time-budget", "1e-6", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert rc == 1 and result["meta"]["skipped"] == ["stage1", "convert", "stage2", "control"]
    assert "final_loss_gap" not in result and not (tmp_path / "work" / "stage1" / "metrics.jsonl").exists()


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


def test_retrieval_scores_are_the_models_losses(runs, monkeypatch):
    """Each cell's loss equals the model's own per-token loss (GPTModel with labels, a separate
    path from the probe's logits) on the value tokens of the regenerated samples."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    data = json.loads((runs / "out" / "retrieval.json").read_text())
    q = json.loads((runs / "out" / "quality.json").read_text())
    meta = data["meta"]
    assert (meta["lengths"], meta["depths"], meta["trials"]) == ([128, 256], [0.0, 0.5, 1.0], 2)
    text = retrieval.held_out_tokens(q["data_prefix"], "969,30,1")
    root = q["checkpoints"]["dense"]
    with training.checkpoint_model(root, "cpu") as (model, _, _):
        for cell in data["models"]["dense"]["cells"][::2]:
            samples = [retrieval.make_sample(text, cell["length"], cell["depth"], t, meta["seed"],
                                             meta["digits"]) for t in range(cell["trials"])]
            tokens = torch.as_tensor(np.stack([s.tokens for s in samples]))
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            with torch.no_grad():
                losses = model(input_ids=inputs, position_ids=torch.arange(inputs.shape[1]).expand_as(inputs),
                               attention_mask=None, labels=labels)
            v = samples[0].value_start - 1  # labels[v:] are the value tokens
            direct = losses[:, v:].mean(dim=1).mean().item()
            assert cell["loss"] == pytest.approx(direct, rel=1e-4, abs=1e-5), cell
            # One position off scores other tokens: the check tells positions apart.
            assert losses[:, v - 1:-1].mean().item() != pytest.approx(direct, rel=1e-4)
            assert 0 <= cell["exact"] <= cell["token_accuracy"] <= 1
    for name in ("dense", "recovered"):
        s = data["models"][name]["summary"]
        assert s["loss"] == pytest.approx(statistics.fmean(c["loss"] for c in data["models"][name]["cells"]))
    assert data["accuracy_gap"] == pytest.approx(data["models"]["recovered"]["summary"]["token_accuracy"]
                                                 - data["models"]["dense"]["summary"]["token_accuracy"])
    assert data["verdict"]["ok"] == (data["accuracy_gap"] >= -retrieval.TOLERANCE)
    assert (runs / "out" / "retrieval.png").read_bytes()[:8] == PNG


def test_report_rows_from_the_runs(runs, tmp_path):
    for kind in ("quality", "retrieval"):
        (tmp_path / kind).mkdir()
        shutil.copy(runs / "out" / f"{kind}.json", tmp_path / kind)
    assert main(["bench", "report", "--root", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    claims = text.split("## What did not reproduce")[0]
    q = json.loads((runs / "out" / "quality.json").read_text())
    r = json.loads((runs / "out" / "retrieval.json").read_text())
    assert f"{q['final_loss_gap']:+.3f} (recovered {q['final_dense_eval']['recovered']:.3f}" in claims
    assert f"{q['cost']['step_s_ratio']:.2f}x" in claims
    assert f"{r['accuracy_gap']:+.3f} value token accuracy" in claims
    gaps = text.split("## What did not reproduce")[1].split("## Plots")[0]
    assert ("**Did not reproduce**: The same two runs" in gaps) == (q["cost"]["step_s_ratio"] >= 1)
    assert "Not yet measured**: Recovered" not in gaps and "Not yet measured**: Needle" not in gaps
    for png in ("quality_loss.png", "retrieval_heatmap.png"):
        assert f"(report/{png})" in text and (tmp_path / "report" / png).read_bytes()[:8] == PNG


@pytest.mark.parametrize("argv, needle", [
    (["quality", "--preset", "tiny", "--switch", "7"], "--switch 7"),
    (["quality", "--preset", "tiny", "--steps", "1"], "--steps"),
    (["quality", "--preset", "tiny", "--seq-length", "100"], "--seq-length 100"),
    (["quality", "--preset", "tiny", "--data-path", "/nonexistent/data"], "--data-path"),
    (["retrieval", "--quality", "/nonexistent/quality.json"], "--quality"),
    (["retrieval", "--lengths", "512"], "--lengths 512"),
    (["retrieval", "--depths", "0,1.5"], "--depths"),
    (["retrieval", "--trials", "0"], "--trials"),
])
def test_bad_input_is_one_error_line(runs, tmp_path, capsys, argv, needle):
    capsys.readouterr()
    if argv[0] == "retrieval" and "--quality" not in argv:
        argv = [*argv, "--quality", str(runs / "out" / "quality.json")]
    rc = main(["bench", *argv, "--device", "cpu", "--out", str(tmp_path / "out"),
               *(["--work-dir", str(tmp_path / "work")] if argv[0] == "quality" else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.gpu
def test_quality_and_retrieval_on_gpu(tmp_path):
    """A short run of the default model on the GPU (bf16, TE where it imports), then the probe."""
    out = tmp_path / "out"
    assert main(["bench", "quality", "--steps", "100", "--eval-interval", "25", "--switch", "75",
                 "--device", "cuda", "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    data = json.loads((out / "quality.json").read_text())
    assert data["meta"]["config"]["device"] == "cuda" and math.isfinite(data["final_loss_gap"])
    assert main(["bench", "retrieval", "--quality", str(out / "quality.json"), "--trials", "1",
                 "--out", str(out)]) == 0
    assert json.loads((out / "retrieval.json").read_text())["meta"]["device"] != "cpu"


@pytest.mark.parametrize("preset", sorted(quality.PRESETS))
def test_the_preset_sets_the_switch(preset):
    """Without --steps or --switch, stage 1 runs the preset's Lighthouse iterations; with
    --steps, the same share of them, on an evaluation."""
    p = quality.PRESETS[preset]
    flags = dict(preset=preset, steps=None, eval_interval=None, switch=None, tolerance=0.02, seq_length=None)
    config, switch = quality.settings(argparse.Namespace(**flags))
    assert (switch, config["train_iters"]) == (p.stage1_iters, p.stage1_iters + p.stage2_iters)
    steps = 3 * (p.stage1_iters + p.stage2_iters)
    config, switch = quality.settings(argparse.Namespace(**{**flags, "steps": steps}))
    assert switch % config["eval_interval"] == 0
    assert abs(switch - 3 * p.stage1_iters) < config["eval_interval"]
