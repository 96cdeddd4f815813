"""The reference against dense attention, against a literal loop formulation, and its invariants."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lighthouse_megatron import LighthouseConfig, lighthouse_attention
from lighthouse_megatron import reference as R
from lighthouse_megatron.ops.twins import base_scores, topk_lower_index

from ._inputs import random_qkv


def sdpa(q, k, v, scale=None):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def literal(q, k, v, cfg, scale):
    """docs/algorithm.md read aloud: Python loops per selection unit, tile, level and token.

    Returns the output and, per (batch, kv head), the gathered (level, index) list.
    """
    b_, n, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    p, levels, half = cfg.pooling_factor, cfg.levels, cfg.tile_topk // 2
    tiles = cfg.num_tiles
    out = torch.zeros(b_, n, hq, d, dtype=torch.float64)
    plans = {}
    for b in range(b_):
        for g in range(hkv):
            heads = range(g * group, (g + 1) * group)
            base_q = [max(float(q[b, t, h].double().norm()) for h in heads) for t in range(n)]
            base_k = [float(k[b, t, g].double().norm()) for t in range(n)]

            def score(base, level, i):
                c = p**level
                return max(base[i * c:(i + 1) * c])

            entries = []
            top = levels - 1
            per_tile = n // p**top // tiles
            for tile in range(tiles):
                cand = list(range(tile * per_tile, (tile + 1) * per_tile))
                for level in range(top, 0, -1):
                    a_q = sorted(cand, key=lambda i: (-score(base_q, level, i), i))[:half]
                    rest = [i for i in cand if i not in a_q]
                    a_k = sorted(rest, key=lambda i: (-score(base_k, level, i), i))[:half]
                    entries += [(level, i) for i in cand]
                    cand = sorted(c * p + r for c in a_q + a_k for r in range(p))
                entries += [(0, i) for i in cand]
            entries.sort(key=lambda e: ((e[1] + 1) * p ** e[0] - 1, e[0]))
            plans[b, g] = entries
            slot = {e: s for s, e in enumerate(entries)}

            def pooled(x, h, level, i, b=b):
                c = p**level
                return x[b, i * c:(i + 1) * c, h].double().mean(dim=0)

            for h in heads:
                qs = torch.stack([pooled(q, h, lv, i) for lv, i in entries])
                ks = torch.stack([pooled(k, g, lv, i) for lv, i in entries])
                vs = torch.stack([pooled(v, g, lv, i) for lv, i in entries])
                o = torch.zeros_like(qs)
                for s in range(len(entries)):
                    w = torch.softmax(ks[: s + 1] @ qs[s] * scale, dim=0)
                    o[s] = w @ vs[: s + 1]
                for t in range(n):
                    feeding = [slot[level, (t + 1) // p**level - 1] for level in range(levels)
                               if (level, (t + 1) // p**level - 1) in slot]
                    for s in feeding:
                        out[b, t, h] += o[s]
                    if cfg.level_merge == "mean" and feeding:
                        out[b, t, h] /= len(feeding)
    return out, plans


def as_list(plan, b, g):
    return list(zip(plan.level[b, g].tolist(), plan.index[b, g].tolist(), strict=True))


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 1)])
def test_one_level_is_dense_attention(hq, hkv):
    cfg = LighthouseConfig(levels=1, pooling_factor=4, topk=8, tile_topk=4)
    q, k, v = random_qkv(2, 64, hq, hkv, 16, separated=False, seed=hq * 10 + hkv)
    got = lighthouse_attention(q, k, v, cfg)
    torch.testing.assert_close(got, sdpa(q, k, v), rtol=0, atol=2e-6)
    got = lighthouse_attention(q, k, v, cfg, softmax_scale=0.3)
    torch.testing.assert_close(got, sdpa(q, k, v, scale=0.3), rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "cfg, n, hq, hkv",
    [
        (LighthouseConfig(levels=3, pooling_factor=2, topk=8, tile_topk=4), 64, 4, 2),
        (LighthouseConfig(levels=2, pooling_factor=4, topk=8, tile_topk=4), 64, 2, 2),
        (LighthouseConfig(levels=3, pooling_factor=4, topk=4, tile_topk=2), 64, 3, 1),
        (LighthouseConfig(levels=4, pooling_factor=2, topk=4, tile_topk=4), 64, 2, 1),
        (LighthouseConfig(levels=3, pooling_factor=2, topk=8, tile_topk=4, level_merge="mean"), 64, 4, 2),
        (LighthouseConfig(levels=4, pooling_factor=2, topk=4, tile_topk=4, level_merge="mean"), 64, 2, 1),
    ],
)
def test_matches_literal_formulation(cfg, n, hq, hkv):
    q, k, v = random_qkv(2, n, hq, hkv, 8, seed=n + hq)
    scale = 0.7
    want, plans = literal(q, k, v, cfg, scale)
    plan = R.plan(q, k, cfg)
    for (b, g), entries in plans.items():
        assert as_list(plan, b, g) == entries
    got = R.lighthouse_attention_reference(q, k, v, cfg, softmax_scale=scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_mean_merge_is_the_sum_over_the_entries_covering_each_token_divided_by_their_number():
    """Against the sum (the paper's) on the same inputs: tokens fed by one entry are unchanged,
    tokens fed by every level get a third of it (L = 3), and the uncovered leading tokens stay 0."""
    paper = LighthouseConfig(levels=3, pooling_factor=2, topk=8, tile_topk=4)
    mean = dataclasses.replace(paper, level_merge="mean")
    q, k, v = random_qkv(2, 64, 4, 2, 8, seed=3)
    summed, merged = (R.lighthouse_attention_reference(q, k, v, c) for c in (paper, mean))
    plan = R.plan(q, k, paper)
    counts = torch.zeros(2, 64, 2)
    for b in range(2):
        for g in range(2):
            emitted = set(as_list(plan, b, g))
            for t in range(64):
                counts[b, t, g] = sum((lv, (t + 1) // 2**lv - 1) in emitted for lv in range(3))
    per_head = counts.repeat_interleave(2, dim=2)[..., None]
    assert {1.0, 3.0} <= set(per_head.unique().tolist())  # both kinds of token occur
    torch.testing.assert_close(merged * per_head.clamp(min=1), summed, rtol=1e-6, atol=1e-6)
    assert bool((merged[per_head[..., 0] == 0] == 0).all())


def check_plan_structure(plan, q, k, cfg):
    """S, tiles, per-tile budgets, the q/k halves and the causal order, from first principles."""
    b_, n, _, _ = q.shape
    hkv = k.shape[2]
    p, levels, t_k, tiles = cfg.pooling_factor, cfg.levels, cfg.tile_topk, cfg.num_tiles
    assert plan.length == cfg.gathered_length(n)
    key = plan.last_token * levels + plan.level
    assert bool((key[..., 1:] > key[..., :-1]).all()), "not strictly in (last token, level) order"
    s_q, s_k = base_scores(q, k)
    tile_len = n // tiles
    for level in range(1, levels):
        c = p**level
        sel_q, sel_k = plan.selected_q[:, :, level - 1], plan.selected_k[:, :, level - 1]
        assert sel_q.shape == sel_k.shape == (b_, hkv, tiles, t_k // 2)
        tile_of = lambda i, c=c: (i * c) // tile_len  # noqa: E731
        own_tile = torch.arange(tiles).view(1, 1, tiles, 1)
        assert bool((tile_of(sel_q) == own_tile).all()) and bool((tile_of(sel_k) == own_tile).all())
        both = torch.cat([sel_q, sel_k], dim=-1).sort(dim=-1).values
        assert bool((both[..., 1:] != both[..., :-1]).all()), "query and key halves overlap"
        # Every selected entry is emitted at its level, and its children at the level below.
        for b in range(b_):
            for g in range(hkv):
                got = set(as_list(plan, b, g))
                for i in both[b, g].flatten().tolist():
                    assert (level, i) in got
                    assert all((level - 1, i * p + r) in got for r in range(p))
        # The query half holds the top T/2 query scores among the tile's candidates at this level.
        lvl_q = s_q.reshape(b_, n // c, c, hkv).amax(2).transpose(1, 2)
        for b in range(b_):
            for g in range(hkv):
                for tile in range(tiles):
                    cand = [i for lv, i in as_list(plan, b, g) if lv == level and tile_of(i) == tile]
                    ranked = sorted(cand, key=lambda i: (-float(lvl_q[b, g, i]), i))
                    assert sorted(ranked[: t_k // 2]) == sorted(sel_q[b, g, tile].tolist())
    # Every emitted entry is whole: no duplicates, and within range.
    for b in range(b_):
        for g in range(hkv):
            entries = as_list(plan, b, g)
            assert len(set(entries)) == len(entries)
            assert all(0 <= i < n // p**lv for lv, i in entries)


def test_plan_structure_gqa_batch():
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=16, tile_topk=8)
    q, k, _ = random_qkv(2, 512, 4, 2, 8, seed=3)
    check_plan_structure(R.plan(q, k, cfg), q, k, cfg)


def test_ties_go_to_lower_index():
    assert topk_lower_index(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 3).tolist() == [1, 2, 4]
    # All-equal norms: every tile refines its first T/2 + T/2 coarse entries.
    cfg = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_topk=4)
    q = torch.ones(1, 64, 1, 4)
    plan = R.plan(q, q, cfg)
    per_tile = 64 // 2 // 2
    assert plan.selected_q[0, 0, 0].tolist() == [[0, 1], [per_tile, per_tile + 1]]
    assert plan.selected_k[0, 0, 0].tolist() == [[2, 3], [per_tile + 2, per_tile + 3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_gradients(dtype):
    cfg = LighthouseConfig(levels=3, pooling_factor=2, topk=8, tile_topk=4)
    q, k, v = random_qkv(2, 64, 4, 2, 8, dtype=dtype, seed=11, grad=True)
    out = R.lighthouse_attention_reference(q, k, v, cfg)
    assert out.dtype == dtype
    for t in (0, 5, 31, 40, 62):
        gq, gk, gv = torch.autograd.grad(out[:, t].float().sum(), (q, k, v), retain_graph=True)
        for g in (gq, gk, gv):
            assert g.dtype == dtype
            assert bool((g[:, t + 1:] == 0).all()), f"gradient leaks from positions after {t}"
        assert bool(gv[:, : t + 1].ne(0).any()) or t < 1


def test_future_changes_that_keep_norms_leave_the_past_bitwise_unchanged():
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=8, tile_topk=4)
    q, k, v = random_qkv(1, 256, 4, 2, 8, seed=5)
    base = R.lighthouse_attention_reference(q, k, v, cfg)
    g = torch.Generator().manual_seed(1)
    for t in (17, 100, 200):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        v2[:, t + 1:] = torch.randn(v2[:, t + 1:].shape, generator=g)
        flip = lambda x: torch.where(torch.rand(x.shape, generator=g) < 0.5, -x, x)  # noqa: E731
        q2[:, t + 1:], k2[:, t + 1:] = flip(q2[:, t + 1:]), flip(k2[:, t + 1:])
        out = R.lighthouse_attention_reference(q2, k2, v2, cfg)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])
        assert not torch.equal(out[:, t + 1:], base[:, t + 1:])


def test_future_norms_may_change_past_selection():
    """The selection looks at the whole tile (docs/algorithm.md): measured, not hidden."""
    cfg = LighthouseConfig(levels=2, pooling_factor=4, topk=4, tile_topk=4)
    q, k, v = random_qkv(1, 64, 1, 1, 8, seed=2)
    base_plan = R.plan(q, k, cfg)
    q2, k2 = q.clone(), k.clone()
    q2[:, 60:], k2[:, 60:] = q2[:, 60:] * 100, k2[:, 60:] * 100  # a loud future block
    new_plan = R.plan(q2, k2, cfg)

    def refined(plan):  # the level-1 entries refined by either half
        return set(torch.cat([plan.selected_q[:, :, 0], plan.selected_k[:, :, 0]], -1).flatten().tolist())

    assert 15 in refined(new_plan) and 15 not in refined(base_plan)
    # The loud block took the slot of an earlier block, so tokens before t=60 see a new plan.
    assert refined(base_plan) - refined(new_plan) and min(refined(base_plan) - refined(new_plan)) < 15
    out = R.lighthouse_attention_reference(q, k, v, cfg)
    out2 = R.lighthouse_attention_reference(q2, k2, v, cfg)
    assert not torch.equal(out[:, :60], out2[:, :60])


def test_deterministic():
    cfg = LighthouseConfig(levels=3, pooling_factor=2, topk=8, tile_topk=4)
    runs = []
    for _ in range(2):
        q, k, v = random_qkv(2, 64, 4, 2, 8, seed=9, grad=True)
        out = lighthouse_attention(q, k, v, cfg)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        runs.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_uncovered_leading_tokens_are_zero_and_scatter_spills():
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=4, tile_topk=2)
    q, k, v = random_qkv(1, 256, 2, 1, 8, seed=4)
    plan = R.plan(q, k, cfg)
    o = torch.randn(1, plan.length, 2, 8)
    clipped = R.scatter(o, plan, cfg, 256)
    spilled = R.scatter(o, plan, cfg, 256, out_len=256 + 15)
    assert torch.equal(spilled[:, :256], clipped)
    # The last coarsest entry (15, 15) is always emitted and feeds 15 tokens past the end.
    slot = as_list(plan, 0, 0).index((2, 15))
    row_l1 = as_list(plan, 0, 0).index((1, 63)) if (1, 63) in as_list(plan, 0, 0) else None
    want = o[0, slot] + (o[0, row_l1] if row_l1 is not None else 0)
    torch.testing.assert_close(spilled[0, 256], want)
    # Token 0 is covered only by level 0, so it is zero unless (0, 0) was emitted.
    if (0, 0) not in as_list(plan, 0, 0):
        assert bool((clipped[0, 0] == 0).all())


def test_input_shape_errors():
    cfg = LighthouseConfig(levels=2, pooling_factor=2, topk=4, tile_topk=2)
    q, k, v = random_qkv(1, 32, 3, 2, 8)
    with pytest.raises(ValueError, match="query heads 3 must be a multiple of key/value heads 2"):
        lighthouse_attention(q, k, v, cfg)
    with pytest.raises(ValueError, match=r"expects q \[b, s, Hq, d\]"):
        lighthouse_attention(q[0], k[0], v[0], cfg)
    q, k, v = random_qkv(1, 30, 2, 2, 8)
    with pytest.raises(ValueError, match="sequence length 30 must be divisible"):
        lighthouse_attention(q, k, v, cfg)


@pytest.mark.parametrize("attention", [lighthouse_attention, R.lighthouse_attention_reference],
                         ids=["fast", "reference"])
def test_input_type_and_device_errors(attention):
    cfg = LighthouseConfig(levels=2, pooling_factor=2, topk=4, tile_topk=2)
    q, k, v = random_qkv(1, 32, 2, 2, 8)
    with pytest.raises(ValueError, match=r"one dtype, got q torch.float32, k torch.bfloat16"):
        attention(q, k.bfloat16(), v, cfg)
    with pytest.raises(ValueError, match=r"floating point .*got torch.int64"):
        attention(*(torch.ones(1, 32, 2, 8, dtype=torch.long) for _ in range(3)), cfg)
    with pytest.raises(ValueError, match=r"must not be empty .*batch size"):
        attention(q[:0], k[:0], v[:0], cfg)
    with pytest.raises(ValueError, match=r"one device, got q on cpu, k on meta"):
        attention(q, k.to("meta"), v, cfg)


@st.composite
def small_problems(draw):
    p = draw(st.sampled_from([2, 4, 8]))
    levels = draw(st.integers(1, 4))
    t_k = draw(st.sampled_from([2, 4, 6]))
    tiles = draw(st.integers(1, 3))
    per_tile = t_k * draw(st.integers(1, 2)) if levels > 1 else draw(st.integers(1, 3))
    n = p ** (levels - 1) * tiles * per_tile
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    b = draw(st.integers(1, 2))
    cfg = LighthouseConfig(levels=levels, pooling_factor=p, topk=tiles * t_k, tile_topk=t_k)
    return cfg, n, b, hq, hkv, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(small_problems())
def test_property_small_configs(problem):
    cfg, n, b, hq, hkv, seed = problem
    if n > 1024:
        return  # the literal loops grow fast; large p**L shapes are covered by the structure check
    q, k, v = random_qkv(b, n, hq, hkv, 4, seed=seed, grad=True)
    plan = R.plan(q, k, cfg)
    check_plan_structure(plan, q, k, cfg)
    out = R.lighthouse_attention_reference(q, k, v, cfg)
    assert out.shape == q.shape and bool(torch.isfinite(out).all())
    if n <= 256:
        want, plans = literal(q.detach(), k.detach(), v.detach(), cfg, 1 / math.sqrt(4))
        assert all(as_list(plan, bb, g) == e for (bb, g), e in plans.items())
        torch.testing.assert_close(out.detach().double(), want, rtol=1e-5, atol=1e-5)
    t = n // 2
    gq, gk, gv = torch.autograd.grad(out[:, t].sum(), (q, k, v))
    assert all(bool((g[:, t + 1:] == 0).all()) for g in (gq, gk, gv))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bf16_follows_fp32():
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=8, tile_topk=4)
    q, k, v = random_qkv(2, 256, 4, 2, 16, seed=21)
    want = R.lighthouse_attention_reference(q, k, v, cfg)
    got = R.lighthouse_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), cfg)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_on_gpu_matches_cpu(dtype):
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=256, tile_topk=32)
    q, k, v = random_qkv(1, 8192, 4, 2, 64, dtype=dtype, seed=22)
    want = R.lighthouse_attention_reference(q, k, v, cfg)
    plan_cpu = R.plan(q, k, cfg)
    qc, kc, vc = (x.cuda() for x in (q, k, v))
    plan_gpu = R.plan(qc, kc, cfg)
    assert torch.equal(plan_gpu.index.cpu(), plan_cpu.index)
    assert torch.equal(plan_gpu.level.cpu(), plan_cpu.level)
    got = R.lighthouse_attention_reference(qc, kc, vc, cfg).cpu()
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)
