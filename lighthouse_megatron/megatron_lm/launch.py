"""What both Megatron-LM generations share: importing Megatron-LM, the Lighthouse flags
in its parser, the block spec the arguments describe, the iteration clock, clean exits."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..megatron.schedule import forced_dense, set_iteration_source
from ..megatron.specs import LighthouseBlockSpecProvider
from ..settings.fields import Values
from ..settings.lighthouse import (
    add_lighthouse_args,
    lighthouse_config_from_args,
    lighthouse_warnings,
    recipe_schedule_from_args,
)
from ..settings.rules import refused_setting

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


YAML_CFG_REFUSED = (
    "--yaml-cfg is not supported by lighthouse_megatron: Megatron-LM replaces the whole argument "
    "namespace with the YAML file's, so --attention-impl and every --lighthouse-* flag would be "
    "dropped and a dense model would train; pass the model as flags and the Lighthouse settings "
    "with --lighthouse-config"
)


def refuse_yaml_cfg(argv: list[str]) -> None:
    """Megatron-LM's `--yaml-cfg` swaps the parsed namespace for the YAML file's after parsing,
    so it can only be caught on the command line itself."""
    if any(a == "--yaml-cfg" or a.startswith("--yaml-cfg=") for a in argv):
        raise ValueError(YAML_CFG_REFUSED)


def extra_args_provider(other: Callable | None = None) -> Callable:
    """An `extra_args_provider` adding the Lighthouse flags, then `other`'s (e.g. ModelOpt's).

    Megatron-LM calls it on its parser before parsing: `--yaml-cfg` is refused here."""

    def provider(parser):
        with clean_exit():
            refuse_yaml_cfg(sys.argv[1:])
        parser = add_lighthouse_args(parser)
        return other(parser) if other is not None else parser

    return provider


def uses_package_spec(args) -> bool:
    """Whether the model gets this package's block spec: with `--attention-impl lighthouse`,
    and for dense models with `--transformer-impl local` (unless the user names a `--spec` of
    their own) that it builds exactly: Megatron-LM's local DotProductAttention materialises the
    [b*heads, s, s] scores (about 155 GB at 98K tokens and 8 heads) and has no context
    parallelism, while this package's dense core attention (SDPA, the same parameters and
    checkpoint keys) has neither problem. A dense model with a setting of `settings.rules` (attention
    dropout, another softmax, a sliding window, multi-latent attention, packed sequences, ...)
    keeps Megatron-LM's own spec (announced); under CP, where that spec cannot run, the
    argument validation refuses it (`rules.check_dense_local`)."""
    if args.attention_impl == "lighthouse":
        return True
    local = getattr(args, "transformer_impl", "transformer_engine") == "local"
    if not local or getattr(args, "spec", None) is not None:
        return False
    return refused_setting(args) is None


def spec_provider_from_args(args) -> LighthouseBlockSpecProvider:
    """The callable block spec the (validated) arguments describe."""
    return LighthouseBlockSpecProvider(
        lighthouse=lighthouse_config_from_args(args),
        attention_impl=args.attention_impl,
        use_te=getattr(args, "transformer_impl", "transformer_engine") == "transformer_engine",
        normalization=Values.of(args).normalization,
        qk_l2_norm=getattr(args, "qk_l2_norm", False),
        schedule=recipe_schedule_from_args(args),
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


def warn_settings(args) -> None:
    """Start-up warnings (first rank) about valid settings that cannot do what they say; the
    trainer prints the same words."""
    if os.environ.get("RANK", "0") == "0":
        for warning in lighthouse_warnings(args):
            print(f"lighthouse-megatron: {warning}", file=sys.stderr, flush=True)


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


def megatron_lm_iteration(args) -> int | None:
    """The iteration Megatron-LM's arguments say runs now: `curr_iteration`, which its train()
    sets before each step, and never less than `iteration`, the one the checkpoint was loaded
    at. Runs without a step leave `curr_iteration` behind: it is unset with `--skip-train`
    and before train() on core 0.16, and core 0.19 sets it to 0 before train(), which then
    takes no step when the checkpoint already reached `--train-iters`."""
    known = [v for v in (getattr(args, "curr_iteration", None), getattr(args, "iteration", None))
             if v is not None]
    return max(known) if known else None


def use_megatron_lm_iteration() -> None:
    """Make `--lighthouse-until-iter` read Megatron-LM's iteration (`megatron_lm_iteration`).
    Resolved here once, not on every layer's forward."""
    from megatron.training import get_args

    set_iteration_source(lambda: megatron_lm_iteration(get_args()))


@contextlib.contextmanager
def clean_exit() -> Iterator[None]:
    """Bad settings end the program the way argparse does: one `error:` line, exit code 2."""
    try:
        yield
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def shut_down_process_group() -> None:
    """PyTorch's documented shutdown once every rank has finished: Megatron-LM's `pretrain()`
    returns with its process group alive, which NCCL reports at exit as a leak and which gloo's
    threads can turn into an abort at interpreter teardown (SIGABRT, "terminate called without an
    active exception") after a run that did everything it was asked."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


DENSE_SUFFIX = " dense"  # Megatron-LM's "lm loss" of the same weights with dense attention: "lm loss dense"


def eval_attention_now(args, model) -> str:
    """What this forward step evaluates (`--lighthouse-eval-attention`): "model" while training,
    outside a Lighthouse stage, or when asked; else "dense" or "both"."""
    a = Values.of(args)
    if getattr(model, "training", True) or a.attention_impl != "lighthouse":
        return "model"
    until = a.lighthouse_until_iter
    iteration = megatron_lm_iteration(args)
    if until is not None and iteration is not None and iteration >= until:
        return "model"  # the layers already run dense
    return a.lighthouse_eval_attention or "both"


class _Replay:
    """An iterator that hands out again, after `rewind()`, what it has handed out: the two
    evaluations of one forward step read the same batch and consume it once."""

    def __init__(self, iterator):
        self.iterator, self.items, self.position = iterator, [], 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == len(self.items):
            self.items.append(next(self.iterator))
        self.position += 1
        item = self.items[self.position - 1]
        # Core 0.19's get_batch edits the batch dict it reads in place (device copies, then the
        # CP split): each pass gets a dict of its own over the same tensors.
        return copy.copy(item) if isinstance(item, dict) else item

    def rewind(self) -> None:
        self.position = 0


def _dense_report(report: dict) -> dict:
    return {f"{key}{DENSE_SUFFIX}": value for key, value in report.items()}


def _with_report(result, report: dict):
    """A Megatron-LM loss-function result (`(loss, num_tokens, report)` or `(loss, report)`)
    with its report dict replaced."""
    return (*result[:-1], report)


def wrap_forward_step(forward_step: Callable) -> Callable:
    """`pretrain_gpt.py`'s forward_step, evaluating as `--lighthouse-eval-attention` says (what the
    entry point and the patches hand Megatron-LM's pretrain())."""
    from megatron.training import get_args

    return eval_attention_forward_step(forward_step, get_args)


def eval_attention_forward_step(forward_step: Callable, get_args: Callable) -> Callable:
    """Megatron-LM's `forward_step`, evaluating as `--lighthouse-eval-attention` says.

    Megatron-LM sums and logs every key of the loss function's report (the log line,
    TensorBoard and W&B, through its own writers), so the dense evaluation only adds keys:
    "lm loss dense" beside Megatron-LM's "lm loss". With "both" the two forwards read the
    same batch. Training steps are untouched."""

    @functools.wraps(forward_step)
    def step(data_iterator, model, *args, **kwargs):
        mode = eval_attention_now(get_args(), model)
        if mode == "model":
            return forward_step(data_iterator, model, *args, **kwargs)
        if mode == "dense":
            with forced_dense():
                output, loss_func = forward_step(data_iterator, model, *args, **kwargs)

            def dense_loss(output_tensor, *a, **k):
                result = loss_func(output_tensor, *a, **k)
                return _with_report(result, _dense_report(result[-1]))

            return output, dense_loss
        replay = None if data_iterator is None else _Replay(data_iterator)
        output, loss_func = forward_step(replay, model, *args, **kwargs)
        if replay is not None:
            replay.rewind()
        with forced_dense():
            dense_output, dense_loss_func = forward_step(replay, model, *args, **kwargs)

        def both_loss(output_tensor, *a, **k):
            result = loss_func(output_tensor, *a, **k)
            dense = dense_loss_func(dense_output, *a, **k)
            return _with_report(result, {**result[-1], **_dense_report(dense[-1])})

        return output, both_loss

    return step
