"""The model and launch settings the Lighthouse layers do not support, in one table.

Each rule names a setting twice, as megatron-core's `TransformerConfig` field and as
Megatron-LM's flag, so that the launch-argument validation (`check_args`), the spec
builders and the core-attention modules (`check_config`) refuse the same things with
the same words, each in the vocabulary of its caller.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import nearest_multiples

ATTENTION_IMPLS = ("dense", "lighthouse")

# Where a rule applies: to both core attentions of this package, to Lighthouse layers
# (specs and the Lighthouse module), or only to Megatron-LM's launch arguments (settings
# that megatron-core's TransformerConfig does not carry).
CORE_ATTENTION, LIGHTHOUSE, LAUNCH = "core_attention", "lighthouse", "launch"


def _is_set(value: Any) -> bool:
    return value is not None and value is not False and value != 0


def _cuda_graph_impl(value: Any) -> bool:
    return value is not None and value != "none"


def _backend_is_local(value: Any) -> bool:
    # Megatron-LM parses --attention-backend into megatron-core's AttnBackend enum.
    return value is not None and str(getattr(value, "name", value)).split(".")[-1] == "local"


@dataclass(frozen=True)
class Rule:
    setting: str | None  # TransformerConfig field; None for a launch-only argument
    flag: str  # Megatron-LM's flag
    refused: Callable[[Any], bool]
    reason: str
    fix: str
    scope: str = LIGHTHOUSE

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


_CUDA_GRAPH = ("a captured graph would freeze the --lighthouse-until-iter switch and the mask check reads "
               "a tensor on the host")

RULES = (
    Rule("attention_dropout", "--attention-dropout", _is_set,
         "the fused attention kernels here have no dropout (Megatron's default is 0.1)",
         "set --attention-dropout 0 (TransformerConfig(attention_dropout=0.0))", CORE_ATTENTION),
    Rule("softmax_type", "--softmax-type", lambda v: v is not None and v != "vanilla",
         "only the vanilla softmax is implemented", "use --softmax-type vanilla", CORE_ATTENTION),
    Rule("qk_clip", "--qk-clip", _is_set,
         "QK-clip reads the maximum attention logit, which needs the full score matrix",
         "drop --qk-clip", CORE_ATTENTION),
    Rule("log_max_attention_logit", "--log-max-attention-logit", _is_set,
         "the maximum attention logit needs the full score matrix",
         "drop --log-max-attention-logit", CORE_ATTENTION),
    Rule("window_size", "--window-size", lambda v: v is not None,
         "sliding-window attention is not implemented", "drop --window-size", CORE_ATTENTION),
    Rule("multi_latent_attention", "--multi-latent-attention", _is_set,
         "Lighthouse replaces the core attention of standard self-attention",
         "drop --multi-latent-attention"),
    Rule("experimental_attention_variant", "--experimental-attention-variant", lambda v: v is not None,
         "Lighthouse replaces the core attention of standard self-attention",
         "drop --experimental-attention-variant"),
    Rule(None, "--mtp-num-layers", _is_set,
         "Megatron-LM would build the multi-token-prediction layers without Lighthouse",
         "drop --mtp-num-layers", LAUNCH),
    Rule(None, "--sft", _is_set, "packed sequences need per-document attention; Lighthouse layers "
         "are causal only", "drop --sft", LAUNCH),
    Rule(None, "--dataloader-inter-document-masking", _is_set,
         "packed sequences need per-document attention; Lighthouse layers are causal only",
         "drop --dataloader-inter-document-masking", LAUNCH),
    Rule(None, "--reset-attention-mask", _is_set,
         "per-document (non-causal) masks; Lighthouse layers are causal only",
         "drop --reset-attention-mask", LAUNCH),
    Rule(None, "--use-legacy-models", _is_set, "legacy models take no layer spec",
         "drop --use-legacy-models", LAUNCH),
    Rule(None, "--heterogeneous-layers-config-path", _is_set,
         "heterogeneous models build their own layer specs", "drop --heterogeneous-layers-config-path",
         LAUNCH),
    Rule(None, "--yaml-cfg", lambda v: v is not None,
         "it replaces every command-line argument, the Lighthouse flags too",
         "pass the model as flags and the Lighthouse settings with --lighthouse-config", LAUNCH),
    Rule(None, "--spec", lambda v: v is not None, "--attention-impl lighthouse builds its own layer spec",
         "drop --spec", LAUNCH),
    Rule(None, "--cuda-graph-impl", _cuda_graph_impl, _CUDA_GRAPH, "use --cuda-graph-impl none", LAUNCH),
    Rule(None, "--enable-cuda-graph", _is_set, _CUDA_GRAPH, "drop --enable-cuda-graph", LAUNCH),
    Rule(None, "--external-cuda-graph", _is_set, _CUDA_GRAPH, "drop --external-cuda-graph", LAUNCH),
    Rule(None, "--hybrid-context-parallel", _is_set,
         "it packs sequences of different lengths per rank; Lighthouse layers take whole causal "
         "sequences in Megatron's load-balanced CP layout", "drop --hybrid-context-parallel", LAUNCH),
    Rule(None, "--position-embedding-type", lambda v: v == "relative",
         "relative position embeddings add an attention bias, which Lighthouse layers do not take",
         "use --position-embedding-type rope (or learned_absolute, none)", LAUNCH),
    Rule(None, "--attention-backend", _backend_is_local,
         "'local' replaces every core attention with Megatron's DotProductAttention",
         "use another --attention-backend (e.g. auto)", LAUNCH),
)


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "".join(f" {v}" for v in value)
    return "" if value is True else f" {getattr(value, 'name', value)}"


def refused_setting(args) -> tuple[Rule, Any] | None:
    """The first rule that refuses launch arguments (Megatron-LM's namespace), with the value."""
    for rule in RULES:
        value = getattr(args, rule.dest, None)
        if rule.refused(value):
            return rule, value
    return None


def check_args(args) -> None:
    """Refuse launch arguments (Megatron-LM's namespace) that Lighthouse layers do not support."""
    found = refused_setting(args)
    if found is not None:
        rule, value = found
        raise ValueError(f"{rule.flag}{_shown(value)} is not supported with --attention-impl "
                         f"lighthouse: {rule.reason}; {rule.fix}")


def check_dense_local(args) -> None:
    """A dense model with `--transformer-impl local` under context parallelism: Megatron-LM's local
    DotProductAttention has no CP, so only this package's dense core attention can serve it, which
    must then support every setting (a dense model it cannot serve exactly at CP = 1 keeps
    Megatron-LM's own spec)."""
    cp = getattr(args, "context_parallel_size", 1) or 1
    if cp == 1 or getattr(args, "transformer_impl", None) != "local" or getattr(args, "spec", None):
        return
    found = refused_setting(args)
    if found is not None:
        rule, value = found
        raise ValueError(f"{rule.flag}{_shown(value)} with --transformer-impl local and "
                         f"--context-parallel-size {cp}: Megatron-LM's local attention has no context "
                         "parallelism and this package's dense attention, which has, does not support it "
                         f"({rule.reason}); {rule.fix}, or use --transformer-impl transformer_engine")


def check_config(config, where: str, *, lighthouse: bool, **overrides: Any) -> None:
    """Refuse model settings (a TransformerConfig) that `where` does not support.

    `lighthouse` adds the rules of Lighthouse layers to those of every core attention here;
    `overrides` are values given to a module directly (e.g. its `attention_dropout`)."""
    scopes = (CORE_ATTENTION, LIGHTHOUSE) if lighthouse else (CORE_ATTENTION,)
    for rule in RULES:
        if rule.setting is not None and rule.scope in scopes:
            _check(rule, overrides.get(rule.setting, getattr(config, rule.setting, None)), where)
    if lighthouse:
        tp = getattr(config, "tensor_model_parallel_size", 1) or 1
        heads = getattr(config, "num_attention_heads", None)
        groups = getattr(config, "num_query_groups", None) or heads
        check_heads(heads, groups, tp, lambda name, value: f"{name}={value}", where)


def _check(rule: Rule, value: Any, where: str) -> None:
    if rule.refused(value):
        raise ValueError(f"{where}: {rule.setting}={value!r} ({rule.flag}) is not supported: "
                         f"{rule.reason}; {rule.fix}")


# The same three numbers in both vocabularies.
_HEAD_FLAGS = {"num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
               "tensor_model_parallel_size": "--tensor-model-parallel-size"}


def flag_named(name: str, value: Any) -> str:
    return f"{_HEAD_FLAGS[name]} {value}"


def check_heads(heads: int | None, groups: int | None, tp: int, named: Callable[[str, Any], str],
                where: str | None = None) -> None:
    """Head counts against tensor parallelism; `named(setting, value)` words each number."""
    prefix = f"{where}: " if where else ""
    if heads is None:
        return
    if heads % tp:
        raise ValueError(f"{prefix}{named('num_attention_heads', heads)} is not divisible by "
                         f"{named('tensor_model_parallel_size', tp)}; nearest valid head counts: "
                         f"{nearest_multiples(heads, tp)}")
    if groups is None:
        return
    if heads % groups:
        raise ValueError(f"{prefix}{named('num_attention_heads', heads)} is not a multiple of "
                         f"{named('num_query_groups', groups)}")
    if groups % tp and tp % groups:
        # megatron-core either splits the groups over the ranks or, with fewer groups than
        # ranks, replicates each KV head over tp / groups ranks; anything else it cannot lay out.
        raise ValueError(f"{prefix}{named('num_query_groups', groups)} and "
                         f"{named('tensor_model_parallel_size', tp)}: one must divide the other")


def warn_qk_layernorm(scorer: str, qk_layernorm: bool, names: str, stacklevel: int = 3) -> None:
    if scorer == "norm" and qk_layernorm:
        warnings.warn(f"{names}: QK layer-norm flattens the query and key norms that the norm scorer "
                      "ranks, so the selection carries less signal", stacklevel=stacklevel)
