"""Run a test function on several gloo processes (CPU), as torchrun would."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The workers test the parallel logic with the kernels' PyTorch twins: the Triton
    # interpreter would multiply their time, and tests/test_ops.py checks kernels against twins.
    os.environ["TRITON_INTERPRET"] = "0"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn, world_size: int, *args) -> None:
    """fn(rank, world_size, *args) on `world_size` processes; a worker's exception fails the caller."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
