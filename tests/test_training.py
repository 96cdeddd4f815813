"""`lighthouse-megatron train` on CPU: real training of a tiny GPT on megatron-core's datasets.

One reference run (Lighthouse, 6 iterations, a checkpoint at 3 and 6) is shared by the
tests that compare against it: resume, the in-run dense switch, DP = 2, the layout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")

from lighthouse_megatron import training  # noqa: E402
from lighthouse_megatron.megatron import set_iteration  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 layers, hidden 64, seq 256; L=2, p=4, k=16, T=8 gathers 256/4 + 4*16 = 128 entries,
# so Lighthouse really differs from dense attention.
MODEL = ("--mock-data --num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
         "--seq-length 256 --micro-batch-size 1 --global-batch-size 2 --train-iters 6 --lr 5e-3 "
         "--lr-warmup-iters 1 --min-lr 1e-4 --eval-iters 1 --seed 7").split()
LIGHTHOUSE = ("--attention-impl lighthouse --lighthouse-levels 2 --lighthouse-pooling-factor 4 "
              "--lighthouse-topk 16 --lighthouse-tile-topk 8").split()


@pytest.fixture(scope="module", autouse=True)
def pytorch_twins():
    # conftest runs Triton kernels through the interpreter on CPU (for the kernel tests);
    # training uses the plain-PyTorch twins, as it does on any CPU machine.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield


def _train(*argv) -> training.TrainResult:
    result = training.run(training.parse_args([*MODEL, *map(str, argv)]))
    set_iteration(0)
    return result


def _losses(records):
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    save = tmp_path_factory.mktemp("reference")
    return save, _train(*LIGHTHOUSE, "--save", save, "--save-interval", 3)


def test_loss_falls_and_metrics_are_written(reference):
    save, result = reference
    losses = _losses(result.train)
    assert [r["iteration"] for r in result.train] == [1, 2, 3, 4, 5, 6]
    assert all(r["attention"] == "lighthouse" for r in result.train)
    assert min(losses[-2:]) < losses[0] - 0.3, losses
    # Held-out split with the training attention and with dense attention, both finite.
    evals = {r["attention"]: r["loss"] for r in result.evals if r["iteration"] == 6}
    assert set(evals) == {"lighthouse", "dense"} and evals["dense"] != evals["lighthouse"]
    assert all(0 < v < losses[0] for v in evals.values()), evals
    # JSONL holds what the API returned; TensorBoard the same numbers.
    records = training.read_metrics(os.path.join(save, "metrics.jsonl"))
    assert records == result.train[:6] + result.evals if len(records) == 8 else False, records
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(save, "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert events.Scalars("eval/loss_dense")[-1].value == pytest.approx(evals["dense"], rel=1e-6)
    assert {r["tokens_per_s"] > 0 and r["time_per_iter_s"] > 0 for r in result.train} == {True}


def _common_state(path):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(path)


def test_checkpoint_layout_is_megatron_lms(reference):
    save, _ = reference
    assert sorted(p for p in os.listdir(save) if p.startswith("iter_")) == ["iter_0000003", "iter_0000006"]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "6"
    assert not [p for p in os.listdir(save) if p.endswith(".tmp")]
    ckpt = os.path.join(save, "iter_0000006")
    assert {".metadata", "common.pt", "metadata.json"} <= set(os.listdir(ckpt))
    # The common part loads with weights_only=True: plain types and megatron-core's safe classes.
    common = torch.load(os.path.join(ckpt, "common.pt"), weights_only=True)
    assert {"args", "checkpoint_version", "iteration", "opt_param_scheduler"} <= set(common)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 6
    args = common["args"]
    assert type(args) is argparse.Namespace
    plain = (str, int, float, bool, type(None), list)
    assert all(isinstance(v, plain) for v in vars(args).values()), vars(args)
    assert args.consumed_train_samples == 12 and args.num_layers == 2 and args.attention_impl == "lighthouse"
    assert args.tensor_model_parallel_size == 1 and args.ckpt_format == "torch_dist"
    assert common["opt_param_scheduler"]["num_steps"] == 12  # Megatron-LM counts samples
    # Sharded parts: model weights, optimizer moments (FP32Optimizer layout), RNG state.
    from megatron.core import dist_checkpointing

    keys = set(dist_checkpointing.load_tensors_metadata(ckpt))
    assert "embedding.word_embeddings.weight" in keys and "output_layer.weight" in keys
    assert "optimizer.state.exp_avg.decoder.layers.self_attention.linear_qkv.weight" in keys
    assert "optimizer.state.exp_avg_sq.embedding.word_embeddings.weight" in keys


def test_checkpoint_loads_into_a_dense_model_strictly(reference):
    """The stage-1 checkpoint is the dense model's: no missing or unexpected keys."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from .megatron_testing import init_parallel

    save, _ = reference
    init_parallel()
    args = training.parse_args([*MODEL])  # dense
    from lighthouse_megatron.training.trainer import build_model, transformer_config

    model = build_model(args, transformer_config(args))
    state, missing, unexpected = dist_checkpointing.load(
        {"model": model.sharded_state_dict()}, os.path.join(save, "iter_0000006"),
        strict=StrictHandling.RETURN_ALL)
    assert not unexpected
    assert {k for k in missing if not k.startswith("optimizer.")} == {"rng_state"}
    model.load_state_dict(state["model"], strict=True)
    saved = dist_checkpointing.load_plain_tensors(os.path.join(save, "iter_0000006"))
    assert torch.equal(model.embedding.word_embeddings.weight, saved["embedding.word_embeddings.weight"])


def test_resume_is_bitwise(reference, tmp_path):
    _, full = reference
    first = _train(*LIGHTHOUSE, "--save", tmp_path, "--exit-interval", 3)
    assert first.iteration == 3 and first.checkpoints == [str(tmp_path / "iter_0000003")]
    second = _train(*LIGHTHOUSE, "--save", tmp_path, "--load", tmp_path)
    assert second.start_iteration == 3
    assert _losses(first.train) + _losses(second.train) == _losses(full.train)  # bitwise
    assert second.evals == full.evals


def test_until_iter_switches_to_dense_in_the_same_run(reference, tmp_path):
    """Before N the run is the Lighthouse run; from N on it computes exactly what stage 2
    relaunched dense from the Lighthouse checkpoint at N computes."""
    import shutil

    save, lighthouse = reference
    switched = _train(*LIGHTHOUSE, "--lighthouse-until-iter", 3)
    assert [r["attention"] for r in switched.train] == ["lighthouse"] * 3 + ["dense"] * 3
    assert [r["attention"] for r in switched.evals] == ["dense"]
    losses = _losses(switched.train)
    assert losses[:3] == _losses(lighthouse.train)[:3]
    assert losses[3:] != _losses(lighthouse.train)[3:]  # dense attention really ran

    stage1 = tmp_path / "stage1"
    shutil.copytree(os.path.join(save, "iter_0000003"), stage1 / "iter_0000003")
    (stage1 / "latest_checkpointed_iteration.txt").write_text("3")
    dense = _train("--load", stage1)  # --attention-impl dense (the default)
    assert _losses(dense.train) == losses[3:]
    assert dense.evals == switched.evals


def _torchrun(nproc: int, *argv, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lighthouse_megatron.cli", "train", *map(str, argv)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_data_parallel_ranks_match_one(reference, tmp_path):
    """DP = 2 (torchrun, gloo) with the same global batch trains the same model as DP = 1."""
    _, single = reference
    metrics = tmp_path / "m.jsonl"
    _torchrun(2, *MODEL, *LIGHTHOUSE, "--exit-interval", 3, "--metrics-file", metrics)
    losses = _losses(training.read_metrics(metrics))
    assert losses == pytest.approx(_losses(single.train)[:3], rel=1e-5, abs=0)
