"""Megatron-LM GPT pretraining with Lighthouse attention.

    PYTHONPATH=/path/to/Megatron-LM torchrun ... -m lighthouse_megatron.megatron.pretrain_gpt \\
        <Megatron-LM pretrain_gpt.py arguments> --attention-impl lighthouse --lighthouse-topk 4096 ...

Runs Megatron-LM's own `pretrain()` with its `pretrain_gpt.py` datasets, forward step
and loss; only the arguments (the Lighthouse flags) and the layer spec differ. Both
Megatron-LM generations work:

- core 0.16 (and earlier 0.1x with `gpt_builders.py`): `pretrain(...,
  extra_args_provider=...)` with `partial(model_provider, builder)`;
- core 0.19 and later: `parse_and_validate_args`, a config container, and a callable
  `transformer_layer_spec` on the GPT model config.

The Lighthouse arguments are validated right after parsing, before any process group
or GPU memory exists.
"""

from __future__ import annotations

import inspect
import sys
from functools import partial

from .megatron_lm import chain_extra_args, require_megatron_lm, spec_provider_from_args, wrap_gpt_builder

ARGS_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}  # as Megatron-LM's pretrain_gpt.py


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        training, mlm = require_megatron_lm()
    except ImportError as e:
        raise SystemExit(f"error: {e}") from None

    from megatron.core.enums import ModelType

    from .arguments import validate_lighthouse_args
    from .schedule import megatron_lm_iteration_source, set_iteration_source

    modelopt_args = getattr(mlm, "add_modelopt_args", None) if getattr(mlm, "has_nvidia_modelopt", False) \
        else None
    extra_args_provider = chain_extra_args(modelopt_args)
    mlm.train_valid_test_datasets_provider.is_distributed = True
    pretrain, store = training.pretrain, None
    if hasattr(training, "inprocess_restart"):
        pretrain, store = training.inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    takes = inspect.signature(training.pretrain).parameters

    if "extra_args_provider" in takes:
        # core 0.16 generation: pretrain() parses the arguments itself. Parse them once
        # here too, only to fail early on bad Lighthouse settings.
        from megatron.training.arguments import parse_args

        validate_lighthouse_args(parse_args(extra_args_provider=extra_args_provider))
        if not hasattr(mlm, "gpt_builder"):
            raise SystemExit("error: this Megatron-LM's pretrain_gpt.py has no gpt_builder "
                             "(Megatron-LM before core 0.14); use core_v0.16.1 or later")
        kwargs = {"store": store} if "store" in takes else {}
        set_iteration_source(megatron_lm_iteration_source())
        pretrain(
            mlm.train_valid_test_datasets_provider,
            partial(mlm.model_provider, wrap_gpt_builder(mlm.gpt_builder)),
            ModelType.encoder_or_decoder,
            mlm.forward_step,
            args_defaults=ARGS_DEFAULTS,
            extra_args_provider=extra_args_provider,
            **kwargs,
        )
        return

    # core 0.19 generation: arguments are parsed before pretrain(), which takes a config
    # container; the GPT model builder calls a callable transformer_layer_spec per stage.
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider, args_defaults=ARGS_DEFAULTS)
    validate_lighthouse_args(args)
    if modelopt_args is not None and hasattr(mlm, "maybe_enable_modelopt"):
        mlm.maybe_enable_modelopt(args)
    if getattr(args, "modelopt_enabled", False) and hasattr(mlm, "ModelOptModelConfig"):
        model_cfg = gpt_config_from_args(args, model_config_cls=mlm.ModelOptModelConfig)
    else:
        model_cfg = gpt_config_from_args(args)
    if args.attention_impl == "lighthouse":
        if getattr(args, "spec", None) is not None:
            raise SystemExit(f"error: --attention-impl lighthouse builds its own layer spec; drop --spec "
                             f"{' '.join(args.spec)}")
        model_cfg.transformer_layer_spec = spec_provider_from_args(args)
    full_config = pretrain_cfg_container_from_args(args, model_cfg)
    kwargs = {}
    if "store" in takes:
        kwargs["store"] = store
    if "get_embedding_ranks" in takes and hasattr(mlm, "get_embedding_ranks"):
        kwargs["get_embedding_ranks"] = mlm.get_embedding_ranks
    set_iteration_source(megatron_lm_iteration_source())
    pretrain(full_config, mlm.train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             mlm.forward_step, **kwargs)


if __name__ == "__main__":
    main()
