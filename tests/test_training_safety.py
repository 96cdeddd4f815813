"""`lighthouse-megatron train` runs that must not burn time silently (issue 28): the NaN/Inf
guard, SIGTERM/SIGINT stopping with a checkpoint, metrics that never repeat an iteration,
start-up warnings and refusals of outputs that cannot be written, W&B logging. CPU."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from lighthouse_megatron import training  # noqa: E402
from lighthouse_megatron.megatron import set_iteration  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = ("--mock-data --num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 64 "
         "--global-batch-size 2 --train-iters 4 --lr 3e-3 --eval-iters 1 --seed 3 --no-progress").split()
ENV = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

pytestmark = pytest.mark.usefixtures("pytorch_twins")


def _train(*argv) -> training.TrainResult:
    try:
        return training.run(training.parse_args([*MODEL, *map(str, argv)]))
    finally:
        set_iteration(0)


def _main(*argv) -> int:
    try:
        return training.main([*MODEL, *map(str, argv)])
    finally:
        set_iteration(0)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _weights_finite(directory: Path) -> bool:
    import torch

    from lighthouse_megatron.checkpoint.reader import dcp_read_all

    state = dcp_read_all(directory, lambda k: not k.startswith(("optimizer.", "rng_state", "common_state")))
    return all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor)
               and v.is_floating_point())


# ------------------------------------------------------------------------- NaN guard


def test_a_diverging_run_stops_before_saving_the_diverged_state(tmp_path, capsys):
    """--lr 1e6: the gradient norm turns NaN after two iterations. The run stops there with
    Megatron-LM's exit code 17, one line naming the iteration, and every checkpoint it left
    holds finite weights (the tracker names the last good one)."""
    save = tmp_path / "s"
    assert _main("--lr", "1e6", "--train-iters", 8, "--save", save, "--save-interval", 1) == 17
    line = _one_error(capsys)
    records = training.read_metrics(str(save / "metrics.jsonl"))
    bad = records[-1]
    assert bad["kind"] == "train" and bad.get("skipped") and not math.isfinite(bad["grad_norm"])
    assert line.startswith(f"error: iteration {bad['iteration']}: ") and "training diverged" in line
    saved = sorted(save.glob("iter_*"))
    assert saved and int(saved[-1].name[5:]) < bad["iteration"]
    assert all(_weights_finite(d) for d in saved)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(int(saved[-1].name[5:]))
    assert f"the last checkpoint is {saved[-1]}" in line


def test_skipped_iterations_leave_weights_and_schedule_alone(tmp_path, monkeypatch, capsys):
    """--max-skipped-iters 1: one NaN loss (injected at iteration 2) is skipped: no update,
    the learning-rate schedule waits, the run goes on and ends normally; a second stops it."""
    import torch

    from lighthouse_megatron.training import trainer

    real, calls = trainer._token_losses, {"n": 0}

    def nan_at_second_iteration(runner, batch):
        losses = real(runner, batch)
        calls["n"] += 1
        return losses * float("nan") if calls["n"] == 2 else losses  # one micro-batch per iteration

    monkeypatch.setattr(trainer, "_token_losses", nan_at_second_iteration)
    result = _train("--max-skipped-iters", 1, "--lr-warmup-iters", 2, "--eval-iters", 0,
                    "--micro-batch-size", 2)
    train = result.train
    assert [r.get("skipped", False) for r in train] == [False, True, False, False]
    assert train[2]["lr"] == train[1]["lr"] != train[0]["lr"]  # the schedule did not step at 2
    assert all(math.isfinite(r["loss"]) for r in train if not r.get("skipped"))
    assert ("iteration 2: the loss is nan and the gradient norm is nan: update skipped (1 of "
            "--max-skipped-iters 1)") in capsys.readouterr().out

    calls["n"] = 0
    monkeypatch.setattr(trainer, "_token_losses", lambda runner, batch: real(runner, batch) * torch.nan)
    assert _main("--max-skipped-iters", 1, "--micro-batch-size", 2) == 17
    assert _one_error(capsys).startswith("error: iteration 2: the loss is nan and the gradient norm is nan: "
                                         "training diverged")


def test_the_guard_can_be_turned_off_as_in_megatron_lm(tmp_path):
    result = _train("--lr", "1e6", "--train-iters", 5, "--no-check-for-nan-in-loss-and-grad")
    assert result.iteration == 5 and not math.isfinite(result.train[-1]["loss"])


# ------------------------------------------------------------------------ signals


def _cli(*argv) -> list[str]:
    return [sys.executable, "-m", "lighthouse_megatron.cli", "train", *MODEL, *map(str, argv)]


def _stop_after(argv: list[str], iteration: int, sig: int, cwd: Path) -> tuple[int, str, str]:
    """Start the trainer, send `sig` once it logged `iteration`; (exit code, stdout, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(f"[train] iteration={iteration} "):
                proc.send_signal(sig)
                break
        rest, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, "".join(out) + rest, err


def _train_losses(metrics: Path) -> list[float]:
    return [r["loss"] for r in training.read_metrics(str(metrics)) if r["kind"] == "train"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_end_of_the_iteration_and_the_run_resumes_exactly(tmp_path, sig):
    """SIGTERM (Slurm's preemption and time limit, scancel) or SIGINT (Ctrl-C) mid-run: the
    trainer finishes the iteration, saves it, says so in one line and exits with 128 + the
    signal number; resuming from that checkpoint gives the uninterrupted run's losses, bitwise.
    800 iterations (about 6 s) so that the signal, sent when iteration 2 is logged, reaches a
    running trainer on a loaded test machine too."""
    iters = 800
    full = tmp_path / "full"
    subprocess.run(_cli("--train-iters", iters, "--save", full), check=True, env=ENV, cwd=tmp_path,
                   capture_output=True)
    save = tmp_path / "s"
    code, out, err = _stop_after(_cli("--train-iters", iters, "--save", save), 2, sig, tmp_path)
    name = signal.Signals(sig).name
    assert code == 128 + sig, (code, err[-2000:])
    assert "Traceback" not in err
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped < iters
    assert err.strip().splitlines()[-1] == (f"{name}: stopped after iteration {stopped} and saved "
                                            f"{save / f'iter_{stopped:07d}'}; resume with --load {save}")
    assert _weights_finite(save / f"iter_{stopped:07d}")
    subprocess.run(_cli("--train-iters", iters, "--save", save, "--load", save), check=True, env=ENV,
                   cwd=tmp_path, capture_output=True)
    assert _train_losses(save / "metrics.jsonl") == _train_losses(full / "metrics.jsonl")


def test_a_second_signal_exits_at_once(tmp_path):
    """The first signal asks for a stop at the end of the iteration; a second one (not the
    same one forwarded by torchrun a moment later) does not wait: SIGINT raises
    KeyboardInterrupt, SIGTERM ends the process by its default action."""
    from lighthouse_megatron.training.trainer import StopSignals

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the test run was started in the background
    with StopSignals(True, repeat_window=60) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C, forwarded: ignored
        time.sleep(0.1)
        assert signals.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt), StopSignals(True, repeat_window=0):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before  # restored
    script = ("import os, signal, time\n"
              "from lighthouse_megatron.training.trainer import StopSignals\n"
              "with StopSignals(True, repeat_window=0):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n"
              "print('survived')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == -signal.SIGTERM and "survived" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "second SIGTERM: exiting now, without a checkpoint"


def test_ctrl_c_before_training_is_one_line(tmp_path):
    """Ctrl-C while the model and data are being built: nothing to save, no traceback. The run is
    long (3,000 iterations, about 25 s) so that the signal always reaches a running trainer: a
    4-iteration run could end before a loaded test machine sent it, and a SIGINT during the
    interpreter's exit is not the trainer's to handle. Where the signal lands a little later, the
    trainer stops after an iteration and saves; both endings are one line and exit code 130."""
    save = tmp_path / "s"
    # A shell that starts the tests in the background ignores SIGINT, and the child would inherit that.
    proc = subprocess.Popen(_cli("--save", save, "--train-iters", 3000), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if line.startswith("model: "):  # the model is built, the datasets are next
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    where = re.escape(str(save))
    stopped = re.fullmatch(rf"SIGINT: stopped after iteration (\d+) and saved {where}/iter_(\d{{7}}); "
                           rf"resume with --load {where}", last)
    assert last == "interrupted" or (stopped and int(stopped[1]) == int(stopped[2]) < 3000), last


# ------------------------------------------------------------------------ metrics


def test_a_restart_without_a_checkpoint_logs_each_iteration_once(tmp_path, capsys):
    """A run killed before its first save (or a Slurm requeue of it) and a --force rerun start
    from scratch: the records of the earlier attempt go, in the JSONL file and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save = tmp_path / "s"
    first = _train("--save", save)
    for path in [*save.glob("iter_*"), save / "latest_checkpointed_iteration.txt"]:  # killed before saving
        path.unlink() if path.is_file() else __import__("shutil").rmtree(path)
    again = _train("--save", save, "--load", save)
    assert again.start_iteration == 0
    assert "dropped 5 records after iteration 0 (of an earlier run; this one starts from scratch)" in \
        capsys.readouterr().out
    forced = _train("--save", save, "--force", "--seed", 4)
    for result in (first, again, forced):
        assert [r["iteration"] for r in result.train] == [1, 2, 3, 4]
    records = training.read_metrics(str(save / "metrics.jsonl"))
    assert records == forced.train + forced.evals
    events = EventAccumulator(str(save / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in forced.train], rel=1e-6)


# ------------------------------------------------------------------------ W&B


def _wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (its LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunk, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_logs_what_tensorboard_logs(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="W&B logging is the optional 'wandb' extra (the dev extra has it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save = tmp_path / "s"
    result = _train("--save", save, "--wandb-project", "lighthouse-test", "--wandb-exp-name", "tiny")
    (run_file,) = (save / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    history, run, records = {}, None, _wandb_records(run_file)
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items.get("_step"), {}).update(items)
    assert run is not None, f"no run record in {run_file}: {[r.WhichOneof('record_type') for r in records]}"
    assert (run.project, run.display_name) == ("lighthouse-test", "tiny")
    assert [history[i]["train/loss"] for i in (1, 2, 3, 4)] == pytest.approx(
        [r["loss"] for r in result.train], rel=1e-9)
    assert history[4]["eval/loss_dense"] == pytest.approx(result.evals[-1]["loss"], rel=1e-9)
    # The checkpoint stores the W&B settings as Megatron-LM does; evaluating it needs no W&B.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with training.checkpoint_model(str(save), device="cpu") as (_, args, iteration):
        assert iteration == 4 and args.wandb_project is None


def test_wandb_flags_without_a_project_or_package(tmp_path, capsys, monkeypatch):
    assert _main("--wandb-exp-name", "x") == 2
    assert "--wandb-exp-name and --wandb-save-dir need --wandb-project" in _one_error(capsys)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    assert _main("--wandb-project", "p") == 2
    assert "pip install 'lighthouse-megatron[wandb]'" in _one_error(capsys)


# ------------------------------------------------------------------------ YAML typing


def test_yaml_values_are_typed_by_their_setting(tmp_path, capsys):
    """`swiglu: "false"` trained a SwiGLU model (a non-empty string is true) while the summary
    printed swiglu=false; `lr: 3e-4` (a string to YAML 1.1) was refused without saying why.
    Every value is read as its setting's type: what clearly means one is taken, the rest refused."""
    from lighthouse_megatron.training.trainer import transformer_config

    config = tmp_path / "run.yaml"
    config.write_text('mock_data: true\nswiglu: "false"\nqk_layernorm: "yes"\nlr: 3e-4\ntrain_iters: 1e3\n'
                      'seed: "7"\nuntie_embeddings_and_output_weights: no\nlighthouse_dense_layers: 0\n')
    args = training.parse_args(["--config", str(config)])
    typed = (args.swiglu, args.qk_layernorm, args.lr, args.train_iters, args.seed)
    assert typed == (False, True, 3e-4, 1000, 7)
    assert args.untie_embeddings_and_output_weights is False and args.lighthouse_dense_layers == [0]
    assert transformer_config(args).gated_linear_unit is False  # the model built has no SwiGLU
    assert args.ffn_hidden_size == 4 * args.hidden_size  # GeLU's size, not SwiGLU's
    assert training.settings_args({"mock_data": "on", "swiglu": "off", "lr": "1e-3"}).swiglu is False
    either = "must be true or false (also yes/no, on/off)"
    for text, message in [("swiglu: maybe", f"swiglu {either}, got 'maybe'"),
                          ("train_iters: 10.5", "train_iters must be an integer, got 10.5"),
                          ("lr: fast", "lr must be a number, got 'fast'"),
                          ("swiglu: 1", f"swiglu {either}, got 1")]:
        config.write_text(f"mock_data: true\n{text}\n")
        assert training.main(["--config", str(config)]) == 2
        assert _one_error(capsys) == f"error: --config {config}: {message}"
