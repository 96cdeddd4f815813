"""Helpers for the megatron-core tests: a process group, tiny GPT models, TP weight sharding.

CPU notes (docs/megatron.md, "megatron-core on the CPU"): learned absolute position embeddings (RoPE moves its
frequencies with torch.cuda.current_device() in megatron-core 0.16), CPU initialization,
no dropout, no Megatron RNG tracker (not needed without dropout).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from lighthouse_megatron import LighthouseConfig

VOCAB = 64
SEQ = 64
# L=2, p=2, k=8, T=2 at 64 tokens: S = 64/2 + 2*8 = 48 gathered entries, so Lighthouse
# really differs from dense attention; L=1 is dense.
LH = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_topk=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(rank: int = 0, world_size: int = 1, tp: int = 1, port: int | None = None,
                  backend: str = "gloo") -> None:
    from megatron.core import parallel_state

    if not dist.is_initialized():
        port = port or free_port()
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def tiny_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, attention_dropout=0.0, hidden_dropout=0.0,
        use_cpu_initialization=True, add_bias_linear=False, params_dtype=torch.float32,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt(config, spec, seed: int = 0, device: str = "cpu", position_embedding_type="learned_absolute",
              parallel_output: bool = False, seq: int = SEQ):
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(seed)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=seq,
        parallel_output=parallel_output, position_embedding_type=position_embedding_type,
    )
    return model.to(device)


def batch(b: int = 2, seed: int = 1, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, SEQ), generator=g).to(device)
    positions = torch.arange(SEQ, device=device).unsqueeze(0).expand(b, -1)
    return tokens, positions


def load_sharded(model, full_state_dict, tp_rank: int, tp_size: int) -> None:
    """Load a TP=1 state dict into this rank's TP shard (Megatron tags TP parameters with
    `tensor_model_parallel` and `partition_dim`; QKV is grouped per query group, so a plain
    split along the output dim gives each rank its own groups)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = full_state_dict[name]
            if getattr(p, "tensor_model_parallel", False):
                full = full.chunk(tp_size, dim=p.partition_dim)[tp_rank]
            assert p.shape == full.shape, (name, p.shape, full.shape)
            p.copy_(full)


def tp_worker(rank: int, world_size: int, port: int, path: str) -> None:
    """One TP rank: load the TP=1 weights, write the logits (rank 0)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from lighthouse_megatron.megatron import get_gpt_decoder_block_spec

    init_parallel(rank, world_size, tp=world_size, port=port)
    saved = torch.load(path, weights_only=False)
    config = tiny_config(tensor_model_parallel_size=world_size, **saved["config"])
    spec = get_gpt_decoder_block_spec(config, lighthouse=saved["lighthouse"], use_te=False)
    # Vocab-parallel logits, gathered here: megatron-core's own gather needs CUDA.
    model = build_gpt(config, spec, parallel_output=True)
    load_sharded(model, saved["state_dict"], rank, world_size)
    tokens, positions = saved["tokens"], saved["positions"]
    local = model(tokens, positions, None)
    local.sum().backward()
    shards = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(shards, local.detach().contiguous())
    logits = torch.cat(shards, dim=-1)
    if rank == 0:
        torch.save({"logits": logits.detach()}, path + ".out")
    dist.barrier()
    dist.destroy_process_group()
