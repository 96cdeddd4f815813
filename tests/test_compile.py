"""torch.compile over a layer with Lighthouse attention.

The stages are custom ops (ops/stages.py), so dynamo traces `lighthouse_attention` whole
(fullgraph: any graph break fails) and inductor compiles everything around the ops, which stay
opaque: on the CPU the compiled graph calls the same ops the eager layer does, running the
Triton kernels through the interpreter or the plain-PyTorch twins, whichever TRITON_INTERPRET
picks when they run. Compiled equals eager up to inductor's own fp32 rounding of the
projections and the dense attention around the ops.
"""

from __future__ import annotations

import pytest
import torch

from lighthouse_megatron import LighthouseConfig, lighthouse_attention

from ._inputs import random_qkv

STAGE_OPS = {f"lighthouse.{op}.default" for op in ("score_pyramids", "select", "gather", "scatter")}


class TinyLayer(torch.nn.Module):
    """An attention block: QKV projection, Lighthouse attention, output projection."""

    def __init__(self, config: LighthouseConfig, hidden: int, hq: int, hkv: int, d: int):
        super().__init__()
        self.config, self.d, self.split = config, d, [hq * d, hkv * d, hkv * d]
        self.qkv = torch.nn.Linear(hidden, sum(self.split), bias=False)
        self.proj = torch.nn.Linear(hq * d, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (-1, self.d)) for t in self.qkv(x).split(self.split, dim=-1))
        return self.proj(lighthouse_attention(q, k, v, self.config).flatten(2))


def _assert_compiled_equals_eager(layer, compiled, x, rtol, atol):
    eager = layer(x)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=rtol, atol=atol)
    g = torch.randn_like(eager)
    inputs = (x, *layer.parameters())
    for ours, want in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(eager, inputs, g),
                          strict=True):
        torch.testing.assert_close(ours, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("level_merge", ["sum", "mean"])
def test_compiled_layer_equals_eager_cpu(monkeypatch, level_merge):
    torch._dynamo.reset()
    cfg = LighthouseConfig(levels=3, pooling_factor=2, topk=4, tile_topk=2, level_merge=level_merge)
    torch.manual_seed(0)
    layer = TinyLayer(cfg, hidden=16, hq=2, hkv=1, d=8)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 32, 16, requires_grad=True)
    # One compiled graph for both implementations: the choice is made inside the ops.
    for interpret in ("1", "0"):  # the interpreted kernels, then the twins
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        _assert_compiled_equals_eager(layer, compiled, x, rtol=1e-5, atol=1e-6)


def test_dynamo_graph_holds_the_stages_and_follows_the_sequence_length():
    """The traced graph calls the stage ops (nothing of their insides), and a new sequence length
    gets one graph dynamic in it, the fake implementations computing sizes from the symbol."""
    torch._dynamo.reset()
    cfg = LighthouseConfig(levels=2, pooling_factor=4, topk=8, tile_topk=4)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda q, k, v: lighthouse_attention(q, k, v, cfg), backend=record, fullgraph=True)
    for n in (96, 192, 288):
        q, k, v = random_qkv(1, n, 2, 1, 8, seed=n, grad=True)
        out, eager = fn(q, k, v), lighthouse_attention(q, k, v, cfg)
        assert torch.equal(out, eager)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(eager, (q, k, v), g),
                        strict=True):
            assert torch.equal(a, b)
    assert len(graphs) <= 2  # the first length, then one graph for every later length
    targets = {str(node.target) for node in graphs[-1].graph.nodes if node.op == "call_function"}
    assert STAGE_OPS <= targets


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_compiled_layer_equals_eager_gpu(backend):
    """The Triton kernels inside the compiled graph. SDPA backends only: "auto" and "te" probe and
    build Transformer Engine modules in backends.py, which dynamo does not trace whole."""
    torch._dynamo.reset()
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=512, tile_topk=128, backend=backend)
    torch.manual_seed(0)
    layer = TinyLayer(cfg, hidden=512, hq=8, hkv=2, d=64).to("cuda", torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(1, 16384, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _assert_compiled_equals_eager(layer, compiled, x, rtol=2e-2, atol=2e-2)
