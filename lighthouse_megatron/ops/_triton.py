"""Triton when it imports; otherwise stand-ins so the ops modules still load and their
plain-PyTorch twins run (Triton ships for Linux only)."""

from __future__ import annotations

import os

from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _NoTriton:
        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()
    tl = None


def use_triton(x: Tensor) -> bool:
    """Kernels for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    return HAS_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
