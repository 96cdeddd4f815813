"""The Megatron face of Lighthouse attention for megatron-core users: a core attention,
GPT layer and block specs, and the table of supported settings (`rules`).

Launch code for Megatron-LM users (flags, entry point, patches' adapters) lives in
`lighthouse_megatron.megatron_lm`; its argument functions are re-exported here.
"""

from .core_attention import DenseCoreAttention, LighthouseCoreAttention
from .schedule import forced_dense, get_iteration, set_iteration, set_iteration_source
from .specs import LighthouseBlockSpecProvider, get_gpt_decoder_block_spec, get_gpt_layer_spec

_LAUNCH_NAMES = ("add_lighthouse_args", "lighthouse_config_from_args", "resolve_lighthouse_args",
                 "validate_lighthouse_args")


def __getattr__(name):
    # Lazy: megatron_lm builds on this package, so it cannot be imported while this one is.
    if name in _LAUNCH_NAMES:
        from ..megatron_lm import arguments

        return getattr(arguments, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    *_LAUNCH_NAMES,
]
