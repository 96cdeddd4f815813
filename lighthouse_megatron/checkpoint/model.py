"""A checkpoint's model state: its weights as one TP = 1 state dict (torch format: the TP
shards merged, the pipeline stages renumbered; torch_dist: the layers unstacked), their shapes
from the metadata alone, and what the stored arguments say about the model's modules.

Megatron-LM stores a layer's norms in Transformer Engine's fused names
(`linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`) in torch_dist
checkpoints and in torch-format checkpoints of TE models; the local spec uses
`input_layernorm` / `pre_mlp_layernorm`. State dicts here use the TE names.
"""

from __future__ import annotations

import re

import torch

from ..settings.fields import Values
from .reader import Checkpoint, CheckpointError, dcp_read_all, read_shard

LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Local-spec name -> TE fused name.
_LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
CORE_ATTENTION_EXTRA = "self_attention.core_attention._extra_state"
# Items of a torch_dist checkpoint that are not model state.
NOT_MODEL = ("optimizer.", "rng_state", "common_state", "rerun_state_machine", "content_metadata")


def uses_te(args, keys=()) -> bool:
    """Whether the checkpoint's model (its stored `args`, Values) was built with Transformer
    Engine layers."""
    args = Values.of(args)
    if args.transformer_impl is not None:
        return args.transformer_impl == "transformer_engine"
    return any(k.endswith("._extra_state") and "core_attention" in k for k in keys)


def vocab_size(args, state: dict | None = None) -> int:
    """The model's vocabulary rows: the embedding's, else the stored arguments' (Values)."""
    args = Values.of(args)
    if state is not None and "embedding.word_embeddings.weight" in state:
        return state["embedding.word_embeddings.weight"].shape[0]
    size = args.padded_vocab_size or args.vocab_size
    if size is None:
        raise CheckpointError("the stored arguments lack padded_vocab_size / vocab_size")
    return size


def _rename_layers(state: dict, names: dict[str, str]) -> dict:
    out = {}
    for key, value in state.items():
        m = LAYER_KEY.match(key)
        if m and m.group(2) in names:
            key = f"decoder.layers.{m.group(1)}.{names[m.group(2)]}"
        out[key] = value
    return out


def to_te_names(state: dict) -> dict:
    return _rename_layers(state, _LOCAL_TO_TE)


def to_local_names(state: dict) -> dict:
    return _rename_layers(state, {te: local for local, te in _LOCAL_TO_TE.items()})


# --- tensor-parallel merge (torch format) ---------------------------------------------------

def _merge_tp(key: str, shards: list, gated: bool):
    if len(shards) == 1 or not isinstance(shards[0], torch.Tensor):
        return shards[0]
    name = LAYER_KEY.match(key).group(2) if LAYER_KEY.match(key) else key
    if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                "embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"):
        # QKV rows are grouped per query group and TP splits whole groups, so rank order
        # is the global order.
        return torch.cat(shards, dim=0)
    if name in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
        if gated:  # each rank holds [its gate rows; its up rows]
            halves = [s.chunk(2, dim=0) for s in shards]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return torch.cat(shards, dim=0)
    if name in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return torch.cat(shards, dim=1)
    return shards[0]  # replicated: norms, row-parallel biases, position embeddings, extra state


def legacy_model_state(ckpt: Checkpoint, args, shards: dict | None = None) -> dict:
    """The TP = PP = 1 model state dict of a torch-format checkpoint (TP shards merged,
    pipeline stages renumbered). `shards` may hold already-loaded files by (tp, pp)."""
    args = Values.of(args)
    tps = 1 + max(tp for tp, _ in ckpt.shards)
    pps = 1 + max(pp for _, pp in ckpt.shards)
    gated = bool(args.swiglu)
    merged, offset = {}, 0
    for pp in range(pps):
        states = []
        for tp in range(tps):
            state = shards[(tp, pp)] if shards else read_shard(ckpt, tp, pp)
            if "model" not in state or any(k.startswith("model0") for k in state):
                raise CheckpointError(f"{ckpt.shards[(tp, pp)]}: virtual-pipeline checkpoints (model0, "
                                      "model1, ...) are not supported")
            states.append(state["model"])
        keys = list(states[0])
        for i, s in enumerate(states[1:], 1):
            if set(s) != set(keys):
                raise CheckpointError(f"{ckpt.shards[(i, pp)]}: its keys differ from TP rank 0's (mismatched "
                                      "shards)")
        layers = set()
        for key in keys:
            value = _merge_tp(key, [s[key] for s in states], gated)
            m = LAYER_KEY.match(key)
            if m:
                layers.add(int(m.group(1)))
                key = f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}"
            merged[key] = value
        offset += len(layers)
    return to_te_names(merged)


def dist_model_state(ckpt: Checkpoint) -> dict:
    """The model tensors of a torch_dist checkpoint (global, TP = 1), layers unstacked."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: F401

    items = dcp_read_all(
        ckpt.directory, lambda k: not k.startswith(NOT_MODEL) and "/shard_" not in k
    )
    state = {}
    for key, value in items.items():
        if key.startswith("decoder.layers.") and not LAYER_KEY.match(key):
            # torch_dist stacks each layer parameter along a leading layer axis.
            rest = key[len("decoder.layers."):]
            for i in range(value.shape[0]):
                state[f"decoder.layers.{i}.{rest}"] = value[i]
        else:
            state[key] = value
    return state


def dist_model_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Model tensor shapes of a torch_dist checkpoint from its metadata alone, layers unstacked."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .reader import dcp_items

    shapes = {}
    for key, meta in dcp_items(ckpt.directory).items():
        if not isinstance(meta, TensorStorageMetadata) or key.startswith(NOT_MODEL):
            continue
        if key.startswith("decoder.layers.") and not LAYER_KEY.match(key):
            rest = key[len("decoder.layers."):]
            shapes.update({f"decoder.layers.{i}.{rest}": tuple(meta.size[1:]) for i in range(meta.size[0])})
        else:
            shapes[key] = tuple(meta.size)
    return shapes


def model_state(ckpt: Checkpoint, args) -> dict:
    if ckpt.format == "torch":
        return legacy_model_state(ckpt, args)
    return dist_model_state(ckpt)


