"""Context parallelism: CP = 2 and 4 (gloo processes) against CP = 1, and the chunked reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lighthouse_megatron import LighthouseConfig, lighthouse_attention
from lighthouse_megatron import reference as R
from lighthouse_megatron.attention import plan_selection
from lighthouse_megatron.backends import dense_causal_attention
from lighthouse_megatron.ops import gather, scatter, spill_rows
from lighthouse_megatron.parallel import ContextParallel, causal_attention, merge_chunks, split_chunks

from ._distributed import run_workers
from ._inputs import random_qkv

# Global sequence of 256 tokens; with CP = 4 each of the 8 chunks is one 32-token tile.
CASES = [
    # (config, n, hq, hkv, d)
    (LighthouseConfig(levels=3, pooling_factor=2, topk=32, tile_topk=4), 256, 4, 4, 8),
    (LighthouseConfig(levels=3, pooling_factor=2, topk=32, tile_topk=4), 256, 4, 2, 8),  # GQA
    (LighthouseConfig(levels=2, pooling_factor=4, topk=64, tile_topk=8), 256, 2, 1, 16),
    # level_merge "mean": the counts cross chunk boundaries through the same halo as the outputs
    (LighthouseConfig(levels=3, pooling_factor=2, topk=32, tile_topk=4, level_merge="mean"), 256, 4, 2, 8),
]


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_chunked_reference_equals_reference(cp, case):
    cfg, n, hq, hkv, d = CASES[case]
    q, k, v = random_qkv(2, n, hq, hkv, d, seed=case)
    whole = R.lighthouse_attention_reference(q, k, v, cfg)
    chunked = R.lighthouse_attention_chunked_reference(q, k, v, cfg, cp)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    # Each chunk's plan is the whole sequence's plan restricted to the chunk's tiles.
    whole_plan = R.plan(q, k, cfg)
    per_chunk = whole_plan.length // (2 * cp)
    for j, (qc, kc) in enumerate(zip(q.chunk(2 * cp, dim=1), k.chunk(2 * cp, dim=1), strict=True)):
        part = R.plan(qc, kc, cfg.chunk_config(cp))
        sl = slice(j * per_chunk, (j + 1) * per_chunk)
        offset = (n // (2 * cp)) // cfg.pooling_factor ** whole_plan.level[..., sl]
        assert torch.equal(part.level, whole_plan.level[..., sl])
        assert torch.equal(part.index + j * offset, whole_plan.index[..., sl])


def test_spill_rows_are_what_the_scatter_feeds_past_the_end(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # plain PyTorch: this checks spill_rows, not kernels
    cfg, n, hq, hkv, d = CASES[1]
    q, k, _ = random_qkv(2, n, hq, hkv, d, seed=5)
    plan = plan_selection(q, k, cfg)
    o = torch.randn(2, plan.length, hq, d)
    spill = cfg.coarsest_block - 1
    beyond = R.scatter(o, plan, cfg, n, out_len=n + spill)[:, n:]
    assert beyond.abs().sum() > 0
    torch.testing.assert_close(spill_rows(o, plan), beyond, rtol=0, atol=1e-6)


def test_split_and_merge_chunks_are_megatron_layout():
    x = torch.arange(16).reshape(1, 16)
    # Megatron's get_batch_on_this_cp_rank at CP = 2: rank 0 [0-3, 12-15], rank 1 [4-11].
    assert split_chunks(x, 1, 2, 0).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert split_chunks(x, 1, 2, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert torch.equal(merge_chunks([split_chunks(x, 1, 4, r) for r in range(4)], 1), x)


def _gather_parts(x: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return merge_chunks(parts, dim=1)


def _cp_worker(rank, world):
    cp = ContextParallel(dist.group.WORLD)
    for i, (cfg, n, hq, hkv, d) in enumerate(CASES):
        b = 1 if i == 1 else 2  # b = 1: the chunks are a view; b = 2: a copy
        q, k, v = random_qkv(b, n, hq, hkv, d, seed=10 + i)
        grad = torch.randn(b, n, hq, d, generator=torch.Generator().manual_seed(i))
        for name, fn in (
            ("lighthouse", lambda a, b, c, cfg=cfg, **kw: lighthouse_attention(a, b, c, cfg, **kw)),
            ("dense", lambda a, b, c, **kw: causal_attention(a, b, c, **kw)),
        ):
            full = [x.clone().requires_grad_(True) for x in (q, k, v)]
            want = fn(*full)
            want.backward(grad)
            # Megatron's layout: [s, b, H, d] storage, handed over as a [b, s, H, d] view.
            local_sb = [split_chunks(x, 1, world, rank).transpose(0, 1).contiguous().requires_grad_(True)
                        for x in (q, k, v)]
            out = fn(*(x.transpose(0, 1) for x in local_sb), context_parallel=cp)
            out.backward(split_chunks(grad, 1, world, rank))
            got = _gather_parts(out.detach(), world)
            where = f"{name} case {i} CP={world}"
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, where=where: f"{where}: {m}")
            # The tokens right after each chunk boundary read the halo from the chunk before.
            c = n // (2 * world)
            starts = torch.arange(1, 2 * world) * c
            torch.testing.assert_close(got[:, starts], want.detach()[:, starts], rtol=1e-5, atol=1e-6)
            for x_full, x_sb, label in zip(full, local_sb, "qkv", strict=True):
                g = _gather_parts(x_sb.grad.transpose(0, 1), world)
                # Key and value gradients are sums over the ranks' queries: fp32 rounding of a
                # different summation order.
                torch.testing.assert_close(g, x_full.grad, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, label=label, where=where: f"{where} d{label}: {m}")


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_context_parallel_equals_cp1(cp):
    run_workers(_cp_worker, cp)


def test_cp_refuses_sizes_that_do_not_fit():
    cfg = LighthouseConfig(levels=3, pooling_factor=2, topk=16, tile_topk=4)
    with pytest.raises(ValueError, match=r"topk=16 must be a multiple of 2\*cp_size\*tile_topk=2\*4\*4=32"):
        cfg.validate(256, cp_size=4)
    with pytest.raises(ValueError, match="nearest valid: 32"):
        cfg.chunk_config(4)


def test_dense_backend_on_cpu_matches_sdpa_math():
    q, k, v = random_qkv(1, 64, 4, 2, 8, seed=1)
    torch.testing.assert_close(causal_attention(q, k, v), dense_causal_attention(q, k, v))


def test_chunk_batch_gather_and_scatter_kernels_match_twins(monkeypatch):
    """CP's local layout: the two chunks as the batch of one plan, strided views (b = 1), a halo."""
    cfg, n, hq, hkv, d = CASES[1]
    q, k, _ = random_qkv(1, n // 2, hq, hkv, d, seed=7)
    as_chunks = lambda x: x.reshape(2, n // 4, *x.shape[2:])  # noqa: E731
    plan = plan_selection(as_chunks(q), as_chunks(k), cfg.chunk_config(2))
    x = torch.randn(n // 2, 1, hq, d).transpose(0, 1).requires_grad_(True)  # Megatron's [s, b] view
    halo = torch.randn(2, cfg.coarsest_block - 1, hq, d, requires_grad=True)
    results = []
    for interpret in ("1", "0"):  # kernels, then twins
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        g = gather(as_chunks(x), plan)
        out = scatter(g * 1.5, plan, halo)
        grads = torch.autograd.grad(out, [x, halo], torch.full_like(out, 0.5) + as_chunks(x.detach()))
        results.append([g, out, *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _large_logits_worker(rank, world):
    # The case: norm-ladder q and k scaled so that the logits are large. CP = 1 runs
    # SDPA's math kernel on CPU; CP = 2 must run the same kernel (the CPU flash kernel's fp32
    # backward lost precision here: dv error 3e-2 against 8e-6).
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=16, tile_topk=2)
    q, k, v = random_qkv(1, 512, 4, 2, 8, seed=0)
    q, k = q * 256, k * 256
    grad = torch.randn(1, 512, 4, 8, generator=torch.Generator().manual_seed(1))
    full = [x.double().requires_grad_(True) for x in (q, k, v)]
    R.lighthouse_attention_reference(*full, cfg).backward(grad.double())
    cp1 = [x.clone().requires_grad_(True) for x in (q, k, v)]
    lighthouse_attention(*cp1, cfg).backward(grad)
    local = [split_chunks(x, 1, world, rank).requires_grad_(True) for x in (q, k, v)]
    cp = ContextParallel(dist.group.WORLD)
    # The backend setting holds under CP too (it was ignored there).
    with pytest.raises(ValueError, match=r"backend 'flash' needs CUDA tensors, got cpu tensors"):
        causal_attention(*local, backend="flash", context_parallel=cp)
    lighthouse_attention(*local, cfg, context_parallel=cp).backward(
        split_chunks(grad, 1, world, rank))
    for x, x1, x_full, label in zip(local, cp1, full, "qkv", strict=True):
        err1 = (x1.grad.double() - x_full.grad).abs().max().item()
        err2 = (_gather_parts(x.grad, world).double() - x_full.grad).abs().max().item()
        slack = 1e-6 * x_full.grad.abs().max().item()  # fp32 rounding of the ranks' gradient sums
        assert err2 <= 4 * err1 + slack, f"d{label}: error {err2:.2e} at CP = 2, {err1:.2e} at CP = 1"


def test_cp_backward_keeps_fp32_precision_at_large_logits():
    run_workers(_large_logits_worker, 2)


def _unequal_lengths_worker(rank, world):
    cfg = LighthouseConfig(levels=3, pooling_factor=2, topk=32, tile_topk=4)
    n = 128 if rank == 0 else 64  # local lengths: a caller's mistake, which gloo answered with SIGABRT
    q, k, v = random_qkv(1, n, 4, 2, 8, seed=rank)
    cp = ContextParallel(dist.group.WORLD)
    expected = r"CP ranks must hold equal local sequences: local lengths \[128, 64\], batch sizes \[1, 1\]"
    for call in (lambda: lighthouse_attention(q, k, v, cfg, context_parallel=cp),
                 lambda: causal_attention(q, k, v, context_parallel=cp)):
        with pytest.raises(ValueError, match=expected):
            call()


def test_cp_ranks_with_different_local_lengths_get_a_clear_error():
    run_workers(_unequal_lengths_worker, 2)


# docs/algorithm.md's rule for non-finite inputs: a NaN anywhere in a selection unit's q, k or v
# (one sequence, one GQA group) makes that unit's whole output NaN, and nothing else, on every path.
NAN_CONFIGS = [LighthouseConfig(levels=3, pooling_factor=2, topk=16, tile_topk=4),
               LighthouseConfig(levels=1, pooling_factor=2, topk=16, tile_topk=4)]
NAN_CASES = [("q", 5), ("k", 100), ("v", 40)]  # tensor, token (early, late, a chunk boundary)


def _nan_inputs(which, pos):
    q, k, v = random_qkv(2, 128, 4, 2, 8, seed=3)
    x = {"q": q, "k": k, "v": v}[which]
    x[1, pos, x.shape[2] - 1, 0] = float("nan")  # batch 1, the last head: GQA group 1
    expected = torch.zeros(2, 128, 4, 8, dtype=torch.bool)
    expected[1, :, 2:] = True
    return (q, k, v), expected


def _assert_nan_rule(out, expected, where):
    assert torch.equal(out.isnan(), expected), (
        f"{where}: NaN at {out.isnan().nonzero()[:5].tolist()}..., {int(out.isnan().sum())} NaNs, "
        f"expected {int(expected.sum())} (batch 1, GQA group 1)")


def _nan_worker(rank, world):
    cp = ContextParallel(dist.group.WORLD)
    for c, cfg in enumerate(NAN_CONFIGS):
        for which, pos in NAN_CASES:
            qkv, expected = _nan_inputs(which, pos)
            local = [split_chunks(x, 1, world, rank) for x in qkv]
            out = _gather_parts(lighthouse_attention(*local, cfg, context_parallel=cp), world)
            _assert_nan_rule(out, expected, f"CP = {world}, config {c}, NaN in {which}[{pos}]")


@pytest.mark.parametrize("which,pos", NAN_CASES)
@pytest.mark.parametrize("c", range(len(NAN_CONFIGS)))
def test_nan_inputs_give_one_pattern_on_every_path(which, pos, c, monkeypatch):
    cfg = NAN_CONFIGS[c]
    qkv, expected = _nan_inputs(which, pos)
    _assert_nan_rule(R.lighthouse_attention_reference(*qkv, cfg), expected, "reference")
    _assert_nan_rule(R.lighthouse_attention_chunked_reference(*qkv, cfg, 2), expected, "chunked reference")
    for interpret, path in (("0", "PyTorch twins"), ("1", "Triton kernels (interpreted)")):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        _assert_nan_rule(lighthouse_attention(*qkv, cfg), expected, path)


def test_nan_inputs_give_the_same_pattern_under_cp():
    run_workers(_nan_worker, 2)
