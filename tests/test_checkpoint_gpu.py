"""The recovery checkpoint tool against Megatron-LM on the GPU (tests/gpu/convert_megatron_lm.sh):
a Megatron-LM stage-1 Lighthouse checkpoint, with Transformer Engine or local specs, in both
formats, converted, then resumed dense by Megatron-LM's own pretrain_gpt.py."""

from __future__ import annotations

import pytest

from .megatron_lm_scripts import run_script


@pytest.mark.gpu
def test_te_torch_format_checkpoint_loads_strictly_into_the_te_dense_model(tmp_path):
    """Transformer Engine specs, torch format: the stage-1 state dict lacks the Lighthouse
    layers' core_attention._extra_state, which TE's dense model has; the converted one has
    exactly the dense model's keys and loads strictly (and the converter verified it on a TE
    model itself)."""
    from lighthouse_megatron.backends import te_available

    if not te_available():
        pytest.skip("transformer_engine.pytorch does not import here")
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    from lighthouse_megatron.checkpoint.reader import locate
    from lighthouse_megatron.convert import convert
    from lighthouse_megatron.megatron import get_gpt_decoder_block_spec
    from tests import checkpoint_testing as ct
    from tests.megatron_testing import init_parallel

    init_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    config = ct.transformer_config(cpu_init=False)

    def model(impl):
        spec = get_gpt_decoder_block_spec(config, attention_impl=impl, lighthouse=ct.LH, use_te=True)
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=ct.VOCAB,
                        max_sequence_length=ct.SEQ, position_embedding_type="rope",
                        share_embeddings_and_output_weights=False).cuda()

    stage1 = {k: v.cpu() if isinstance(v, torch.Tensor) else v
              for k, v in model("lighthouse").state_dict_for_save_checkpoint().items()}
    extra = "self_attention.core_attention._extra_state"
    assert [i for i in range(3) if f"decoder.layers.{i}.{extra}" in stage1] == [0]  # layer 0 is dense
    dense_keys = set(model("dense").state_dict_for_save_checkpoint())
    assert dense_keys - set(stage1) == {f"decoder.layers.{i}.{extra}" for i in (1, 2)}
    args = ct.megatron_args(ckpt_format="torch", transformer_impl="transformer_engine")
    ct.save_legacy({0: {"model": stage1}}, args, tmp_path / "in")
    report = convert(tmp_path / "in", tmp_path / "out")
    assert report["verified"]["spec"] == "TE dense"
    converted = torch.load(locate(tmp_path / "out").shards[(0, 0)], weights_only=True)["model"]
    assert set(converted) == dense_keys  # (megatron-core <= 0.18 refuses stage1 strictly, 0.19 not)
    model("dense").load_state_dict(converted, strict=True)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("impl", ["te", "local"])
@pytest.mark.parametrize("tag", ["core_v0.16.1", "core_v0.19.0"])
def test_megatron_lm_resumes_converted_checkpoint_dense(tag, impl, fmt, tmp_path):
    run_script("convert_megatron_lm.sh", tag, impl, fmt, tmp_path=tmp_path, timeout=1200)
