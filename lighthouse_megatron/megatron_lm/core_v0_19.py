"""Megatron-LM core 0.19 (`parse_and_validate_args`, a config container, and a callable
`transformer_layer_spec` on the GPT model config).

Called by the entry point and by `patches/megatron-lm-core_v0.19.0.patch`:

    args = parse_and_validate_args(extra_args_provider=lighthouse.extra_args_provider(...), ...)
    model_cfg = gpt_config_from_args(args)
    lighthouse.configure_model(args, model_cfg)
    pretrain(..., lighthouse.wrap_forward_step(forward_step), ...)

and, with no patch at all, through Megatron-LM's `--spec` hook:
`--spec lighthouse_megatron.megatron_lm.core_v0_19 lighthouse_spec_from_env`.
"""

from __future__ import annotations

import argparse
import os

from ..settings.fields import Values, given
from ..settings.lighthouse import lighthouse_dests, load_lighthouse_yaml, validate_lighthouse_args
from .launch import (
    AnnouncingSpecProvider,
    announce,
    clean_exit,
    extra_args_provider,
    spec_provider_from_args,
    use_megatron_lm_iteration,
    uses_package_spec,
    warn_settings,
    wrap_forward_step,
)

__all__ = ["configure_model", "extra_args_provider", "lighthouse_spec_from_env", "run", "wrap_forward_step"]

ARGS_DEFAULTS = dict(tokenizer_type="GPT2BPETokenizer")  # as Megatron-LM's pretrain_gpt.py
LIGHTHOUSE_CONFIG_ENV = "LIGHTHOUSE_CONFIG"
SPEC_ROUTE = f"--spec {__name__} lighthouse_spec_from_env"


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
    (the `--lighthouse-config` format; argparse rejects new flags without a patch).

    Megatron-LM's GPT model builder calls it inside pretrain(): the settings are checked then
    against its arguments as the entry point checks them (one `error:` line, exit code 2), and
    `until_iter` reads Megatron-LM's iteration. Its validation is not hooked here, so an
    `eval_attention` other than `model` is refused."""
    from megatron.training import get_args

    with clean_exit():
        try:
            args = spec_route_args(get_args(), os.environ.get(LIGHTHOUSE_CONFIG_ENV))
            validate_lighthouse_args(args)
        except ValueError as e:
            raise ValueError(f"{SPEC_ROUTE}: {e}") from e
    use_megatron_lm_iteration()
    return AnnouncingSpecProvider(spec_provider_from_args(args))(config, vp_stage=vp_stage)


def spec_route_args(args, path: str | None) -> argparse.Namespace:
    """A copy of Megatron-LM's arguments `args` with the --spec route's Lighthouse settings: the
    YAML file `path` alone (argparse took no Lighthouse flag), `attention_impl` lighthouse unless
    it says dense, validation evaluating the model; `spec` cleared, being the route itself."""
    settings = Values(load_lighthouse_yaml(path) if path else {})  # keys without "lighthouse_"
    evaluation = given(settings.eval_attention, "model")
    if evaluation != "model":
        raise ValueError(f"${LIGHTHOUSE_CONFIG_ENV} {path}: eval_attention {evaluation!r} cannot be honoured "
                         "here: without the entry point or a patch, Megatron-LM's validation is not hooked "
                         "and evaluates the model as it trains; drop the key (or set it to model), or run "
                         "python -m lighthouse_megatron.megatron_lm.pretrain_gpt")
    ours = argparse.Namespace(**vars(args))
    for dest in lighthouse_dests():
        setattr(ours, dest, None)
    ours.lighthouse_config, ours.spec = path, None
    ours.attention_impl = given(settings.attention_impl, "lighthouse")
    ours.lighthouse_eval_attention = "model"
    return ours


def run(training, mlm, pretrain, store) -> None:
    """The entry point's 0.19 path: Megatron-LM's own __main__ block, with the Lighthouse hooks."""
    from megatron.core.enums import ModelType
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
             wrap_forward_step(mlm.forward_step), **kwargs)
