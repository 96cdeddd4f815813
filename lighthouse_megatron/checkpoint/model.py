"""The dense model a checkpoint describes: its megatron-core config from the stored
arguments, its weights as one TP = 1 state dict, and the load-and-forward check.

Megatron-LM stores a layer's norms in Transformer Engine's fused names
(`linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`) in torch_dist
checkpoints and in torch-format checkpoints of TE models; the local spec uses
`input_layernorm` / `pre_mlp_layernorm`. State dicts here use the TE names.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F

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


def arg(args: dict, name: str, default=None):
    value = args.get(name, default)
    return default if value is None else value


def uses_te(args: dict, keys=()) -> bool:
    """Whether the checkpoint's model was built with Transformer Engine layers."""
    impl = args.get("transformer_impl")
    if impl is not None:
        return impl == "transformer_engine"
    return any(k.endswith("._extra_state") and "core_attention" in k for k in keys)


def transformer_config(args: dict, *, dtype=torch.float32, cpu_init: bool = True, **overrides):
    """megatron-core TransformerConfig for Megatron-LM arguments (a checkpoint's, or the
    trainer's as it stores them): the model's architecture, with TP = PP = 1 and no dropout
    unless `overrides` (more TransformerConfig fields) say otherwise."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    needed = [n for n in ("num_layers", "hidden_size", "num_attention_heads") if args.get(n) is None]
    if needed:
        raise CheckpointError(f"the stored arguments lack {needed}: cannot rebuild the model")
    if arg(args, "num_experts"):
        raise CheckpointError(f"num_experts={args['num_experts']}: MoE checkpoints are not supported")
    if arg(args, "multi_latent_attention", False):
        raise CheckpointError("multi_latent_attention=True: MLA checkpoints are not supported")
    if arg(args, "swiglu", False):
        activation, gated = F.silu, True
    elif arg(args, "squared_relu", False):
        activation, gated = (lambda x: torch.pow(F.relu(x), 2)), False
    else:
        activation, gated = F.gelu, False
    groups = args.get("num_query_groups") if arg(args, "group_query_attention", False) else None
    fields = dict(
        num_layers=args["num_layers"],
        hidden_size=args["hidden_size"],
        num_attention_heads=args["num_attention_heads"],
        num_query_groups=groups,
        ffn_hidden_size=args.get("ffn_hidden_size"),
        kv_channels=args.get("kv_channels"),
        normalization=arg(args, "normalization", "LayerNorm"),
        layernorm_epsilon=arg(args, "norm_epsilon", 1e-5),
        layernorm_zero_centered_gamma=arg(args, "apply_layernorm_1p", False),
        add_bias_linear=arg(args, "add_bias_linear", True),
        add_qkv_bias=arg(args, "add_qkv_bias", False),
        gated_linear_unit=gated,
        activation_func=activation,
        qk_layernorm=arg(args, "qk_layernorm", False),
        init_method_std=arg(args, "init_method_std", 0.02),
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=dtype,
        use_cpu_initialization=cpu_init,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    with warnings.catch_warnings():
        # megatron-core's own default cuda_graph_scope ("full") triggers its deprecation warning.
        warnings.filterwarnings("ignore", message=r"full scope is deprecated")
        return TransformerConfig(**{**fields, **overrides})


def vocab_size(args: dict, state: dict | None = None) -> int:
    if state is not None and "embedding.word_embeddings.weight" in state:
        return state["embedding.word_embeddings.weight"].shape[0]
    size = args.get("padded_vocab_size") or args.get("vocab_size")
    if size is None:
        raise CheckpointError("the stored arguments lack padded_vocab_size / vocab_size")
    return size


def build_dense_model(args: dict, vocab: int, *, use_te: bool = False, device="cpu", dtype=torch.float32):
    """GPTModel with dense attention for the stored arguments (this package's dense spec)."""
    from megatron.core.models.gpt import GPTModel

    from ..megatron import get_gpt_decoder_block_spec

    config = transformer_config(args, dtype=dtype, cpu_init=device == "cpu")
    if device != "cpu":
        _seed_cuda_rng_tracker()
    spec = get_gpt_decoder_block_spec(config, attention_impl="dense", use_te=use_te)
    position = arg(args, "position_embedding_type", "learned_absolute")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=arg(args, "max_position_embeddings", arg(args, "seq_length", 2048)),
        parallel_output=False,
        share_embeddings_and_output_weights=not arg(args, "untie_embeddings_and_output_weights", False),
        position_embedding_type=position,
        rotary_percent=arg(args, "rotary_percent", 1.0),
        rotary_base=arg(args, "rotary_base", 10000),
        rope_scaling=arg(args, "use_rope_scaling", False),
    )
    return model.to(device).eval()


def _seed_cuda_rng_tracker() -> None:
    # Transformer Engine layers initialise their weights under megatron-core's CUDA RNG
    # tracker; the values are overwritten by the checkpoint's.
    from megatron.core import tensor_parallel

    if not tensor_parallel.get_cuda_rng_tracker().get_states():
        tensor_parallel.model_parallel_cuda_manual_seed(0)


@contextlib.contextmanager
def single_process_megatron():
    """A one-process gloo group and megatron-core's parallel state (TP = PP = 1) for
    building and loading models, unless the caller already has them."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    made_group = not dist.is_initialized()
    if made_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise CheckpointError("the checkpoint tools run in one process; call them outside torchrun "
                              f"(world size {dist.get_world_size()})")
    made_state = not parallel_state.model_parallel_is_initialized()
    if made_state:
        parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        if made_state:
            parallel_state.destroy_model_parallel()
        if made_group:
            dist.destroy_process_group()


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


def legacy_model_state(ckpt: Checkpoint, args: dict, shards: dict | None = None) -> dict:
    """The TP = PP = 1 model state dict of a torch-format checkpoint (TP shards merged,
    pipeline stages renumbered). `shards` may hold already-loaded files by (tp, pp)."""
    tps = 1 + max(tp for tp, _ in ckpt.shards)
    pps = 1 + max(pp for _, pp in ckpt.shards)
    gated = bool(arg(args, "swiglu", False))
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


def model_state(ckpt: Checkpoint, args: dict) -> dict:
    if ckpt.format == "torch":
        return legacy_model_state(ckpt, args)
    return dist_model_state(ckpt)


# --- verification -----------------------------------------------------------------------------

def _te_ready() -> bool:
    from ..backends import te_available

    return torch.cuda.is_available() and te_available()


def verify_dense(ckpt: Checkpoint, args: dict) -> dict[str, Any]:
    """Load `ckpt` into a dense-spec GPTModel with strict key checks and run a forward pass.

    torch_dist (the >= 0.19 layout needs megatron-core >= 0.19): megatron-core's own
    dist_checkpointing.load, which must report no missing and no unexpected model keys.
    Otherwise the merged TP = 1 state dict is compared key by key with the model's and
    loaded. Transformer Engine checkpoints are loaded into a TE model where TE runs (a GPU);
    elsewhere into the local spec with TE's norm names mapped, TE's
    `core_attention._extra_state` checked by name. The forward pass runs on the GPU where TE
    runs, on the CPU elsewhere.
    Returns a summary; raises CheckpointError on any mismatch.
    """
    from ..megatron.cpu import cpu_as_current_device  # imports megatron-core: only when a model is built

    te_checkpoint = uses_te(args)
    use_te = te_checkpoint and _te_ready()
    # Where TE runs, megatron-core builds even the local spec's final norm from TE
    # (transformer_block.LayerNormImpl), which has no CPU kernels: verify on the GPU there.
    device = "cuda" if _te_ready() else "cpu"
    with single_process_megatron(), cpu_as_current_device() if device == "cpu" else contextlib.nullcontext():
        readable = ckpt.layout == "common.pt" or _core_reads_common_state()
        if ckpt.format == "torch_dist" and readable:
            model, how = _load_with_dist_checkpointing(ckpt, args, use_te, device)
        else:
            state = model_state(ckpt, args)
            te_checkpoint = te_checkpoint or uses_te(args, state)
            model, how = _load_state_dict(state, args, use_te, te_checkpoint, device)
        seq = min(64, arg(args, "seq_length", 64), arg(args, "max_position_embeddings", 64))
        tokens = (torch.arange(seq, device=device) * 7 % model.vocab_size).unsqueeze(0)
        positions = torch.arange(seq, device=device).unsqueeze(0)
        with torch.no_grad():
            logits = model(tokens, positions, None)
    if not torch.isfinite(logits).all():
        raise CheckpointError("the converted checkpoint loads, but its forward pass gives non-finite logits")
    return {"loaded_with": how, "spec": "TE dense" if use_te else "local dense",
            "forward": f"logits {tuple(logits.shape)} finite"}


def _core_reads_common_state() -> bool:
    """megatron-core >= 0.19 reads the common state from the distcp files."""
    import megatron.core

    major, minor = (int(x) for x in megatron.core.__version__.split(".")[:2])
    return (major, minor) >= (0, 19)


def _dtype(device: str) -> torch.dtype:
    # Transformer Engine's fused attention runs bf16, not fp32; the check is load + finite logits.
    return torch.bfloat16 if device == "cuda" else torch.float32


def _load_with_dist_checkpointing(ckpt, args, use_te, device):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from .reader import dcp_items

    items = dcp_items(ckpt.directory)
    vocab = items["embedding.word_embeddings.weight"].size[0] if "embedding.word_embeddings.weight" in items \
        else vocab_size(args)
    model = build_dense_model(args, vocab, use_te=use_te, device=device, dtype=_dtype(device))
    # megatron-core's names: "missing" = stored but not requested by the model,
    # "unexpected" = requested by the model but not stored.
    request = model.sharded_state_dict()
    try:
        loaded, not_requested, not_stored = dist_checkpointing.load(
            request, str(ckpt.directory), strict=StrictHandling.RETURN_ALL
        )
    except Exception as e:  # megatron-core and torch raise their own exception types
        raise CheckpointError(f"{ckpt.directory}: megatron-core cannot load it under the dense spec "
                              f"({str(e).strip().splitlines()[-1][:300]})") from e
    not_requested = {k for k in not_requested if not k.startswith(NOT_MODEL)}
    if not_requested or not_stored:
        raise CheckpointError(f"{ckpt.directory} does not match the dense model: keys the model lacks "
                              f"{sorted(not_requested)}, keys the checkpoint lacks {sorted(not_stored)}")
    model.load_state_dict({k: loaded[k] for k in request}, strict=True)  # loaded holds the common state too
    return model, "megatron-core dist_checkpointing.load (strict)"


def _load_state_dict(state, args, use_te, te_checkpoint, device):
    model = build_dense_model(args, vocab_size(args, state), use_te=use_te, device=device,
                              dtype=_dtype(device))
    expected = model.state_dict()
    if te_checkpoint and not use_te:
        # No TE here: its extra state has no local counterpart, so check by name that every
        # layer has the entry TEDotProductAttention loads.
        lacking = [i for i in range(args["num_layers"])
                   if f"decoder.layers.{i}.{CORE_ATTENTION_EXTRA}" not in state]
        if lacking:
            raise CheckpointError(f"layers {lacking} lack {CORE_ATTENTION_EXTRA}, which Transformer "
                                  "Engine's dense core attention loads")
    candidate = state if use_te else to_local_names(state)

    def extra(key):  # TE's FP8 metadata, None for local layers: not a weight
        return key.endswith("._extra_state")

    if not use_te:
        candidate = {k: v for k, v in candidate.items() if not extra(k) or k in expected}
    missing = sorted(k for k in set(expected) - set(candidate) if use_te or not extra(k))
    unexpected = sorted(set(candidate) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"the model state does not match the dense model: missing keys {missing}, "
                              f"unexpected keys {unexpected}")
    weights = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
               for k, v in candidate.items()}
    model.load_state_dict(weights, strict=use_te)  # the key sets were compared above
    return model, "load_state_dict (strict keys)"
