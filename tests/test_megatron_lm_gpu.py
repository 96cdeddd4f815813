"""Megatron-LM's own training loop on the GPU with Lighthouse, at the real tags, through
tests/gpu/run_megatron_lm.sh (see its header for the wheels and archives it needs):
stage 1 Lighthouse with --exit-interval (validation logs "lm loss" and "lm loss dense"),
stage 2 dense from that checkpoint, with and without Transformer Engine; CP = 2 on two GPUs.
And tests/gpu/run_production_recipe.sh: the production recipe (distributed optimizer with
overlap, selective/full recompute, bf16/FP8, TP/PP/CP where the GPUs are there)."""

from __future__ import annotations

import pytest

from .megatron_lm_scripts import run_script

TAGS = ["core_v0.16.1", "core_v0.19.0"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["local", "te"])
@pytest.mark.parametrize("tag", TAGS)
def test_megatron_lm_two_stages(tag, impl, tmp_path):
    run_script("run_megatron_lm.sh", tag, impl, "1", tmp_path=tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["local", "te"])
@pytest.mark.parametrize("tag", TAGS)
def test_megatron_lm_two_stages_context_parallel(tag, impl, tmp_path):
    run_script("run_megatron_lm.sh", tag, impl, "2", tmp_path=tmp_path, gpus=2)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [
    "--lighthouse-dense-every 4",
    "--lighthouse-until-iter 20 --lighthouse-progressive-iters 8",
    "--lighthouse-until-iter 20 --lighthouse-grow-topk-iters 8",  # k 512 -> 1024 over iterations 12-19
    "--lighthouse-level-merge mean",
])
def test_megatron_lm_recipe_variants(variant, tmp_path):
    """Each recipe variant in stage 1 of Megatron-LM's own loop on the GPU, then the dense stage 2
    from its checkpoint, checked as the plain two stages are."""
    run_script("run_megatron_lm.sh", "core_v0.19.0", "local", "1", tmp_path=tmp_path,
               env={"STAGE1_EXTRA": variant})


@pytest.mark.gpu
def test_production_recipe(tmp_path):
    """Every variant this machine can run passes; the others print SKIP with the reason."""
    import os
    import subprocess

    import torch

    from .megatron_lm_scripts import GPU_SCRIPTS, ROOT, archive_present

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not archive_present("core_v0.19.0"):
        pytest.skip("megatron-lm-core_v0.19.0.tgz not found (see run_megatron_lm.sh's header)")
    proc = subprocess.run(["bash", str(GPU_SCRIPTS / "run_production_recipe.sh"), str(tmp_path)], cwd=ROOT,
                          env=dict(os.environ), capture_output=True, text=True, timeout=1500)
    verdicts = [line for line in proc.stdout.splitlines()
                if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert proc.returncode == 0 and any(v.startswith("PASS") for v in verdicts), \
        "\n".join(verdicts) + proc.stdout[-3000:] + proc.stderr[-3000:]
