"""Context parallelism on GPUs (NCCL): CP = 2 against CP = 1 on the same inputs, for every
cp_comm_type of Transformer Engine's CP attention and for the built-in all-gather attention.

Needs two CUDA GPUs (the lent 2-GPU kinds): `pytest -m gpu tests/test_parallel_gpu.py`. With
TE installed, each case runs in a fresh process that imports TE before torch first uses cuDNN.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ._distributed import free_port

pytestmark = pytest.mark.gpu

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

N = 32768  # per rank 16K tokens: two 8K chunks of 4 tiles each


def _worker(rank: int, world: int, port: int, backend: str, comm_type: str, hierarchy, dtype_name: str):
    if backend == "te":
        import transformer_engine.pytorch  # noqa: F401  (before torch first runs a cuDNN op)
    import torch.distributed as dist

    from lighthouse_megatron import LighthouseConfig, lighthouse_attention
    from lighthouse_megatron.parallel import ContextParallel, causal_attention, merge_chunks, split_chunks

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    te_group = None
    if hierarchy is not None:  # a2a+p2p: TE takes [a2a group, p2p group] (Megatron's hierarchical CP)
        a = hierarchy[0]
        groups = {}
        for kind, members in (("a2a", [list(range(i * a, (i + 1) * a)) for i in range(world // a)]),
                              ("p2p", [list(range(i, world, a)) for i in range(a)])):
            for ranks in members:
                g = dist.new_group(ranks)
                if rank in ranks:
                    groups[kind] = g
        te_group = [groups["a2a"], groups["p2p"]]
    cp = ContextParallel(dist.group.WORLD, comm_type, te_group)
    dtype = getattr(torch, dtype_name)
    cfg = LighthouseConfig(levels=3, pooling_factor=4, topk=1024, tile_topk=64, backend=backend)
    cfg.validate(N, world)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(1, N, h, 64, device="cuda", dtype=dtype, generator=gen)
                     for h in (8, 2, 2, 8))
    # CP = 1 with the same stage-5 backend family: TE for TE, SDPA's math kernel for the built-in.
    one = cfg if backend == "te" else dataclasses.replace(cfg, backend="math")
    dense_backend = "te" if backend == "te" else "math"
    for name, fn, fn1 in (
        ("lighthouse", lambda *x, **kw: lighthouse_attention(*x, cfg, **kw),
         lambda *x: lighthouse_attention(*x, one)),
        ("dense", lambda *x, **kw: causal_attention(*x, backend=backend, **kw),
         lambda *x: causal_attention(*x, backend=dense_backend)),
    ):
        # Dense attention on the first 8K tokens: SDPA's math kernel holds the N x N scores.
        n = N if name == "lighthouse" else 8192
        full = [x[:, :n].clone().requires_grad_(True) for x in (q, k, v)]
        want = fn1(*full)
        want.backward(grad[:, :n])
        local = [split_chunks(x[:, :n], 1, world, rank).requires_grad_(True) for x in (q, k, v)]
        out = fn(*local, context_parallel=cp)
        out.backward(split_chunks(grad[:, :n], 1, world, rank))

        def whole(x):
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x.contiguous())
            return merge_chunks(parts, dim=1).float()

        pairs = [("out", whole(out.detach()), want.detach())]
        pairs += [(f"d{n}", whole(a.grad), b.grad) for n, a, b in zip("qkv", local, full, strict=True)]
        for label, got, ref in pairs:
            rel = float((got - ref.float()).norm() / ref.float().norm())
            limit = 2e-2 if dtype == torch.bfloat16 else 1e-5
            assert rel < limit, f"{name} {backend} {comm_type} {label}: relative error {rel:.3g} >= {limit}"
            if rank == 0:
                print(f"{name} {backend} {comm_type} {dtype_name} {label}: relative error {rel:.2e}")
    dist.destroy_process_group()


def _spawn(backend, comm_type, hierarchy=None, dtype="bfloat16"):
    args = (2, free_port(), backend, comm_type, hierarchy, dtype)
    torch.multiprocessing.spawn(_worker, args=args, nprocs=2, join=True)


@needs_two_gpus
@pytest.mark.parametrize("comm_type,hierarchy", [("p2p", None), ("a2a", None), ("all_gather", None),
                                                  ("a2a+p2p", (2, 1)), ("a2a+p2p", (1, 2))])
def test_te_cp_attention_equals_cp1(comm_type, hierarchy):
    from lighthouse_megatron.backends import te_import_error

    error = te_import_error()
    if error is not None:
        pytest.skip(f"transformer_engine.pytorch does not import here ({error})")
    _spawn("te", comm_type, hierarchy)


@needs_two_gpus
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_builtin_cp_attention_on_nccl_equals_cp1(dtype):
    """The built-in CP attention (all-gather of K/V, reduce-scatter of their gradients), which
    every backend but 'te' (and 'auto' where TE imports) takes under CP."""
    _spawn("cudnn" if dtype == "bfloat16" else "math", "p2p", dtype=dtype)
