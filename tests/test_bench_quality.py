"""`bench quality` and `bench retrieval` at a tiny size on the CPU: the numbers in their JSON
are recomputed here from the runs' metrics files and from the models' own logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lighthouse_megatron import training
from lighthouse_megatron.bench import retrieval
from lighthouse_megatron.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch twins: the kernels have their own tests
        assert main(["bench", "quality", "--preset", "tiny", "--device", "cpu",
                     "--work-dir", str(root / "work"), "--out", str(root / "out")]) == 0
        assert main(["bench", "retrieval", "--quality", str(root / "out" / "quality.json"), "--device", "cpu",
                     "--trials", "2", "--depths", "0,1", "--out", str(root / "out")]) == 0
    return root


def _evals(path: Path, attention: str) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in training.read_metrics(path)
            if r["kind"] == "eval" and r["attention"] == attention}


def test_quality_numbers_are_the_runs_metrics(runs):
    q = json.loads((runs / "out" / "quality.json").read_text())
    work = runs / "work"
    n1, total = q["meta"]["stage1_iters"], q["meta"]["total_iters"]
    dense = _evals(work / "control" / "metrics.jsonl", "dense")
    recovered = {**_evals(work / "stage1" / "metrics.jsonl", "dense"),
                 **_evals(work / "stage2" / "metrics.jsonl", "dense")}
    lighthouse = _evals(work / "stage1" / "metrics.jsonl", "lighthouse")
    assert q["final_dense_eval"] == {"dense": dense[total], "recovered": recovered[total]}
    assert q["final_loss_gap"] == pytest.approx(recovered[total] - dense[total])
    assert q["switch"]["eval_jump"] == pytest.approx(recovered[n1] - lighthouse[n1])
    # Recovery: the first shared evaluation after the switch within the tolerance, none before it.
    tol = q["recovery"]["tolerance"]
    after = [i for i in sorted(set(dense) & set(recovered)) if i > n1]
    within = [i for i in after if recovered[i] <= dense[i] + tol]
    assert q["recovery"]["iteration"] == (within[0] if within else None)
    # The claim is computed from the numbers and the stated thresholds.
    claim = q["claim"]
    assert claim["loss"]["ok"] == (q["final_loss_gap"] <= tol)
    assert claim["cost"]["ok"] == (q["cost"]["step_s_ratio"] < 1)
    assert claim["held"] == (claim["loss"]["ok"] and claim["cost"]["ok"])
    # Both arms trained: their final dense eval losses are finite and below the first evaluation's.
    for curve in (dense, recovered):
        assert np.isfinite(curve[total]) and curve[total] < curve[min(curve)]
    assert (runs / "out" / "quality.png").stat().st_size > 0
    assert Path(q["checkpoints"]["dense"]).is_dir() and Path(q["checkpoints"]["recovered"]).is_dir()


def test_needle_is_where_the_sample_says():
    haystack = retrieval.encode("abcdefghij" * 20)
    for depth in (0.0, 0.5, 1.0):
        s = retrieval.plant(haystack, depth, "bakomi", "123456")
        text = bytes(s.tokens.astype(np.uint8)).decode()
        needle = retrieval.NEEDLE.format(word="bakomi", value="123456")
        assert text[s.needle_start:].startswith(needle) and s.needle_start == round(depth * len(haystack))
        assert text[s.value_start:] == "123456"
        assert text[:s.value_start].endswith(retrieval.QUERY.format(word="bakomi"))
    sample = retrieval.make_sample(haystack, 150, 0.25, trial=0, seed=1, digits=6)
    assert len(sample.tokens) == 150 and len(sample.value) == 6


def test_retrieval_scores_are_the_models_logits(runs):
    r = json.loads((runs / "out" / "retrieval.json").read_text())
    q = json.loads((runs / "out" / "quality.json").read_text())
    cell = next(c for c in r["models"]["recovered"]["cells"] if c["depth"] == 1)
    losses = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        with training.checkpoint_model(q["checkpoints"]["recovered"], device="cpu") as (model, args, _):
            text = retrieval.held_out_tokens(q["data_prefix"], args.split)
            meta = r["meta"]
            samples = [retrieval.make_sample(text, cell["length"], 1.0, t, meta["seed"], meta["digits"])
                       for t in range(cell["trials"])]
            with training.dense_attention(model), torch.no_grad():
                for s in samples:
                    tokens = torch.as_tensor(s.tokens)[None]
                    logits = model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1])[None],
                                   attention_mask=None).float()[0]
                    value = tokens[0, s.value_start:]
                    losses.append(F.cross_entropy(logits[s.value_start - 1:-1], value).item())
    assert cell["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-4)
    assert r["accuracy_gap"] == pytest.approx(r["models"]["recovered"]["summary"]["token_accuracy"]
                                              - r["models"]["dense"]["summary"]["token_accuracy"])


@pytest.mark.parametrize("argv, message", [
    (["quality", "--preset", "tiny", "--steps", "30", "--switch", "7"], "--switch 7 must"),
    (["quality", "--preset", "tiny", "--tolerance", "-1"], "--tolerance must be >= 0"),
])
def test_bad_settings_are_one_error_line(argv, message, tmp_path, capsys):
    assert main(["bench", *argv, "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()
