"""The leak probe (`benchmarks/leak/`) and the retrieval probe (`benchmarks/retrieval/`) on two tiny
trainer checkpoints on the CPU, and the needle and passkey formats they rest on.

The leak probe's numbers: exactly 0 under dense attention for both models, not 0 under Lighthouse
attention (its per-tile selection sees the tile's later tokens). The retrieval probe's: the gaps are
recovered - dense of the per-model summaries, the summaries are the means of the cells, and the
comparison is marked uninformative exactly when the dense model's accuracy is below chance + margin.
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from benchmarks._common import main as study_main
from benchmarks.retrieval import needle, passkey

SEQ = 256
MODEL = (f"--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 --seq-length {SEQ} "
         "--micro-batch-size 1 --global-batch-size 2 --train-iters 2 --lr 3e-3 --lr-warmup-iters 1 "
         "--eval-iters 1 --split 90,10,0 --seed 3").split()
LIGHTHOUSE = ("--attention-impl lighthouse --lighthouse-levels 2 --lighthouse-pooling-factor 4 "
              "--lighthouse-topk 16 --lighthouse-tile-topk 8").split()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, pytorch_twins):
    """A byte dataset of 60 standard-library files, and two checkpoints trained on it for 2
    iterations: dense attention, and Lighthouse attention (the same architecture)."""
    pytest.importorskip("megatron.core")
    from lighthouse_megatron import training
    from lighthouse_megatron.data import default_inputs, prepare_data
    from lighthouse_megatron.megatron import set_iteration

    tmp = tmp_path_factory.mktemp("probes")
    data = str(tmp / "corpus")
    prepare_data(default_inputs()[:60], data, progress=False)
    saves = {}
    for name, extra in (("dense", []), ("lighthouse", LIGHTHOUSE)):
        saves[name] = str(tmp / name)
        training.run(training.parse_args([*MODEL, *extra, "--data-path", data, "--data-cache-path",
                                          str(tmp / "cache"), "--save", saves[name]]))
        set_iteration(0)
    return tmp, data, saves


def test_leak_probe_is_zero_under_dense_attention_only(checkpoints):
    from benchmarks.leak import run as leak

    tmp, data, saves = checkpoints
    out = tmp / "leak.json"
    argv = ["--lighthouse", saves["lighthouse"], "--control", saves["dense"], "--data-path", data,
            "--samples", "2", "--window", "8", "--device", "cpu", "--out", str(out)]
    assert study_main(leak.add_leak_parser, "benchmarks.leak.run", argv) == 0
    r = json.loads(out.read_text())
    for model in leak.MODELS:
        assert r[model]["dense"]["max_abs"] == 0.0  # causal: exactly 0
        assert r[model]["dense"]["n"] == 2 * len(r["positions"])  # one per (sample, t)
    # Lighthouse's per-tile selection sees the tile's later tokens: the loss before t moves.
    assert r["lighthouse_trained"]["lighthouse"]["max_abs"] > 0
    assert r["check"]["ok"] is True
    tile = r["tile_length"]
    assert r["positions"] == leak.positions(SEQ, tile, 8) and all(t % tile for t in r["positions"])


def test_retrieval_numbers_come_from_its_cells(checkpoints):
    from benchmarks.retrieval import run as retrieval

    tmp, data, saves = checkpoints
    argv = ["--dense", saves["dense"], "--recovered", saves["lighthouse"], "--data-path", data,
            "--trials", "1", "--depths", "0,1", "--device", "cpu", "--out", str(tmp / "retrieval")]
    assert study_main(retrieval.add_retrieval_parser, "benchmarks.retrieval.run", argv) == 0
    r = json.loads((tmp / "retrieval" / "retrieval.json").read_text())
    shortest = needle.fixed_tokens(6) + 1
    assert r["meta"]["lengths"] == [n for n in (SEQ // 8, SEQ // 4, SEQ // 2, SEQ) if n >= shortest]
    for model in retrieval.MODELS:
        cells = r["models"][model]["cells"]
        assert len(cells) == 2 * len(r["meta"]["lengths"])
        summary = r["models"][model]["summary"]
        for key in ("loss", "token_accuracy", "exact"):
            assert summary[key] == pytest.approx(statistics.fmean(c[key] for c in cells))
    dense, rec = (r["models"][m]["summary"] for m in ("dense", "recovered"))
    assert r["accuracy_gap"] == pytest.approx(rec["token_accuracy"] - dense["token_accuracy"])
    assert r["verdict"]["informative"] == (dense["token_accuracy"] >= needle.CHANCE + needle.RETRIEVES)


@pytest.mark.parametrize("argv, needle_text", [
    (["--lengths", "16"], "--lengths"),
    (["--depths", "0,2"], "--depths"),
    (["--trials", "0"], "--trials"),
])
def test_retrieval_bad_input_is_one_error_line(checkpoints, capsys, argv, needle_text):
    from benchmarks.retrieval import run as retrieval

    tmp, data, saves = checkpoints
    capsys.readouterr()
    base = ["--dense", saves["dense"], "--recovered", saves["lighthouse"], "--data-path", data,
            "--device", "cpu", "--out", str(tmp / "bad")]
    assert study_main(retrieval.add_retrieval_parser, "benchmarks.retrieval.run", [*base, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle_text in err[0], err
    assert not (tmp / "bad").exists()


def test_retrieval_refuses_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    from benchmarks.retrieval import run as retrieval

    argv = ["--dense", str(tmp_path), "--recovered", str(tmp_path), "--data-path", str(tmp_path / "x")]
    assert study_main(retrieval.add_retrieval_parser, "benchmarks.retrieval.run", argv) == 2
    assert "not a trainer checkpoint" in capsys.readouterr().err


def test_passkey_document():
    text = bytes(range(32, 127)) * 50
    docs = passkey.passkey_documents(text, 20, 96, 200, seed=3)
    assert len(docs) == 20 and all(96 <= len(d.document) <= 200 for d in docs)
    for d in docs:
        planted = needle.NEEDLE.format(word=d.word, value=d.value).encode()
        assert d.document[d.needle_start:d.needle_start + len(planted)] == planted
        assert d.document[d.value_start:] == d.value.encode() and len(d.value) == 6
        assert d.document[:d.value_start].endswith(needle.QUERY.format(word=d.word).encode())
        # Byte tokens, as prepare-data writes them, decode back to the document.
        assert bytes(needle.encode(d.document.decode()).astype(np.uint8)) == d.document
        rest = d.document[:d.needle_start] + d.document[d.needle_start + len(planted):d.value_start - len(
            needle.QUERY.format(word=d.word))]
        assert rest in text  # the haystack is one window of the text
    assert len({d.value for d in docs}) > 15  # random values
    with pytest.raises(ValueError, match="passkey documents"):
        passkey.passkey_documents(text, 1, 50, 60, seed=0)


def test_needle_placement():
    hay = np.arange(1000, 1200)  # ids no byte has: easy to tell apart
    for depth in (0.0, 0.3, 1.0):
        s = needle.plant(hay, depth, "bakotu", "123456")
        planted = needle.encode(needle.NEEDLE.format(word="bakotu", value="123456"))
        d = round(depth * len(hay))
        assert s.needle_start == d
        assert np.array_equal(s.tokens[:d], hay[:d])
        assert np.array_equal(s.tokens[d:d + len(planted)], planted)
        assert np.array_equal(s.tokens[d + len(planted):d + len(planted) + len(hay) - d], hay[d:])
        assert bytes(s.tokens[s.value_start:].astype(np.uint8)).decode() == "123456"
        query = bytes(s.tokens[s.value_start - 31:s.value_start].astype(np.uint8)).decode()
        assert query.endswith("# The secret key for bakotu is ")
    # Whole samples: the requested length, the value last, seeded.
    text = np.arange(5000) % 200 + 1000
    s = needle.make_sample(text, 300, 0.5, trial=1, seed=7, digits=4)
    room = 300 - needle.fixed_tokens(4)
    assert len(s.tokens) == 300 and s.value_start == 296 and s.needle_start == round(0.5 * room)
    assert bytes(s.tokens[296:].astype(np.uint8)).decode() == s.value and len(s.word) == 6
    again = needle.make_sample(text, 300, 0.5, trial=1, seed=7, digits=4)
    other = needle.make_sample(text, 300, 0.5, trial=2, seed=7, digits=4)
    assert np.array_equal(s.tokens, again.tokens) and (other.word, other.value) != (s.word, s.value)


def test_the_sample_format_is_unchanged():
    """The committed retrieval JSON was scored on these exact samples (same seeds, same draws)."""
    text = np.arange(5000) % 200 + 1000
    s = needle.make_sample(text, 300, 0.25, trial=0, seed=1234, digits=6)
    rng = np.random.default_rng([1234, 300, 250_000, 0])
    word = "".join(rng.choice(list(needle.CONSONANTS)) + rng.choice(list(needle.VOWELS)) for _ in range(3))
    value = "".join(str(d) for d in rng.integers(0, 10, size=6))
    assert (s.word, s.value) == (word, value)


def test_the_package_imports_no_benchmark():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, lighthouse_megatron; "
            "print([m for m in sys.modules if m.startswith(('benchmarks', 'lighthouse_megatron.bench'))])")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
