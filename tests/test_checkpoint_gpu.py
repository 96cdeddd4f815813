"""The recovery checkpoint tool against Megatron-LM on the GPU (tests/gpu/convert_megatron_lm.sh):
a Megatron-LM stage-1 Lighthouse checkpoint, with Transformer Engine or local specs, in both
formats, converted, then resumed dense by Megatron-LM's own pretrain_gpt.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "gpu" / "convert_megatron_lm.sh"


def _archive_present(tag: str) -> bool:
    dirs = [os.environ.get("MEGATRON_LM_ARCHIVES", ""), ROOT / ".whl" / "megatron-lm",
            ROOT.parent / "shared" / "megatron-lm"]
    return any(d and (Path(d) / f"megatron-lm-{tag}.tgz").is_file() for d in dirs)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
@pytest.mark.parametrize("impl", ["te", "local"])
@pytest.mark.parametrize("tag", ["core_v0.16.1", "core_v0.19.0"])
def test_megatron_lm_resumes_converted_checkpoint_dense(tag, impl, fmt, tmp_path):
    if not _archive_present(tag):
        pytest.skip(f"megatron-lm-{tag}.tgz not found (see {SCRIPT.name}'s header)")
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    if impl == "te":
        from lighthouse_megatron.backends import te_available

        if not te_available():
            pytest.skip("transformer_engine.pytorch does not import here")
    proc = subprocess.run(["bash", str(SCRIPT), tag, impl, fmt], cwd=ROOT,
                          env={**os.environ, "RUN_DIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=1200)
    verdict = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and verdict.startswith("OK:"), proc.stdout[-4000:] + proc.stderr[-4000:]
