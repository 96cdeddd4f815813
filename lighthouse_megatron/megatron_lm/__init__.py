"""Launch code for Megatron-LM users: the Lighthouse flags, the entry point
(`python -m lighthouse_megatron.megatron_lm.pretrain_gpt`), and the per-generation
adapters (`core_v0_16`, `core_v0_19`) that the entry point and `patches/` call.

Needs megatron-core; Megatron-LM (`megatron.training`, not on PyPI) only where it
is actually launched.
"""

from ..settings.lighthouse import (
    add_lighthouse_args,
    lighthouse_config_from_args,
    load_lighthouse_yaml,
    resolve_lighthouse_args,
    validate_lighthouse_args,
)

__all__ = [
    "add_lighthouse_args",
    "lighthouse_config_from_args",
    "load_lighthouse_yaml",
    "resolve_lighthouse_args",
    "validate_lighthouse_args",
]
