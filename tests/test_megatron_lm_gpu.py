"""Megatron-LM's own training loop on the GPU with Lighthouse, at the real tags, through
tests/gpu/run_megatron_lm.sh (see its header for the wheels and archives it needs):
stage 1 Lighthouse with --exit-interval, stage 2 dense from that checkpoint, with and
without Transformer Engine; CP = 2 on two GPUs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "gpu" / "run_megatron_lm.sh"
TAGS = ["core_v0.16.1", "core_v0.19.0"]


def _archives_present(tag: str) -> bool:
    dirs = [os.environ.get("MEGATRON_LM_ARCHIVES", ""), ROOT / ".whl" / "megatron-lm",
            ROOT.parent / "shared" / "megatron-lm"]
    return any(d and (Path(d) / f"megatron-lm-{tag}.tgz").is_file() for d in dirs)


def _run(tag: str, impl: str, cp: int, tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() < cp:
        pytest.skip(f"needs {cp} GPUs, {torch.cuda.device_count()} here")
    if not _archives_present(tag):
        pytest.skip(f"megatron-lm-{tag}.tgz not found (see {SCRIPT.name}'s header)")
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    if impl == "te":
        from lighthouse_megatron.backends import te_available

        if not te_available():
            pytest.skip("transformer_engine.pytorch does not import here")
    env = {**os.environ, "RUN_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), tag, impl, str(cp)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    verdict = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and verdict.startswith("OK:"), proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["local", "te"])
@pytest.mark.parametrize("tag", TAGS)
def test_megatron_lm_two_stages(tag, impl, tmp_path):
    _run(tag, impl, 1, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["local", "te"])
@pytest.mark.parametrize("tag", TAGS)
def test_megatron_lm_two_stages_context_parallel(tag, impl, tmp_path):
    _run(tag, impl, 2, tmp_path)
