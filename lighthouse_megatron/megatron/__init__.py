"""The Megatron face of Lighthouse attention: a megatron-core core attention, GPT layer
and block specs, launch arguments, and a Megatron-LM entry point (`pretrain_gpt`).

Needs megatron-core; Megatron-LM (`megatron.training`) only for the entry point.
"""

from .arguments import (
    add_lighthouse_args,
    lighthouse_config_from_args,
    resolve_lighthouse_args,
    validate_lighthouse_args,
)
from .core_attention import DenseCoreAttention, LighthouseCoreAttention
from .schedule import get_iteration, set_iteration, set_iteration_source
from .specs import (
    LighthouseBlockSpecProvider,
    get_gpt_decoder_block_spec,
    get_gpt_layer_spec,
    lighthouse_spec_from_env,
)

__all__ = [
    "DenseCoreAttention",
    "LighthouseBlockSpecProvider",
    "LighthouseCoreAttention",
    "add_lighthouse_args",
    "get_gpt_decoder_block_spec",
    "get_gpt_layer_spec",
    "get_iteration",
    "lighthouse_config_from_args",
    "lighthouse_spec_from_env",
    "resolve_lighthouse_args",
    "set_iteration",
    "set_iteration_source",
    "validate_lighthouse_args",
]
