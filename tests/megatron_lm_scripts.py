"""Running the GPU scripts of tests/gpu/ (Megatron-LM's own loop at a real tag) from pytest:
the reasons to skip, and the verdict the script prints last ("OK: ...")."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_SCRIPTS = ROOT / "tests" / "gpu"


def archive_present(tag: str) -> bool:
    dirs = [os.environ.get("MEGATRON_LM_ARCHIVES", ""), ROOT / ".whl" / "megatron-lm",
            ROOT.parent / "shared" / "megatron-lm"]
    return any(d and (Path(d) / f"megatron-lm-{tag}.tgz").is_file() for d in dirs)


def run_script(script: str, tag: str, impl: str, *args: str, tmp_path: Path, gpus: int = 1,
               timeout: int = 1500, env: dict[str, str] | None = None) -> None:
    """bash tests/gpu/SCRIPT TAG IMPL ARGS..., skipped where it cannot run; fails with its output
    unless it exits 0 with an "OK:" verdict."""
    import torch

    path = GPU_SCRIPTS / script
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs, {torch.cuda.device_count()} here")
    if not archive_present(tag):
        pytest.skip(f"megatron-lm-{tag}.tgz not found (see {path.name}'s header)")
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    if impl == "te":
        from lighthouse_megatron.backends import te_available

        if not te_available():
            pytest.skip("transformer_engine.pytorch does not import here")
    proc = subprocess.run(["bash", str(path), tag, impl, *args], cwd=ROOT,
                          env={**os.environ, "RUN_DIR": str(tmp_path), **(env or {})}, capture_output=True,
                          text=True,
                          timeout=timeout)
    verdict = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and verdict.startswith("OK:"), proc.stdout[-4000:] + proc.stderr[-4000:]
