"""The Megatron face of Lighthouse attention for megatron-core users: a core attention,
GPT layer and block specs, and the table of supported settings (`rules`).

The launch flags (`arguments`) live here, shared by the trainer and by the launch code for
Megatron-LM users (`lighthouse_megatron.megatron_lm`: entry point, patches' adapters), which
builds on this package.
"""

from .arguments import (
    add_lighthouse_args,
    lighthouse_config_from_args,
    resolve_lighthouse_args,
    validate_lighthouse_args,
)
from .core_attention import DenseCoreAttention, LighthouseCoreAttention
from .schedule import forced_dense, get_iteration, set_iteration, set_iteration_source
from .specs import LighthouseBlockSpecProvider, get_gpt_decoder_block_spec, get_gpt_layer_spec

__all__ = [
    "DenseCoreAttention",
    "LighthouseBlockSpecProvider",
    "LighthouseCoreAttention",
    "get_gpt_decoder_block_spec",
    "forced_dense",
    "get_gpt_layer_spec",
    "get_iteration",
    "set_iteration",
    "set_iteration_source",
    "add_lighthouse_args",
    "lighthouse_config_from_args",
    "resolve_lighthouse_args",
    "validate_lighthouse_args",
]
