"""Loading a converted checkpoint densely to check it: the dense model its stored arguments
describe (the package's one model builder, `megatron.model`), loaded with strict key checks and
run forward once, inside a one-process megatron-core if the caller has none."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..checkpoint.model import (
    CORE_ATTENTION_EXTRA,
    NOT_MODEL,
    model_state,
    to_local_names,
    uses_te,
    vocab_size,
)
from ..checkpoint.reader import Checkpoint, CheckpointError, dcp_items
from ..megatron import get_gpt_decoder_block_spec
from ..megatron.cpu import cpu_as_current_device
from ..megatron.model import gpt_model, transformer_config
from ..settings.fields import Values, given


def build_dense_model(args, vocab: int, *, use_te: bool = False, device="cpu", dtype=torch.float32):
    """GPTModel with dense attention for the stored arguments (this package's dense spec), by
    the package's one model builder."""
    try:
        config = transformer_config(args, dtype=dtype, cpu_init=device == "cpu")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if device != "cpu":
        _seed_cuda_rng_tracker()
    spec = get_gpt_decoder_block_spec(config, attention_impl="dense", use_te=use_te)
    return gpt_model(args, config, spec, vocab, parallel_output=False).to(device).eval()


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


def _te_ready() -> bool:
    from ..backends import te_available

    return torch.cuda.is_available() and te_available()


def verify_dense(ckpt: Checkpoint, args: Values) -> dict[str, Any]:
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
    args = Values.of(args)
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
        seq = min(64, given(args.seq_length, 64), given(args.max_position_embeddings, 64))
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
        lacking = [i for i in range(args.num_layers)
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
