"""What every benchmark shares: run metadata (card, versions, command), timing, JSON output."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..config import LighthouseConfig
from ..settings.bench import LAYER_DTYPES


class UsageError(Exception):
    """A bad setting: the CLI prints one `error: ...` line and exits with 2."""


def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def usage_errors_as_exit_2(run):
    """`run(args)` for the CLI: a UsageError becomes one `error:` line and exit code 2."""

    def run_cli(args) -> int:
        try:
            return run(args)
        except UsageError as e:
            return error(str(e))

    return run_cli


def nvidia_smi() -> str | None:
    """The card as nvidia-smi names it (name, memory, driver), or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def run_meta(device: torch.device) -> dict:
    """Where and how this run happened, for the JSON (the report's 'card' and 'command')."""
    cuda = device.type == "cuda"
    return {
        "command": "lighthouse-megatron " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "nvidia_smi": nvidia_smi() if cuda else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn_version() if cuda else None,
        "megatron_core": _version("megatron-core"),
        "transformer_engine": _version("transformer-engine") or _version("transformer_engine"),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, warmup: int, reps: int, device: torch.device) -> list[float]:
    """Milliseconds of each timed call of fn(i): CUDA events on a GPU, wall clock elsewhere."""
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    for i in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(warmup + i)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(warmup + i)
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def check_writable(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to overwrite it")


def write_json(path: Path, data: dict) -> None:
    """Write to a temporary name and rename, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def cudnn_version():
    """torch's cuDNN version, or why torch's own cuDNN check refuses (with Transformer Engine
    loaded first against another cuDNN, torch's cuDNN check raises, while attention works)."""
    try:
        return torch.backends.cudnn.version()
    except RuntimeError as e:
        found = re.search(r"against \(([\d, ]+)\) but found runtime version \(([\d, ]+)\)", str(e))
        if found is None:
            return f"unavailable: {str(e).splitlines()[0][:120]}"
        built, runtime = (v.replace(", ", ".") for v in found.groups())
        return f"runtime {runtime} (torch built against {built}; torch's own cuDNN check refuses)"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype name (bf16, fp16, fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


DTYPES = {name: torch_dtype(name) for name in LAYER_DTYPES}


def cuda_median_ms(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of fn(i) (i = repetition, for rotating inputs), CUDA events."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def layer_config(args, topk: int) -> LighthouseConfig:
    """The Lighthouse settings of `bench layer` (and its --cp mode) at budget `topk`."""
    return LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=topk,
                            tile_topk=args.tile_topk, backend=args.backend)
