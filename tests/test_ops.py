"""Fast path (lighthouse_megatron.ops + attention.py) against its twins and the reference: every
kernel against its twin, the custom ops' fake shapes and gradients, the whole path.

On the CPU the Triton kernels run through TRITON_INTERPRET=1 (set by conftest) at tiny sizes;
the `gpu` tests repeat the checks at realistic sizes in bf16 and check bitwise determinism.
Outputs are poisoned: every torch.empty the ops allocate comes back filled with NaN (floats)
or a large negative number (ints), so an element a kernel forgets to write shows up.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lighthouse_megatron import lighthouse_attention
from lighthouse_megatron.attention import plan_selection
from lighthouse_megatron.config import LighthouseConfig
from lighthouse_megatron.ops import gather, scatter, scores, segments, tiles, tokens, twins
from lighthouse_megatron.ops.plan import level_offsets
from lighthouse_megatron.reference import gather as reference_gather
from lighthouse_megatron.reference import lighthouse_attention_reference, plan, pyramid
from lighthouse_megatron.reference import scatter as reference_scatter

from ._inputs import random_qkv
from .test_reference import as_list, literal

# The kernel and twin pairs by the token range they sum ("pool" or "feed"), for tests
# parametrized over both.
SEGMENTS = {"pool": (segments.pool_segments, twins.pool_segments),
            "feed": (segments.feed_segments, twins.feed_segments)}


def segment_sum(x, plan, mode):
    return SEGMENTS[mode][0](x, plan)


def segment_sum_torch(x, plan, mode):
    return SEGMENTS[mode][1](x, plan)


def token_sum(g, plan, mode, halo=None):
    return tokens.feed_tokens(g, plan, halo=halo) if mode == "feed" else tokens.pool_tokens(g, plan)


def token_sum_torch(g, plan, mode, halo=None):
    return twins.feed_tokens(g, plan, halo) if mode == "feed" else twins.pool_tokens(g, plan)


PLAN_FIELDS = ("level", "index", "inverse", "selected_q", "selected_k")

# (config, n, Hq, Hkv, d): tiny shapes for the interpreter; M/n_tiles is deliberately not a
# multiple of the kernel's candidate block in some of them.
SMALL = [
    (LighthouseConfig(levels=3, pooling_factor=2, topk=16, tile_topk=8), 256, 4, 2, 16),
    (LighthouseConfig(levels=2, pooling_factor=4, topk=8, tile_topk=4), 96, 2, 2, 8),
    (LighthouseConfig(levels=3, pooling_factor=4, topk=4, tile_topk=4), 192, 3, 1, 12),
    (LighthouseConfig(levels=4, pooling_factor=2, topk=8, tile_topk=2), 160, 2, 1, 8),
    (LighthouseConfig(levels=2, pooling_factor=8, topk=12, tile_topk=6), 112, 2, 2, 8),  # T/2 = 3
]
SMALL_IDS = ["L3p2", "L2p4", "L3p4-onetile", "L4p2", "L2p8-T6"]


@pytest.fixture
def poisoned(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(real_empty_like(*a, **kw)))


def assert_plans_equal(a, b):
    for name in PLAN_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y), f"plans differ in {name}"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------- scores


@pytest.mark.parametrize("cfg,n,hq,hkv,d", SMALL, ids=SMALL_IDS)
def test_scores_kernel_matches_twin(cfg, n, hq, hkv, d, poisoned):
    q, k, _ = random_qkv(2, n, hq, hkv, d, seed=n)
    sq, sk = scores.score_pyramids(q, k, cfg)
    tq, tk = twins.score_pyramids(q, k, cfg)
    assert sq.shape == tq.shape == (2 * hkv, level_offsets(n, cfg.pooling_factor, cfg.levels)[-1])
    torch.testing.assert_close(sq, tq, rtol=1e-6, atol=0)
    torch.testing.assert_close(sk, tk, rtol=1e-6, atol=0)
    # The pyramid is the max of the kernel's own base scores, exactly.
    offs = level_offsets(n, cfg.pooling_factor, cfg.levels)
    for level in range(1, cfg.levels):
        c = cfg.pooling_factor**level
        for s in (sq, sk):
            assert torch.equal(s[:, offs[level]:offs[level + 1]], s[:, :n].reshape(-1, n // c, c).amax(-1))


# ---------------------------------------------------------------------- selection


@pytest.mark.parametrize("cfg,n,hq,hkv,d", SMALL, ids=SMALL_IDS)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_select_kernel_matches_twin_bitwise(cfg, n, hq, hkv, d, kind, poisoned):
    q, k, _ = random_qkv(2, n, hq, hkv, d, seed=n + 1)
    sq, sk = twins.score_pyramids(q, k, cfg)
    if kind == "ties":  # few distinct values: most comparisons are ties, broken by index
        g = torch.Generator().manual_seed(n)
        sq = torch.randint(0, 3, sq.shape, generator=g).float()
        sk = torch.randint(0, 3, sk.shape, generator=g).float()
    fast = tiles.select(sq, sk, 2, hkv, n, cfg)
    twin = twins.select(sq, sk, 2, hkv, n, cfg)
    assert_plans_equal(fast, twin)
    assert fast.length == cfg.gathered_length(n)


@pytest.mark.parametrize("cfg,n,hq,hkv,d", SMALL, ids=SMALL_IDS)
def test_select_twin_matches_literal_plan(cfg, n, hq, hkv, d):
    # The twin is the reference's plan (one CPU implementation per stage); the independent
    # check is the literal formulation of the paper's steps in test_reference.
    q, k, v = random_qkv(2, n, hq, hkv, d, seed=n + 2)
    sq, sk = twins.score_pyramids(q, k, cfg)
    ours = twins.select(sq, sk, 2, hkv, n, cfg)
    _, literal_plans = literal(q, k, v, cfg, 1.0)
    for (b, g), entries in literal_plans.items():
        assert as_list(ours, b, g) == entries


def test_equal_scores_select_lowest_indices():
    cfg = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_topk=4)
    n = 64  # 2 tiles of 16 coarsest entries
    total = level_offsets(n, 2, 2)[-1]
    ones = torch.ones(1, total)
    fast = tiles.select(ones, ones, 1, 1, n, cfg)
    assert_plans_equal(fast, twins.select(ones, ones, 1, 1, n, cfg))
    # All equal: A_q = the 2 lowest indices of each tile, A_k the next 2.
    assert fast.selected_q[0, 0, 0].tolist() == [[0, 1], [16, 17]]
    assert fast.selected_k[0, 0, 0].tolist() == [[2, 3], [18, 19]]


def test_inverse_map_points_back():
    cfg, n, hq, hkv, d = SMALL[0]
    q, k, _ = random_qkv(1, n, hq, hkv, d, seed=3)
    p = plan_selection(q, k, cfg)
    offs = torch.tensor(level_offsets(n, cfg.pooling_factor, cfg.levels)[:-1])
    flat = offs[p.level.long()] + p.index.long()
    slots = torch.arange(p.length).expand_as(flat)
    assert torch.equal(p.inverse.gather(-1, flat).long(), slots)
    assert int((p.inverse >= 0).sum()) == p.level.numel()


# ------------------------------------------------------------ gather and scatter


@pytest.mark.parametrize("cfg,n,hq,hkv,d", SMALL[:3], ids=SMALL_IDS[:3])
@pytest.mark.parametrize("mode", ["pool", "feed"])
def test_segment_sum_kernel_matches_twin(cfg, n, hq, hkv, d, mode, poisoned):
    q, k, _ = random_qkv(2, n, hq, hkv, d, seed=n + 4)
    p = plan_selection(q, k, cfg)
    for x in (q, k):  # GQA: Hq heads share their group's plan
        torch.testing.assert_close(segment_sum(x, p, mode), segment_sum_torch(x, p, mode),
                                   rtol=1e-5, atol=1e-5)


def test_segment_sum_twin_sums_each_block_on_its_own():
    """One huge token must not damage the blocks after it (fp64 prefix sums did: the
    difference of two prefixes near 1e16 loses every digit of an O(1) block sum)."""
    cfg, n, hq, hkv, d = SMALL[0]
    q, k, v = random_qkv(2, n, hq, hkv, d, seed=n + 8)
    v[:, 3] *= 1e16
    p = plan_selection(q, k, cfg)
    expected = reference_gather(pyramid(v, cfg), p)  # per-block fp32 means
    torch.testing.assert_close(segment_sum_torch(v, p, "pool"), expected, rtol=1e-5, atol=1e-6)
    # "feed" sums the tokens an entry's output feeds: the kernel sums them directly.
    torch.testing.assert_close(segment_sum_torch(v, p, "feed"), segment_sum(v, p, "feed"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg,n,hq,hkv,d", SMALL[:3], ids=SMALL_IDS[:3])
@pytest.mark.parametrize("mode", ["pool", "feed", "feed+halo"])
def test_token_sum_kernel_matches_twin(cfg, n, hq, hkv, d, mode, poisoned):
    q, k, _ = random_qkv(2, n, hq, hkv, d, seed=n + 5)
    p = plan_selection(q, k, cfg)
    g = torch.randn(2, p.length, hq, d)
    halo = torch.randn(2, cfg.coarsest_block - 1, hq, d) if mode == "feed+halo" else None
    mode = mode.split("+")[0]
    # Same fp32 additions in the same order: bitwise equal.
    assert torch.equal(token_sum(g, p, mode, halo=halo), token_sum_torch(g, p, mode, halo))


@pytest.mark.parametrize("cfg,n,hq,hkv,d", SMALL, ids=SMALL_IDS)
def test_gather_and_scatter_match_reference(cfg, n, hq, hkv, d, poisoned):
    q, k, v = random_qkv(2, n, hq, hkv, d, seed=n + 6)
    p = plan_selection(q, k, cfg)
    for x in (q, k, v):
        expected = reference_gather(pyramid(x, cfg), p)
        torch.testing.assert_close(gather(x, p), expected, rtol=1e-5, atol=1e-6)
    o = torch.randn(2, p.length, hq, d)
    torch.testing.assert_close(scatter(o, p), reference_scatter(o, p, cfg, n), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------- custom ops

# TRITON_INTERPRET at call time: which implementation the ops run on CPU tensors.
DISPATCH = {"kernel": "1", "twin": "0"}
# Three levels and GQA, at a size the interpreter runs many times over in a few seconds.
TINY = (LighthouseConfig(levels=3, pooling_factor=2, topk=4, tile_topk=2), 32, 2, 1, 4)


def _op_inputs(cfg, n, hq, hkv, d, seed, dtype=torch.float32, b=2):
    """q, k, their plan, an attention output o [b, S, Hq, d] and a halo (fp32, as `spill_rows`
    makes it)."""
    q, k, _ = random_qkv(b, n, hq, hkv, d, seed=seed, dtype=dtype)
    p = plan_selection(q, k, cfg)
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(b, p.length, hq, d, generator=g, dtype=dtype)
    halo = torch.randn(b, cfg.coarsest_block - 1, hq, d, generator=g)
    return q, k, p, o, halo


@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_custom_ops_pass_opcheck(impl, monkeypatch):
    """Per op: the schema, the fake implementation (shapes, dtypes and strides against the real
    outputs), the autograd registration and AOT dispatch with dynamic shapes."""
    monkeypatch.setenv("TRITON_INTERPRET", DISPATCH[impl])
    cfg, n, hq, hkv, d = TINY
    q, k, p, o, halo = _op_inputs(cfg, n, hq, hkv, d, seed=21)
    sel = (cfg.levels, cfg.pooling_factor, cfg.topk, cfg.tile_topk)
    plan_args = (*p.tensors(), n, cfg.pooling_factor, cfg.levels)
    sq, sk = torch.ops.lighthouse.score_pyramids(q, k, *sel)
    lh = torch.ops.lighthouse
    cases = [
        (lh.score_pyramids, (q, k, *sel)),
        (lh.select, (sq, sk, 2, hkv, n, *sel)),
        (lh.gather, (q.clone().requires_grad_(True), *plan_args)),
        (lh.gather_backward, (o, *plan_args)),
        (lh.scatter, (o.clone().requires_grad_(True), *plan_args)),
        (lh.scatter, (o.clone().requires_grad_(True), *plan_args, halo.clone().requires_grad_(True))),
        (lh.scatter_backward, (q, *plan_args)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_fake_tensors_give_the_real_shapes():
    """Under FakeTensorMode (what torch.compile traces with) the plan and the output have the
    shapes and dtypes of the real ones."""
    cfg, n, hq, hkv, d = TINY
    q, k, v = random_qkv(2, n, hq, hkv, d, seed=22, dtype=torch.bfloat16)
    real_plan, real = plan_selection(q, k, cfg), lighthouse_attention(q, k, v, cfg)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        fake_plan, fake = plan_selection(fq, fk, cfg), lighthouse_attention(fq, fk, fv, cfg)
    for name, a, b in zip(PLAN_FIELDS, fake_plan.tensors(), real_plan.tensors(), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), name
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype)


@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_custom_op_gradients_match_autograd_through_the_twins(impl, monkeypatch):
    """The registered backward passes (kernels of the other index space) against PyTorch's own
    autograd through the twins' formulas: the gather's, and the scatter's in o and the halo."""
    monkeypatch.setenv("TRITON_INTERPRET", DISPATCH[impl])
    cfg, n, hq, hkv, d = TINY
    q, _, p, o, halo = _op_inputs(cfg, n, hq, hkv, d, seed=23)
    q, o, halo = (x.requires_grad_(True) for x in (q, o, halo))
    pairs = [(gather(q, p), twins.pool_segments(q, p), (q,)),
             (scatter(o, p, halo), twins.feed_tokens(o, p, halo), (o, halo))]
    for fast, slow, inputs in pairs:
        g = torch.randn_like(fast)
        for ours, want in zip(torch.autograd.grad(fast, inputs, g), torch.autograd.grad(slow, inputs, g),
                              strict=True):
            torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_custom_ops_gradcheck(monkeypatch):
    """gradcheck in float64 at a tiny size (d = 1: one column of the Jacobian per element). The
    stages sum in fp32 whatever the input dtype, so the finite differences take a step large
    enough for fp32 rounding to stay under the tolerance; gather and scatter are linear, so a
    large step is exact otherwise. Full mode: fast mode let a halo gradient one row off pass.
    The twins only: the backward formulas do not depend on the implementation, the kernels
    equal the twins (above), and the interpreter would take 20 s over the Jacobian."""
    monkeypatch.setenv("TRITON_INTERPRET", DISPATCH["twin"])
    cfg, n, hq, hkv, _ = TINY
    q, _, p, o, halo = _op_inputs(cfg, n, hq, hkv, 1, seed=24, dtype=torch.float64, b=1)
    q, o, halo = (x.double().requires_grad_(True) for x in (q, o, halo))
    tol = {"eps": 1e-3, "atol": 1e-4, "rtol": 1e-3}
    assert torch.autograd.gradcheck(lambda x: gather(x, p), (q,), **tol)
    assert torch.autograd.gradcheck(lambda x, h: scatter(x, p, h), (o, halo), **tol)


# ---------------------------------------------------------------- the whole path


def _compare_with_reference(cfg, q, k, v, fwd_tol, grad_tol, scale=None):
    out = lighthouse_attention(q, k, v, cfg, scale)
    ref = lighthouse_attention_reference(q, k, v, cfg, scale)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    assert rel(out, ref) < fwd_tol
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads, strict=True):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < grad_tol, f"d{name}: {rel(a, b)}"


@pytest.mark.parametrize("cfg,n,hq,hkv,d", SMALL, ids=SMALL_IDS)
def test_fast_path_matches_reference(cfg, n, hq, hkv, d, poisoned):
    q, k, v = random_qkv(2, n, hq, hkv, d, seed=n + 7, grad=True)
    _compare_with_reference(cfg, q, k, v, 1e-5, 1e-5, scale=0.3)


@pytest.mark.parametrize("case", [0, 3], ids=["L3p2", "L4p2"])
def test_fast_path_matches_reference_with_mean_merge(case):
    cfg, n, hq, hkv, d = SMALL[case]
    mean = dataclasses.replace(cfg, level_merge="mean")
    q, k, v = random_qkv(2, n, hq, hkv, d, seed=n + 8, grad=True)
    _compare_with_reference(mean, q, k, v, 1e-5, 1e-5)
    # Not the sum: the option changes the output wherever a token is fed by more than one level.
    assert rel(lighthouse_attention(q, k, v, mean), lighthouse_attention(q, k, v, cfg)) > 0.1


def test_fast_path_takes_strided_inputs():
    """Megatron hands [s, b, h, d] tensors; their [b, s, h, d] views are not contiguous."""
    cfg, n, hq, hkv, d = SMALL[1]
    q, k, v = (x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
               for x in random_qkv(2, n, hq, hkv, d, seed=10))
    assert not q.is_contiguous()
    _compare_with_reference(cfg, q, k, v, 1e-5, 1e-5)


def test_package_works_without_triton():
    """Triton ships for Linux only: without it the package imports and the twins run."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lighthouse_megatron import LighthouseConfig, lighthouse_attention\n"
        "from lighthouse_megatron.ops._triton import HAS_TRITON\n"
        "from lighthouse_megatron.reference import lighthouse_attention_reference\n"
        "assert not HAS_TRITON\n"
        "cfg = LighthouseConfig(levels=2, pooling_factor=4, topk=8, tile_topk=4)\n"
        "q, k, v = (torch.randn(1, 96, 2, 8) for _ in range(3))\n"
        "out = lighthouse_attention(q, k, v, cfg)\n"
        "assert torch.allclose(out, lighthouse_attention_reference(q, k, v, cfg), atol=1e-5)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU tensors without a GPU driver")
def test_interpreter_switched_on_after_import_keeps_the_twins():
    """Triton fixes interpreted-or-compiled when a kernel is defined: TRITON_INTERPRET=1 set after
    the ops loaded must not send CPU tensors into compiled kernels (which look for a GPU)."""
    code = (
        "import os, torch\n"
        "from lighthouse_megatron import LighthouseConfig, lighthouse_attention\n"
        "from lighthouse_megatron.ops._triton import HAS_TRITON\n"
        "from lighthouse_megatron.reference import lighthouse_attention_reference\n"
        "assert HAS_TRITON\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "cfg = LighthouseConfig(levels=2, pooling_factor=4, topk=8, tile_topk=4)\n"
        "q, k, v = (torch.randn(1, 96, 2, 8) for _ in range(3))\n"
        "out = lighthouse_attention(q, k, v, cfg)\n"
        "assert torch.allclose(out, lighthouse_attention_reference(q, k, v, cfg), atol=1e-5)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_fast_path_one_level_is_dense():
    cfg = LighthouseConfig(levels=1, pooling_factor=4, topk=8, tile_topk=4)
    q, k, v = random_qkv(1, 64, 4, 2, 8, seed=8, grad=True)
    _compare_with_reference(cfg, q, k, v, 1e-5, 1e-5)


def test_fast_path_torch_twins(monkeypatch):
    """Without the interpreter, CPU tensors take the plain-PyTorch twins."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg, n, hq, hkv, d = SMALL[0]
    q, k, v = random_qkv(2, n, hq, hkv, d, seed=9, grad=True)
    _compare_with_reference(cfg, q, k, v, 1e-5, 1e-5)


# ---------------------------------------------------------------------------- GPU

GPU_CFG = LighthouseConfig(levels=3, pooling_factor=4, topk=2048, tile_topk=128)


def _gpu_qkv(n, hq=8, hkv=8, d=128, seed=0, separated=False, grad=False, b=1):
    if separated:
        q, k, v = random_qkv(b, n, hq, hkv, d, dtype=torch.bfloat16, device="cuda", seed=seed)
    else:
        g = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
                   for h in (hq, hkv, hkv))
    return tuple(x.requires_grad_(grad) for x in (q, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize("n,topk,hq,hkv", [(65536, 2048, 8, 8), (131072, 4096, 8, 2), (1 << 20, 4096, 8, 8)])
def test_gpu_kernels_match_twins(n, topk, hq, hkv, poisoned):
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=topk, tile_topk=128)
    q, k, v = _gpu_qkv(n, hq, hkv, seed=n)
    sq, sk = scores.score_pyramids(q, k, cfg)
    tq, tk = twins.score_pyramids(q, k, cfg)
    torch.testing.assert_close(sq, tq, rtol=1e-5, atol=0)
    torch.testing.assert_close(sk, tk, rtol=1e-5, atol=0)
    fast = tiles.select(sq, sk, 1, hkv, n, cfg)
    assert_plans_equal(fast, twins.select(sq, sk, 1, hkv, n, cfg))
    for x in (q, v):
        for mode in ("pool", "feed"):
            torch.testing.assert_close(segment_sum(x, fast, mode), segment_sum_torch(x, fast, mode),
                                       rtol=1e-2, atol=1e-2)
    o = torch.randn(1, fast.length, hq, 128, device="cuda", dtype=torch.bfloat16)
    for mode in ("pool", "feed"):
        assert torch.equal(token_sum(o, fast, mode), token_sum_torch(o, fast, mode))


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
def test_gpu_fast_path_matches_reference_bf16(hq, hkv):
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=512, tile_topk=128)
    # Random normal inputs: fp32 norms of d=128 vectors are far apart at the top-k boundary
    # compared with summation-order rounding, so both sides select the same entries (checked
    # first, so a near-tie would show up as such and not as an arithmetic error).
    q, k, v = _gpu_qkv(16384, hq, hkv, seed=hq + hkv, grad=True)
    ours, ref = plan_selection(q, k, cfg), plan(q, k, cfg)
    assert torch.equal(ours.level, ref.level) and torch.equal(ours.index, ref.index)
    # bf16 operands (docs/performance.md, numerical tolerance: 1e-3 .. 1e-2); the reference attends in fp32.
    _compare_with_reference(cfg, q, k, v, 1e-2, 2e-2)
    _compare_with_reference(dataclasses.replace(cfg, level_merge="mean"), q, k, v, 1e-2, 2e-2)


@pytest.mark.gpu
def test_gpu_large_config_runs():
    """1M tokens, k = 4096: no launch-size or shared-memory failure, finite output and grads."""
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=4096, tile_topk=128)
    q, k, v = _gpu_qkv(1 << 20, grad=True, seed=11)
    out = lighthouse_attention(q, k, v, cfg)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.gpu
def test_gpu_kernels_bitwise_deterministic():
    q, k, v = _gpu_qkv(131072, 8, 2, seed=12)
    runs = []
    for _ in range(2):
        p = plan_selection(q, k, GPU_CFG)
        g = gather(q, p)
        runs.append([p.level, p.index, p.inverse, g, scatter(g, p),
                     segment_sum(q, p, "feed"), token_sum(g, p, "pool")])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def _run_twice(cfg, n, backward):
    q, k, v = _gpu_qkv(n, seed=13, grad=True)
    g = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    results = []
    for _ in range(2):
        out = lighthouse_attention(q, k, v, cfg)
        results.append([out, *torch.autograd.grad(out, (q, k, v), g)] if backward else [out.detach()])
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cudnn", "flash"])
def test_gpu_forward_bitwise_deterministic(backend):
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=2048, tile_topk=128, backend=backend)
    first, second = _run_twice(cfg, 131072, backward=False)
    assert torch.equal(first[0], second[0])


@pytest.mark.gpu
def test_gpu_fast_path_bitwise_deterministic():
    """Same inputs, same outputs and gradients, bitwise. The Lighthouse kernels are
    deterministic by construction; the stage-5 backward is too under deterministic mode,
    where "auto" picks SDPA's memory-efficient kernel (see backends.py)."""
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=2048, tile_topk=128)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _run_twice(cfg, 131072, backward=True)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(["out", "dq", "dk", "dv"], first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.gpu
def test_gpu_dense_backends_agree():
    q, k, v = _gpu_qkv(4096, 8, 2, seed=14)
    from lighthouse_megatron.backends import dense_causal_attention

    ref = dense_causal_attention(q.float(), k.float(), v.float(), None, "math")
    for backend in ("auto", "cudnn", "flash", "math"):
        out = dense_causal_attention(q, k, v, None, backend)
        assert out.shape == q.shape and rel(out.float(), ref) < 1e-2, backend
    torch.use_deterministic_algorithms(True)
    try:  # deterministic mode: "auto" takes the memory-efficient kernel
        assert rel(dense_causal_attention(q, k, v, None, "auto").float(), ref) < 1e-2
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
def test_gpu_te_backend_matches_sdpa():
    from lighthouse_megatron.backends import dense_causal_attention, te_available

    if not te_available():
        pytest.skip("transformer_engine is not installed")
    q, k, v = _gpu_qkv(4096, 8, 2, seed=15)
    te = dense_causal_attention(q, k, v, None, "te")
    assert rel(te.float(), dense_causal_attention(q, k, v, None, "cudnn").float()) < 1e-2
