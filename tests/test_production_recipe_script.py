"""tests/gpu/run_production_recipe.sh's own logic on the CPU: a stand-in `torchrun` writes
Megatron-LM's log lines for each run the script launches (stage 1, the dense relaunch, the
in-run switch), so the variants, their skips and the verdict lines are exercised without a
GPU. The real runs: tests/test_megatron_lm_gpu.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_TORCHRUN = r'''#!/usr/bin/env python3
import os, sys
argv = sys.argv[1:]
first = []
def log(i, loss):
    # As Megatron-LM: a launch's first iteration does not reset the sum, the next line is the mean.
    shown = (first[0] + loss) / 2 if len(first) == 1 else loss
    first.append(loss)
    print(f" [2026] iteration {i:8d}/      40 | consumed samples: {4 * i} | "
          f"lm loss: {shown:.6E} | grad norm: 1.0 |")
def val(i, *values):
    names = ["lm loss", "lm loss dense"]
    fields = "".join(f"{n} value: {v:.6E} | {n} PPL: 1.0E+02 | " for n, v in zip(names, values))
    print(f" validation loss at iteration {i} | {fields}")
loss = lambda i: 5.5 - 0.05 * i
if "--exit-interval" in argv:  # stage 1
    print("lighthouse-megatron: layer specs of this stage (vp_stage=None): "
          "LighthouseCoreAttention x5, DenseCoreAttention x1")
    for i in range(1, 21):
        log(i, loss(i))
        if i % 10 == 0:
            val(i, loss(i), loss(i) + 1.5)
    print("  successfully saved checkpoint from iteration      20 to /ckpt [ t 1/1, p 1/1 ]")
    sys.exit(0)
switch = "--lighthouse-until-iter" in argv
if switch and os.environ.get("FAKE_SWITCH_FAILS"):
    sys.exit(1)
print("  successfully loaded checkpoint from /ckpt [ t 1/1, p 1/1 ] at iteration 20")
shift = float(os.environ.get("FAKE_SWITCH_SHIFT", "0")) if switch else 0.0
shift_at = int(os.environ.get("FAKE_SWITCH_SHIFT_AT", "0"))
for i in range(21, 41):
    log(i, loss(i) + 0.3 + (shift if shift_at in (0, i) else 0.0))
    if i % 10 == 0:
        val(i, loss(i) + 0.3)
'''


@pytest.fixture
def fake_env(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torchrun = bin_dir / "torchrun"
    torchrun.write_text(FAKE_TORCHRUN)
    torchrun.chmod(0o755)
    # The script's `python` is this interpreter; Megatron-LM's own dependencies, which the
    # setup checks for, are the GPU image's business: the check passes here.
    python = bin_dir / "python"
    check = "-c import pydantic, six, regex, pybind11"
    python.write_text(f'#!/usr/bin/env bash\n[ "$*" = "{check}" ] && exit 0\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    archives = tmp_path / "archives"
    archives.mkdir()
    tree = tmp_path / "Megatron-LM-core_v0.19.0"
    tree.mkdir()
    (tree / "pretrain_gpt.py").write_text("")
    with tarfile.open(archives / "megatron-lm-core_v0.19.0.tgz", "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "MEGATRON_LM_ARCHIVES": str(archives), "CUDA_VISIBLE_DEVICES": ""}


def _run(env, out):
    proc = subprocess.run(["bash", "tests/gpu/run_production_recipe.sh", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, proc.stdout.strip().splitlines()[-8:]


def _te_imports() -> bool:
    from lighthouse_megatron.backends import te_available

    return te_available()


def test_variants_pass_and_skip_with_reasons(fake_env, tmp_path):
    proc, lines = _run(fake_env, tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdicts = {line.split()[1].rstrip(":"): line.split()[0] for line in lines}
    assert verdicts["local-bf16"] == verdicts["moe"] == "PASS"
    assert {verdicts[n] for n in ("tp2-sp", "pp2-vpp", "cp2-tp2")} == {"SKIP"}
    assert "needs 2 GPUs, 0 here" in "\n".join(lines)
    te = "PASS" if _te_imports() else "SKIP"
    assert {verdicts[n] for n in ("te-bf16-selective", "te-bf16-full", "te-fp8-hybrid")} == {te}
    # stage 1's last validation, both numbers
    assert "stage 1 validation at 20: lm loss 4.500, lm loss dense 6.000" in "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("env, match", [
    ({"FAKE_SWITCH_SHIFT": "0.1"}, "dense losses of iteration 21 differ by 0.1000"),
    # Megatron-LM prints iteration 22 averaged with 21 (0.015 apart): compared per iteration.
    ({"FAKE_SWITCH_SHIFT": "0.03", "FAKE_SWITCH_SHIFT_AT": "22"}, "iteration 22 differ by 0.0300"),
    ({"FAKE_SWITCH_FAILS": "1"}, "stage 2 failed (dense rc 0, switch rc 1"),
])
def test_a_wrong_stage_two_fails(fake_env, tmp_path, env, match):
    proc, lines = _run({**fake_env, **env}, tmp_path / "out")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    (local,) = [line for line in lines if " local-bf16:" in line]
    assert local.startswith("FAIL local-bf16") and match in local, lines
