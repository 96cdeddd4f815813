"""The converter on a real `lighthouse-megatron train` checkpoint: stage 1 with Lighthouse,
`convert` (dense Megatron and Hugging Face Llama), then the trainer resumes the converted
checkpoint with dense attention (the recovery stage)."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from lighthouse_megatron import training  # noqa: E402
from lighthouse_megatron.convert import convert, export_hf, inspect_checkpoint  # noqa: E402
from lighthouse_megatron.megatron import set_iteration  # noqa: E402

MODEL = ("--mock-data --num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
         "--seq-length 256 --micro-batch-size 1 --global-batch-size 2 --lr 5e-3 --lr-warmup-iters 1 "
         "--min-lr 1e-4 --eval-iters 1 --seed 7 --train-iters 4").split()
LIGHTHOUSE = ("--attention-impl lighthouse --lighthouse-levels 2 --lighthouse-pooling-factor 4 "
              "--lighthouse-topk 16 --lighthouse-tile-topk 8").split()


def _train(*argv):
    result = training.run(training.parse_args([*MODEL, *map(str, argv)]))
    set_iteration(0)
    return result


@pytest.mark.slow
def test_trainer_checkpoint_converts_and_resumes_dense(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # training uses the PyTorch twins on CPU
    stage1 = tmp_path / "stage1"
    _train(*LIGHTHOUSE, "--save", stage1, "--save-interval", 2, "--exit-interval", 2)
    info = inspect_checkpoint(stage1)
    assert info["iteration"] == 2 and info["attention"] == ["lighthouse", "lighthouse"]

    report = convert(stage1, tmp_path / "dense")
    assert report["verified"]["loaded_with"].startswith("megatron-core dist_checkpointing.load")
    assert inspect_checkpoint(tmp_path / "dense")["attention"] == ["dense", "dense"]
    hf = export_hf(stage1, tmp_path / "hf")
    if not isinstance(hf["verified"], str):  # transformers installed
        assert hf["verified"]["logits_max_abs_diff"] < 1e-4

    # Recovery: the trainer continues the converted checkpoint densely, optimizer and all.
    result = _train("--attention-impl", "dense", "--load", tmp_path / "dense", "--save", tmp_path / "dense",
                    "--force")
    assert result.start_iteration == 2 and [r["iteration"] for r in result.train] == [3, 4]
    assert all(r["attention"] == "dense" for r in result.train)
