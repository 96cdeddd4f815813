"""Checkpoints that lie, crash or pile up, on real `lighthouse-megatron train` checkpoints (CPU):
manifests and their verification (train --load, convert, inspect), saves that leave no
process or temporary folder behind, metrics across resumes, --save-retain, the start-up
lines, and the Hugging Face export's files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from lighthouse_megatron import training  # noqa: E402
from lighthouse_megatron.checkpoint.manifest import MANIFEST  # noqa: E402
from lighthouse_megatron.checkpoint.reader import dcp_read_all, read_dcp_metadata  # noqa: E402
from lighthouse_megatron.cli import main as cli  # noqa: E402
from lighthouse_megatron.convert import CheckpointError, convert, export_hf, inspect_checkpoint  # noqa: E402
from lighthouse_megatron.megatron import set_iteration  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Llama-shaped (the trainer's defaults: RMSNorm, SwiGLU, RoPE, no biases, untied), tiny.
MODEL = ("--mock-data --num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 64 "
         "--global-batch-size 2 --train-iters 4 --lr 3e-3 --eval-iters 1 --seed 3").split()


pytestmark = pytest.mark.usefixtures("pytorch_twins")


def _train(*argv) -> training.TrainResult:
    result = training.run(training.parse_args([*MODEL, *map(str, argv)]))
    set_iteration(0)
    return result


def _main(*argv) -> int:
    code = training.main([*MODEL, *map(str, argv)])
    set_iteration(0)
    return code


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Iterations 1-2 saved at 2 (model, optimizer state, RNG, scheduler)."""
    save = tmp_path_factory.mktemp("run") / "save"
    _train("--save", save, "--exit-interval", 2)
    return save


def _copy(run, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(run, target)
    return target


def _flip(directory: Path, key_prefix: str, count: int = 16) -> Path:
    """Flip `count` bytes in the middle of the first stored item whose key starts with
    `key_prefix`; returns the distcp file changed."""
    storage = read_dcp_metadata(directory).storage_data
    index, info = next((i, s) for i, s in storage.items() if i.fqn.startswith(key_prefix))
    file = directory / info.relative_path
    data = bytearray(file.read_bytes())
    start = info.offset + info.length // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))
    return file


def test_every_save_has_a_manifest_of_its_files(run):
    import xxhash

    directory = run / "iter_0000002"
    manifest = json.loads((directory / MANIFEST).read_text())
    files = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == files and any(f.endswith(".distcp") for f in files)
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    assert not [p for p in directory.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("item", ["optimizer.state.exp_avg", "embedding.word_embeddings.weight"])
def test_flipped_bytes_are_refused_by_load_convert_and_inspect(run, tmp_path, item, capsys):
    ckpt = _copy(run, tmp_path)
    damaged = _flip(ckpt / "iter_0000002", item)
    capsys.readouterr()

    assert _main("--load", ckpt, "--save", tmp_path / "resumed") == 2
    err = capsys.readouterr().err
    assert str(damaged) in err and "corrupted" in err
    assert not (tmp_path / "resumed").exists()

    with pytest.raises(CheckpointError, match=str(damaged)):
        convert(ckpt, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    assert cli(["convert", "--input", str(ckpt), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert str(damaged) in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert cli(["inspect", str(ckpt)]) == 2
    assert str(damaged) in capsys.readouterr().err

    # --no-verify reads it anyway, and says it did not verify.
    info = inspect_checkpoint(ckpt, verify=False)
    assert info["verified"].startswith("not verified") and info["iteration"] == 2
    assert cli(["inspect", str(ckpt), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "not verified" in out and "verified " not in out.replace("not verified", "")


def test_verified_means_verified(run, tmp_path, capsys):
    """A sound checkpoint: each tool says what it verified; the converted output carries a
    manifest of its own that verifies."""
    assert cli(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    n = len(json.loads((run / "iter_0000002" / MANIFEST).read_text())["files"])
    assert f"verified {n} files" in out
    report = convert(run, tmp_path / "dense")
    assert report["input_verified"].startswith(f"verified {n} files")
    assert (tmp_path / "dense" / "iter_0000002" / MANIFEST).is_file()
    assert inspect_checkpoint(tmp_path / "dense")["verified"].startswith("verified")


def test_a_checkpoint_without_manifest_loads_with_a_note(run, tmp_path, capsys):
    ckpt = _copy(run, tmp_path)
    (ckpt / "iter_0000002" / MANIFEST).unlink()  # as Megatron-LM writes them
    capsys.readouterr()
    result = _train("--load", ckpt, "--save", ckpt, "--train-iters", 4)
    assert result.start_iteration == 2 and result.iteration == 4
    out = capsys.readouterr().out
    assert f"not verified: {ckpt / 'iter_0000002'} has no {MANIFEST}" in out
    assert out.count("not verified") == 1
    assert inspect_checkpoint(ckpt)["verified"] == inspect_checkpoint(ckpt / "iter_0000004")["verified"]


def _write_nan(directory: Path, key: str) -> None:
    """Overwrite the stored values of item `key` with NaN, in place (a checkpoint whose training
    diverged, and which has no manifest to catch it)."""
    import numpy as np

    (directory / MANIFEST).unlink(missing_ok=True)
    storage = read_dcp_metadata(directory).storage_data
    info = next(s for i, s in storage.items() if i.fqn == key)
    values = dcp_read_all(directory, lambda k: k == key)[key].numpy().tobytes()
    file = directory / info.relative_path
    data = file.read_bytes()
    at = data.index(values, info.offset, info.offset + info.length)  # the raw floats in the item
    nan = np.full(len(values) // 4, np.nan, np.float32).tobytes()
    file.write_bytes(data[:at] + nan + data[at + len(nan):])


def test_convert_refuses_non_finite_weights(run, tmp_path):
    ckpt = _copy(run, tmp_path)
    _write_nan(ckpt / "iter_0000002", "decoder.final_layernorm.weight")
    with pytest.raises(CheckpointError, match=r"decoder\.final_layernorm\.weight: 32 of 32 values are NaN"):
        convert(ckpt, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


def test_convert_refuses_non_finite_optimizer_state(run, tmp_path):
    """NaN Adam moments with finite weights passed convert, and the first update after the
    resume would have made the weights NaN. The state the output keeps is checked too; with
    --weights-only (state dropped) the report says that only the weights were checked."""
    ckpt = _copy(run, tmp_path)
    key = "optimizer.state.exp_avg_sq.decoder.final_layernorm.weight"
    _write_nan(ckpt / "iter_0000002", key)
    with pytest.raises(CheckpointError, match=rf"^{key}: 32 of 32 values are NaN or infinite; refusing to "
                       r"convert a diverged or damaged checkpoint; convert an earlier checkpoint, or keep "
                       r"only the weights with --weights-only$"):
        convert(ckpt, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    report = convert(ckpt, tmp_path / "weights", weights_only=True)
    assert report["finite"] == "checked finite: the weights (the optimizer state is dropped: --weights-only)"
    report = convert(run, tmp_path / "good")  # the input itself is only read
    assert report["finite"].startswith("checked finite: the weights and the optimizer state (")


def test_a_tracker_naming_a_missing_iteration(run, tmp_path, capsys):
    ckpt = _copy(run, tmp_path)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("40")
    assert _main("--load", ckpt, "--save", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "names 40 but" in err and "iter_0000040 is missing" in err and "legacy" not in err


def test_resume_drops_metrics_past_the_checkpoint(run, tmp_path, capsys):
    """A run that logged iterations 3-4 but died before saving them: the resumed run logs
    3-4 again, each iteration once, in the JSONL file and in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save = tmp_path / "save"
    _train("--save", save, "--save-interval", 2)  # iterations 1-4, saved at 2 and 4
    shutil.rmtree(save / "iter_0000004")
    (save / "latest_checkpointed_iteration.txt").write_text("2")
    capsys.readouterr()
    resumed = _train("--save", save, "--load", save)
    assert resumed.start_iteration == 2
    assert f"resumed from iteration 2 of {save}" in capsys.readouterr().out
    records = training.read_metrics(str(save / "metrics.jsonl"))
    train = [r["iteration"] for r in records if r["kind"] == "train"]
    assert train == [1, 2, 3, 4]
    assert [r["loss"] for r in records if r["iteration"] > 2 and r["kind"] == "train"] == \
        [r["loss"] for r in resumed.train]
    events = EventAccumulator(str(save / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_startup_summary_and_one_line_per_save(tmp_path, capsys):
    _train("--save", tmp_path / "s", "--save-interval", 2, "--attention-impl", "lighthouse",
           "--lighthouse-levels", 2, "--lighthouse-pooling-factor", 4, "--lighthouse-topk", 4,
           "--lighthouse-tile-topk", 2, "--lighthouse-dense-layers", 0)
    out = capsys.readouterr().out
    settings = next(line for line in out.splitlines() if line.startswith("settings (not the defaults): "))
    for shown in ("hidden_size=32", "seq_length=64", "global_batch_size=2", "train_iters=4",
                  "attention_impl=lighthouse", "lighthouse_topk=4", "mock_data=True"):
        assert shown in settings
    for derived in ("ffn_hidden_size", "kv_channels", "max_position_embeddings", "lr_decay_iters",
                    "num_layers"):
        assert f"{derived}=" not in settings  # derived from the others / unchanged defaults
    with training.checkpoint_model(str(tmp_path / "s")) as (model, _, _):
        params = sum(p.numel() for p in model.parameters())
    assert f"model: {params:,} parameters" in out
    assert "attention: layer 0 dense; layer 1 lighthouse" in out
    saved = [line for line in out.splitlines() if line.startswith("saved checkpoint")]
    assert [line.split()[2] for line in saved] == [str(tmp_path / "s" / "iter_0000002"),
                                                  str(tmp_path / "s" / "iter_0000004")]


def test_save_retain_keeps_the_last_n_and_the_loaded_one(tmp_path, capsys):
    save = tmp_path / "s"
    _train("--save", save, "--save-interval", 1, "--exit-interval", 1)
    capsys.readouterr()
    _train("--save", save, "--load", save, "--save-interval", 1, "--save-retain", 2)
    # 1: the checkpoint this run loaded; 3, 4: the last two.
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001", "iter_0000003", "iter_0000004"]
    assert f"removed {save / 'iter_0000002'} (--save-retain 2)" in capsys.readouterr().out
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not [p for p in save.iterdir() if p.name.startswith(".")]
    capsys.readouterr()
    assert training.main([*MODEL, "--save", str(tmp_path / "t"), "--save-retain", "0"]) == 2
    assert "--save-retain must be >= 1" in capsys.readouterr().err


def test_leftovers_of_a_killed_save_are_removed_at_start_up(tmp_path, capsys):
    save = tmp_path / "s"
    (save / ".iter_0000003.tmp").mkdir(parents=True)
    (save / ".iter_0000003.tmp" / "__0_0.distcp").write_bytes(b"half")
    (save / "latest_checkpointed_iteration.txt.tmp").write_text("3")
    (save / ".mine").mkdir()  # not the trainer's: kept
    _train("--save", save, "--train-iters", 1)
    out = capsys.readouterr().out
    assert f"removed {save / '.iter_0000003.tmp'}: left by a save that did not finish" in out
    assert sorted(p.name for p in save.iterdir() if p.name.startswith(".")) == [".mine"]


_KILL_SCRIPT = """
import contextlib, multiprocessing, sys, time
import psutil
from lighthouse_megatron import training
from lighthouse_megatron.training import checkpointing

args = training.parse_args(sys.argv[2:] + ["--save", sys.argv[1]])
training.run(args)
print("PIDS", *[p.pid for p in psutil.Process().children(recursive=True)], flush=True)
# As during a save, when megatron-core <= 0.18 forks its writers (nothing to enter before the fix).
with getattr(checkpointing, "in_process_save", contextlib.nullcontext)():
    writer = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    writer.start()
    print("PIDS", writer.pid, flush=True)
    time.sleep(60)
"""


def test_no_process_outlives_a_killed_trainer(tmp_path):
    """SIGKILL the trainer after a save and during a save's forked writer: nothing it started
    may survive it (megatron-core's results-queue server did, with hundreds of MB)."""
    import psutil

    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "s"), *MODEL,
                             "--train-iters", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=tmp_path)
    pids, lines = [], 0
    try:
        for line in proc.stdout:  # after training, then with a forked writer running
            if line.startswith("PIDS"):
                pids += [int(p) for p in line.split()[1:]]
                lines += 1
                if lines == 2:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if running(p)]
        time.sleep(0.1)
    for pid in alive:
        psutil.Process(pid).kill()
    assert not alive, f"processes {alive} outlived the killed trainer"
    assert lines == 2, "the script did not get to the forked writer"


def test_python_api_example_runs_as_a_script(tmp_path):
    """examples/train_api.py, run as a plain script (no __main__ guard), saves checkpoints;
    docs/training.md shows the same code."""
    example = REPO / "examples" / "train_api.py"
    code = example.read_text()
    assert code.split('"""', 2)[2].strip() in (REPO / "docs" / "training.md").read_text()
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "api" / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert inspect_checkpoint(tmp_path / "runs" / "api")["verified"].startswith("verified")


def test_hf_export_nested_output_permissions_and_byte_tokenizer(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lighthouse_megatron.data import byte_vocab_size, null_tokenizer

    output = tmp_path / "hf" / "98k"  # neither exists
    report = export_hf(run, output)
    assert isinstance(report["verified"], dict)
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in output.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~mask
    tok = transformers.AutoTokenizer.from_pretrained(str(output))
    eod = null_tokenizer(byte_vocab_size()).eod  # the trainer's end-of-document id
    assert tok.eos_token_id == eod
    text = "héllo\x00\x7f wörld ✓ 日本\n\t<|not special|>"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # what prepare-data writes, byte for byte
    assert tok.decode(ids) == text
    tokens = tok.convert_ids_to_tokens(list(range(256)) + [eod])
    assert len(set(tokens)) == 257 and tok.convert_tokens_to_ids(tokens) == list(range(256)) + [eod]
    assert inspect_manifest_verifies(output)


def inspect_manifest_verifies(directory: Path) -> bool:
    from lighthouse_megatron.checkpoint.manifest import verify_manifest

    result = verify_manifest(directory)
    return result is not None and result["files"] == len([p for p in directory.iterdir()
                                                          if p.name != MANIFEST])


def test_hf_tokenizer_files_are_copied_or_the_export_says_why(tmp_path):
    pytest.importorskip("transformers")
    from lighthouse_megatron.convert.hf import byte_tokenizer, export_tokenizer

    source = tmp_path / "tok"
    byte_tokenizer(256).save_pretrained(str(source))
    out = tmp_path / "out"
    out.mkdir()
    line = export_tokenizer({"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(source)}, out)
    assert line.startswith("tokenizer: copied") and sorted(p.name for p in out.iterdir()) == \
        sorted(p.name for p in source.iterdir())
    hub = export_tokenizer({"tokenizer_type": "HuggingFaceTokenizer",
                            "tokenizer_model": "meta-llama/Meta-Llama-3-8B"}, tmp_path)
    assert hub.startswith("tokenizer not exported") and "meta-llama/Meta-Llama-3-8B" in hub


def test_demo_output_is_git_ignored():
    import argparse

    from lighthouse_megatron.demo import add_demo_parser

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers())
    out = parser.parse_args(["demo"]).out
    assert not out.is_absolute()
    check = subprocess.run(["git", "check-ignore", "-q", str(out / "stage1" / "metrics.jsonl")], cwd=REPO)
    assert check.returncode == 0, f"the demo's default --out {out} is not git-ignored"
