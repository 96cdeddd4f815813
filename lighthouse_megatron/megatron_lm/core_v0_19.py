"""Megatron-LM core 0.19 (`parse_and_validate_args`, a config container, and a callable
`transformer_layer_spec` on the GPT model config).

Called by the entry point and by `patches/megatron-lm-core_v0.19.0.patch`:

    args = parse_and_validate_args(extra_args_provider=lighthouse.extra_args_provider(...), ...)
    model_cfg = gpt_config_from_args(args)
    lighthouse.configure_model(args, model_cfg)

and, with no patch at all, through Megatron-LM's `--spec` hook:
`--spec lighthouse_megatron.megatron_lm.core_v0_19 lighthouse_spec_from_env`.
"""

from __future__ import annotations

import os

from ..config import LighthouseConfig
from ..flags.lighthouse import load_lighthouse_yaml, validate_lighthouse_args
from ..megatron.specs import LighthouseBlockSpecProvider, transformer_config_of
from .launch import (
    AnnouncingSpecProvider,
    announce,
    clean_exit,
    eval_attention_forward_step,
    extra_args_provider,
    spec_provider_from_args,
    use_megatron_lm_iteration,
    uses_package_spec,
    warn_settings,
)

__all__ = ["configure_model", "extra_args_provider", "lighthouse_spec_from_env", "run"]

ARGS_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}  # as Megatron-LM's pretrain_gpt.py
LIGHTHOUSE_CONFIG_ENV = "LIGHTHOUSE_CONFIG"


def configure_model(args, model_cfg) -> None:
    """Validate the Lighthouse arguments (one `error:` line and exit 2 if bad) and, with
    `--attention-impl lighthouse`, put the Lighthouse block spec on the GPT model config."""
    with clean_exit():
        validate_lighthouse_args(args)
    if uses_package_spec(args):
        model_cfg.transformer_layer_spec = AnnouncingSpecProvider(spec_provider_from_args(args))
    else:
        announce("--attention-impl dense: Megatron-LM's own layer specs")
    use_megatron_lm_iteration()


def lighthouse_spec_from_env(config, vp_stage: int | None = None):
    """The no-patch route: `--spec lighthouse_megatron.megatron_lm.core_v0_19
    lighthouse_spec_from_env`, settings from the YAML file named by $LIGHTHOUSE_CONFIG
    (the `--lighthouse-config` format; argparse rejects new flags without a patch)."""
    path = os.environ.get(LIGHTHOUSE_CONFIG_ENV)
    settings = load_lighthouse_yaml(path) if path else {}
    impl = settings.pop("attention_impl", "lighthouse")
    until = settings.pop("until_iter", None)
    settings.pop("eval_attention", None)  # Megatron-LM's validation is not hooked on this route
    transformer_impl = getattr(transformer_config_of(config), "transformer_impl", None)
    use_te = None if transformer_impl is None else transformer_impl == "transformer_engine"
    provider = LighthouseBlockSpecProvider(
        LighthouseConfig.from_dict(settings), attention_impl=impl, use_te=use_te, until_iter=until
    )
    return provider(config, vp_stage=vp_stage)


def run(training, mlm, pretrain, store) -> None:
    """The entry point's 0.19 path: Megatron-LM's own __main__ block, with the Lighthouse hooks."""
    from megatron.core.enums import ModelType
    from megatron.training import get_args
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args, parse_args

    modelopt = getattr(mlm, "has_nvidia_modelopt", False)
    provider = extra_args_provider(mlm.add_modelopt_args if modelopt else None)
    # Megatron-LM's validate_args asserts on some settings Lighthouse refuses anyway (with a
    # traceback): check the plain parse first, so both generations refuse with one line.
    with clean_exit():
        validate_lighthouse_args(parse_args(extra_args_provider=provider))
    args = parse_and_validate_args(extra_args_provider=provider, args_defaults=ARGS_DEFAULTS)
    with clean_exit():
        validate_lighthouse_args(args)  # before Megatron-LM turns the arguments into configs
    warn_settings(args)
    if modelopt:
        mlm.maybe_enable_modelopt(args)
    if modelopt and getattr(args, "modelopt_enabled", False):
        model_cfg = gpt_config_from_args(args, model_config_cls=mlm.ModelOptModelConfig)
    else:
        model_cfg = gpt_config_from_args(args)
    configure_model(args, model_cfg)
    full_config = pretrain_cfg_container_from_args(args, model_cfg)
    kwargs = {"store": store}
    if hasattr(mlm, "get_embedding_ranks"):
        kwargs["get_embedding_ranks"] = mlm.get_embedding_ranks
    pretrain(full_config, mlm.train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             eval_attention_forward_step(mlm.forward_step, get_args), **kwargs)
