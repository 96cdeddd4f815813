"""Megatron-LM's own `pretrain()` on the CPU, one process per rank (gloo).

    torchrun --nproc-per-node N tests/megatron_lm_cpu.py TARGET ARG...

(tests/megatron_lm_loop.py starts it as `python -c "...import megatron_lm_cpu; ...main()"`, so
that the main module of the rank processes imports nothing: see `main`.)

TARGET is a module run as `python -m` (the entry point,
`lighthouse_megatron.megatron_lm.pretrain_gpt`) or a script path (a patched or stock
`pretrain_gpt.py`); ARG are Megatron-LM's arguments, with `--distributed-backend gloo`.

Megatron-LM asserts CUDA and places tensors on it; this shim maps only placement and the
CUDA runtime's bookkeeping to the CPU, and changes no math: every tensor a `cuda` device,
a device index or `.cuda()` would put on the GPU stays on the CPU (a torch function mode),
and the `torch.cuda` calls Megatron-LM makes for streams, events, synchronisation, memory
statistics and the CUDA RNG state become their CPU equivalents or no-ops.
"""

from __future__ import annotations

import collections
import contextlib
import os
import runpy
import sys
import types

# Megatron's jit_fuser is torch.compile, whose CUDA path would see the patched torch.cuda below:
# the same functions run eagerly.
os.environ["TORCHDYNAMO_DISABLE"] = "1"

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

CPU = torch.device("cpu")


def _on_cpu(device):
    """A device argument with CUDA (a name, a torch.device or a bare index) mapped to the CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return CPU
    return device


# Stands for the GPU's generator, whose state Megatron-LM's RNG tracker reads and sets.
_cuda_rng = torch.Generator().manual_seed(0)


class CudaOnCpu(TorchFunctionMode):
    """Every torch call sees the CPU where its caller named CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # page-locking needs the CUDA runtime
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _on_cpu(args[1]), *args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return result.replace("torch.", "torch.cuda.", 1)  # what the tensor would be on the GPU
        return result


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream(_Event):
    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def install() -> None:
    """Patch torch.cuda and enter the device mode for the rest of the process."""
    cuda = torch.cuda

    # One function object per name: torch.compile's rules table refuses one object under two names.
    def nothing():
        return lambda *a, **k: None

    def zero():
        return lambda *a, **k: 0

    patches = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        # Megatron-LM passes it as a device (also to `with torch.device(...)`): the CPU itself.
        "current_device": lambda: "cpu",
        "set_device": nothing(),
        "synchronize": nothing(),
        "empty_cache": nothing(),
        "Event": _Event,
        "Stream": _Stream,
        "current_stream": lambda *a, **k: _Stream(),
        "default_stream": lambda *a, **k: _Stream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_stream": nothing(),
        "memory_allocated": zero(),
        "max_memory_allocated": zero(),
        "memory_reserved": zero(),
        "max_memory_reserved": zero(),
        "reset_peak_memory_stats": nothing(),
        "memory_stats": lambda *a, **k: {},
        "default_generators": collections.defaultdict(lambda: _cuda_rng),  # indexed by current_device()
        "_lazy_call": lambda callback, **kwargs: callback(),  # there is no CUDA to initialise first
        # What Megatron-LM asks of the device to pick code paths: answered as a Hopper GPU.
        "get_device_capability": lambda *a, **k: (9, 0),
        "get_device_properties": lambda *a, **k: types.SimpleNamespace(
            name="CPU", major=9, minor=0, total_memory=0, multi_processor_count=1),
    }
    for name, value in patches.items():
        setattr(cuda, name, value)
    # The CUDA RNG state calls, under both names Megatron-LM uses, read and set the stand-in.
    for module in (cuda, cuda.random):
        module.get_rng_state = lambda *a, **k: _cuda_rng.get_state()
        module.set_rng_state = lambda state, *a, **k: _cuda_rng.set_state(state)
        module.manual_seed = lambda seed: _cuda_rng.manual_seed(seed)
        module.manual_seed_all = lambda seed: _cuda_rng.manual_seed(seed)
    # torch's own code (optimizers, the DataLoader) asks torch.accelerator, which would now
    # delegate to the patched torch.cuda: it sees the CPU machine this is, as a CPU build of
    # torch does.
    torch.accelerator.current_accelerator = lambda *a, **k: None
    CudaOnCpu().__enter__()
    try:  # core 0.16: asks nvcc for its version, then builds nothing (its kernels moved out)
        from megatron.legacy import fused_kernels
    except ImportError:
        pass
    else:
        fused_kernels.load = lambda args: None
    # Megatron-LM's JIT warm-up runs dropout on random GPU tensors sized by the parallel layout;
    # on a GPU that leaves the CPU generator, which --use-cpu-initialization draws the weights
    # from, untouched: so here too.
    from megatron.training import initialize

    warmup = initialize._warmup_jit_function

    def _warmup_jit_function(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return warmup(*args, **kwargs)

    initialize._warmup_jit_function = _warmup_jit_function


def main() -> None:
    """Run TARGET as `__main__` without making it `sys.modules["__main__"]`: processes that
    multiprocessing spawns (Megatron-LM's checkpoint writer starts one) import the main module
    first, which for a script or module importing torch and Megatron-LM takes seconds."""
    target, argv = sys.argv[1], sys.argv[2:]
    install()
    sys.argv = [target, *argv]
    if target.endswith(".py"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        with open(target) as f:
            code = compile(f.read(), target, "exec")
        exec(code, {"__name__": "__main__", "__file__": target, "__builtins__": __builtins__})
    else:
        runpy.run_module(target, run_name="__main__")


if __name__ == "__main__":
    main()
