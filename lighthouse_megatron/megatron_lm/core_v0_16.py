"""Megatron-LM core 0.16 (`pretrain(..., extra_args_provider=...)`, `gpt_builders.gpt_builder`).

Called by the entry point and by `patches/megatron-lm-core_v0.16.1.patch`:

    pretrain(..., partial(model_provider, lighthouse.wrap_gpt_builder(gpt_builder)), ...,
             lighthouse.wrap_forward_step(forward_step), ...,
             extra_args_provider=lighthouse.extra_args_provider(add_modelopt_args or None))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial

from ..settings.lighthouse import validate_lighthouse_args
from .launch import (
    announce,
    clean_exit,
    extra_args_provider,
    spec_provider_from_args,
    use_megatron_lm_iteration,
    uses_package_spec,
    warn_settings,
    wrap_forward_step,
)

__all__ = ["extra_args_provider", "run", "wrap_forward_step", "wrap_gpt_builder"]

ARGS_DEFAULTS = dict(tokenizer_type="GPT2BPETokenizer")  # as Megatron-LM's pretrain_gpt.py

# 0.16's gpt_builder takes a custom spec only through `--spec MODULE NAME`, which it reads
# as a module attribute and never calls. This attribute holds the spec of the stage being
# built for exactly the duration of one stock gpt_builder call, and nothing else uses it.
_stage_block_spec = None


def wrap_gpt_builder(gpt_builder: Callable) -> Callable:
    """Megatron-LM's stock `gpt_builder`, building the Lighthouse block spec of each
    pipeline stage with `--attention-impl lighthouse` (and validating the arguments).

    The stock builder still builds everything else (embeddings, RoPE, output layer)."""

    @functools.wraps(gpt_builder)
    def builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        global _stage_block_spec
        with clean_exit():
            validate_lighthouse_args(args)
        use_megatron_lm_iteration()
        call = partial(gpt_builder, args, pre_process, post_process, vp_stage=vp_stage, config=config,
                       pg_collection=pg_collection)
        if not uses_package_spec(args):
            return _announced(call(), vp_stage)
        if config is None:
            from megatron.training.arguments import core_transformer_config_from_args

            config = core_transformer_config_from_args(args)
            call = partial(call, config=config)
        _stage_block_spec = spec_provider_from_args(args)(config, vp_stage=vp_stage)
        args.spec = [__name__, "_stage_block_spec"]
        try:
            return _announced(call(), vp_stage)
        finally:
            # Checkpoints store args: they must never record this spec.
            args.spec, _stage_block_spec = None, None

    return builder


def _announced(model, vp_stage):
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    announce(f"model of this stage (vp_stage={vp_stage}), core attention",
             [type(layer.self_attention.core_attention).__name__ for layer in layers])
    return model


def run(training, mlm, pretrain, store) -> None:
    """The entry point's 0.16 path: Megatron-LM's own __main__ block, with the Lighthouse hooks."""
    from megatron.core.enums import ModelType
    from megatron.training.arguments import parse_args

    modelopt = mlm.add_modelopt_args if getattr(mlm, "has_nvidia_modelopt", False) else None
    provider = extra_args_provider(modelopt)
    # pretrain() parses the arguments itself, after starting the process groups; parse
    # them once here too, to fail on bad Lighthouse settings before anything starts.
    with clean_exit():
        args = parse_args(extra_args_provider=provider)
        validate_lighthouse_args(args)
        if not hasattr(mlm, "gpt_builder"):
            raise ValueError("this Megatron-LM's pretrain_gpt.py has no gpt_builder (Megatron-LM "
                             "before core 0.14); use core_v0.16.1 or later")
    warn_settings(args)
    kwargs = {"store": store}
    if hasattr(mlm, "get_embedding_ranks"):
        kwargs["get_embedding_ranks"] = mlm.get_embedding_ranks
    pretrain(
        mlm.train_valid_test_datasets_provider,
        partial(mlm.model_provider, wrap_gpt_builder(mlm.gpt_builder)),
        ModelType.encoder_or_decoder,
        wrap_forward_step(mlm.forward_step),
        args_defaults=ARGS_DEFAULTS,
        extra_args_provider=provider,
        **kwargs,
    )
