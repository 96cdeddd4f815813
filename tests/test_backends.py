"""Stage-5 dense kernels: settings errors by device, the layouts handed to Transformer
Engine, and (GPU, TE installed) TE on Megatron's permuted views against SDPA cuDNN."""

from __future__ import annotations

import pytest
import torch

from lighthouse_megatron import LighthouseConfig, lighthouse_attention
from lighthouse_megatron.backends import dense_causal_attention, te_available, te_layout


@pytest.mark.parametrize("backend", ["cudnn", "flash", "te"])
def test_gpu_only_backends_on_cpu_name_the_valid_ones(backend):
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match=rf"backend '{backend}' needs CUDA tensors, got cpu tensors; "
                                         r"valid on cpu: \['auto', 'math'\]"):
        dense_causal_attention(q, q, q, None, backend)
    cfg = LighthouseConfig(levels=2, pooling_factor=2, topk=4, tile_topk=2, backend=backend)
    with pytest.raises(ValueError, match=f"backend '{backend}' needs CUDA tensors"):
        lighthouse_attention(q, q, q, cfg)


def megatron_views(s: int, b: int, hq: int, hkv: int, d: int, fused: bool, device="cpu",
                   dtype=torch.float32):
    """q, k, v as megatron-core's core attention receives them ([s, b, h, d]) and as
    Lighthouse's modules hand them on ([b, s, h, d], a transposed view)."""
    if fused:  # one QKV projection output split along the last dim, as SelfAttention does
        qkv = torch.randn(s, b, hkv, (hq // hkv + 2) * d, device=device, dtype=dtype)
        q = qkv[..., : hq // hkv * d].reshape(s, b, hq, d)
        k, v = qkv[..., -2 * d : -d], qkv[..., -d:]
    else:
        q, k, v = (torch.randn(s, b, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    return tuple(t.transpose(0, 1) for t in (q, k, v))


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused_qkv"])
def test_te_layout_has_dense_strides_and_same_values(b, fused):
    q, k, v = megatron_views(16, b, 4, 2, 8, fused)
    fmt, tensors = te_layout(q, k, v)
    for original, t in zip((q, k, v), tensors, strict=True):
        # TE checks every stride, size-1 dims included: exactly row-major in its format.
        expected = torch.empty(t.shape).stride()
        assert t.stride() == expected, (fmt, t.stride(), expected)
        back = t if fmt == "bshd" else t.transpose(0, 1)
        assert torch.equal(back, original)
    if not fused:  # Megatron's own [s, b, h, d] tensors pass without a copy
        assert fmt == "sbhd" and tensors[0].data_ptr() == q.data_ptr()
    if b == 1 and not fused:
        # torch calls the b = 1 view contiguous, yet its batch stride is not s*h*d.
        assert q.is_contiguous() and q.stride(0) != q.shape[1] * q.shape[2] * q.shape[3]


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused_qkv"])
def test_gpu_te_accepts_megatron_views(b, fused):
    if not te_available():
        pytest.skip("transformer_engine.pytorch does not import here")
    torch.manual_seed(b)
    q, k, v = megatron_views(8192, b, 8, 2, 128, fused, device="cuda", dtype=torch.bfloat16)
    te = dense_causal_attention(q, k, v, None, "te")
    cudnn = dense_causal_attention(q, k, v, None, "cudnn")
    assert te.shape == q.shape
    err = ((te.float() - cudnn.float()).norm() / cudnn.float().norm()).item()
    assert err < 1e-2, err
    # And through Lighthouse (stage 5 on gathered tensors), same views.
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=512, tile_topk=128)
    out_te = lighthouse_attention(q, k, v, LighthouseConfig(**{**cfg.to_dict(), "backend": "te"}))
    out_cudnn = lighthouse_attention(q, k, v, LighthouseConfig(**{**cfg.to_dict(), "backend": "cudnn"}))
    err = ((out_te.float() - out_cudnn.float()).norm() / out_cudnn.float().norm()).item()
    assert err < 1e-2, err
