"""Slurm templates and `lighthouse-megatron slurm render/submit`, without a Slurm cluster.

The rendered scripts are run by bash with stand-ins for srun, scontrol and sbatch on PATH
that record their arguments, so the launch logic (layout, resume, the torchrun command, the
completion check) is checked as bash executes it. tests/test_slurm_cluster.py runs the
chain under a real Slurm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lighthouse_megatron import slurm
from lighthouse_megatron.cli import main

TRAINING = ("stage1", "stage2", "1m")
REQUIRED = os.environ.get("LIGHTHOUSE_MEGATRON_CI") == "1"  # .ci/run: tools must be there


def needs_shellcheck():
    if shutil.which("shellcheck"):
        return
    if REQUIRED:
        pytest.fail("shellcheck is missing (.ci/run installs it with apt-get install -y shellcheck)")
    pytest.skip("shellcheck is not installed (Debian: apt-get install -y shellcheck)")


def render(tmp_path, template, *args, name=None):
    """Render into tmp_path; training templates get a data path and a (stand-in) Megatron-LM
    checkout unless `args` set them: the scripts refuse the templates' placeholders."""
    out = tmp_path / (name or f"{template}.sbatch")
    if template != "convert":
        if not any(a in ("--data-path", "--megatron-lm") or a.startswith("data_path") for a in args):
            mlm = tmp_path / "Megatron-LM"
            (mlm / "megatron" / "training").mkdir(parents=True, exist_ok=True)
            args = ("--data-path", "/data/corpus_text_document", "--megatron-lm", str(mlm), *args)
    rc = main(["slurm", "render", template, "-o", str(out), *args])
    assert rc == 0
    return out


def settings(script: Path, *names: str) -> dict[str, str]:
    """The settings' values as bash sees them."""
    lines = script.read_text().splitlines()
    block = lines[lines.index("# ---- settings ----"): lines.index("# ---- end of settings ----")]
    prog = "\n".join(block + [f'printf "%s\\0" "${n}"' for n in names])
    out = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.split("\0")[:-1], strict=True))


def sbatch_option(script: Path, option: str) -> str | None:
    for line in script.read_text().splitlines():
        if line.startswith(f"#SBATCH --{option}="):
            return line.split("=", 1)[1]
    return None


STUBS = {
    "srun": r"""#!/bin/bash
printf '%s\n' "$@" > "$STUB_DIR/srun.args"
# Plays the training run: leaves a checkpoint at STUB_END_ITER in the --save directory.
prev=
for a in "$@"; do
    if [[ $prev == --save && -n ${STUB_END_ITER:-} && $a == "$STUB_ROOT"/* ]]; then
        mkdir -p "$a" && echo "$STUB_END_ITER" > "$a/latest_checkpointed_iteration.txt"
    fi
    prev=$a
done
""",
    "scontrol": r"""#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\n' $STUB_HOSTS; exit 0; fi
echo "$*" >> "$STUB_DIR/scontrol.log"
""",
}


def run_job(script: Path, tmp_path: Path, nodes: int = 4, end_iter: int | None = None):
    """Run a rendered script as the batch step of a job on `nodes` nodes of 8 GPUs."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    for f in ("srun.args", "scontrol.log"):
        (stubs / f).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{stubs}:{env['PATH']}", STUB_DIR=str(stubs), STUB_ROOT=str(tmp_path),
               STUB_HOSTS=" ".join(f"gpu-{i:02d}" for i in range(nodes)),
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="test", SLURM_JOB_NODELIST=f"gpu-[00-{nodes - 1:02d}]",
               SLURM_JOB_NUM_NODES=str(nodes), SLURM_CPUS_ON_NODE="64", SLURM_GPUS_PER_NODE="8")
    if end_iter is not None:
        env["STUB_END_ITER"] = str(end_iter)
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    srun = (stubs / "srun.args").read_text().splitlines() if (stubs / "srun.args").exists() else None
    scontrol = (stubs / "scontrol.log").read_text() if (stubs / "scontrol.log").exists() else ""
    return proc, srun, scontrol


def after(args: list[str], flag: str, n: int = 1) -> list[str]:
    i = args.index(flag)
    return args[i + 1: i + 1 + n]


# ------------------------------------------------------------------------- templates


def test_training_templates_share_the_launch_code():
    def launch(name):
        text = slurm.load_template(name).path.read_text()
        return text[text.index("# ---- launch"):]

    assert launch("stage1") == launch("stage2") == launch("1m")


@pytest.mark.parametrize("template", TRAINING)
@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_training_template_renders(tmp_path, template, nodes):
    needs_shellcheck()
    script = render(tmp_path, template, "--nodes", str(nodes), "--partition", "gpu", "--account", "proj",
                    "--log-dir", str(tmp_path / "logs"), "--checkpoint-root", str(tmp_path / "ckpt"),
                    "--set", "init_checkpoint=")
    subprocess.run(["bash", "-n", str(script)], check=True)
    subprocess.run(["shellcheck", str(script)], check=True)
    assert sbatch_option(script, "nodes") == str(nodes)
    assert sbatch_option(script, "partition") == "gpu"
    assert sbatch_option(script, "account") == "proj"
    assert sbatch_option(script, "output") == f"{tmp_path / 'logs'}/%x-%j.out"
    assert (tmp_path / "logs").is_dir()  # Slurm would not create it
    cp = {"stage1": 2, "stage2": 2, "1m": 8}[template]
    proc, srun, _ = run_job(script, tmp_path, nodes=nodes)
    assert proc.returncode == 1 and srun, proc.stderr  # the stand-in srun trained nothing
    assert f"TP 1 x CP {cp} x PP 1 x DP {nodes * 8 // cp}" in proc.stdout


def test_convert_template_renders(tmp_path):
    needs_shellcheck()
    script = render(tmp_path, "convert", "--checkpoint-root", str(tmp_path / "ckpt"), "--time", "00:30:00")
    subprocess.run(["bash", "-n", str(script)], check=True)
    subprocess.run(["shellcheck", str(script)], check=True)
    assert sbatch_option(script, "time") == "00:30:00"
    proc, srun, _ = run_job(script, tmp_path, nodes=1)
    assert proc.returncode == 0, proc.stderr
    cmd = srun[srun.index("python"):]
    assert cmd[:4] == ["python", "-m", "lighthouse_megatron.cli", "convert"]
    assert after(cmd, "--input") == [f"{tmp_path}/ckpt/stage1-lighthouse"]
    assert after(cmd, "--output") == [f"{tmp_path}/ckpt/stage1-dense"]
    assert "--force" not in cmd


def test_unrendered_templates_pass_shellcheck():
    needs_shellcheck()
    for name in slurm.TEMPLATES.values():
        subprocess.run(["shellcheck", str(slurm.TEMPLATE_DIR / name)], check=True)


# ------------------------------------------------------------------------ the launch


def test_stage1_launches_torchrun_on_every_node(tmp_path):
    mlm = tmp_path / "Megatron-LM"
    (mlm / "megatron" / "training").mkdir(parents=True)
    script = render(tmp_path, "stage1", "--checkpoint-root", str(tmp_path / "ckpt"),
                    "--data-path", "/data/corpus_text_document", "--megatron-lm", str(mlm))
    proc, srun, _ = run_job(script, tmp_path, nodes=4, end_iter=14000)
    assert proc.returncode == 0, proc.stderr
    assert "starting from a random initialisation" in proc.stdout
    assert after(srun, "--train-iters") == ["16000"] and after(srun, "--exit-interval") == ["14000"]
    srun_opts, torchrun = srun[:srun.index("bash")], srun[srun.index("torchrun"):]
    assert {"--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=64", "--gpus-per-node=8"} <= set(srun_opts)
    assert srun[srun.index("bash") + 1] == "-c"
    assert torchrun[1:5] == ["--nnodes=4", "--nproc-per-node=8", "--master-addr=gpu-00",
                             f"--master-port={20000 + 4242 % 20000}"]
    assert torchrun[5:7] == ["-m", "lighthouse_megatron.megatron.pretrain_gpt"]
    assert after(torchrun, "--context-parallel-size") == ["2"]
    assert after(torchrun, "--tensor-model-parallel-size") == ["1"]
    assert after(torchrun, "--pipeline-model-parallel-size") == ["1"]
    assert after(torchrun, "--seq-length") == ["98304"]
    assert after(torchrun, "--attention-impl") == ["lighthouse"]
    assert after(torchrun, "--lighthouse-topk") == ["1536"]
    assert after(torchrun, "--lighthouse-dense-layers", 5) == ["0", "1", "-2", "-1", "--data-path"]
    assert after(torchrun, "--save") == [f"{tmp_path}/ckpt/stage1-lighthouse"]
    assert after(torchrun, "--data-path") == ["/data/corpus_text_document"]
    assert after(torchrun, "--split") == ["99,1,0"]
    assert "--load" not in torchrun and "--mock-data" not in torchrun
    assert "finished: iteration 14000" in proc.stdout


def test_requeued_job_resumes_from_its_own_checkpoint(tmp_path):
    script = render(tmp_path, "stage1", "--checkpoint-root", str(tmp_path / "ckpt"))
    save = tmp_path / "ckpt" / "stage1-lighthouse"
    save.mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("500\n")
    proc, srun, _ = run_job(script, tmp_path, end_iter=14000)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {save} at iteration 500" in proc.stdout
    assert after(srun, "--load") == [str(save)]
    assert after(srun, "--save") == [str(save)]


def test_stage2_starts_from_the_converted_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    script = render(tmp_path, "stage2", "--checkpoint-root", str(root))
    proc, srun, _ = run_job(script, tmp_path)
    assert proc.returncode == 2 and srun is None
    assert f"INIT_CHECKPOINT={root}/stage1-dense holds no checkpoint" in proc.stderr

    (root / "stage1-dense").mkdir(parents=True)
    (root / "stage1-dense" / "latest_checkpointed_iteration.txt").write_text("14000")
    proc, srun, _ = run_job(script, tmp_path, end_iter=16000)
    assert proc.returncode == 0, proc.stderr
    assert f"starting from {root}/stage1-dense at iteration 14000" in proc.stdout
    assert after(srun, "--train-iters") == ["16000"] and "--exit-interval" not in srun
    assert after(srun, "--load") == [f"{root}/stage1-dense"]
    assert after(srun, "--save") == [f"{root}/stage2-dense"]
    assert after(srun, "--attention-impl") == ["dense"]
    assert not any(a.startswith("--lighthouse") for a in srun)
    assert "finished: iteration 16000" in proc.stdout
    # Requeued after a checkpoint, stage 2 resumes its own run instead.
    (root / "stage2-dense" / "latest_checkpointed_iteration.txt").write_text("15000")
    proc, srun, _ = run_job(script, tmp_path, end_iter=16000)
    assert after(srun, "--load") == [f"{root}/stage2-dense"]
    # Requeued after it finished, it trains nothing (and still succeeds).
    proc, srun, _ = run_job(script, tmp_path, end_iter=16000)
    assert proc.returncode == 0 and srun is None
    assert "finished already" in proc.stdout


@pytest.mark.parametrize("end_iter, rc, requeued, message", [
    (14000, 0, False, "finished: iteration 14000"),
    (9000, 0, True, "stopped at iteration 9000 of 14000; requeueing"),
    (16000, 0, False, "finished: iteration 16000"),
    (500, 1, False, "error: training exited without progress"),
])
def test_completion_check(tmp_path, end_iter, rc, requeued, message):
    """afterok must mean trained to TRAIN_ITERS: a clean early stop requeues, no progress fails."""
    script = render(tmp_path, "stage1", "--checkpoint-root", str(tmp_path / "ckpt"))
    save = tmp_path / "ckpt" / "stage1-lighthouse"
    save.mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("500")
    proc, _, scontrol = run_job(script, tmp_path, end_iter=end_iter)
    assert proc.returncode == rc
    assert message in proc.stdout + proc.stderr
    assert ("requeue 4242" in scontrol) == requeued


def test_trainer_engine_and_cpu_job(tmp_path):
    script = render(tmp_path, "stage1", "--engine", "trainer", "--nodes", "1", "--gpus-per-node", "0",
                    "--checkpoint-root", str(tmp_path / "ckpt"),
                    "--nproc-per-node", "2", "--context-parallel-size", "1", "--set", "global_batch_size=4",
                    "--set", "extra_args=--seed 7", "--set", "data_path=")
    assert sbatch_option(script, "gpus-per-node") is None
    assert "##SBATCH --gpus-per-node=" in script.read_text()
    proc, srun, _ = run_job(script, tmp_path, nodes=1, end_iter=14000)
    assert proc.returncode == 0, proc.stderr
    torchrun = srun[srun.index("torchrun"):]
    assert torchrun[1:3] == ["--nnodes=1", "--nproc-per-node=2"]
    assert torchrun[5:8] == ["-m", "lighthouse_megatron.cli", "train"]
    assert "--mock-data" in torchrun and after(torchrun, "--seed") == ["7"]
    # Megatron-LM-only arguments stay out of the trainer's command line.
    assert "--pipeline-model-parallel-size" not in torchrun and "--bf16" not in torchrun


def test_script_checks_an_edited_layout_itself(tmp_path):
    script = tmp_path / "edited.sbatch"
    text = slurm.load_template("stage1").path.read_text()
    script.write_text(text.replace("DATA_PARALLEL_SIZE=auto", "DATA_PARALLEL_SIZE=16"))
    proc, srun, _ = run_job(script, tmp_path, nodes=2)
    assert proc.returncode == 2 and srun is None
    assert "TP x CP x PP x DP = 1 x 2 x 1 x 16 = 32 but the job has 16 processes; DP = 8 fits" in proc.stderr


def test_unedited_template_refuses_to_start(tmp_path):
    for template, setting in (("stage1", "DATA_PATH"), ("convert", "CHECKPOINT_ROOT")):
        proc, srun, _ = run_job(slurm.load_template(template).path, tmp_path)
        assert proc.returncode == 2 and srun is None
        assert f"{setting} is still the template's placeholder /path/to/" in proc.stderr
    script = render(tmp_path, "stage1", "--checkpoint-root", str(tmp_path / "c"), "--data-path", "/d",
                    "--megatron-lm", str(tmp_path / "nothing"))
    proc, srun, _ = run_job(script, tmp_path)
    assert proc.returncode == 2 and srun is None
    assert f"MEGATRON_LM={tmp_path}/nothing is not a Megatron-LM checkout" in proc.stderr


@pytest.mark.parametrize("time, expected", [("04:00:00", "228"), ("1-00:00:00", "1368"), ("30", "20")])
def test_time_limit_sets_the_clean_exit(tmp_path, time, expected):
    script = render(tmp_path, "stage1", "--time", time)
    assert settings(script, "EXIT_DURATION_MINS") == {"EXIT_DURATION_MINS": expected}
    assert sbatch_option(script, "time") == time


def test_values_reach_bash_verbatim(tmp_path):
    odd = "/data/my corpus/$HOME 'quoted'"
    script = render(tmp_path, "stage1", "--data-path", odd, "--set", "lighthouse_dense_layers=0 -1")
    assert settings(script, "DATA_PATH", "LIGHTHOUSE_DENSE_LAYERS", "NPROC_PER_NODE") == {
        "DATA_PATH": odd, "LIGHTHOUSE_DENSE_LAYERS": "0 -1", "NPROC_PER_NODE": "8"}


MEGATRON_LM = os.environ.get("MEGATRON_LM")


@pytest.mark.skipif(not MEGATRON_LM, reason="set MEGATRON_LM=/path/to/Megatron-LM (a checkout or an unpacked "
                    "release snapshot) to parse the templates' commands with Megatron-LM's own parser")
@pytest.mark.parametrize("template", TRAINING)
def test_megatron_lm_parses_the_command(tmp_path, template):
    """Every flag the templates pass exists in Megatron-LM (plus the plugin's) and parses."""
    script = render(tmp_path, template, "--checkpoint-root", str(tmp_path / "ckpt"),
                    "--tensor-model-parallel-size", "2", "--set", "init_checkpoint=",
                    "--set", "exit_duration_mins=60")
    _, srun, _ = run_job(script, tmp_path, end_iter=20000)
    argv = srun[srun.index("lighthouse_megatron.megatron.pretrain_gpt") + 1:]
    prog = (
        "import json, sys\n"
        "from megatron.training.arguments import parse_args\n"
        "from lighthouse_megatron.megatron import add_lighthouse_args\n"
        "sys.argv = ['pretrain_gpt.py'] + json.loads(sys.argv[1])\n"
        "a = parse_args(add_lighthouse_args)\n"
        "print(json.dumps(vars(a), default=str))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{MEGATRON_LM}{os.pathsep}{slurm.TEMPLATE_DIR.parent}"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", prog, json.dumps(argv)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads(proc.stdout.splitlines()[-1])
    v = settings(script, "CONTEXT_PARALLEL_SIZE", "SEQ_LENGTH", "ATTENTION_IMPL", "TRAIN_ITERS")
    assert args["context_parallel_size"] == int(v["CONTEXT_PARALLEL_SIZE"])
    assert args["tensor_model_parallel_size"] == 2 and args["sequence_parallel"] is True
    assert args["seq_length"] == int(v["SEQ_LENGTH"]) and args["train_iters"] == int(v["TRAIN_ITERS"])
    assert args["attention_impl"] == v["ATTENTION_IMPL"]
    assert args["bf16"] and args["use_distributed_optimizer"] and args["exit_signal_handler"]
    assert args["exit_duration_in_mins"] == 60 and args["save"] == after(argv, "--save")[0]
    if v["ATTENTION_IMPL"] == "lighthouse":
        assert args["lighthouse_dense_layers"] == [0, 1, -2, -1]


# -------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("template, args, message", [
    ("stage1", ["--nodes", "1", "--data-parallel-size", "16"],
     "TP x CP x PP x DP = 1 x 2 x 1 x 16 = 32, but the job has 1 node x 8 GPUs = 8 GPUs; "
     "use DP = 4 or 4 nodes"),
    ("stage1", ["--nodes", "2", "--tensor-model-parallel-size", "3"],
     "TP x CP x PP = 3 x 2 x 1 = 6 does not divide the job's 2 nodes x 8 GPUs = 16 GPUs"),
    ("stage1", ["--set", "global_batch_size=20"],
     "global_batch_size 20 must be a multiple of micro_batch_size x DP = 1 x 16 = 16; "
     "nearest valid: 16 or 32"),
    ("1m", ["--set", "lighthouse_topk=1536"],
     "topk=1536 must be a multiple of 2*cp_size*tile_topk=2*8*128=2048"),
    ("stage1", ["--seq-length", "98305"], "seq_length 98305 must be a multiple of 2 x CP = 4"),
    ("stage1", ["--seq-length", "98560"], "sequence length 98560 must be divisible by"),
    ("stage1", ["--set", "lighthouse_dense_layers=0 30"], "dense_layers entry 30 is out of range"),
    ("stage1", ["--tensor-model-parallel-size", "16", "--context-parallel-size", "1"],
     "num_query_groups 8 (and num_attention_heads 8) must be multiples of TP = 16"),
    ("stage1", ["--engine", "trainer"], "engine trainer runs on one node without pipeline parallelism"),
    ("stage1", ["--engine", "deepspeed"], "engine must be one of megatron-lm, trainer, got 'deepspeed'"),
    ("stage1", ["--gpus-per-node", "0", "--nproc-per-node", "2"],
     "a CPU job (gpus_per_node 0) needs engine trainer"),
    ("stage1", ["--nproc-per-node", "4"], "nproc_per_node 4 != gpus_per_node 8"),
    ("stage1", ["--set", "num_layer=2"], "unknown setting 'num_layer'"),
    ("stage1", ["--set", "exit_interval=20000"], "exit_interval 20000 must be <= train_iters 16000"),
    ("stage1", ["--time", "02:00:00", "--set", "exit_duration_mins=120"],
     "exit_duration_mins 120 must be below the time limit (02:00:00 = 120 min)"),
    ("stage1", ["--set", "input=x"], "stage1 has no setting(s) input"),
    ("convert", ["--nodes", "2"], "convert has no setting(s) nodes"),
    ("stage3", [], "unknown template 'stage3'; valid: stage1, convert, stage2, 1m"),
])
def test_bad_settings_are_refused(tmp_path, capsys, template, args, message):
    out = tmp_path / "job.sbatch"
    assert main(["slurm", "render", template, "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_existing_script_needs_force(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    out.write_text("keep me")
    assert main(["slurm", "render", "stage1", "-o", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["slurm", "render", "stage1", "-o", str(out), "--force", "--nodes", "2"]) == 0
    assert sbatch_option(out, "nodes") == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["job.sbatch"]  # no temporary left behind


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lighthouse_megatron.cli", "slurm", "render", "stage1",
         "-o", str(tmp_path / "x"), "--nodes", "3", "--data-parallel-size", "16"],
        capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    # (Importing megatron-core may print warnings first; the error itself is one line.)
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower()] == [
        "error: stage1: TP x CP x PP x DP = 1 x 2 x 1 x 16 = 32, but the job has 3 nodes x 8 GPUs = 24 GPUs; "
        "use DP = 12 or 4 nodes"]


def test_yaml_config_top_level_and_sections(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("nodes: 2\ntrain_iters: 20000\ninput: /elsewhere\nstage1:\n  train_iters: 18000\n"
                   "  time: '02:00:00'\n")
    s1 = render(tmp_path, "stage1", "--config", str(cfg), "--seq-length", "49152")
    s2 = render(tmp_path, "stage2", "--config", str(cfg))
    assert settings(s1, "TRAIN_ITERS", "SEQ_LENGTH") == {"TRAIN_ITERS": "18000", "SEQ_LENGTH": "49152"}
    assert settings(s2, "TRAIN_ITERS") == {"TRAIN_ITERS": "20000"}
    assert sbatch_option(s1, "time") == "02:00:00" and sbatch_option(s2, "time") == "06:00:00"
    assert sbatch_option(s1, "nodes") == sbatch_option(s2, "nodes") == "2"

    cfg.write_text("stage9:\n  nodes: 2\n")
    assert main(["slurm", "render", "stage1", "-o", str(tmp_path / "x"), "--config", str(cfg)]) == 2
    assert "unknown section 'stage9'" in capsys.readouterr().err
    cfg.write_text("stage1:\n  input: x\n")
    assert main(["slurm", "render", "stage1", "-o", str(tmp_path / "x"), "--config", str(cfg)]) == 2
    assert "stage1: unknown setting(s) input" in capsys.readouterr().err


# ---------------------------------------------------------------------------- submit


def test_submit_chains_the_stages_with_afterok(tmp_path, capsys, monkeypatch):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "sbatch").write_text('#!/bin/bash\necho "$*" >> "$STUB_LOG"\n'
                                  'n=$(wc -l < "$STUB_LOG"); echo "$((700 + n));cluster"\n')
    (stubs / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "sbatch.log"))
    out = tmp_path / "jobs"
    assert main(["slurm", "submit", "--output-dir", str(out), "--checkpoint-root", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.split() == ["stage1", "701", "convert", "702", "stage2", "703"]
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert calls == [
        f"--parsable {out}/stage1.sbatch",
        f"--parsable --dependency=afterok:701 --kill-on-invalid-dep=yes {out}/convert.sbatch",
        f"--parsable --dependency=afterok:702 --kill-on-invalid-dep=yes {out}/stage2.sbatch",
    ]
    assert settings(out / "convert.sbatch", "CHECKPOINT_ROOT") == {"CHECKPOINT_ROOT": f"{tmp_path}/c"}
    # A second submit into the same folder is refused unless forced.
    assert main(["slurm", "submit", "--output-dir", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_submit_dry_run_and_failing_sbatch(tmp_path, capsys, monkeypatch):
    assert main(["slurm", "submit", "--output-dir", str(tmp_path / "a"), "--dry-run"]) == 0
    assert "--dependency=afterok:<stage1 job id>" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["convert.sbatch", "stage1.sbatch",
                                                                   "stage2.sbatch"]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "sbatch").write_text('#!/bin/bash\necho "sbatch: error: invalid partition" >&2\nexit 1\n')
    (stubs / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    assert main(["slurm", "submit", "--output-dir", str(tmp_path / "b")]) == 2
    assert "sbatch: error: invalid partition" in capsys.readouterr().err


@pytest.mark.parametrize("config, message", [
    ("stage2:\n  train_iters: 18000\n", "train_iters differs (16000 vs 18000)"),
    ("stage1:\n  exit_interval:\n", "stage1 exit_interval must be set below train_iters 16000 (got none)"),
    ("stage2:\n  exit_interval: 9000\n", "stage2 exit_interval 9000 must be empty or above stage1's 14000"),
    ("convert:\n  input: /other\n", "convert input '/other' is not stage1's save_dir"),
    ("stage2:\n  checkpoint_root: /other\n", "stage2 init_checkpoint '/other/stage1-dense' is not convert's"),
    ("stage2:\n  num_layers: 24\n", "stage1's model and schedule: num_layers differs (30 vs 24)"),
])
def test_submit_refuses_an_inconsistent_chain(tmp_path, capsys, config, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config)
    out = tmp_path / "o"
    assert main(["slurm", "submit", "--output-dir", str(out), "--config", str(cfg), "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_example_recipe_submits(tmp_path, capsys):
    recipe = slurm.TEMPLATE_DIR / "recipe-98k.yaml"
    out = tmp_path / "jobs"
    assert main(["slurm", "submit", "--config", str(recipe), "--output-dir", str(out), "--dry-run",
                 "--log-dir", str(tmp_path / "logs")]) == 0
    s1, s2 = out / "stage1.sbatch", out / "stage2.sbatch"
    assert sbatch_option(s1, "nodes") == "4" and sbatch_option(s1, "partition") == "gpu"
    assert settings(s1, "TRAIN_ITERS", "EXIT_INTERVAL", "DATA_PARALLEL_SIZE") == {
        "TRAIN_ITERS": "16000", "EXIT_INTERVAL": "14000", "DATA_PARALLEL_SIZE": "16"}
    assert settings(s2, "TRAIN_ITERS", "EXIT_INTERVAL") == {"TRAIN_ITERS": "16000", "EXIT_INTERVAL": ""}
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing but the scripts
