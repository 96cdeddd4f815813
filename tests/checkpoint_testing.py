"""Stage-1 checkpoints written the way Megatron-LM writes them, for the converter tests.

A tiny Llama-shaped GPT (RMSNorm, SwiGLU, RoPE, GQA 4/2, no biases, untied embeddings)
with this package's Lighthouse block spec (layer 0 dense), after one Adam step:

- torch_dist: `dist_checkpointing.save` of Megatron-LM's top-level keys (args Namespace,
  checkpoint_version 3.0, iteration, model and optimizer sharded state dicts,
  opt_param_scheduler, rng_state ShardedObject), megatron-core 0.16's layout
  (common.pt); the >= 0.19 layout (common state as a `common_state` byte item, no
  common.pt) written with torch.distributed.checkpoint as megatron-core 0.19 does;
- torch: `iter_N/mp_rank_TT/model_optim_rng.pt` with `state_dict_for_save_checkpoint()`,
  from TP = 1 or from the ranks of a real TP = 2 model (two gloo processes).

CPU notes: megatron-core 0.16.1's RoPE asks torch.cuda.current_device() in forward
(`lighthouse_megatron.megatron.cpu.cpu_as_current_device` answers "cpu"), its checkpoint writer
calls torch.cuda.synchronize() (a no-op here while saving); Megatron-LM's RNG
tracker needs CUDA, so rng_state holds the CPU generator's state only.
"""

from __future__ import annotations

import argparse
import io
import os
import random
from pathlib import Path

import torch

from lighthouse_megatron import LighthouseConfig
from lighthouse_megatron.megatron.cpu import cpu_as_current_device
from lighthouse_megatron.recipe import RecipeSchedule

VOCAB, SEQ, ITERATION = 64, 64, 7
LH = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_topk=2, dense_layers=(0,))


def megatron_args(tp: int = 1, ckpt_format: str = "torch_dist", **overrides) -> argparse.Namespace:
    """The arguments Megatron-LM would store for the model (Megatron-LM's names)."""
    values = dict(
        num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, group_query_attention=True,
        num_query_groups=2, kv_channels=16, seq_length=SEQ, max_position_embeddings=SEQ,
        padded_vocab_size=VOCAB, normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True,
        position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0, add_bias_linear=False,
        add_qkv_bias=False, untie_embeddings_and_output_weights=True, transformer_impl="local",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, context_parallel_size=1,
        world_size=tp, ckpt_format=ckpt_format, params_dtype=torch.float32, iteration=ITERATION,
        attention_impl="lighthouse", spec=None, lighthouse_levels=LH.levels,
        lighthouse_pooling_factor=LH.pooling_factor, lighthouse_topk=LH.topk,
        lighthouse_tile_topk=LH.tile_topk, lighthouse_dense_layers=list(LH.dense_layers),
        lighthouse_scorer="norm", lighthouse_backend="auto", lighthouse_until_iter=None,
        lighthouse_config=None,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def transformer_config(tp: int = 1, cpu_init: bool = True):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        kv_channels=16, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, attention_dropout=0.0,
        hidden_dropout=0.0, use_cpu_initialization=cpu_init, params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
    )


def lighthouse_model(tp: int = 1, dense: bool = False, seed: int = 0, parallel_output: bool = False,
                     tied: bool = False):
    """The stage-1 model; `dense=True` runs the same layers densely (dense from iteration 0),
    the independent reference for a converted checkpoint's logits."""
    from megatron.core.models.gpt import GPTModel

    from lighthouse_megatron.megatron import get_gpt_decoder_block_spec

    config = transformer_config(tp)
    spec = get_gpt_decoder_block_spec(config, lighthouse=LH, use_te=False,
                                      schedule=RecipeSchedule(until_iter=0 if dense else None))
    torch.manual_seed(seed)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                    parallel_output=parallel_output, position_embedding_type="rope",
                    share_embeddings_and_output_weights=tied).eval()


def tokens(b: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, SEQ), generator=g), torch.arange(SEQ).unsqueeze(0).expand(b, -1)


def logits(model, b: int = 2):
    tok, pos = tokens(b)
    with torch.no_grad(), cpu_as_current_device():
        return model(tok, pos, None)


def train_step(model):
    """One Adam step, so the checkpoint has real optimizer state."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    tok, pos = tokens()
    with cpu_as_current_device():
        model(tok, pos, None).float().pow(2).mean().backward()
    opt.step()
    model.eval()
    return opt


def _rng_state():
    return {"random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state()}


def save_torch_dist(model, opt, args, root: Path, iteration: int = ITERATION) -> Path:
    """Megatron-LM's generate_state_dict + dist_checkpointing.save, on one process."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    model_sd = model.sharded_state_dict()
    optim_sd = opt.state_dict()
    id_map = get_param_id_to_sharded_param_map(model_sd, model.parameters())
    optim_state_to_sharding_state(optim_sd, id_map, exclude_keys=("step",))
    state = {
        "args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model_sd,
        "optimizer": optim_sd, "opt_param_scheduler": {"num_steps": iteration * 4, "max_lr": 1e-2},
        "rng_state": ShardedObject("rng_state", [_rng_state()], (1, 1), (0, 0), replica_id=0),
        "num_floating_point_operations_so_far": 1.0e9,
    }
    directory = root / f"iter_{iteration:07d}"
    directory.mkdir(parents=True)
    synchronize = torch.cuda.synchronize
    if not torch.cuda.is_available():
        # megatron-core's writer synchronises CUDA after staging tensors to host memory.
        torch.cuda.synchronize = lambda *a, **k: None
    try:
        with cpu_as_current_device():  # also answers the writer's torch.cuda.current_device()
            dist_checkpointing.save(state, str(directory))
    finally:
        torch.cuda.synchronize = synchronize
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def to_common_state_layout(src: Path, dst: Path, common: dict | None = None) -> Path:
    """Rewrite a megatron-core 0.16 torch_dist checkpoint in the >= 0.19 layout: every item
    kept, the common state stored as the byte item `common_state/shard_0_1` holding
    torch.save([common]) (megatron-core 0.19's ShardedObject("common_state") serialisation),
    and no common.pt; `common` replaces the common state. Uses torch.distributed.checkpoint
    directly."""
    import shutil

    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter, save

    from lighthouse_megatron.checkpoint.reader import dcp_read_all

    (it,) = [p for p in src.iterdir() if p.name.startswith("iter_")]
    # Byte items as megatron-core hands them to torch: the objects, which torch.save()s.
    state = {k: torch.load(io.BytesIO(v), weights_only=False) if isinstance(v, bytes) else v  # test-made
             for k, v in dcp_read_all(it).items()}
    if common is None:  # the source's (megatron-core >= 0.19 writes no common.pt)
        from lighthouse_megatron.checkpoint.reader import locate, read_common

        common = read_common(locate(src))
    state["common_state/shard_0_1"] = [common]
    out = dst / it.name
    out.mkdir(parents=True)
    save(state, storage_writer=FileSystemWriter(str(out)),
         planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
    shutil.copy2(it / "metadata.json", out / "metadata.json")
    shutil.copy2(src / "latest_checkpointed_iteration.txt", dst / "latest_checkpointed_iteration.txt")
    return dst


def save_legacy(state_dicts: dict[int, dict], args, root: Path, iteration: int = ITERATION) -> Path:
    """Megatron-LM's torch format: one model_optim_rng.pt per TP rank."""
    for tp, state in state_dicts.items():
        file = root / f"iter_{iteration:07d}" / f"mp_rank_{tp:02d}" / "model_optim_rng.pt"
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**state, "args": args, "checkpoint_version": 3.0, "iteration": iteration}, file)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def legacy_rank_state(model, opt) -> dict:
    return {"model": model.state_dict_for_save_checkpoint(), "optimizer": opt.state_dict(),
            "opt_param_scheduler": {"num_steps": ITERATION * 4}, "rng_state": [_rng_state()]}


def tp2_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank of a TP = 2 stage-1 model: a training step, then its torch-format shard
    and (rank 0) the model's dense logits, gathered over the vocab-parallel output."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.distributed as dist

    from tests.megatron_testing import init_parallel

    init_parallel(rank, world_size, tp=world_size, port=port)
    model = lighthouse_model(tp=world_size, parallel_output=True)
    opt = train_step(model)
    dense = lighthouse_model(tp=world_size, dense=True, parallel_output=True)
    dense.load_state_dict(model.state_dict())
    local = logits(dense)
    shards = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(shards, local.contiguous())
    torch.save({"rank_state": legacy_rank_state(model, opt), "logits": torch.cat(shards, dim=-1)},
               f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
