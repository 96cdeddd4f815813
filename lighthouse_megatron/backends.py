"""Dense causal attention kernels for stage 5 (and for dense layers without Transformer Engine).

Layout [b, s, H, d]; GQA passed natively (Hq a multiple of Hkv).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

_SDPA = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "math": [SDPBackend.MATH],
}


def dense_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Causal attention, [b, s, Hq, d] x [b, s, Hkv, d] -> [b, s, Hq, d]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if backend == "auto":
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH] if q.is_cuda else [SDPBackend.MATH]
    elif backend in _SDPA:
        order = _SDPA[backend]
    else:
        raise ValueError(f"unknown dense attention backend {backend!r}; valid: auto, {', '.join(_SDPA)}")
    gqa = q.shape[2] != k.shape[2]
    with sdpa_kernel(order, set_priority=True):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=scale, enable_gqa=gqa,
        )
    return out.transpose(1, 2)
