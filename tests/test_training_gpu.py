"""The trainer on CUDA (run with `pytest -m gpu`): bf16 training through megatron-core's
DDP and optimizer, resume, and Megatron-LM continuing a trainer checkpoint.

The Megatron-LM test needs a Megatron-LM checkout of the installed megatron-core's release:
`MEGATRON_LM=/path/to/Megatron-LM pytest -m gpu tests/test_training_gpu.py`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")

from lighthouse_megatron import training  # noqa: E402

pytestmark = pytest.mark.gpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGV = ("--mock-data --num-layers 2 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2 "
        "--seq-length 1024 --micro-batch-size 2 --global-batch-size 4 --train-iters 8 --lr 3e-3 "
        "--lr-warmup-iters 1 --eval-iters 1 --attention-impl lighthouse --lighthouse-levels 2 "
        "--lighthouse-pooling-factor 4 --lighthouse-topk 64 --lighthouse-tile-topk 16").split()


def _run(cmd, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*([env_extra] if env_extra else []), REPO,
                                                         os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _train(*argv):
    return _run([sys.executable, "-m", "lighthouse_megatron.cli", "train", *ARGV, *map(str, argv)])


def _losses(path):
    return [r["loss"] for r in training.read_metrics(path) if r["kind"] == "train"]


def test_bf16_training_on_cuda_resumes(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _train("--save", full, "--save-interval", 4)
    _train("--save", part, "--exit-interval", 4)
    _train("--save", part, "--load", part)
    losses = _losses(full / "metrics.jsonl")
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert min(losses[-2:]) < losses[0] - 0.3, losses
    # Same weights, optimizer, data and schedule after the restart (GPU kernels are not
    # all bitwise deterministic, so up to bf16 noise).
    assert _losses(part / "metrics.jsonl") == pytest.approx(losses, rel=2e-2)
    evals = [r for r in training.read_metrics(full / "metrics.jsonl") if r["kind"] == "eval"]
    assert {r["attention"] for r in evals} == {"lighthouse", "dense"}
    # megatron-core's bf16 optimizer (Float16OptimizerWithFloat16Params) wrote its fp32
    # master weights, as Megatron-LM's --bf16 does; the model weights are bf16.
    from megatron.core import dist_checkpointing

    ckpt = str(full / "iter_0000008")
    meta = dist_checkpointing.load_tensors_metadata(ckpt)
    assert any(k.startswith("optimizer.state.fp32_param.") for k in meta)
    assert meta["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    args = dist_checkpointing.load_common_state_dict(ckpt)["args"]
    assert args.bf16 is True and args.consumed_train_samples == 32


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM"), reason="set MEGATRON_LM=/path/to/Megatron-LM")
def test_megatron_lm_continues_a_trainer_checkpoint(tmp_path):
    """Megatron-LM's own loop `--load`s a trainer checkpoint (model, optimizer, scheduler,
    RNG, data position) and continues with the loss the trainer itself reaches."""
    from lighthouse_megatron.backends import te_available

    save = tmp_path / "ckpt"
    _train("--save", save, "--exit-interval", 4)
    reference = tmp_path / "reference.jsonl"
    _train("--metrics-file", reference)
    args = training.parse_args(ARGV)
    # The GPU image has no apex, whose extension Megatron-LM's default gradient-accumulation
    # fusion needs for the output layer (megatron-core's own linear, TE spec or not).
    extra = ["--no-gradient-accumulation-fusion"]
    if not te_available():
        extra += ["--transformer-impl", "local", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
                  "--no-rope-fusion"]
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                 "-m", "lighthouse_megatron.megatron_lm.pretrain_gpt", *training.megatron_lm_args(args),
                 "--load", str(save), "--log-interval", "1", *extra], env_extra=os.environ["MEGATRON_LM"])
    out = proc.stdout + proc.stderr
    (tmp_path / "megatron_lm.log").write_text(out)
    assert "successfully loaded checkpoint" in out and "at iteration 4" in out, out[-4000:]
    mlm = {int(i): float(v) for i, v in re.findall(r"iteration\s+(\d+)/\s*\d+.*?lm loss: ([0-9.E+-]+)", out)}
    assert sorted(mlm) == [5, 6, 7, 8], out[-4000:]
    ours = _losses(reference)
    # Megatron-LM logs the mean loss since its last reset of the sums, and its first line
    # after start-up does not reset them: iteration 6's line is the mean of 5 and 6.
    expected = [ours[4], (ours[4] + ours[5]) / 2, ours[6], ours[7]]
    assert [mlm[i] for i in (5, 6, 7, 8)] == pytest.approx(expected, rel=1e-2), (
        f"trainer iterations 1-8 {ours}, its checkpointed run {_losses(save / 'metrics.jsonl')}; "
        f"Megatron-LM's log in {tmp_path / 'megatron_lm.log'}")
