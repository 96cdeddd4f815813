"""`python -m benchmarks.report`: REPORT.md from result files shaped like real runs and from
claims.yaml; the committed REPORT.md is what the committed JSON files give."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from benchmarks._common import main as study_main
from benchmarks.quality import analyze, stats
from benchmarks.report import add_report_parser
from benchmarks.report.claims import CLAIMS_YAML, Rule, load_claims
from benchmarks.report.extract import EXTRACTORS, Interval
from benchmarks.retrieval.needle import CHANCE, RETRIEVES
from lighthouse_megatron.bench.e2e import summarize

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def main(argv):
    return study_main(add_report_parser, "benchmarks.report", argv)


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


def _sections(root: Path) -> tuple[str, str]:
    text = (root / "REPORT.md").read_text()
    claims, rest = text.split("## What did not reproduce")
    return claims, rest.split("## Plots")[0]


def _row(claims: str, start: str) -> list[str]:
    return [line for line in claims.splitlines() if line.startswith(f"| {start}")]


def test_claims_follow_the_files(root):
    assert main(["--root", str(root)]) == 0
    claims, gaps = _sections(root)
    # 530M: 4600 / 1500 ms = 3.07x meets its 3x target; 268M: 4500 / 1500 = 3.00x misses 3.3x.
    assert "3.07x (65.5k vs 21.4k tok/s, 30 layers, vocab 128256, te spec, bf16)" in claims
    assert "Test Card 80GB" in claims
    assert "**Did not reproduce**: End to end, 268M model (vocab 256)" in gaps and "3.00x" in gaps
    assert "Did not reproduce**: End to end, 530M" not in gaps  # met
    # A run without TE is context, in its own row, with no verdict: 4000 / 2000 ms = 2.00x.
    row = _row(claims, "End to end without")[0]
    assert "2.00x" in row and "local spec" in row and "2.00x" not in gaps
    # 1200 / 1500 ms = 80% of the ceiling for vocab 256; 1450 / 1500 = 96.7% for 128,256 (met).
    assert "80.0% of the ceiling (vocab 256" in gaps and "96.7% of the ceiling (vocab 128256" not in gaps
    # No layer, failure-mode, quality or retrieval file: said so, nothing filled in.
    assert "**Not yet measured**: One layer fwd+bwd at 512K" in gaps
    assert "**Not yet measured**: Time to dense quality" in gaps and "**Not yet measured**: Needle" in gaps
    assert "**Not yet measured** (earlier protocol): Recovered vs dense" in gaps
    text = (root / "REPORT.md").read_text()
    assert "No failure-mode results yet." in text
    assert "Not measured yet: no `quality/results/summary.json`" in text
    # The sweep: Lighthouse is 3x faster at every length in these files.
    assert "end to end: 16K 3.00x, 48K 3.00x, 96K 3.00x" in claims
    # The plot where matplotlib is installed (the dev extra), and no plot where it is not.
    plotted = importlib.util.find_spec("matplotlib") is not None
    assert (root / "report" / "results" / "e2e_speedup.png").exists() == plotted


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


@pytest.mark.parametrize("dense_accuracy, verdict", [(0.03, "uninformative"), (0.9, "did not reproduce")])
def test_retrieval_claim_needs_a_dense_model_that_retrieves(root, dense_accuracy, verdict):
    """A recovered model far behind dense fails the retrieval claim only where dense retrieves;
    with dense at chance the row says the probe is uninformative and gives no verdict."""
    data = json.loads((BENCHMARKS / "retrieval" / "results" / "retrieval.json").read_text())
    data["models"]["dense"]["summary"]["token_accuracy"] = dense_accuracy
    data["models"]["recovered"]["summary"]["token_accuracy"] = dense_accuracy - 0.3
    data["accuracy_gap"] = -0.3
    data["verdict"].update(ok=False, informative=dense_accuracy >= CHANCE + RETRIEVES)
    (root / "retrieval" / "results").mkdir(parents=True)
    (root / "retrieval" / "results" / "r.json").write_text(json.dumps(data))
    assert main(["--root", str(root)]) == 0
    claims, gaps = _sections(root)
    row = _row(claims, "Needle")[0]
    assert ("uninformative" in row) == (verdict == "uninformative")
    assert ("**Did not reproduce**: Needle" in gaps) == (verdict == "did not reproduce")
    assert "-0.300 value token accuracy" in row


# ------------------------------------------------------------------ time to dense quality


def _seed_row(batch: str, seed: int, switch_frac: float, gap: float, lag: float) -> dict:
    iters = int(batch.split("-")[1])
    return {"batch": batch, "recipe": "paper", "preset": batch.split("-")[0], "iters": iters,
            "tokens": iters * 32_768,
            "seed": seed, "switch": round(switch_frac * iters), "switch_frac": switch_frac, "train_gap": gap,
            "heldout_gap": gap + 0.01, "lag_per_lh_iter": lag, "lag_interp": lag * switch_frac * iters,
            "quality_lag_per_lh_iter": lag, "quality_from_crossing": False,
            "lag": lag * switch_frac * iters, "lag_from_fit": False, "lag_fit": None, "spike": 0.5,
            "stage1_gap_lighthouse": -0.1, "stage1_gap_dense": 1.0, "end_slope": -0.2}


def _summary(rows: list[dict], ratio: float) -> dict:
    """What `python -m benchmarks.quality.analyze` writes, from per-seed rows given here."""
    step = {"ratio": ratio, "lighthouse_ms": 1000 * ratio, "dense_ms": 1000.0, "card": "Test Card 80GB",
            "command": "lighthouse-megatron bench e2e", "file": "e2e.json", "parameters": 1, "N": 98_304}
    batches = sorted({r["batch"] for r in rows})
    return {"rule": stats.RULE.format(conf=stats.CONFIDENCE, tol=stats.TOLERANCE), "runs": 3 * len(rows),
            "cards": ["Test Card 80GB"], "commands": [], "step_ratio": step, "rows": rows,
            "aggregates": analyze.aggregate(rows),
            "time_to_quality": {b: analyze.time_to_quality(rows, b, ratio) for b in batches},
            "scale_trend": None}


def test_quality_rows_are_recomputed_from_the_summary(root):
    """Two batches: 'default-2560' (4 seeds, recovered clearly behind: worse, and a lag large enough
    that the two-stage run is slower than dense) and 'wide-2560' (2 seeds: marked as fewer)."""
    gaps_default, lags_default = [0.10, 0.12, 0.11, 0.13], [0.60, 0.62, 0.61, 0.63]
    rows = [_seed_row("default-2560", s + 1, 0.625, g, lag)
            for s, (g, lag) in enumerate(zip(gaps_default, lags_default, strict=True))]
    rows += [_seed_row("default-2560", s + 1, 0.75, 0.2, 0.3) for s in range(4)]
    rows += [_seed_row("wide-2560", s + 1, 0.625, g, 0.01) for s, g in enumerate([0.005, -0.004])]
    # A recipe variant at 75%, one dense step in four, with a larger lag on every seed than the paper's.
    variant = [{**_seed_row("default-2560", s + 1, 0.75, 0.3, lag), "recipe": "dense-every-4"}
               for s, lag in enumerate([0.35, 0.36, 0.34, 0.37])]
    summary = _summary(rows, ratio=0.324)
    summary["aggregates"] += analyze.aggregate(variant)
    summary["time_to_quality"]["default-2560 dense-every-4"] = analyze.time_to_quality(
        variant, "default-2560", 0.324, "dense-every-4")
    summary["against_paper"] = {"default-2560 dense-every-4": analyze.against_paper(
        rows + variant, "default-2560", 0.324, "dense-every-4")}
    (root / "quality" / "results").mkdir(parents=True)
    (root / "quality" / "results" / "summary.json").write_text(json.dumps(summary))
    assert main(["--root", str(root)]) == 0
    claims, gaps = _sections(root)

    want = stats.verdict(gaps_default)
    row = next(r for r in _row(claims, "Recovered vs dense: training loss") if "default-2560" in r)
    assert f"{want['verdict']}: {want['mean']:+.3f} nats/byte" in row and want["verdict"] == "worse"
    assert f"[{want['lower']:+.3f}, {want['upper']:+.3f}]" in row and "4 seeds;" in row
    assert "**Did not reproduce**: Recovered vs dense: training loss" in gaps
    wide = next(r for r in _row(claims, "Recovered vs dense: training loss") if "wide-2560" in r)
    assert "2 seeds (fewer seeds: 2 of 4)" in wide and "cannot tell" in wide  # t with 1 dof: wide bounds
    assert not any("wide-2560" in line for line in gaps.splitlines() if "training loss" in line)

    # Time to quality at 62.5%: 1 / (1 - f (1 - r - lag)) at the mean lag, the ends from the mean lag's
    # two-sided 95% t interval (scipy's), the larger lag giving the lower end.
    mean, sem = np.mean(lags_default), scipy.stats.sem(lags_default)
    lag_lo, lag_hi = scipy.stats.t.interval(0.95, 3, loc=mean, scale=sem)
    value, lower, upper = (1 / (1 - 0.625 * (1 - 0.324 - x)) for x in (mean, lag_hi, lag_lo))
    ttq = next(r for r in _row(claims, "Time to dense quality") if "default-2560" in r)
    assert f"{value:.2f}x [{lower:.2f}, {upper:.2f}]" in ttq and upper < 1.40
    # Every measured switch has its row (here 75% too, where the four seeds agree: no interval).
    at75 = [r for r in _row(claims, "Time to dense quality") if "default-2560" in r and "switch 75.0%" in r]
    assert len(at75) == 1 and f"{1 / (1 - 0.75 * (1 - 0.324 - 0.3)):.2f}x" in at75[0]
    assert any("Time to dense quality" in line and "default-2560" in line for line in gaps.splitlines())
    # The variant is judged against the paper's switch on the same seeds, not against the paper's claims:
    # the share of the dense run's time saved, f (1 - c - lag), paired by seed, two-sided 95% t.
    assert not any("dense-every-4" in r for start in ("Time to dense quality", "Recovered vs dense", "Lag:")
                   for r in _row(claims, start))
    cost = 0.324 + (1 - 0.324) / 4
    diffs = [0.75 * (1 - cost - lag) - 0.75 * (1 - 0.324 - 0.3) for lag in (0.35, 0.36, 0.34, 0.37)]
    lo, hi = scipy.stats.t.interval(0.95, 3, loc=np.mean(diffs), scale=scipy.stats.sem(diffs))
    (vs,) = _row(claims, "A recipe variant")
    assert f"loses: saves {0.75 * (1 - cost - 0.355):.2f} of the dense run's time against" in vs
    assert f"difference {np.mean(diffs):+.2f} [{lo:+.2f}, {hi:+.2f}]; 4 seeds; default-2560 dense-every-4" \
        in vs
    assert f"a stage-1 step {cost:.3f} of a dense one" in vs and hi < 0
    assert "**Did not reproduce**: A recipe variant" in gaps
    # The quality section quotes the analysis's own tables, from the same JSON.
    assert analyze.markdown(summary).splitlines()[4] in (root / "REPORT.md").read_text()


# ------------------------------------------------------------------------- claims.yaml


def test_every_claim_resolves_to_an_extractor():
    claims = load_claims()
    names = [c.measure for t in claims.tables for c in t.claims]
    assert names and all(n in EXTRACTORS for n in names)
    # Every extractor is used by some claim: none is dead.
    assert set(EXTRACTORS) == set(names)
    # One paper range per figure: the final loss is quoted with one text wherever it appears.
    quoted = {c.paper for t in claims.tables for c in t.claims if "0.724" in c.paper}
    assert len(quoted) == 1
    # ... and the algorithm's page quotes the same range.
    (text,) = quoted
    low_high = text.split(" vs ")[0]
    assert f"{low_high} against 0.724" in (BENCHMARKS.parent / "docs" / "algorithm.md").read_text()


def test_the_earlier_protocol_is_labelled_as_its_files_say():
    note = next(t.note for t in load_claims().tables if t.label == "earlier protocol")
    meta = json.loads((BENCHMARKS / "quality" / "v1" / "paper_protocol.json").read_text())["meta"]
    s = meta["settings"][meta["paper_schedule"]]
    reads = meta["iters"] * s["global_batch_size"] * s["seq_length"] / meta["data"]["tokens"]
    assert f"{meta['seeds']} seeds x {meta['iters']:,} iterations" in note
    assert round(reads) == 3 and "read about three times" in note and "max(0.02, 2 x standard error)" in note


@pytest.mark.parametrize("rule, value, verdict", [
    (">= 3", 3.0, True), (">= 3", 2.9, False), ("< 1", 0.5, True), ("== 0", 0.0, True),
    (">= 1.4", Interval(1.5, 1.9), True), (">= 1.4", Interval(1.1, 1.3), False),
    (">= 1.4", Interval(1.2, 1.6), None), (">= 1.4", Interval(None, None), None),
    ("in beats, matches", "matches", True), ("in beats, matches", "worse", False), (">= 3", None, None),
])
def test_pass_rules(rule, value, verdict):
    from benchmarks.report.claims import parse_rule

    assert parse_rule(rule, None, "test").judge(value) is verdict
    assert isinstance(parse_rule(rule, None, "test"), Rule)


GOOD = """
paper:
  source: a paper
  figures:
    speed: {text: "2x", low: 2}
tables:
  - title: T
    claims:
      - claim: A claim
        paper: speed
        target: t
        measure: e2e_speedup
        args: {vocab: 256}
        pass: ">= low"
        command: lighthouse-megatron bench e2e
"""


@pytest.mark.parametrize("old, new, message", [
    ("measure: e2e_speedup", "measure: e2e_sped", "measure 'e2e_sped' is not an extractor"),
    ("args: {vocab: 256}", "args: {vocabulary: 256}", "unexpected keyword argument 'vocabulary'"),
    ("measure: e2e_speedup\n        args: {vocab: 256}", "measure: e2e_summary\n        args: {key: speed}",
     "measure e2e_summary: key='speed' is not one of lighthouse_of_ceiling, attention_share_dense"),
    ("paper: speed", "paper: sped", "paper figure 'sped' is not in paper.figures"),
    ('pass: ">= low"', 'pass: "at least 2"', "pass rule 'at least 2'"),
    ('pass: ">= low"', 'pass: ">= high"', "names the paper figure's 'high', which it lacks"),
    ("        target: t\n", "", "missing target"),
    ("        command:", "        comand:", "missing command; unknown key comand"),
    ("tables:", "tables: [", "not a readable claims file"),
])
def test_bad_claims_yaml_is_one_clear_error(root, tmp_path, capsys, old, new, message):
    assert old in GOOD
    bad = tmp_path / "claims.yaml"
    bad.write_text(GOOD.replace(old, new))
    capsys.readouterr()
    assert main(["--root", str(root), "--claims", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}") and message in err[0], err
    assert not (root / "REPORT.md").exists()
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert main(["--root", str(root), "--claims", str(good)]) == 0


def test_committed_report_is_what_the_committed_files_give(tmp_path):
    """REPORT.md regenerated from a copy of the committed results equals the committed one: every
    row comes from a JSON file (and claims.yaml), none was edited by hand or left stale."""
    pytest.importorskip("matplotlib")
    copy = tmp_path / "benchmarks"
    shutil.copytree(BENCHMARKS, copy, ignore=shutil.ignore_patterns("*.py", "*.tgz", "*.log", "__pycache__"))
    (copy / "REPORT.md").unlink()
    assert main(["--root", str(copy), "--claims", str(CLAIMS_YAML)]) == 0
    assert (copy / "REPORT.md").read_text() == (BENCHMARKS / "REPORT.md").read_text()
