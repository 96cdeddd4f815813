"""Lighthouse attention for NVIDIA Megatron (arXiv 2605.06554)."""

from .attention import lighthouse_attention
from .config import LighthouseConfig

__all__ = ["LighthouseConfig", "lighthouse_attention"]
__version__ = "0.1.0"
