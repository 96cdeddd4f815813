"""What both Megatron-LM generations share: importing Megatron-LM, the Lighthouse flags
in its parser, the block spec the arguments describe, the iteration clock, clean exits."""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..megatron.schedule import set_iteration_source
from ..megatron.specs import LighthouseBlockSpecProvider
from .arguments import add_lighthouse_args, lighthouse_config_from_args

# Modules of Megatron-LM itself (not of megatron-core, nor of its dependencies).
MEGATRON_LM_MODULES = ("megatron", "megatron.training", "pretrain_gpt", "gpt_builders", "model_provider")

NOT_ON_PATH = (
    "Megatron-LM's `{module}` is not importable. Megatron-LM is not on PyPI (the megatron-core "
    "wheels lack its pretrain_gpt.py, and before 0.19 its megatron.training): clone it at the "
    "tag of your megatron-core (git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM) "
    "and put the checkout first on PYTHONPATH, e.g. PYTHONPATH=/path/to/Megatron-LM:$PYTHONPATH "
    "python -m lighthouse_megatron.megatron_lm.pretrain_gpt ..."
)
MISSING_DEPENDENCY = (
    "Megatron-LM's `{module}` was found ({where}) but needs `{missing}`, which is not installed; "
    "install it (pip install {package}) next to megatron-core"
)
BROKEN = "Megatron-LM's `{module}` ({where}) failed to import: {error}"


def _where(module: str) -> str:
    """Where `module` is imported from (its package's folders for a namespace package)."""
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        spec = importlib.util.find_spec(module.split(".")[0])
    if spec is None:
        return "on the path"
    if spec.origin and spec.origin != "namespace":
        return spec.origin
    return ", ".join(spec.submodule_search_locations or ["on the path"])


def require_megatron_lm() -> tuple:
    """Import Megatron-LM's `megatron.training` and its `pretrain_gpt` script, or raise an
    ImportError that says what is missing: Megatron-LM itself, or one of its dependencies."""
    modules = []
    for name in ("megatron.training", "pretrain_gpt"):
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name is None or e.name in MEGATRON_LM_MODULES:
                raise ImportError(NOT_ON_PATH.format(module=name)) from e
            root = e.name.split(".")[0]
            raise ImportError(MISSING_DEPENDENCY.format(module=name, where=_where(name), missing=e.name,
                                                        package=root.replace("_", "-"))) from e
        except ImportError as e:
            raise ImportError(BROKEN.format(module=name, where=_where(name), error=e)) from e
    return tuple(modules)


def extra_args_provider(other: Callable | None = None) -> Callable:
    """An `extra_args_provider` adding the Lighthouse flags, then `other`'s (e.g. ModelOpt's)."""

    def provider(parser):
        parser = add_lighthouse_args(parser)
        return other(parser) if other is not None else parser

    return provider


def uses_package_spec(args) -> bool:
    """Whether the model gets this package's block spec: with `--attention-impl lighthouse`,
    and for dense models that Megatron-LM's own local spec cannot run (its local
    DotProductAttention has no context parallelism; this package's dense core attention has),
    unless the user names a `--spec` of their own."""
    if args.attention_impl == "lighthouse":
        return True
    local = getattr(args, "transformer_impl", "transformer_engine") == "local"
    cp = getattr(args, "context_parallel_size", 1) or 1
    return local and cp > 1 and getattr(args, "spec", None) is None


def spec_provider_from_args(args) -> LighthouseBlockSpecProvider:
    """The callable block spec the (validated) arguments describe."""
    return LighthouseBlockSpecProvider(
        lighthouse=lighthouse_config_from_args(args),
        attention_impl=args.attention_impl,
        use_te=getattr(args, "transformer_impl", "transformer_engine") == "transformer_engine",
        normalization=getattr(args, "normalization", None),
        qk_l2_norm=getattr(args, "qk_l2_norm", False),
        until_iteration=args.lighthouse_until_iter,
    )


def announce(what: str, core_attentions: list[str] | None = None) -> None:
    """One line on the first rank of the job: which core attention the layers got, so a
    run's log shows what ran (the GPU integration test reads it)."""
    if os.environ.get("RANK", "0") != "0":
        return
    if core_attentions is not None:
        counts = collections.Counter(core_attentions)
        what += ": " + ", ".join(f"{name} x{n}" for name, n in counts.items())
    print(f"lighthouse-megatron: {what}", flush=True)


@dataclass
class AnnouncingSpecProvider:
    """A block spec provider that announces the core attention of the layers it specifies
    (a plain dataclass: Megatron-LM may pickle the model config holding it)."""

    provider: Callable

    def __call__(self, config, vp_stage: int | None = None):
        spec = self.provider(config, vp_stage=vp_stage)
        # A spec's core_attention is a ModuleSpec or, as in megatron-core's TE specs, a class.
        attentions = [layer.submodules.self_attention.submodules.core_attention for layer in spec.layer_specs]
        names = [getattr(a, "module", a).__name__ for a in attentions]
        announce(f"layer specs of this stage (vp_stage={vp_stage})", names)
        return spec


def use_megatron_lm_iteration() -> None:
    """Make `--lighthouse-until-iter` read Megatron-LM's `args.curr_iteration`, which its
    train() sets before each step. Resolved here once, not on every layer's forward."""
    from megatron.training import get_args

    set_iteration_source(lambda: getattr(get_args(), "curr_iteration", None))


@contextlib.contextmanager
def clean_exit() -> Iterator[None]:
    """Bad settings end the program the way argparse does: one `error:` line, exit code 2."""
    try:
        yield
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
