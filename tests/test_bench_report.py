"""`python -m benchmarks.report`: REPORT.md from result files shaped like real runs."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import report
from benchmarks._common import main as study_main
from lighthouse_megatron.bench.e2e import summarize


def main(argv):
    return study_main(report.add_report_parser, "benchmarks.report", argv)


def _e2e_result(vocab: int, ms: dict[str, float], lens=(98_304,), spec="te") -> dict:
    rows = [{"N": n, "mode": mode, "topk": 1536, "S": 18_432, "step_ms": t * n / lens[-1],
             "tokens_per_s": n / (t * n / lens[-1] / 1e3), "peak_mem_gib": 10.0}
            for n in lens for mode, t in ms.items()]
    meta = {"command": f"lighthouse-megatron bench e2e --vocab {vocab}", "device": "Test Card 80GB",
            "model": {"vocab": vocab, "layers": 30}, "spec": spec}
    return {"meta": meta, "rows": rows, "summary": summarize(rows)}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "e2e").mkdir()
    big = _e2e_result(128_256, {"dense": 4600.0, "lighthouse": 1500.0, "ceiling": 1450.0, "none": 700.0})
    small = _e2e_result(256, {"dense": 4500.0, "lighthouse": 1500.0, "ceiling": 1200.0, "none": 600.0})
    local = _e2e_result(256, {"dense": 4000.0, "lighthouse": 2000.0}, spec="local")
    sweep = _e2e_result(256, {"dense": 4500.0, "lighthouse": 1500.0}, lens=(16_384, 49_152, 98_304))
    for name, data in (("big", big), ("small", small), ("local", local), ("sweep", sweep)):
        (tmp_path / "e2e" / f"{name}.json").write_text(json.dumps(data))
    return tmp_path


def test_claims_follow_the_files(root):
    assert main(["--root", str(root)]) == 0
    text = (root / "REPORT.md").read_text()
    claims = text.split("## What did not reproduce")[0]
    # 530M: 4600 / 1500 ms = 3.07x meets its 3x target; 268M: 4500 / 1500 = 3.00x misses 3.3x.
    assert "3.07x (65.5k vs 21.4k tok/s, 30 layers, vocab 128256, te spec, bf16)" in claims
    assert "Test Card 80GB" in claims
    gaps = text.split("## What did not reproduce")[1].split("## Plots")[0]
    assert "**Did not reproduce**: End to end, 268M model (vocab 256)" in gaps and "3.00x" in gaps
    assert "530M model" not in gaps  # met
    # A run without TE is context, in its own row, with no verdict: 4000 / 2000 ms = 2.00x.
    row = next(line for line in claims.splitlines() if line.startswith("| End to end without"))
    assert "2.00x" in row and "local spec" in row and "2.00x" not in gaps
    # 1200 / 1500 ms = 80% of the ceiling for vocab 256; 1450 / 1500 = 96.7% for 128,256 (met).
    assert "80.0% of the ceiling (vocab 256" in gaps and "96.7% of the ceiling (vocab 128256" not in gaps
    # No layer, failure-mode, quality or retrieval file: said so, nothing filled in.
    assert "**Not yet measured**: One layer fwd+bwd at 512K" in gaps
    assert "**Not yet measured**: Recovered model" in gaps and "**Not yet measured**: Needle" in gaps
    assert "No failure-mode results yet." in text
    # The sweep: Lighthouse is 3x faster at every length in these files.
    assert "end to end: 16K 3.00x, 48K 3.00x, 96K 3.00x" in claims
    # The plot where matplotlib is installed (the dev extra), and no plot where it is not.
    plotted = importlib.util.find_spec("matplotlib") is not None
    assert (root / "report" / "e2e_speedup.png").exists() == plotted


def test_refuses_to_overwrite_and_bad_root(root, tmp_path, capsys):
    assert main(["--root", str(root)]) == 0
    assert main(["--root", str(root)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--root", str(root), "--force"]) == 0
    assert main(["--root", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: --root")
    (root / "e2e" / "broken.json").write_text("{")
    assert main(["--root", str(root), "--force"]) == 2
    assert "broken.json" in capsys.readouterr().err


@pytest.mark.parametrize("dense_accuracy, verdict", [(0.03, "not informative"), (0.9, "did not reproduce")])
def test_retrieval_claim_needs_a_dense_model_that_retrieves(root, dense_accuracy, verdict):
    """A recovered model far behind dense fails the retrieval claim only where dense retrieves;
    with dense at chance the row says the probe is not informative and gives no verdict."""
    from pathlib import Path

    from benchmarks.retrieval.needle import CHANCE, RETRIEVES

    real = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval" / "results" / "retrieval.json"
    data = json.loads(real.read_text())
    data["models"]["dense"]["summary"]["token_accuracy"] = dense_accuracy
    data["models"]["recovered"]["summary"]["token_accuracy"] = dense_accuracy - 0.3
    data["accuracy_gap"] = -0.3
    data["verdict"].update(ok=False, informative=dense_accuracy >= CHANCE + RETRIEVES)
    (root / "retrieval" / "results").mkdir(parents=True)
    (root / "retrieval" / "results" / "r.json").write_text(json.dumps(data))
    assert main(["--root", str(root)]) == 0
    claims, gaps = (root / "REPORT.md").read_text().split("## What did not reproduce")
    row = next(line for line in claims.splitlines() if line.startswith("| Needle"))
    failed = "**Did not reproduce**: Needle" in gaps.split("## Plots")[0]
    assert ("not informative" in row) == (verdict == "not informative")
    assert failed == (verdict == "did not reproduce")
