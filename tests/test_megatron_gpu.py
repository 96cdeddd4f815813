"""GPU checks of the Megatron plugin: RoPE models on CUDA, and the Transformer Engine specs
(run with `pytest -m gpu`; the TE tests skip where transformer_engine is not installed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core")

from lighthouse_megatron.megatron import get_gpt_decoder_block_spec, set_iteration  # noqa: E402
from lighthouse_megatron.recipe import RecipeSchedule  # noqa: E402

from .megatron_testing import LH, SEQ, batch, build_gpt, init_parallel, tiny_config  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def parallel():
    init_parallel()
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    yield
    set_iteration(0)


def _logits_and_grads(model, tokens, positions):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, None)
    (logits.float() ** 2).mean().backward()
    return logits.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def test_rope_model_on_cuda_local_spec():
    """TE-free GPTModel with RoPE on CUDA: forward/backward, and L=1 equals the dense spec."""
    config = tiny_config(num_layers=2)
    tokens, positions = batch(device="cuda")

    def build(spec):
        return build_gpt(config, spec, device="cuda", position_embedding_type="rope")

    sparse = build(get_gpt_decoder_block_spec(config, lighthouse=LH, use_te=False))
    logits, grads = _logits_and_grads(sparse, tokens, positions)
    assert logits.shape == (2, SEQ, 64) and all(torch.isfinite(g).all() for g in grads.values())

    one_level = dataclasses.replace(LH, levels=1)
    one = build(get_gpt_decoder_block_spec(config, lighthouse=one_level, use_te=False))
    dense = build(get_gpt_decoder_block_spec(config, attention_impl="dense", use_te=False))
    dense.load_state_dict(one.state_dict())
    l1, g1 = _logits_and_grads(one, tokens, positions)
    ld, gd = _logits_and_grads(dense, tokens, positions)
    torch.testing.assert_close(l1, ld, rtol=1e-4, atol=1e-4)
    for name in gd:
        torch.testing.assert_close(g1[name], gd[name], rtol=1e-3, atol=1e-5, msg=name)


def _te_config(**kw):
    return tiny_config(use_cpu_initialization=False, bf16=True, params_dtype=torch.bfloat16, **kw)


def test_te_block_spec_lighthouse_and_dense_layers():
    pytest.importorskip("transformer_engine")
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    from lighthouse_megatron.megatron import LighthouseCoreAttention

    config = _te_config(num_layers=3)
    lh = dataclasses.replace(LH, dense_layers=(0,))
    spec = get_gpt_decoder_block_spec(config, lighthouse=lh, use_te=True)
    model = build_gpt(config, spec, device="cuda", position_embedding_type="rope")
    kinds = [type(layer.self_attention.core_attention) for layer in model.decoder.layers]
    assert kinds == [TEDotProductAttention, LighthouseCoreAttention, LighthouseCoreAttention]
    tokens, positions = batch(device="cuda")
    logits, grads = _logits_and_grads(model, tokens, positions)
    assert torch.isfinite(logits).all() and all(torch.isfinite(g).all() for g in grads.values())

    dense = build_gpt(config, get_gpt_decoder_block_spec(config, attention_impl="dense", use_te=True),
                      device="cuda", position_embedding_type="rope")
    # torch_dist checkpoints: the same sharded keys as the dense TE model.
    assert model.sharded_state_dict().keys() == dense.sharded_state_dict().keys()


def _load_ignoring_te_extra_state(model, dense):
    # Plain state dicts differ only in TEDotProductAttention's _extra_state (torch_dist
    # checkpoints exclude it); every parameter must match.
    result = model.load_state_dict(dense.state_dict(), strict=False)
    mismatched = result.missing_keys + result.unexpected_keys
    assert all(k.endswith("core_attention._extra_state") for k in mismatched), mismatched


def test_te_one_level_and_recovery_match_te_dense():
    pytest.importorskip("transformer_engine")
    config = _te_config(num_layers=2)
    tokens, positions = batch(device="cuda")
    dense = build_gpt(config, get_gpt_decoder_block_spec(config, attention_impl="dense", use_te=True),
                      device="cuda", position_embedding_type="rope")
    ref = _logits_and_grads(dense, tokens, positions)[0]
    one_level = dataclasses.replace(LH, levels=1)
    one = build_gpt(config, get_gpt_decoder_block_spec(config, lighthouse=one_level, use_te=True),
                    device="cuda", position_embedding_type="rope")
    _load_ignoring_te_extra_state(one, dense)
    torch.testing.assert_close(_logits_and_grads(one, tokens, positions)[0], ref, rtol=2e-2, atol=2e-2)

    recovering = build_gpt(config, get_gpt_decoder_block_spec(config, lighthouse=LH, use_te=True,
                                                              schedule=RecipeSchedule(until_iter=10)),
                           device="cuda", position_embedding_type="rope")
    _load_ignoring_te_extra_state(recovering, dense)
    set_iteration(10)
    try:
        torch.testing.assert_close(_logits_and_grads(recovering, tokens, positions)[0], ref,
                                   rtol=2e-2, atol=2e-2)
    finally:
        set_iteration(0)
