"""Megatron-LM's own `pretrain()` loop on the CPU, from pytest: one process per rank (gloo)
through tests/megatron_lm_cpu.py, at a real tag's snapshot, on a tiny GPT with mock data.

Core 0.19's `megatron.training` needs Python >= 3.12: its runs use this interpreter when it is
one, else the one named by $LIGHTHOUSE_MEGATRON_LM_PY312 (a Python 3.12 environment with
torch, megatron-core 0.19 and Megatron-LM's dependencies; `.ci/run` builds it), and skip
with the reason where there is none. Core 0.16 runs with this interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ._distributed import free_port
from .test_patches import snapshot

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "tests" / "megatron_lm_cpu.py"
BOOT = (f"import sys; sys.path.insert(0, {str(SHIM.parent)!r}); import megatron_lm_cpu; "
        "sys.path.pop(0); megatron_lm_cpu.main()")
ENTRY = "lighthouse_megatron.megatron_lm.pretrain_gpt"
PY312 = "LIGHTHOUSE_MEGATRON_LM_PY312"
TAGS = ("core_v0.16.1", "core_v0.19.0")

_spec = importlib.util.spec_from_file_location("check_megatron_lm_logs",
                                               ROOT / "tests" / "gpu" / "check_megatron_lm_logs.py")
logs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(logs)

# A tiny GPT as the GPU scripts' (RoPE, RMSNorm, SwiGLU, GQA), fp32, two micro-batches per step.
# Four layers: core 0.19 takes one --cp-comm-type per layer.
MODEL = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--seq-length", "64",
         "--max-position-embeddings", "64", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
         "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
         "--attention-dropout", "0", "--hidden-dropout", "0", "--transformer-impl", "local",
         "--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
         "--no-rope-fusion", "--use-cpu-initialization", "--init-method-std", "0.05"]
TRAINING = ["--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-2", "--min-lr", "1e-3",
            "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--clip-grad", "1.0", "--seed", "1234",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--split", "90,10,0",
            "--log-interval", "1", "--eval-iters", "1", "--num-workers", "0", "--ckpt-format", "torch_dist",
            "--distributed-backend", "gloo"]
# Lighthouse really selects at 64 tokens (S = 64/2 + 2*8 = 48 < 64) and fits CP = 2; the last layer dense.
LIGHTHOUSE = ["--attention-impl", "lighthouse", "--lighthouse-levels", "2", "--lighthouse-pooling-factor",
              "2", "--lighthouse-topk", "8", "--lighthouse-tile-topk", "2", "--lighthouse-dense-layers", "-1"]


def python_for(tag: str) -> str:
    """The interpreter that runs `tag`'s Megatron-LM, or a skip that says why there is none."""
    if tag < "core_v0.19" or sys.version_info >= (3, 12):
        return sys.executable
    path = os.environ.get(PY312)
    if not path:
        pytest.skip(f"Megatron-LM {tag} needs Python >= 3.12 (this is {sys.version.split()[0]}); set "
                    f"${PY312} to a Python 3.12 with torch and megatron-core 0.19 (.ci/run builds one)")
    if not os.access(path, os.X_OK):
        pytest.fail(f"${PY312}={path} is not an executable")
    return path


def _extension_suffix(python: str) -> str:
    if python == sys.executable:
        return sysconfig.get_config_var("EXT_SUFFIX")
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class Run:
    """One launch: every rank's output; Megatron-LM logs iterations and validation on the last rank."""

    returncode: int
    outputs: list[str]
    seconds: float

    @property
    def log(self) -> str:
        return self.outputs[-1]

    @property
    def first(self) -> str:
        return self.outputs[0]

    def tail(self, n: int = 4000) -> str:
        return "\n".join(f"--- rank {r} ---\n{o[-n:]}" for r, o in enumerate(self.outputs))

    def losses(self) -> dict[int, float]:
        """Per-iteration training losses (Megatron-LM averages a launch's first two: undone here)."""
        return logs.losses(self.log)

    def validations(self) -> dict[int, dict[str, float]]:
        return logs.validations(self.log)

    def final_validation(self) -> dict[str, float]:
        """The validation after training (`validation loss at iteration N on validation set`)."""
        return logs.final_validation(self.log)


def launch(tag: str, *args: str, tmp_path: Path, nproc: int = 1, target: str = ENTRY,
           pythonpath: tuple[str | Path, ...] = (), env: dict | None = None, timeout: float = 600,
           check: bool = True) -> Run:
    """Megatron-LM's `pretrain()` at `tag` on `nproc` gloo ranks, as torchrun would start them:
    `target` (a module, or a script path) with `args`. Fails with every rank's output unless all
    exit 0 (with `check`)."""
    python = python_for(tag)
    source = snapshot(tag)
    if shutil.which("make") is None or shutil.which("g++") is None:
        pytest.skip("Megatron-LM builds its dataset helpers with make and g++, which are not here")
    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, source, ROOT])),
        # Megatron-LM's helper build runs `python3` and `python3-config` from PATH: this interpreter's
        # (a virtual environment has no python3-config, hence the suffix given to make directly).
        "PATH": os.pathsep.join([os.path.dirname(python), os.environ.get("PATH", "")]),
        "MAKEFLAGS": f"LIBEXT={_extension_suffix(python)}",
        "OMP_NUM_THREADS": "1",
        # The package's CPU path: the stages' PyTorch twins (the Triton interpreter is for tests/test_ops.py).
        "TRITON_INTERPRET": "0",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc), "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        **(env or {}),
    }
    run_dir = Path(tmp_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = [run_dir / f"rank{r}.log" for r in range(nproc)]
    start = time.monotonic()
    procs = []
    for rank, path in enumerate(files):
        with open(path, "w") as out:
            procs.append(subprocess.Popen(
                [python, "-c", BOOT, target, *args], cwd=run_dir, stdout=out, stderr=subprocess.STDOUT,
                env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"}))
    returncode = 0
    try:
        for proc in procs:
            left = max(1.0, timeout - (time.monotonic() - start))
            code = proc.wait(timeout=left)
            returncode = returncode or code
            if code:  # the others would wait for it in a collective
                break
    except subprocess.TimeoutExpired:
        returncode = -9
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    run = Run(returncode, [p.read_text() for p in files], time.monotonic() - start)
    if check and returncode:
        pytest.fail(f"Megatron-LM {tag} ({nproc} ranks) exited with {returncode}:\n{run.tail()}")
    return run


def checkpoint(directory: Path, iteration: int) -> dict:
    """The tensors of a torch_dist checkpoint (model and optimizer state) saved at `iteration`."""
    import torch

    from lighthouse_megatron.checkpoint.reader import dcp_read_all

    items = dcp_read_all(Path(directory) / f"iter_{iteration:07d}")
    return {k: v for k, v in items.items() if isinstance(v, torch.Tensor)}


def assert_same_checkpoint(a: Path, b: Path, iteration: int) -> None:
    """Bit for bit: every weight and optimizer moment."""
    import torch

    left, right = checkpoint(a, iteration), checkpoint(b, iteration)
    assert sorted(left) == sorted(right)
    assert any(k.startswith("optimizer.") for k in left) and "embedding.word_embeddings.weight" in left
    differ = [k for k in left if not torch.equal(left[k], right[k])]
    assert not differ, f"{len(differ)} of {len(left)} tensors differ, e.g. {differ[:4]}"


def assert_losses(a: dict[int, float], b: dict[int, float], iterations, abs: float = 3e-6) -> None:
    """Per-iteration losses equal to Megatron-LM's printed precision (7 digits; a launch's second
    iteration is recovered from an average, hence the 3e-6), or within `abs`."""
    iterations = list(iterations)
    assert all(i in a and i in b for i in iterations), (sorted(a), sorted(b), iterations)
    assert [a[i] for i in iterations] == pytest.approx([b[i] for i in iterations], abs=abs, rel=0)
