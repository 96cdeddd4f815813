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


@triton.jit
def program_head(heads, kv_heads, GROUP: tl.constexpr):
    """The (batch, head, batch * kv_heads + kv head) of a program whose axis 1 is batch * heads,
    as int64: head-major inputs make h * stride_h pass 2**31."""
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    unit = (b * kv_heads + h // GROUP).to(tl.int64)
    return b.to(tl.int64), h.to(tl.int64), unit


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when the ops modules load: only
# kernels defined under the interpreter can take CPU tensors. Set later, the variable cannot
# turn compiled kernels into interpreted ones (they would look for a GPU driver and fail).
_KERNELS_INTERPRETED = interpreting()


def use_triton(x: Tensor) -> bool:
    """Kernels for CUDA tensors, and for CPU tensors while TRITON_INTERPRET=1 if it was already
    set when the kernels were defined (the tests); the plain-PyTorch twins otherwise."""
    return HAS_TRITON and (x.is_cuda or (_KERNELS_INTERPRETED and interpreting()))
