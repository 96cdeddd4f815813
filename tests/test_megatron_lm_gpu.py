"""Megatron-LM's own training loop on the GPU with Lighthouse, at the real tags, through
tests/gpu/run_megatron_lm.sh (see its header for the wheels and archives it needs):
stage 1 Lighthouse with --exit-interval, stage 2 dense from that checkpoint, with and
without Transformer Engine; CP = 2 on two GPUs."""

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
