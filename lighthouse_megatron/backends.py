"""Dense causal attention kernels for stage 5 (and for dense layers without Transformer Engine).

Layout [b, s, H, d]; GQA passed natively (Hq a multiple of Hkv), never by repeating k and v.
Order for "auto" on a GPU: Transformer Engine's fused attention when it imports, then PyTorch
SDPA with cuDNN, flash, memory-efficient and math kernels (SDPA picks the first that accepts
the inputs). On the CPU: SDPA's math kernel.

Determinism: the cuDNN and flash backward passes accumulate dQ in a run-dependent order
(PyTorch 2.11 does not expose cuDNN's deterministic mode), so under
`torch.use_deterministic_algorithms(True)` "auto" uses SDPA's memory-efficient kernel,
whose backward PyTorch then makes deterministic, and never the others.
"""

from __future__ import annotations

import functools
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
_SDPA_AUTO = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.MATH]


@functools.lru_cache(maxsize=1)
def _te_import_error() -> str | None:
    """Why transformer_engine.pytorch does not import here, or None when it does."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # ImportError, or a TE build that does not match this torch/CUDA
        return f"{type(err).__name__}: {err}"
    return None


def te_available() -> bool:
    return _te_import_error() is None


@functools.lru_cache(maxsize=64)
def _te_module(heads: int, groups: int, d: int, scale: float, dtype: torch.dtype, device: int):
    # Building a DotProductAttention is slow (backend probing); one per shape and scale.
    from transformer_engine.pytorch import DotProductAttention

    return DotProductAttention(
        num_attention_heads=heads,
        kv_channels=d,
        num_gqa_groups=groups,
        attention_dropout=0.0,
        qkv_format="bshd",
        attn_mask_type="causal",
        softmax_scale=scale,
    ).to(device=torch.device("cuda", device), dtype=dtype)


def te_layout(x: Tensor) -> Tensor:
    """`x` with the strides of a freshly allocated tensor, size-1 dimensions included.

    TE infers the qkv memory layout from strides; `.contiguous()` keeps a permuted view whose
    size-1 dimensions carry odd strides (Megatron's [s, b, h, d] at b = 1), which TE rejects."""
    stride, expected = 1, []
    for size in reversed(x.shape):
        expected.append(stride)
        stride *= size
    if tuple(x.stride()) == tuple(reversed(expected)):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _te_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    b, s, hq, d = q.shape
    module = _te_module(hq, k.shape[2], d, float(scale), q.dtype, q.device.index or 0)
    out = module(te_layout(q), te_layout(k), te_layout(v))  # [b, s, hq * d]
    return out.view(b, s, hq, d)


def dense_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Causal attention, [b, s, Hq, d] x [b, s, Hkv, d] -> [b, s, Hq, d]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    deterministic = torch.are_deterministic_algorithms_enabled()
    if backend == "te" or (backend == "auto" and q.is_cuda and te_available() and not deterministic):
        if not te_available():
            raise RuntimeError(
                f"lighthouse backend 'te' needs transformer_engine.pytorch, which does not import here "
                f"({_te_import_error()}); choose backend 'auto', 'cudnn', 'flash' or 'math'"
            )
        if not q.is_cuda:
            raise RuntimeError("lighthouse backend 'te' needs CUDA tensors")
        return _te_attention(q, k, v, scale)
    if backend == "auto":
        if not q.is_cuda:
            order = [SDPBackend.MATH]
        elif deterministic:
            order = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        else:
            order = _SDPA_AUTO
    elif backend in _SDPA:
        order = _SDPA[backend]
    else:
        raise ValueError(f"unknown dense attention backend {backend!r}; valid: auto, te, {', '.join(_SDPA)}")
    gqa = q.shape[2] != k.shape[2]
    with sdpa_kernel(order, set_priority=True):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=scale, enable_gqa=gqa,
        )
    return out.transpose(1, 2)
