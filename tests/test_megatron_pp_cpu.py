"""Pipeline parallelism on the CPU: PP = 2 over two gloo processes, each building its own stage
with the package's block spec (Lighthouse and dense layers by global index), hands the hidden
states on and gives the logits of the one-process model with the same weights. (Megatron-LM's
pipeline schedules need CUDA; the stages' forward is what they run.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from ._distributed import run_workers  # noqa: E402
from .megatron_testing import LH, SEQ, VOCAB, batch, init_parallel, tiny_config  # noqa: E402

LIGHTHOUSE = dataclasses.replace(LH, dense_layers=(0, -1))


def _gpt(config, pre_process=True, post_process=True):
    from megatron.core.models.gpt import GPTModel

    from lighthouse_megatron.megatron import get_gpt_decoder_block_spec

    torch.manual_seed(0)
    spec = get_gpt_decoder_block_spec(config, lighthouse=LIGHTHOUSE, use_te=False)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                    pre_process=pre_process, post_process=post_process, parallel_output=False,
                    share_embeddings_and_output_weights=False, position_embedding_type="learned_absolute")


def _stage_worker(rank: int, world_size: int, path: str) -> None:
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    saved = torch.load(path)
    config = tiny_config(num_layers=4, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    stage = _gpt(config, pre_process=rank == 0, post_process=rank == 1)
    offset = get_transformer_layer_offset(config)
    kinds = [type(layer.self_attention.core_attention).__name__ for layer in stage.decoder.layers]
    # Global layers 0 and 3 are dense: the first layer of stage 0, the last of stage 1.
    expected = {0: ["DenseCoreAttention", "LighthouseCoreAttention"],
                1: ["LighthouseCoreAttention", "DenseCoreAttention"]}[rank]
    assert kinds == expected, kinds
    full = saved["state_dict"]

    def global_key(key: str) -> str:
        if key.startswith("decoder.layers."):
            _, _, index, rest = key.split(".", 3)
            return f"decoder.layers.{int(index) + offset}.{rest}"
        return key

    stage.load_state_dict({k: full[global_key(k)] for k in stage.state_dict()}, strict=True)
    stage.eval()
    tokens, positions = saved["tokens"], saved["positions"]
    hidden_shape = (SEQ, tokens.shape[0], config.hidden_size)
    with torch.no_grad():
        if rank == 0:
            hidden = stage(tokens, positions, None)
            assert tuple(hidden.shape) == hidden_shape
            dist.send(hidden.contiguous(), dst=1)
        else:
            hidden = torch.empty(hidden_shape)
            dist.recv(hidden, src=0)
            stage.set_input_tensor(hidden)
            torch.save({"logits": stage(tokens, positions, None)}, path + ".out")


def test_pipeline_two_stages_same_logits(tmp_path):
    init_parallel()
    config = tiny_config(num_layers=4)
    model = _gpt(config).eval()
    tokens, positions = batch()
    with torch.no_grad():
        reference = model(tokens, positions, None)
    path = str(tmp_path / "pp.pt")
    torch.save({"state_dict": model.state_dict(), "tokens": tokens, "positions": positions}, path)
    run_workers(_stage_worker, 2, path)
    torch.testing.assert_close(torch.load(path + ".out")["logits"], reference, rtol=1e-5, atol=1e-5)
