"""The one model builder: megatron-core's TransformerConfig and GPTModel from Megatron-LM's
arguments (Megatron-LM's `core_transformer_config_from_args` for the models this package
builds), and how a model's layers are described. The trainer builds from its settings (as a
checkpoint stores them), the converter from a checkpoint's stored arguments, the bench from
its flags under Megatron-LM's names; a value that is absent or None is Megatron-LM's default.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..settings.fields import Values, given


def transformer_config(args, *, dtype=torch.float32, cpu_init: bool = True, **overrides):
    """megatron-core TransformerConfig for Megatron-LM arguments: the model's architecture, with
    TP = PP = 1 and no dropout unless `overrides` (more TransformerConfig fields) say otherwise.
    ValueError for arguments that do not describe a model this package builds."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    a = Values.of(args)
    if None in (a.num_layers, a.hidden_size, a.num_attention_heads):
        raise ValueError("the stored arguments lack num_layers, hidden_size or num_attention_heads: cannot "
                         "rebuild the model")
    if a.num_experts:
        raise ValueError(f"num_experts={a.num_experts}: MoE checkpoints are not supported")
    if a.multi_latent_attention:
        raise ValueError("multi_latent_attention=True: MLA checkpoints are not supported")
    if a.swiglu:
        activation, gated = F.silu, True
    elif a.squared_relu:
        activation, gated = (lambda x: torch.pow(F.relu(x), 2)), False
    else:
        activation, gated = F.gelu, False
    fields = dict(
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups if a.group_query_attention else None,
        ffn_hidden_size=a.ffn_hidden_size,
        kv_channels=a.kv_channels,
        normalization=given(a.normalization, "LayerNorm"),
        layernorm_epsilon=given(a.norm_epsilon, 1e-5),
        layernorm_zero_centered_gamma=bool(a.apply_layernorm_1p),
        add_bias_linear=given(a.add_bias_linear, True),
        add_qkv_bias=bool(a.add_qkv_bias),
        gated_linear_unit=gated,
        activation_func=activation,
        qk_layernorm=bool(a.qk_layernorm),
        init_method_std=given(a.init_method_std, 0.02),
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=dtype,
        use_cpu_initialization=cpu_init,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    with warnings.catch_warnings():
        # megatron-core's own default cuda_graph_scope ("full") triggers its deprecation warning.
        warnings.filterwarnings("ignore", message=r"full scope is deprecated")
        return TransformerConfig(**{**fields, **overrides})


def gpt_model(args, config, spec, vocab_size: int, *, parallel_output: bool = True):
    """megatron-core's GPTModel for Megatron-LM arguments with `config` and the block `spec`;
    `vocab_size` rows (the padded vocabulary). Unwrapped, on the CPU unless `config` says
    otherwise."""
    from megatron.core.models.gpt import GPTModel

    a = Values.of(args)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=given(a.max_position_embeddings, given(a.seq_length, 2048)),
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights,
        position_embedding_type=given(a.position_embedding_type, "learned_absolute"),
        rotary_percent=given(a.rotary_percent, 1.0),
        rotary_base=given(a.rotary_base, 10000),
        rope_scaling=bool(a.use_rope_scaling),
    )


def attention_spans(kinds: list[str]) -> str:
    """['dense', 'lighthouse', 'lighthouse'] -> 'layer 0 dense; layer 1-2 lighthouse'."""
    runs: list[list] = []
    for i, kind in enumerate(kinds):
        if runs and runs[-1][2] == kind:
            runs[-1][1] = i
        else:
            runs.append([i, i, kind])
    return "; ".join(f"layer {a}" + (f"-{b}" if b > a else "") + f" {k}" for a, b, k in runs)
