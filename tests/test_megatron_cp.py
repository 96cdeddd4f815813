"""A megatron-core GPTModel with the Lighthouse spec under context parallelism (gloo, CPU).

Four processes run the same model at (TP, CP) = (1, 1), (1, 2), (1, 4) and (2, 2), each fed the
layout megatron-core's `get_batch_on_this_cp_rank` produces: per-token losses and the
parameter gradients summed over the CP group equal the CP = 1 ones.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402

from lighthouse_megatron import LighthouseConfig  # noqa: E402
from lighthouse_megatron.parallel import merge_chunks  # noqa: E402

from ._distributed import run_workers  # noqa: E402

SEQ = 128
# L=3, p=2, k=16, T=2: 8 tiles of 16 tokens, so CP = 4 gives each of its 8 chunks one tile;
# S = 128/4 + 2*2*16 = 96 gathered entries. Layer 0 stays dense (it runs CP attention too).
LH = LighthouseConfig(levels=3, pooling_factor=2, topk=16, tile_topk=2, dense_layers=(0,))
LAYOUTS = [(1, 1), (1, 2), (1, 4), (2, 2)]


def _split_batch(batch):
    from megatron.core.utils import get_batch_on_this_cp_rank

    params = inspect.signature(get_batch_on_this_cp_rank).parameters
    kwargs = {"is_hybrid_cp": False} if "is_hybrid_cp" in params else {}
    if "cp_group" in params:  # megatron-core 0.19 splits over the whole world without it
        from megatron.core import parallel_state

        kwargs["cp_group"] = parallel_state.get_context_parallel_group()
    return get_batch_on_this_cp_rank(dict(batch), **kwargs)


def _worker(rank, world):
    from megatron.core import parallel_state

    from lighthouse_megatron.megatron import get_gpt_decoder_block_spec

    from .megatron_testing import VOCAB, build_gpt, load_sharded, tiny_config

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    full = {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1),
            "position_ids": torch.arange(SEQ).unsqueeze(0).expand(2, -1).contiguous()}
    reference = None
    for tp, cp in LAYOUTS:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        config = tiny_config(tensor_model_parallel_size=tp, context_parallel_size=cp)
        model = build_gpt(config, get_gpt_decoder_block_spec(config, lighthouse=LH, use_te=False), seq=SEQ,
                          parallel_output=True)
        if reference is None:
            state = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            load_sharded(model, state, parallel_state.get_tensor_model_parallel_rank(), tp)
        batch = _split_batch(full)
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s_local]
        loss.sum().backward()
        cp_group = parallel_state.get_context_parallel_group()
        parts = [torch.empty_like(loss) for _ in range(cp)]
        dist.all_gather(parts, loss.detach().contiguous(), group=cp_group)
        per_token = merge_chunks(parts, dim=1)
        grads = {}
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad, group=cp_group)  # what Megatron's DDP does over DP x CP
            grads[name] = (grad, p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
        if reference is None:
            reference = (per_token, {n: g for n, (g, _) in grads.items()})
            continue
        where = f"TP={tp} CP={cp}"
        torch.testing.assert_close(per_token, reference[0], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, where=where: f"{where} per-token loss: {m}")
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for name, (grad, dim) in grads.items():
            want = reference[1][name]
            if dim is not None:
                want = want.chunk(tp, dim=dim)[tp_rank]
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name, where=where: f"{where} grad {name}: {m}")


def test_gpt_model_is_cp_invariant():
    run_workers(_worker, 4)


def _split_groups_worker(rank, world):
    """One GQA group (num_query_groups = 1) over TP = 2: megatron-core replicates the KV head,
    each rank holds half the query heads, and the ranks max-reduce the group's query scores."""
    from megatron.core import parallel_state

    # megatron-core's all-gather of the QKV output (its layout for fewer groups than ranks)
    # allocates on torch.cuda.current_device(); this worker process runs on the CPU.
    torch.cuda.current_device = lambda: "cpu"

    from lighthouse_megatron.megatron import get_gpt_decoder_block_spec

    from .megatron_testing import VOCAB, build_gpt, load_sharded, tiny_config

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(2, -1).contiguous()
    labels = torch.roll(tokens, -1, dims=1)
    # Query heads with very different norms per rank: a per-rank max would select differently.
    results = {}
    for tp in (1, 2):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        config = tiny_config(tensor_model_parallel_size=tp, num_query_groups=1, num_layers=2)
        model = build_gpt(config, get_gpt_decoder_block_spec(config, lighthouse=LH, use_te=False), seq=SEQ,
                          parallel_output=True)
        if tp == 1:
            state = {n: p.detach().clone() for n, p in model.named_parameters()}
            with torch.no_grad():  # rank-dependent query norms: the second half of the heads louder
                w = state["decoder.layers.1.self_attention.linear_qkv.weight"]
                w[32:64] *= 3.0  # [q0 q1 q2 q3 k v] x 16 rows: heads 2 and 3
        load_sharded(model, state, parallel_state.get_tensor_model_parallel_rank(), tp)
        loss = model(tokens, positions, None, labels=labels)
        loss.sum().backward()
        layer = model.decoder.layers[1].self_attention.core_attention
        assert (layer.split_groups is not None) == (tp == 2)
        results[tp] = (loss.detach(), model.embedding.word_embeddings.weight.grad.clone())
    torch.testing.assert_close(results[2][0], results[1][0], rtol=1e-5, atol=1e-5)
    vocab_part = results[1][1].chunk(2)[parallel_state.get_tensor_model_parallel_rank()]
    torch.testing.assert_close(results[2][1], vocab_part, rtol=1e-4, atol=1e-5)


def test_fewer_query_groups_than_tp_ranks_equals_tp1():
    run_workers(_split_groups_worker, 2)
