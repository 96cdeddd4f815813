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
from .fields import Values

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
    flag: str  # Megatron-LM's flag
    refused: Callable[[Any], bool]
    reason: str
    fix: str
    scope: str = LIGHTHOUSE

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def setting(self) -> str | None:
        """The TransformerConfig field (megatron-core names it as Megatron-LM's flag); None for a
        launch-only argument."""
        return None if self.scope == LAUNCH else self.dest


_CUDA_GRAPH = ("a captured graph would freeze the --lighthouse-until-iter switch and the mask check reads "
               "a tensor on the host")

RULES = (
    Rule("--attention-dropout", _is_set,
         "the fused attention kernels here have no dropout (Megatron's default is 0.1)",
         "set --attention-dropout 0 (TransformerConfig(attention_dropout=0.0))", CORE_ATTENTION),
    Rule("--softmax-type", lambda v: v is not None and v != "vanilla",
         "only the vanilla softmax is implemented", "use --softmax-type vanilla", CORE_ATTENTION),
    Rule("--qk-clip", _is_set,
         "QK-clip reads the maximum attention logit, which needs the full score matrix",
         "drop --qk-clip", CORE_ATTENTION),
    Rule("--log-max-attention-logit", _is_set,
         "the maximum attention logit needs the full score matrix",
         "drop --log-max-attention-logit", CORE_ATTENTION),
    Rule("--window-size", lambda v: v is not None,
         "sliding-window attention is not implemented", "drop --window-size", CORE_ATTENTION),
    Rule("--multi-latent-attention", _is_set,
         "Lighthouse replaces the core attention of standard self-attention",
         "drop --multi-latent-attention"),
    Rule("--experimental-attention-variant", lambda v: v is not None,
         "Lighthouse replaces the core attention of standard self-attention",
         "drop --experimental-attention-variant"),
    Rule("--mtp-num-layers", _is_set,
         "Megatron-LM would build the multi-token-prediction layers without Lighthouse",
         "drop --mtp-num-layers", LAUNCH),
    Rule("--sft", _is_set, "packed sequences need per-document attention; Lighthouse layers "
         "are causal only", "drop --sft", LAUNCH),
    Rule("--dataloader-inter-document-masking", _is_set,
         "packed sequences need per-document attention; Lighthouse layers are causal only",
         "drop --dataloader-inter-document-masking", LAUNCH),
    Rule("--reset-attention-mask", _is_set,
         "per-document (non-causal) masks; Lighthouse layers are causal only",
         "drop --reset-attention-mask", LAUNCH),
    Rule("--use-legacy-models", _is_set, "legacy models take no layer spec",
         "drop --use-legacy-models", LAUNCH),
    Rule("--heterogeneous-layers-config-path", _is_set,
         "heterogeneous models build their own layer specs", "drop --heterogeneous-layers-config-path",
         LAUNCH),
    Rule("--yaml-cfg", lambda v: v is not None,
         "it replaces every command-line argument, the Lighthouse flags too",
         "pass the model as flags and the Lighthouse settings with --lighthouse-config", LAUNCH),
    Rule("--spec", lambda v: v is not None, "--attention-impl lighthouse builds its own layer spec",
         "drop --spec", LAUNCH),
    Rule("--cuda-graph-impl", _cuda_graph_impl, _CUDA_GRAPH, "use --cuda-graph-impl none", LAUNCH),
    Rule("--enable-cuda-graph", _is_set, _CUDA_GRAPH, "drop --enable-cuda-graph", LAUNCH),
    Rule("--external-cuda-graph", _is_set, _CUDA_GRAPH, "drop --external-cuda-graph", LAUNCH),
    Rule("--hybrid-context-parallel", _is_set,
         "it packs sequences of different lengths per rank; Lighthouse layers take whole causal "
         "sequences in Megatron's load-balanced CP layout", "drop --hybrid-context-parallel", LAUNCH),
    Rule("--position-embedding-type", lambda v: v == "relative",
         "relative position embeddings add an attention bias, which Lighthouse layers do not take",
         "use --position-embedding-type rope (or learned_absolute, none)", LAUNCH),
    Rule("--attention-backend", _backend_is_local,
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
    a = Values.of(args)
    cp = a.context_parallel_size or 1
    if cp == 1 or a.transformer_impl != "local" or a.spec:
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
        c = Values.of(config)
        heads = c.num_attention_heads
        check_heads(heads, c.num_query_groups or heads, c.tensor_model_parallel_size or 1,
                    lambda name, value: f"{name}={value}", where)


def _check(rule: Rule, value: Any, where: str) -> None:
    if rule.refused(value):
        raise ValueError(f"{where}: {rule.setting}={value!r} ({rule.flag}) is not supported: "
                         f"{rule.reason}; {rule.fix}")


def flag_named(name: str, value: Any) -> str:
    """A number in the flags' vocabulary: `--num-attention-heads 8`."""
    return f"--{name.replace('_', '-')} {value}"


def check_heads(heads: int | None, groups: int | None, tp: int, named: Callable[[str, Any], str],
                where: str | None = None) -> None:
    """Head counts against tensor parallelism; `named(setting, value)` words each number (the
    flags' or TransformerConfig's vocabulary)."""
    prefix = f"{where}: " if where else ""
    if heads is None:
        return
    said = {k: named(k, v) for k, v in dict(num_attention_heads=heads, num_query_groups=groups,
                                            tensor_model_parallel_size=tp).items()}
    heads_said, groups_said, tp_said = said.values()
    if heads % tp:
        raise ValueError(f"{prefix}{heads_said} is not divisible by {tp_said}; nearest valid head counts: "
                         f"{nearest_multiples(heads, tp)}")
    if groups is None:
        return
    if heads % groups:
        raise ValueError(f"{prefix}{heads_said} is not a multiple of {groups_said}")
    if groups % tp and tp % groups:
        # megatron-core either splits the groups over the ranks or, with fewer groups than
        # ranks, replicates each KV head over tp / groups ranks; anything else it cannot lay out.
        raise ValueError(f"{prefix}{groups_said} and {tp_said}: one must divide the other")


def warn_qk_layernorm(scorer: str, qk_layernorm: bool, names: str, stacklevel: int = 3) -> None:
    if scorer == "norm" and qk_layernorm:
        warnings.warn(f"{names}: QK layer-norm flattens the query and key norms that the norm scorer "
                      "ranks, so the selection carries less signal", stacklevel=stacklevel)
