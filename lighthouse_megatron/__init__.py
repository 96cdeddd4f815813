"""Lighthouse attention for NVIDIA Megatron (arXiv 2605.06554)."""

from .config import LighthouseConfig

__all__ = ["LighthouseConfig", "lighthouse_attention"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The attention imports torch (seconds); the command line (`lighthouse-megatron --help`,
    # `--version`, every subcommand's --help) imports this package and must not pay for it.
    if name == "lighthouse_attention":
        from .attention import lighthouse_attention

        return lighthouse_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
