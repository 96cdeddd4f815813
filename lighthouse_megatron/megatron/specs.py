"""GPT layer and block specs with Lighthouse core attention, mirroring megatron-core's.

The layer spec is megatron-core's own (`get_gpt_layer_with_transformer_engine_spec` or
`get_gpt_layer_local_spec`), deep-copied, with only `core_attention` replaced: norms,
QK layer-norm, projections and the MLP are exactly those of the dense model, so the
parameters and checkpoints are too. The block spec gives one layer spec per layer and
slices it to this pipeline stage, like megatron-core's `get_gpt_decoder_block_spec`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core.models.gpt import gpt_layer_specs as mcore_specs
from megatron.core.transformer import transformer_block
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from ..backends import te_available
from ..config import LighthouseConfig
from ..recipe import RecipeSchedule
from ..settings.fields import Values, given
from ..settings.rules import ATTENTION_IMPLS, check_config, warn_qk_layernorm
from .core_attention import DenseCoreAttention, LighthouseCoreAttention


def _use_te_default() -> bool:
    """Transformer Engine specs where TE imports and a CUDA device is present."""
    return torch.cuda.is_available() and te_available()


def transformer_config_of(config):
    # Megatron-LM >= 0.19 hands `--spec` functions a GPTModelConfig; the
    # TransformerConfig is its `.transformer`.
    return getattr(config, "transformer", config)


def _common_arguments(config, attention_impl, lighthouse, use_te):
    """Defaults and checks shared by the layer and block spec builders."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {list(ATTENTION_IMPLS)}, got {attention_impl!r}")
    return (
        transformer_config_of(config),
        LighthouseConfig() if lighthouse is None else lighthouse,
        _use_te_default() if use_te is None else use_te,
    )


def check_lighthouse_model(config, lighthouse: LighthouseConfig) -> None:
    """Fail at build time on model settings Lighthouse layers do not support."""
    check_config(config, "Lighthouse attention", lighthouse=True)
    warn_qk_layernorm(lighthouse.scorer, bool(Values.of(config).qk_layernorm),
                      "Lighthouse with scorer='norm' and qk_layernorm=True", stacklevel=4)


def get_gpt_layer_spec(
    config,
    *,
    attention_impl: str = "lighthouse",
    lighthouse: LighthouseConfig | None = None,
    use_te: bool | None = None,
    qk_layernorm: bool | None = None,
    normalization: str | None = None,
    qk_l2_norm: bool | None = False,
    schedule: RecipeSchedule | None = None,
) -> ModuleSpec:
    """A GPT layer spec (MoE-free MLP) with Lighthouse or dense core attention.

    config          TransformerConfig (or Megatron-LM's GPTModelConfig).
    attention_impl  "lighthouse" or "dense".
    lighthouse      LighthouseConfig (default settings when None).
    use_te          Transformer Engine submodules; None picks TE when importable on a GPU.
    qk_layernorm, normalization  as megatron-core's builders; None reads them from config.
    qk_l2_norm      as megatron-core's builders.
    schedule        when Lighthouse layers run dense (the recipe: `--lighthouse-until-iter` and
                    its variants); None: always Lighthouse.

    Dense core attention is TEDotProductAttention with TE, DenseCoreAttention without.
    """
    config, lighthouse, use_te = _common_arguments(config, attention_impl, lighthouse, use_te)
    if getattr(config, "num_moe_experts", None):
        raise ValueError(f"get_gpt_layer_spec builds one MoE-free layer, got num_moe_experts="
                         f"{config.num_moe_experts}; use get_gpt_decoder_block_spec, which follows "
                         "moe_layer_freq as megatron-core's does")
    if attention_impl == "lighthouse":
        check_lighthouse_model(config, lighthouse)
    c = Values.of(config)  # megatron-core's TransformerConfig (or a stand-in with fewer fields)
    qk_layernorm = bool(c.qk_layernorm) if qk_layernorm is None else qk_layernorm
    normalization = given(c.normalization, "LayerNorm") if normalization is None else normalization

    if use_te:
        spec = mcore_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=qk_layernorm,
            qk_l2_norm=qk_l2_norm,
            use_te_activation_func=getattr(config, "use_te_activation_func", False),
        )
    else:
        spec = mcore_specs.get_gpt_layer_local_spec(
            qk_layernorm=qk_layernorm, normalization=normalization, qk_l2_norm=qk_l2_norm
        )
    return _with_core_attention(spec, attention_impl, lighthouse, use_te, schedule, c.num_query_groups)


def _with_core_attention(spec: ModuleSpec, attention_impl, lighthouse, use_te, schedule,
                         query_groups) -> ModuleSpec:
    """A deep copy of megatron-core's layer spec `spec` with only its core attention replaced.
    `query_groups`: the model's num_query_groups (the core attention is handed a config copy
    whose group count is the TP size when groups < TP)."""
    # megatron-core's builders may share submodule specs between calls: never mutate theirs.
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention.submodules
    if attention_impl == "lighthouse":
        attention.core_attention = ModuleSpec(
            module=LighthouseCoreAttention,
            params={"lighthouse": lighthouse, "schedule": schedule,
                    "query_groups": query_groups},
        )
    elif not use_te:
        # Stock DotProductAttention needs CUDA (global memory buffer, RNG tracker) and
        # materialises the [b*heads, s, s] scores.
        attention.core_attention = ModuleSpec(module=DenseCoreAttention)
    return spec


def _moe_block_spec(config, attention_impl, lighthouse, use_te, normalization, qk_l2_norm,
                    schedule, vp_stage, pp_rank) -> TransformerBlockSubmodules:
    """MoE models: megatron-core's own per-layer specs (expert and dense MLPs as moe_layer_freq
    says, what Megatron-LM builds with --num-experts) with only the core attention replaced."""
    if attention_impl == "lighthouse":
        check_lighthouse_model(config, lighthouse)
        dense_layers = lighthouse.resolve_dense_layers(config.num_layers)
    else:
        dense_layers = frozenset(range(config.num_layers))
    c = Values.of(config)
    normalization = given(c.normalization, "LayerNorm") if normalization is None else normalization
    mcore = mcore_specs.get_gpt_decoder_layer_specs(config, use_te, normalization, qk_l2_norm)
    layer_specs = [
        _with_core_attention(spec, "dense" if i in dense_layers else "lighthouse", lighthouse, use_te,
                             schedule, c.num_query_groups)
        for i, spec in enumerate(mcore)
    ]
    layer_specs = _layers_of_this_stage(config, layer_specs, vp_stage, pp_rank)
    # The final norm of megatron-core's get_gpt_decoder_block_spec (which needs the process
    # groups to slice), so that checkpoints keep its keys.
    inference = getattr(config, "transformer_impl", None) == "inference_optimized"
    layer_norm = mcore_specs.TENorm if use_te or inference else mcore_specs.LNImpl
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=layer_norm)


def get_gpt_decoder_block_spec(
    config,
    *,
    attention_impl: str = "lighthouse",
    lighthouse: LighthouseConfig | None = None,
    use_te: bool | None = None,
    qk_layernorm: bool | None = None,
    normalization: str | None = None,
    qk_l2_norm: bool | None = False,
    schedule: RecipeSchedule | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """Per-layer specs for this pipeline (and virtual pipeline) stage.

    Layers in `lighthouse.dense_layers` (0-based global indices, negative from the end)
    keep dense attention, the others get Lighthouse (all dense for attention_impl="dense").
    Other arguments as `get_gpt_layer_spec` and megatron-core's block spec builder.
    """
    config, lighthouse, use_te = _common_arguments(config, attention_impl, lighthouse, use_te)
    if getattr(config, "num_moe_experts", None):
        return _moe_block_spec(config, attention_impl, lighthouse, use_te, normalization, qk_l2_norm,
                               schedule, vp_stage, pp_rank)
    common = dict(use_te=use_te, qk_layernorm=qk_layernorm, normalization=normalization,
                  qk_l2_norm=qk_l2_norm)
    dense_spec = get_gpt_layer_spec(config, attention_impl="dense", lighthouse=lighthouse, **common)
    if attention_impl == "lighthouse":
        sparse_spec = get_gpt_layer_spec(
            config, attention_impl="lighthouse", lighthouse=lighthouse, schedule=schedule,
            **common,
        )
        dense_layers = lighthouse.resolve_dense_layers(config.num_layers)
    else:
        sparse_spec, dense_layers = dense_spec, frozenset(range(config.num_layers))
    # One deep copy per layer, so that no two layers share a mutable spec.
    layer_specs = [
        copy.deepcopy(dense_spec if i in dense_layers else sparse_spec) for i in range(config.num_layers)
    ]
    layer_specs = _layers_of_this_stage(config, layer_specs, vp_stage, pp_rank)
    # The final norm Megatron-LM's own dense model gets from a layer spec (TransformerBlock's
    # LayerNormImpl: TENorm wherever TE imports, even with --transformer-impl local), so that
    # checkpoints move between this spec and Megatron-LM's dense one with the same keys.
    layer_norm = mcore_specs.TENorm if use_te else transformer_block.LayerNormImpl
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=layer_norm)


def _layers_of_this_stage(config, layer_specs, vp_stage, pp_rank):
    """The slice megatron-core's get_gpt_decoder_block_spec builds on this PP/VPP stage."""
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None:
        ids = layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
        return [layer_specs[i] for i in ids]
    if (config.pipeline_model_parallel_size or 1) == 1 and vp_stage is None:
        return layer_specs  # no pipeline: no process groups needed to know that
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return layer_specs[offset : offset + count]


@dataclass
class LighthouseBlockSpecProvider:
    """A callable block spec for Megatron-LM >= 0.19 (`GPTModelConfig.transformer_layer_spec`).

    Megatron-LM's GPT model builder calls it as `provider(config, vp_stage=...)` on each
    pipeline stage; it is a plain dataclass so that configs holding it stay picklable.
    """

    lighthouse: LighthouseConfig
    attention_impl: str = "lighthouse"
    use_te: bool | None = None
    normalization: str | None = None
    qk_l2_norm: bool | None = False
    schedule: RecipeSchedule | None = None

    def __call__(self, config, vp_stage: int | None = None) -> TransformerBlockSubmodules:
        return get_gpt_decoder_block_spec(
            config,
            attention_impl=self.attention_impl,
            lighthouse=self.lighthouse,
            use_te=self.use_te,
            normalization=self.normalization,
            qk_l2_norm=self.qk_l2_norm,
            schedule=self.schedule,
            vp_stage=vp_stage,
        )
