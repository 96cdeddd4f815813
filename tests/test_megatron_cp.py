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
