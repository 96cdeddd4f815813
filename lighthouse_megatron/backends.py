"""Dense causal attention kernels for stage 5 (and for dense layers without Transformer Engine).

Layout [b, s, H, d]; GQA passed natively (Hq a multiple of Hkv), never by repeating k and v.
Order for "auto" on a GPU: Transformer Engine's fused attention when it imports, then PyTorch
SDPA with cuDNN, flash, memory-efficient and math kernels (SDPA picks the first that accepts
the inputs). On the CPU: SDPA's math kernel.

Determinism: the cuDNN and flash backward passes accumulate dQ in a run-dependent order
(PyTorch offers no deterministic mode for them), so under
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

from .config import backend_problem

_SDPA = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "math": [SDPBackend.MATH],
}
_SDPA_AUTO = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.MATH]


@functools.lru_cache(maxsize=1)
def te_import_error() -> str | None:
    """Why transformer_engine.pytorch does not import here, or None when it does."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # ImportError, or a TE build that does not match this torch/CUDA
        return f"{type(err).__name__}: {err}"
    return None


def te_available() -> bool:
    return te_import_error() is None


@functools.lru_cache(maxsize=64)
def _te_module(heads: int, groups: int, d: int, scale: float, dtype: torch.dtype, device: int,
               qkv_format: str):
    # Building a DotProductAttention is slow (backend probing); one per shape, scale and layout.
    from transformer_engine.pytorch import DotProductAttention

    return DotProductAttention(
        num_attention_heads=heads,
        kv_channels=d,
        num_gqa_groups=groups,
        attention_dropout=0.0,
        qkv_format=qkv_format,
        attn_mask_type="causal",
        softmax_scale=scale,
    ).to(device=torch.device("cuda", device), dtype=dtype)


def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def te_layout(q: Tensor, k: Tensor, v: Tensor) -> tuple[str, list[Tensor]]:
    """q, k, v [b, s, H, d] as TE takes them: `(qkv_format, tensors in that format)`.

    TE reads the strides literally: a size-1 batch dim with any stride, which torch calls
    contiguous (so `.contiguous()` is a no-op), is rejected ("The provided qkv memory
    layout is not supported!"). Megatron hands over permuted views of [s, b, h, d], so
    "sbhd" is tried too; only tensors dense in neither layout are copied."""
    for fmt, tensors in (("bshd", [q, k, v]), ("sbhd", [t.transpose(0, 1) for t in (q, k, v)])):
        if all(t.stride() == _dense_strides(t.shape) for t in tensors):
            return fmt, tensors
    return "bshd", [t.clone(memory_format=torch.contiguous_format) for t in (q, k, v)]


def _te_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    b, s, hq, d = q.shape
    fmt, tensors = te_layout(q, k, v)
    module = _te_module(hq, k.shape[2], d, float(scale), q.dtype, q.device.index or 0, fmt)
    out = module(*tensors)  # [b, s, hq * d] or [s, b, hq * d]
    if fmt == "sbhd":
        return out.view(s, b, hq, d).transpose(0, 1)
    return out.view(b, s, hq, d)


def check_backend(backend: str, device: torch.device) -> None:
    """ValueError naming the backend and the ones valid on `device`."""
    problem = backend_problem(backend, device.type)
    if problem:
        raise ValueError(problem)
    if backend == "te" and not te_available():
        raise ValueError(f"lighthouse backend 'te' needs transformer_engine.pytorch, which does not "
                         f"import here ({te_import_error()}); valid here: 'auto', 'cudnn', 'flash', 'math'")


def sdpa_kernels(backend: str, q: Tensor) -> list[SDPBackend] | None:
    """The kernel rule of every dense attention in the package, with and without context
    parallelism: None for Transformer Engine, else the SDPA kernels to allow, in priority order.
    Raises ValueError (naming the valid backends) for a backend this device cannot run."""
    check_backend(backend, q.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if backend == "te" or (backend == "auto" and q.is_cuda and te_available() and not deterministic):
        return None
    if backend != "auto":
        return _SDPA[backend]
    if not q.is_cuda:
        # SDPA's own CPU choice is its flash kernel, whose fp32 backward loses precision at
        # large logits; the math kernel is exact enough to compare CP degrees and paths.
        return [SDPBackend.MATH]
    return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if deterministic else _SDPA_AUTO


def dense_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, softmax_scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Causal attention, [b, s, Hq, d] x [b, s, Hkv, d] -> [b, s, Hq, d]."""
    kernels = sdpa_kernels(backend, q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if kernels is None:
        return _te_attention(q, k, v, scale)
    gqa = q.shape[2] != k.shape[2]
    with sdpa_kernel(kernels, set_priority=True):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=scale, enable_gqa=gqa,
        )
    return out.transpose(1, 2)
