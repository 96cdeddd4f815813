"""The Megatron face of Lighthouse attention for megatron-core users: a core attention,
GPT layer and block specs, and the launch flags (`add_lighthouse_args` and friends, defined
torch-free in `lighthouse_megatron.settings.lighthouse` with the table of supported settings,
`settings.rules`, and re-exported here).

The launch code for Megatron-LM users (`lighthouse_megatron.megatron_lm`: entry point,
patches' adapters) builds on this package.
"""

from ..settings.lighthouse import (
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
