"""megatron-core GPTModel with Lighthouse specs on CPU (gloo): numerics, per-layer choice, TP."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from lighthouse_megatron import lighthouse_attention  # noqa: E402
from lighthouse_megatron.backends import dense_causal_attention  # noqa: E402
from lighthouse_megatron.megatron import (  # noqa: E402
    DenseCoreAttention,
    LighthouseCoreAttention,
    get_gpt_decoder_block_spec,
    get_gpt_layer_spec,
    set_iteration,
)
from lighthouse_megatron.recipe import RecipeSchedule  # noqa: E402

from .megatron_testing import LH, SEQ, batch, build_gpt, init_parallel, tiny_config  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def parallel():
    init_parallel()
    yield
    set_iteration(0)


def _models(config, lighthouse, **kw):
    """The same weights under the Lighthouse and the dense block spec."""
    sparse = build_gpt(config, get_gpt_decoder_block_spec(config, lighthouse=lighthouse, use_te=False, **kw))
    dense = build_gpt(config, get_gpt_decoder_block_spec(config, attention_impl="dense", use_te=False))
    dense.load_state_dict(sparse.state_dict(), strict=True)
    return sparse, dense


def _run(model, tokens, positions):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, None)
    (logits.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), grads


def _capture_core_attention(model):
    """Record (q, k, v, out) of every core attention, by layer number."""
    seen = {}

    def hook(module, args, out):
        q, k, v = args[:3]
        seen[module.layer_number] = (q.detach(), k.detach(), v.detach(), out.detach())

    for m in model.modules():
        if isinstance(m, (LighthouseCoreAttention, DenseCoreAttention)):
            m.register_forward_hook(hook)
    return seen


def _as_bshd(x):
    return x.transpose(0, 1)


def _dense_reference(q, k, v):
    s, b = q.shape[:2]
    return dense_causal_attention(_as_bshd(q), _as_bshd(k), _as_bshd(v)).transpose(0, 1).reshape(s, b, -1)


def _lighthouse_reference(q, k, v, cfg):
    s, b = q.shape[:2]
    out = lighthouse_attention(_as_bshd(q), _as_bshd(k), _as_bshd(v), cfg)
    return out.transpose(0, 1).reshape(s, b, -1)


def test_forward_backward_and_state_dict():
    config = tiny_config()
    lh = dataclasses.replace(LH, dense_layers=(0,))
    sparse, dense = _models(config, lh)
    tokens, positions = batch()
    logits, grads = _run(sparse, tokens, positions)
    assert logits.shape == (2, SEQ, 64)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    # No parameters or buffers of its own: the checkpoint is the dense model's.
    assert sparse.state_dict().keys() == dense.state_dict().keys()
    assert sparse.sharded_state_dict().keys() == dense.sharded_state_dict().keys()
    # Lighthouse really is on (S = 48 < N = 64): the logits differ from dense.
    assert not torch.allclose(logits, _run(dense, tokens, positions)[0], atol=1e-4)


def test_one_level_equals_dense_logits_and_grads():
    config = tiny_config()
    sparse, dense = _models(config, dataclasses.replace(LH, levels=1))
    tokens, positions = batch()
    logits_s, grads_s = _run(sparse, tokens, positions)
    logits_d, grads_d = _run(dense, tokens, positions)
    torch.testing.assert_close(logits_s, logits_d, rtol=1e-5, atol=1e-5)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dense_layers_run_dense_attention_by_behaviour():
    """Layers 0 and -1 of 3 dense, layer 1 Lighthouse: checked on the attention each computes."""
    config = tiny_config()
    lh = dataclasses.replace(LH, dense_layers=(0, -1))
    sparse, _ = _models(config, lh)
    seen = _capture_core_attention(sparse)
    tokens, positions = batch()
    with torch.no_grad():
        sparse(tokens, positions, None)
    assert sorted(seen) == [1, 2, 3]  # global 1-based layer numbers
    for layer, (q, k, v, out) in seen.items():
        # GQA arrives compact: 4 query heads, 2 key/value heads.
        assert q.shape[2] == 4 and k.shape[2] == 2 and v.shape[2] == 2
        dense_out = _dense_reference(q, k, v)
        if layer in (1, 3):
            torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(out, _lighthouse_reference(q, k, v, lh), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(out, dense_out, atol=1e-4)


def test_forced_dense_ranks_match_a_model_built_with_that_layer_dense():
    """forced_dense([r]) turns only the r-th Lighthouse layer (depth order) dense: the same logits as
    the same weights under a spec that builds that layer dense; the others stay Lighthouse."""
    from lighthouse_megatron.megatron import forced_dense

    config = tiny_config()  # 3 layers
    lh = dataclasses.replace(LH, dense_layers=(0,))  # Lighthouse layers 1 and 2: ranks 0 and 1
    sparse, dense = _models(config, lh)
    tokens, positions = batch()
    with torch.no_grad():
        plain = sparse(tokens, positions, None)
        for rank, layer in ((0, 1), (1, 2)):
            one = build_gpt(config, get_gpt_decoder_block_spec(
                config, lighthouse=dataclasses.replace(lh, dense_layers=(0, layer)), use_te=False))
            one.load_state_dict(sparse.state_dict(), strict=True)
            with forced_dense([rank]):
                got = sparse(tokens, positions, None)
            torch.testing.assert_close(got, one(tokens, positions, None), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, plain, atol=1e-4)
            assert not torch.allclose(got, dense(tokens, positions, None), atol=1e-4)
        with forced_dense([0, 1]):
            torch.testing.assert_close(sparse(tokens, positions, None), dense(tokens, positions, None),
                                       rtol=1e-5, atol=1e-5)


def test_until_iter_switches_lighthouse_layers_to_dense():
    config = tiny_config(num_layers=2)
    sparse, dense = _models(config, LH, schedule=RecipeSchedule(until_iter=3))
    tokens, positions = batch()
    ref = _run(dense, tokens, positions)[0]
    set_iteration(2)
    assert not torch.allclose(_run(sparse, tokens, positions)[0], ref, atol=1e-4)
    set_iteration(3)
    torch.testing.assert_close(_run(sparse, tokens, positions)[0], ref, rtol=1e-5, atol=1e-5)
    set_iteration(0)


def test_pipeline_stages_get_their_slice_of_dense_layers():
    config = tiny_config(num_layers=4, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    lh = dataclasses.replace(LH, dense_layers=(0, -1))

    def kinds(pp_rank):
        block = get_gpt_decoder_block_spec(config, lighthouse=lh, use_te=False, pp_rank=pp_rank)
        return [s.submodules.self_attention.submodules.core_attention.module.__name__
                for s in block.layer_specs]

    assert kinds(0) == ["DenseCoreAttention", "LighthouseCoreAttention"]
    assert kinds(1) == ["LighthouseCoreAttention", "DenseCoreAttention"]
    # Virtual pipeline: stage (pp, vp) holds layers 2*(2*vp + pp) and the next one.
    vconfig = tiny_config(num_layers=8, pipeline_model_parallel_size=2,
                          virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)

    def vkinds(pp_rank, vp_stage):
        block = get_gpt_decoder_block_spec(vconfig, lighthouse=lh, use_te=False, pp_rank=pp_rank,
                                           vp_stage=vp_stage)
        return [s.submodules.self_attention.submodules.core_attention.module is DenseCoreAttention
                for s in block.layer_specs]

    assert vkinds(0, 0) == [True, False] and vkinds(1, 0) == [False, False]
    assert vkinds(0, 1) == [False, False] and vkinds(1, 1) == [False, True]
    # Specs are never shared between layers.
    block = get_gpt_decoder_block_spec(config, lighthouse=lh, use_te=False, pp_rank=0)
    assert block.layer_specs[0] is not block.layer_specs[1]


def test_build_time_errors_name_the_setting():
    with pytest.raises(ValueError, match="--attention-dropout 0"):
        get_gpt_layer_spec(tiny_config(attention_dropout=0.1), lighthouse=LH, use_te=False)
    with pytest.raises(ValueError, match=r"softmax_type='off-by-one' \(--softmax-type\) is not supported"):
        get_gpt_layer_spec(tiny_config(softmax_type="off-by-one"), lighthouse=LH, use_te=False)
    with pytest.raises(ValueError, match="attention_impl"):
        get_gpt_layer_spec(tiny_config(), attention_impl="sparse", use_te=False)
    with pytest.raises(ValueError, match="out of range"):
        get_gpt_decoder_block_spec(tiny_config(), lighthouse=dataclasses.replace(LH, dense_layers=(5,)),
                                   use_te=False)
    with pytest.warns(UserWarning, match="qk_layernorm"):
        get_gpt_layer_spec(tiny_config(qk_layernorm=True), lighthouse=LH, use_te=False)


def test_module_refuses_packed_sequences_and_non_causal_masks():
    config = tiny_config()
    attn = LighthouseCoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                   attention_type="self", lighthouse=LH)
    q = torch.randn(SEQ, 1, 4, 16)
    k = torch.randn(SEQ, 1, 2, 16)
    kw = dict(attn_mask_type=AttnMaskType.causal, attention_bias=None)
    assert attn(q, k, k, None, packed_seq_params=None, **kw).shape == (SEQ, 1, 64)
    with pytest.raises(ValueError, match="packed sequences"):
        attn(q, k, k, None, packed_seq_params=object(), **kw)
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
    assert attn(q, k, k, causal, packed_seq_params=None, **kw).shape == (SEQ, 1, 64)
    padding = causal.clone()
    padding[..., :4] = True
    with pytest.raises(ValueError, match="not the causal mask"):
        attn(q, k, k, padding, packed_seq_params=None, **kw)
    with pytest.raises(ValueError, match="only causal"):
        attn(q, k, k, None, packed_seq_params=None, attn_mask_type=AttnMaskType.padding, attention_bias=None)
    with pytest.raises(ValueError, match="only causal"):
        LighthouseCoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                                attention_type="self")


def test_tensor_parallel_two_ranks_same_logits(tmp_path):
    """TP=2 over two gloo processes (GQA: one query group per rank) gives the TP=1 logits
    for the same weights."""
    import torch.multiprocessing as mp

    from .megatron_testing import free_port, tp_worker

    overrides = dict(num_layers=2)
    config = tiny_config(**overrides)
    lh = dataclasses.replace(LH, dense_layers=(0,))
    model = build_gpt(config, get_gpt_decoder_block_spec(config, lighthouse=lh, use_te=False))
    tokens, positions = batch()
    with torch.no_grad():
        ref = model(tokens, positions, None)
    path = str(tmp_path / "tp.pt")
    torch.save({"config": overrides, "lighthouse": lh, "state_dict": model.state_dict(),
                "tokens": tokens, "positions": positions}, path)
    mp.spawn(tp_worker, args=(2, free_port(), path), nprocs=2, join=True)
    logits = torch.load(path + ".out")["logits"]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_causal_mask_check_reads_the_cp_layout():
    """Under CP Megatron splits only the mask's query rows (chunks r and 2*CP-1-r)."""
    from lighthouse_megatron.megatron.core_attention import _is_causal_mask
    from lighthouse_megatron.parallel import split_chunks

    class Rank1Of2:  # what ContextParallel.chunk_ids() gives CP rank 1 of 2
        def chunk_ids(self):
            return 1, 2

    n = 64
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[None, None]
    assert _is_causal_mask(split_chunks(causal, 2, 2, 1), n // 2, Rank1Of2())
    assert not _is_causal_mask(split_chunks(causal, 2, 2, 0), n // 2, Rank1Of2())  # rank 0's rows
    documents = causal.clone()
    documents[..., n // 2:, : n // 2] = True  # two documents: the second sees nothing of the first
    assert not _is_causal_mask(split_chunks(documents, 2, 2, 1), n // 2, Rank1Of2())
