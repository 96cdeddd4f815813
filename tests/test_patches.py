"""patches/ against the real Megatron-LM trees: each patch applies to its tag's snapshot,
and the patched `pretrain_gpt.py`, run as `__main__`, parses the Lighthouse flags and
builds Lighthouse layers (core 0.16: the real model, on one gloo rank) or rejects a bad
`--lighthouse-topk` with one `error:` line.

The snapshots are the unpacked `Megatron-LM-<tag>/` folders in the directory named by
$LIGHTHOUSE_MEGATRON_LM_SNAPSHOTS (`.ci/run` sets it)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches").glob("megatron-lm-*.patch"))
ENV = "LIGHTHOUSE_MEGATRON_LM_SNAPSHOTS"

# A tiny GPT that megatron-core builds on the CPU (learned positions: 0.16's RoPE needs CUDA).
TINY = ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", "1", "--lr", "1e-4", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "256", "--transformer-impl", "local", "--position-embedding-type",
        "learned_absolute", "--attention-dropout", "0", "--no-persist-layer-norm",
        "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-rope-fusion",
        "--use-cpu-initialization"]
LIGHTHOUSE = ["--attention-impl", "lighthouse", "--lighthouse-levels", "2", "--lighthouse-pooling-factor",
              "2", "--lighthouse-topk", "8", "--lighthouse-tile-topk", "2", "--lighthouse-dense-layers", "-1"]


def _tag(patch: Path) -> str:
    return re.fullmatch(r"megatron-lm-(.+)\.patch", patch.name).group(1)


def snapshot(tag: str) -> Path:
    root = os.environ.get(ENV)
    if not root:
        pytest.skip(f"${ENV} is not set (a directory with the unpacked Megatron-LM-<tag>/ snapshots; "
                    ".ci/run sets it)")
    path = Path(root) / f"Megatron-LM-{tag}"
    if not (path / "pretrain_gpt.py").is_file():
        pytest.skip(f"no Megatron-LM snapshot for {tag} at {path}")
    return path


def apply_patch(tag: str, work: Path) -> Path:
    """The snapshot's files that `tag`'s patch touches, copied into `work` and patched there
    (`work` goes before the snapshot on PYTHONPATH). Returns the snapshot."""
    patch = ROOT / "patches" / f"megatron-lm-{tag}.patch"
    source = snapshot(tag)
    for name in re.findall(r"^\+\+\+ b/(\S+)", patch.read_text(), flags=re.M):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, work / name)
    git = lambda *a: subprocess.run(["git", *a], cwd=work, capture_output=True, text=True)  # noqa: E731
    git("init", "-q", ".")
    check = git("apply", "--check", str(patch))
    assert check.returncode == 0, f"{patch.name} does not apply to {source}: {check.stderr}"
    applied = git("apply", str(patch))
    assert applied.returncode == 0, applied.stderr
    assert (work / "pretrain_gpt.py").read_text() != (source / "pretrain_gpt.py").read_text()
    return source


@pytest.fixture(scope="module", params=PATCHES, ids=_tag)
def patched(request, tmp_path_factory):
    """(tag, snapshot, a copy of the snapshot's files the patch touches, patched)."""
    tag = _tag(request.param)
    work = tmp_path_factory.mktemp(tag)
    return tag, apply_patch(tag, work), work


def test_patch_applies_to_its_tag(patched):
    tag, source, work = patched
    assert "lighthouse_megatron.megatron_lm" in (work / "pretrain_gpt.py").read_text()


def test_every_megatron_lm_snapshot_has_a_patch():
    root = os.environ.get(ENV)
    if not root:
        pytest.skip(f"${ENV} is not set")
    tags = {p.name.removeprefix("Megatron-LM-") for p in Path(root).glob("Megatron-LM-*")}
    assert tags <= {_tag(p) for p in PATCHES}


def _run(tag: str, source: Path, work: Path, *argv: str) -> subprocess.CompletedProcess:
    from .megatron_lm_loop import python_for

    pytest.importorskip("megatron.core")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), str(source), str(ROOT)])}
    return subprocess.run(
        [python_for(tag), str(ROOT / "tests" / "megatron_lm_driver.py"), str(work / "pretrain_gpt.py"),
         *argv], capture_output=True, text=True, cwd=work, env=env, timeout=300,
    )


def _result(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_patched_script_parses_the_flags_and_builds_lighthouse_layers(patched):
    tag, source, work = patched
    result = _result(_run(tag, source, work, *TINY, *LIGHTHOUSE))
    assert result["attention_impl"] == "lighthouse" and result["lighthouse_topk"] == 8
    # core 0.16: the real gpt_builder built the real GPTModel; 0.19: the specs its builder
    # gets. The last layer stays dense.
    assert result["core_attention"] == ["LighthouseCoreAttention"] * 2 + ["DenseCoreAttention"]
    assert result["spec"] is None  # checkpoints store the arguments: no --spec left behind


def test_the_trainer_builds_megatron_lms_vocabulary(patched):
    """--vocab-size 256 with the NullTokenizer: 384 rows on core 0.16 (its tokenizer adds the
    end-of-document id), 256 on 0.19. The trainer follows the installed megatron-core, so its
    checkpoints load into Megatron-LM of the same release."""
    import megatron.core

    tag, source, work = patched
    installed = ".".join(megatron.core.__version__.split(".")[:2])
    if not tag.removeprefix("core_v").startswith(installed + "."):
        pytest.skip(f"megatron-core {megatron.core.__version__} is installed, not {tag}'s release")
    result = _result(_run(tag, source, work, *TINY, *LIGHTHOUSE))
    from lighthouse_megatron.settings.checks import padded_vocab_size

    args = argparse.Namespace(vocab_size=256, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1)
    assert padded_vocab_size(args) == result["padded_vocab_size"] == {"0.16": 384, "0.19": 256}[installed]


def test_patched_script_rejects_a_bad_topk(patched):
    tag, source, work = patched
    proc = _run(tag, source, work, *TINY, *LIGHTHOUSE, "--lighthouse-topk", "7")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # 6 would be 3 tiles, which do not divide the 64 / 2 = 32 coarsest entries.
    assert errors and "--lighthouse-topk 7" in errors[0] and "nearest valid: 4 or 8" in errors[0], \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
