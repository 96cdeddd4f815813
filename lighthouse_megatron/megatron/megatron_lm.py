"""Hooks into Megatron-LM's GPT pretraining (its `megatron.training`, not on PyPI).

Used by the `pretrain_gpt` entry point and by `patches/` for users who keep their own
`pretrain_gpt.py`. Nothing here is imported by the model code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from . import specs
from .arguments import add_lighthouse_args, lighthouse_config_from_args, validate_lighthouse_args
from .schedule import megatron_lm_iteration_source, set_iteration_source

MISSING_MEGATRON_LM = (
    "lighthouse_megatron.megatron.pretrain_gpt runs Megatron-LM's GPT pretraining, but "
    "Megatron-LM's `{module}` is not importable ({error}). Megatron-LM is not on PyPI (the "
    "megatron-core wheels lack its pretrain_gpt.py, and before 0.19 its megatron.training): "
    "clone it at the tag of your megatron-core (git clone -b core_v0.16.1 "
    "https://github.com/NVIDIA/Megatron-LM) and put the checkout first on PYTHONPATH, e.g. "
    "PYTHONPATH=/path/to/Megatron-LM:$PYTHONPATH python -m lighthouse_megatron.megatron.pretrain_gpt ..."
)


def require_megatron_lm():
    """Import Megatron-LM's `megatron.training` and its `pretrain_gpt` script, or raise an
    ImportError that says how to make them importable."""
    import importlib

    modules = []
    for name in ("megatron.training", "pretrain_gpt"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError as e:
            raise ImportError(MISSING_MEGATRON_LM.format(module=name, error=e)) from e
    return modules


def chain_extra_args(other: Callable | None = None) -> Callable:
    """An `extra_args_provider` adding the Lighthouse flags, then `other`'s (e.g. ModelOpt's)."""

    def provider(parser):
        parser = add_lighthouse_args(parser)
        return other(parser) if other is not None else parser

    return provider


def wrap_gpt_builder(gpt_builder: Callable) -> Callable:
    """Wrap Megatron-LM's `gpt_builders.gpt_builder` (0.16 generation) so that with
    `--attention-impl lighthouse` it builds the Lighthouse block spec of this stage.

    The stock builder is kept for everything else (MTP, embeddings, RoPE): it receives the
    spec through its own `--spec` path, which reads a module attribute, and `args.spec`
    is restored afterwards so checkpoints never record it.
    """

    @functools.wraps(gpt_builder)
    def builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        validate_lighthouse_args(args)
        set_iteration_source(megatron_lm_iteration_source())
        if args.attention_impl != "lighthouse":
            return gpt_builder(args, pre_process, post_process, vp_stage=vp_stage, config=config,
                               pg_collection=pg_collection)
        if getattr(args, "spec", None) is not None:
            raise ValueError(f"--attention-impl lighthouse builds its own layer spec; drop --spec "
                             f"{' '.join(args.spec)}")
        if config is None:
            from megatron.training.arguments import core_transformer_config_from_args

            config = core_transformer_config_from_args(args)
        specs._megatron_lm_block_spec = spec_provider_from_args(args)(config, vp_stage=vp_stage)
        args.spec = [specs.__name__, "_megatron_lm_block_spec"]
        try:
            return gpt_builder(args, pre_process, post_process, vp_stage=vp_stage, config=config,
                               pg_collection=pg_collection)
        finally:
            args.spec = None
            specs._megatron_lm_block_spec = None

    return builder


def spec_provider_from_args(args) -> specs.LighthouseBlockSpecProvider:
    """The callable block spec the arguments describe (Megatron-LM >= 0.19 calls it)."""
    return specs.LighthouseBlockSpecProvider(
        lighthouse=lighthouse_config_from_args(args),
        attention_impl=args.attention_impl,
        use_te=getattr(args, "transformer_impl", "transformer_engine") == "transformer_engine",
        normalization=getattr(args, "normalization", None),
        qk_l2_norm=getattr(args, "qk_l2_norm", False),
        until_iteration=args.lighthouse_until_iter,
    )
