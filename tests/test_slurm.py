"""The Slurm launcher (slurm/launch.sbatch) and `lighthouse-megatron slurm render/submit`, without a
Slurm cluster.

The rendered scripts are run by bash with stand-ins for srun, scontrol and sbatch on PATH
that record their arguments, so the launch logic (the package's layout check, resume, the
torchrun command, the completion check) is checked as bash executes it.
tests/test_slurm_cluster.py runs the chain under a real Slurm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lighthouse_megatron import slurm
from lighthouse_megatron.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "lighthouse_megatron" / "recipes"
TRAINING = ("stage1", "stage2", "1m")
REQUIRED = os.environ.get("LIGHTHOUSE_MEGATRON_CI") == "1"  # .ci/run: tools must be there
RECIPE = yaml.safe_load((RECIPES / "98k.yaml").read_text())


def needs_shellcheck():
    if shutil.which("shellcheck"):
        return
    if REQUIRED:
        pytest.fail("shellcheck is missing (.ci/run installs it with apt-get install -y shellcheck)")
    pytest.skip("shellcheck is not installed (Debian: apt-get install -y shellcheck)")


def mlm_checkout(tmp_path: Path) -> Path:
    mlm = tmp_path / "Megatron-LM"
    (mlm / "megatron" / "training").mkdir(parents=True, exist_ok=True)
    return mlm


def render(tmp_path, job, *args, name=None):
    """Render into tmp_path with real-looking paths unless `args` set them (render refuses
    unset ones)."""
    out = tmp_path / (name or f"{job}.sbatch")
    given = " ".join(args)
    defaults = []
    if "--checkpoint-root" not in given:
        defaults += ["--checkpoint-root", str(tmp_path / "ckpt")]
    if job != "convert":
        if "--data-path" not in given and "mock_data" not in given:
            defaults += ["--data-path", "/data/corpus_text_document"]
        if "--megatron-lm" not in given:
            defaults += ["--megatron-lm", str(mlm_checkout(tmp_path))]
    rc = main(["slurm", "render", job, "-o", str(out), "--force", *defaults, *args])
    assert rc == 0
    return out


def settings(script: Path, *names: str) -> dict[str, str | list[str]]:
    """The settings' values as bash sees them (arrays as lists)."""
    lines = script.read_text().splitlines()
    block = lines[lines.index(slurm.SETTINGS_START): lines.index(slurm.SETTINGS_END)]
    prog = "\n".join(block + [f'printf "%s\\0" "${{#{n}[@]}}" "${{{n}[@]}}"' for n in names])
    out = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, check=True).stdout.split("\0")
    values, i = {}, 0
    for n in names:
        count = int(out[i])
        items = out[i + 1: i + 1 + count]
        values[n] = items if n.endswith("_ARGS") else (items[0] if items else "")
        i += 1 + count
    return values


def sbatch_option(script: Path, option: str) -> str | None:
    for line in script.read_text().splitlines():
        if line.startswith(f"#SBATCH --{option}"):
            return line.split("=", 1)[1] if "=" in line else ""
    return None


STUBS = {
    "srun": r"""#!/bin/bash
# The launcher's helper steps (python in a container) are not the training step.
args=("$@")
if [[ " $* " != *" torchrun "* && " $* " != *" convert "* ]]; then
    for i in "${!args[@]}"; do
        if [[ ${args[i]} == python ]]; then exec "${args[@]:i}"; fi
    done
fi
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


def run_job(script: Path, tmp_path: Path, nodes: int = 4, end_iter: int | None = None, gpus: bool = True):
    """Run a rendered script as the batch step of a job on `nodes` nodes of 8 GPUs."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    for f in ("srun.args", "scontrol.log"):
        (stubs / f).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{stubs}:{Path(sys.executable).parent}:{env['PATH']}", STUB_DIR=str(stubs),
               STUB_ROOT=str(tmp_path), STUB_HOSTS=" ".join(f"gpu-{i:02d}" for i in range(nodes)),
               PYTHONPATH=str(REPO), SLURM_JOB_ID="4242", SLURM_JOB_NAME="test",
               SLURM_JOB_NODELIST=f"gpu-[00-{nodes - 1:02d}]", SLURM_JOB_NUM_NODES=str(nodes),
               SLURM_CPUS_ON_NODE="64")
    if gpus:
        env["SLURM_GPUS_PER_NODE"] = "8"
    if end_iter is not None:
        env["STUB_END_ITER"] = str(end_iter)
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    srun = (stubs / "srun.args").read_text().splitlines() if (stubs / "srun.args").exists() else None
    scontrol = (stubs / "scontrol.log").read_text() if (stubs / "scontrol.log").exists() else ""
    return proc, srun, scontrol


def after(args: list[str], flag: str, n: int = 1) -> list[str]:
    i = args.index(flag)
    return args[i + 1: i + 1 + n]


# ---------------------------------------------------------------------- the one launcher


def test_one_launcher_and_no_second_copy_of_the_recipe():
    """The launch logic exists once (the package's launch.sbatch); the jobs are YAML that name the
    recipe instead of repeating its model and schedule."""
    assert sorted(p.name for p in RECIPES.rglob("*.sbatch")) == ["launch.sbatch"]
    schedule = {"lr", "min_lr", "train_iters", "lr_warmup_iters", "lr_decay_style", "global_batch_size",
                "weight_decay", "adam_beta1", "adam_beta2", "clip_grad", "num_layers", "hidden_size",
                "lighthouse_until_iter", "lighthouse_topk", "seq_length"}
    for path in [*(RECIPES / "jobs").glob("*.yaml"), *(REPO / "slurm").glob("*.yaml")]:
        keys = set(yaml.safe_load(path.read_text()))
        assert not keys & schedule, (path.name, keys & schedule)


@pytest.mark.parametrize("job", slurm.JOBS)
@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_every_job_renders(tmp_path, job, nodes):
    args = [] if job == "convert" else ["--nodes", str(nodes), "--data-parallel-size", "auto"]
    if job != "convert" and nodes * 8 < (16 if job == "1m" else 2):
        pytest.skip("layout needs more GPUs")
    if job == "1m" and nodes == 1:
        args += ["--set", "global_batch_size=1"]
    script = render(tmp_path, job, *args)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    if job == "convert":
        assert "GPU" not in "".join(line for line in text.splitlines() if line.startswith("#SBATCH"))
        assert sbatch_option(script, "exclusive") is None and sbatch_option(script, "ntasks") == "1"
        assert "no GPU" in text.splitlines()[1]
    else:
        assert sbatch_option(script, "nodes") == str(nodes)
        cp = 8 if job == "1m" else 2
        # The header says what was rendered, not the default layout.
        assert f"{nodes} node(s) x 8 GPUs, DP {nodes * 8 // cp}" in text.splitlines()[1]
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(script)], check=True)


def test_unrendered_launcher_passes_shellcheck_and_refuses_to_run(tmp_path):
    proc, srun, _ = run_job(slurm.LAUNCHER, tmp_path)
    assert proc.returncode == 2 and srun is None
    assert "unrendered launcher" in proc.stderr
    needs_shellcheck()
    subprocess.run(["shellcheck", str(slurm.LAUNCHER)], check=True)


def test_stage1_runs_the_recipe_to_its_switch_on_every_node(tmp_path):
    script = render(tmp_path, "stage1")
    proc, srun, _ = run_job(script, tmp_path, nodes=4, end_iter=10000)
    assert proc.returncode == 0, proc.stderr
    assert "starting from a random initialisation" in proc.stdout
    srun_opts, torchrun = srun[:srun.index("bash")], srun[srun.index("torchrun"):]
    assert {"--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=64", "--gpus-per-node=8"} <= set(srun_opts)
    assert torchrun[1:5] == ["--nnodes=4", "--nproc-per-node=8", "--master-addr=gpu-00",
                             f"--master-port={20000 + 4242 % 20000}"]
    assert torchrun[5:7] == ["-m", "lighthouse_megatron.megatron_lm.pretrain_gpt"]
    # The recipe's numbers, read from the 98k recipe; stage 1 stops at its switch.
    for key in ("train_iters", "lr_warmup_iters", "lr_decay_style", "global_batch_size", "seq_length",
                "adam_beta2", "weight_decay", "lighthouse_topk"):
        assert after(torchrun, "--" + key.replace("_", "-")) == [str(RECIPE[key])], key
    assert after(torchrun, "--lr") == [str(RECIPE["lr"])]
    assert after(torchrun, "--exit-interval") == [str(RECIPE["lighthouse_until_iter"])]
    assert after(torchrun, "--lighthouse-dense-layers", 4) == ["0", "1", "28", "29"]
    assert after(torchrun, "--context-parallel-size") == ["2"]
    assert after(torchrun, "--pipeline-model-parallel-size") == ["1"]
    assert after(torchrun, "--attention-dropout") == ["0.0"] and "--disable-bias-linear" in torchrun
    assert after(torchrun, "--save") == [f"{tmp_path}/ckpt/stage1-lighthouse"]
    assert after(torchrun, "--data-path") == ["/data/corpus_text_document"]
    # Byte-level data: NullTokenizer with the vocabulary of the megatron-core that runs.
    from lighthouse_megatron.data import byte_vocab_size

    assert after(torchrun, "--tokenizer-type", 3) == ["NullTokenizer", "--vocab-size", str(byte_vocab_size())]
    assert "--load" not in torchrun and "--mock-data" not in torchrun
    assert "finished: iteration 10000" in proc.stdout and "DP 16" in proc.stdout


def test_requeued_job_resumes_from_its_own_checkpoint(tmp_path):
    script = render(tmp_path, "stage1")
    save = tmp_path / "ckpt" / "stage1-lighthouse"
    save.mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("500\n")
    proc, srun, _ = run_job(script, tmp_path, end_iter=10000)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {save} at iteration 500" in proc.stdout
    assert after(srun, "--load") == [str(save)] and after(srun, "--save") == [str(save)]


def test_stage2_starts_from_the_converted_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    script = render(tmp_path, "stage2")
    proc, srun, _ = run_job(script, tmp_path)
    assert proc.returncode == 2 and srun is None
    assert f"INIT_CHECKPOINT={root}/stage1-dense holds no checkpoint" in proc.stderr

    (root / "stage1-dense").mkdir(parents=True)
    (root / "stage1-dense" / "latest_checkpointed_iteration.txt").write_text("10000")
    proc, srun, _ = run_job(script, tmp_path, end_iter=16000)
    assert proc.returncode == 0, proc.stderr
    assert f"starting from {root}/stage1-dense at iteration 10000" in proc.stdout
    assert after(srun, "--train-iters") == ["16000"] and "--exit-interval" not in srun
    assert after(srun, "--load") == [f"{root}/stage1-dense"]
    assert after(srun, "--save") == [f"{root}/stage2-dense"]
    assert after(srun, "--attention-impl") == ["dense"]
    assert not any(a.startswith("--lighthouse") for a in srun)
    assert after(srun, "--lr-decay-style") == ["constant"]  # the same schedule, continued
    assert "finished: iteration 16000" in proc.stdout
    (root / "stage2-dense" / "latest_checkpointed_iteration.txt").write_text("15000")
    proc, srun, _ = run_job(script, tmp_path, end_iter=16000)
    assert after(srun, "--load") == [f"{root}/stage2-dense"]
    proc, srun, _ = run_job(script, tmp_path, end_iter=16000)
    assert proc.returncode == 0 and srun is None and "finished already" in proc.stdout


@pytest.mark.parametrize("end_iter, rc, requeued, message", [
    (10000, 0, False, "finished: iteration 10000"),
    (9000, 0, True, "stopped at iteration 9000 of 10000; requeueing"),
    (500, 1, False, "error: training exited without progress"),
])
def test_completion_check(tmp_path, end_iter, rc, requeued, message):
    """afterok must mean trained to the target: a clean early stop requeues, no progress fails."""
    script = render(tmp_path, "stage1")
    save = tmp_path / "ckpt" / "stage1-lighthouse"
    save.mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("500")
    proc, _, scontrol = run_job(script, tmp_path, end_iter=end_iter)
    assert proc.returncode == rc
    assert message in proc.stdout + proc.stderr
    assert ("requeue 4242" in scontrol) == requeued


def test_trainer_engine_and_cpu_job(tmp_path):
    script = render(tmp_path, "stage1", "--engine", "trainer", "--nodes", "1", "--gpus-per-node", "0",
                    "--nproc-per-node", "2", "--context-parallel-size", "1", "--set", "global_batch_size=4",
                    "--set", "extra_args=--seed 7", "--set", "mock_data=true", "--set", "bf16=null")
    assert sbatch_option(script, "gpus-per-node") is None
    proc, srun, _ = run_job(script, tmp_path, nodes=1, end_iter=10000, gpus=False)
    assert proc.returncode == 0, proc.stderr
    torchrun = srun[srun.index("torchrun"):]
    assert torchrun[1:3] == ["--nnodes=1", "--nproc-per-node=2"]
    assert torchrun[5:8] == ["-m", "lighthouse_megatron.cli", "train"]
    assert "--mock-data" in torchrun and after(torchrun, "--seed") == ["7"]
    # Megatron-LM-only arguments stay out of the trainer's command line.
    assert "--pipeline-model-parallel-size" not in torchrun and "--tokenizer-type" not in torchrun
    # The trainer takes every training flag the launcher gives it.
    from lighthouse_megatron.settings.train import build_parser

    build_parser().parse_args(torchrun[8:])


def test_launcher_checks_the_layout_with_the_package(tmp_path):
    """A job that got other nodes than rendered for (or an edited script) fails before torchrun,
    with the package's message."""
    script = render(tmp_path, "stage1", "--data-parallel-size", "16")
    proc, srun, _ = run_job(script, tmp_path, nodes=2)
    assert proc.returncode == 2 and srun is None
    assert ("TP x CP x PP x DP = 1 x 2 x 1 x 16 = 32, but the job has 2 nodes x 8 GPUs = 16 GPUs; "
            "DP = 8 fits") in proc.stderr


def test_missing_megatron_lm_checkout_stops_the_job(tmp_path):
    script = render(tmp_path, "stage1", "--megatron-lm", str(tmp_path / "nothing"))
    proc, srun, _ = run_job(script, tmp_path)
    assert proc.returncode == 2 and srun is None
    assert f"MEGATRON_LM={tmp_path}/nothing is not a Megatron-LM checkout" in proc.stderr


@pytest.mark.parametrize("time, expected", [("04:00:00", "228"), ("1-00:00:00", "1368"), ("30", "20"),
                                            ("90:00", "80"), ("11", "1"), ("1-00:30:30", "1398"), ("0", "0")])
def test_time_limit_sets_the_clean_exit(tmp_path, time, expected):
    script = render(tmp_path, "stage1", "--time", time)
    assert settings(script, "EXIT_DURATION_MINS") == {"EXIT_DURATION_MINS": expected}
    assert sbatch_option(script, "time") == time


@pytest.mark.parametrize("time", ["tomorrow", "1h", "24:00:00:00", "-5", "2-"])
def test_a_time_limit_slurm_cannot_read_is_refused(tmp_path, capsys, time):
    """`--time tomorrow` wrote `#SBATCH --time=tomorrow` and a clean-exit margin of 0."""
    out = tmp_path / "job.sbatch"
    assert main(["slurm", "render", "stage1", "-o", str(out), "--checkpoint-root", "/c", "--megatron-lm",
                 "/m", "--data-path", "/d", "--time", time]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: stage1: time {time!r} is not a Slurm time limit; use one of MINUTES, "
                   "MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, DAYS-HOURS:MINUTES, "
                   "DAYS-HOURS:MINUTES:SECONDS (e.g. 24:00:00 or 2-00:00:00)"]
    assert not out.exists()


TIME_FORMATS = ("use one of MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, DAYS-HOURS:MINUTES, "
                "DAYS-HOURS:MINUTES:SECONDS (e.g. 24:00:00 or 2-00:00:00)")


@pytest.mark.parametrize("job, time, message", [
    # Slurm reads 25:99:99 as 26:40:39; a field after the first beyond its unit is a typo.
    ("stage1", "25:99:99", "time '25:99:99' is not a Slurm time limit (minutes 99 must be below 60, "
                           f"seconds 99 must be below 60); {TIME_FORMATS}"),
    ("stage1", "1-25", f"time '1-25' is not a Slurm time limit (hours 25 must be below 24); {TIME_FORMATS}"),
    ("stage1", "2-00:60", "time '2-00:60' is not a Slurm time limit (minutes 60 must be below 60); "
                          f"{TIME_FORMATS}"),
    # MINUTES:SECONDS under an hour: 1:00 and 12:00 are minutes to Slurm, hours to the user.
    ("stage1", "1:00", "time '1:00' is 1 minute to Slurm, which reads MINUTES:SECONDS; did you mean 1:00:00? "
                       "(or 1 for 1 minute)"),
    ("convert", "12:00", "time '12:00' is 12 minutes to Slurm, which reads MINUTES:SECONDS; did you mean "
                         "12:00:00? (or 12 for 12 minutes)"),
    ("stage1", "0:30", "time '0:30' is 0 minutes 30 seconds to Slurm, which reads MINUTES:SECONDS; did you "
                       "mean 0:30:00?"),
    # No time to train before the clean exit (it blamed exit_duration_mins, which was not given).
    ("stage1", "10", "time '10' is 10 minutes: a train job needs more than 10 (Megatron-LM saves and exits "
                     "10 minutes before the limit; set exit_duration_mins for a shorter margin)"),
])
def test_a_time_limit_that_is_a_typo_is_refused(tmp_path, capsys, job, time, message):
    out = tmp_path / "job.sbatch"
    site = SITE if job != "convert" else SITE[:2]
    assert main(["slurm", "render", job, "-o", str(out), *site, "--time", time]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {job}: {message}"]
    assert not out.exists()


def test_a_short_time_limit_with_its_own_clean_exit(tmp_path):
    """A short test job sets its own margin: the limit is then only checked against it."""
    script = render(tmp_path, "stage1", "--time", "5", "--set", "exit_duration_mins=3")
    assert settings(script, "EXIT_DURATION_MINS") == {"EXIT_DURATION_MINS": "3"}


def test_an_unquoted_time_in_yaml_stays_a_time(tmp_path):
    """YAML 1.1 reads `time: 1:00:00` as the base-60 number 3600, which Slurm would read as
    3600 minutes; the settings reader keeps it as written (in job files, --config and --set)."""
    cfg = tmp_path / "site.yaml"
    cfg.write_text("time: 1:00:00\n")
    script = render(tmp_path, "stage1", "--config", str(cfg), name="a.sbatch")
    assert sbatch_option(script, "time") == "1:00:00"
    assert settings(script, "EXIT_DURATION_MINS") == {"EXIT_DURATION_MINS": "50"}
    script = render(tmp_path, "stage1", "--set", "time=2:30:00", name="b.sbatch")
    assert sbatch_option(script, "time") == "2:30:00"


def test_recipe_values_are_typed_by_their_setting(tmp_path, capsys):
    """A recipe's values are typed as the trainer types them: `train_iters: 1e4` (a string to
    YAML 1.1) is 10000, and `swiglu: "false"` (which reached the job as `--swiglu false`, an
    argparse error on the cluster) is refused at render."""
    recipe = tmp_path / "recipe.yaml"
    base = (RECIPES / "98k.yaml").read_text()
    recipe.write_text(base.replace("train_iters: 16000", "train_iters: 1.6e4")
                      .replace("lr: 2.0e-3", "lr: 2e-3"))
    job = tmp_path / "job.yaml"
    job.write_text(f"job: train\nrecipe: {recipe}\nnodes: 4\ngpus_per_node: 8\ncontext_parallel_size: 2\n"
                   "save_dir: s\n")
    script = render(tmp_path, str(job))
    args = settings(script, "TRAIN_ARGS")["TRAIN_ARGS"]
    assert after(args, "--train-iters") == ["16000"] and after(args, "--lr") == ["0.002"]
    recipe.write_text(base.replace("swiglu: true", 'swiglu: "false"'))
    out = tmp_path / "x.sbatch"
    assert main(["slurm", "render", str(job), "-o", str(out), "--checkpoint-root", "/c", "--megatron-lm",
                 "/m", "--data-path", "/d"]) == 2
    assert "swiglu: false is not supported in a Slurm job" in capsys.readouterr().err
    assert not out.exists()


def test_values_reach_bash_verbatim(tmp_path):
    odd = "/data/my corpus/$HOME 'quoted'"
    script = render(tmp_path, "stage1", "--data-path", odd, "--set", "lighthouse_dense_layers=[0, -1]",
                    "--venv", odd, "--checkpoint-root", f"{tmp_path}/my ckpt; $(touch x)")
    args = settings(script, "TRAIN_ARGS")["TRAIN_ARGS"]
    assert after(args, "--data-path") == [odd] and after(args, "--lighthouse-dense-layers", 2) == ["0", "-1"]
    assert settings(script, "VENV", "SAVE_DIR") == {
        "VENV": odd, "SAVE_DIR": f"{tmp_path}/my ckpt; $(touch x)/stage1-lighthouse"}
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["--account", "a b"],
     "account 'a b' cannot go into an #SBATCH line; use letters, digits, '.', '_', '+' and '-' only"),
    (["--set", "job_name=my job; rm -rf x"],
     "job_name 'my job; rm -rf x' cannot go into an #SBATCH line; use letters, digits, '.', '_', '+' and '-' "
     "only"),
    (["--set", "job_name=runs/a"], "job_name 'runs/a' cannot go into an #SBATCH line"),
    (["--partition", "gpu\n#SBATCH --qos=high"],
     "partition 'gpu\\n#SBATCH --qos=high' cannot go into an #SBATCH line; use letters, digits, '.', '_', "
     "'+' and '-' (a list: comma-separated) only"),
    (["--partition", "gpu", "--convert-partition", 'cpu"'], "convert_partition 'cpu\"' cannot go into an"),
    (["--log-dir", "/shared/my logs"],
     "log_dir '/shared/my logs' cannot go into an #SBATCH line; use a path of letters, digits and "
     "/ . _ + , : = @ - only"),
    (["--log-dir", "/shared/logs#1"], "log_dir '/shared/logs#1' cannot go into an #SBATCH line"),
])
def test_sbatch_header_values_are_one_word(tmp_path, capsys, args, message):
    """#SBATCH lines are not shell: sbatch splits them at blanks and cuts them at '#', and a line
    break would start another option. Such values were written raw."""
    out = tmp_path / "job.sbatch"
    assert main(["slurm", "render", "stage1", "-o", str(out), *SITE, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: stage1: {message}") and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "shared").exists()


def test_sbatch_header_names_and_the_derived_job_name(tmp_path, capsys):
    script = render(tmp_path, "stage1", "--partition", "gpu,gpu-long", "--account", "proj_1.x",
                    "--set", "job_name=s1+run")
    assert sbatch_option(script, "partition") == "gpu,gpu-long"
    assert sbatch_option(script, "account") == "proj_1.x" and sbatch_option(script, "job-name") == "s1+run"
    # A job file's name is the job name unless job_name is set; a line break in its folder's name
    # stays inside the header comment.
    folder = tmp_path / "odd\ntouch pwned"
    folder.mkdir()
    job = folder / "my job.yaml"
    job.write_text("job: train\nrecipe: 98k\nnodes: 4\ngpus_per_node: 8\ncontext_parallel_size: 2\n"
                   "save_dir: s\n")
    out = tmp_path / "x.sbatch"
    assert main(["slurm", "render", str(job), "-o", str(out), *SITE]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: my job: job_name 'lighthouse-my job' (lighthouse- and the job file's name; set job_name) "
        "cannot go into an #SBATCH line; use letters, digits, '.', '_', '+' and '-' only"]
    script = render(tmp_path, str(job), "--set", "job_name=mine")
    assert sbatch_option(script, "job-name") == "mine"
    assert not any(line.startswith("touch") for line in script.read_text().splitlines())


def megatron_lm_tree() -> str:
    """$MEGATRON_LM, else the unpacked snapshot (.ci/run's) that matches the installed megatron-core
    (its megatron.training parses with that core only)."""
    if os.environ.get("MEGATRON_LM"):
        return os.environ["MEGATRON_LM"]
    from .test_patches import snapshot

    core = pytest.importorskip("megatron.core")
    tag = f"core_v{core.__version__}"
    if tag not in ("core_v0.16.1", "core_v0.19.0"):
        pytest.skip(f"megatron-core {core.__version__} has no snapshot here: "
                    "set MEGATRON_LM=/path/to/Megatron-LM")
    return str(snapshot(tag))


@pytest.mark.parametrize("job", [j if j == "stage1" else pytest.param(j, marks=pytest.mark.slow)
                                 for j in TRAINING])
def test_megatron_lm_parses_the_command(tmp_path, job):
    """Every flag the launcher passes exists in Megatron-LM (plus the plugin's) and parses."""
    tree = megatron_lm_tree()
    script = render(tmp_path, job, "--megatron-lm", tree, "--tensor-model-parallel-size", "2",
                    "--set", "exit_duration_mins=60", "--set", "init_checkpoint=")
    _, srun, _ = run_job(script, tmp_path, end_iter=20000)
    argv = srun[srun.index("lighthouse_megatron.megatron_lm.pretrain_gpt") + 1:]
    prog = (
        "import json, sys\n"
        "from megatron.training.arguments import parse_args\n"
        "from lighthouse_megatron.megatron import add_lighthouse_args\n"
        "sys.argv = ['pretrain_gpt.py'] + json.loads(sys.argv[1])\n"
        "a = parse_args(add_lighthouse_args)\n"
        "print(json.dumps(vars(a), default=str))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", prog, json.dumps(argv)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads(proc.stdout.splitlines()[-1])
    recipe = yaml.safe_load((RECIPES / ("1m-cp8.yaml" if job == "1m" else "98k.yaml")).read_text())
    assert args["tensor_model_parallel_size"] == 2
    for key in ("seq_length", "train_iters", "lr", "lr_warmup_iters", "lr_decay_style", "global_batch_size"):
        assert args[key] == recipe[key], key
    assert args["attention_impl"] == ("dense" if job == "stage2" else "lighthouse")
    assert args["bf16"] and args["use_distributed_optimizer"] and args["exit_signal_handler"]
    assert args["exit_duration_in_mins"] == 60 and args["save"] == after(argv, "--save")[0]


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("job, args, message", [
    ("stage1", ["--nodes", "1", "--data-parallel-size", "16"],
     "TP x CP x PP x DP = 1 x 2 x 1 x 16 = 32, but the job has 1 node x 8 GPUs = 8 GPUs; DP = 4 fits"),
    ("stage1", ["--nodes", "2", "--tensor-model-parallel-size", "3"],
     "TP x CP x PP = 3 x 2 x 1 = 6 does not divide the job's 2 nodes x 8 GPUs = 16 GPUs"),
    ("stage1", ["--set", "global_batch_size=20"],
     "global_batch_size 20 must be a multiple of micro_batch_size x DP = 1 x 16 = 16; "
     "nearest valid: 16 or 32"),
    ("1m", ["--set", "lighthouse_topk=1536"],
     "topk=1536 must be a multiple of 2*cp_size*tile_topk=2*8*128=2048"),
    ("stage1", ["--seq-length", "98305"], "seq_length 98305 must be a multiple of 2 x CP = 4"),
    ("stage1", ["--seq-length", "98560"], "sequence length 98560 must be divisible by"),
    ("stage1", ["--set", "lighthouse_dense_layers=[0, 30]"], "dense_layers entry 30 is out of range"),
    ("stage1", ["--tensor-model-parallel-size", "16", "--context-parallel-size", "1"],
     "num_query_groups 8 (and num_attention_heads 8) must be multiples of TP = 16"),
    ("stage1", ["--engine", "trainer"], "engine trainer runs on one node without pipeline parallelism"),
    ("stage1", ["--engine", "deepspeed"], "engine must be one of megatron-lm, trainer, got 'deepspeed'"),
    ("stage1", ["--gpus-per-node", "0", "--nproc-per-node", "2"], "a CPU job (gpus_per_node 0) needs engine "
                                                                   "trainer"),
    ("stage1", ["--nproc-per-node", "4"], "nproc_per_node 4 != gpus_per_node 8"),
    ("stage1", ["--set", "num_layer=2"], "unknown setting 'num_layer' (did you mean 'num_layers'?)"),
    ("stage1", ["--set", "exit_interval=20000"], "exit_interval 20000 must be <= train_iters 16000"),
    ("stage1", ["--time", "02:00:00", "--set", "exit_duration_mins=120"],
     "exit_duration_mins 120 must be below the time limit (02:00:00 = 120 min)"),
    ("stage1", ["--set", "input=x"], "a train job has no setting(s) input"),
    ("convert", ["--set", "nodes=2"], "a convert job has no setting(s) nodes"),
    ("stage3", [], "unknown job 'stage3'; valid: stage1, convert, stage2, 1m"),
    ("stage1", ["--tokenizer", "meta-llama/Meta-Llama-3-8B"],
     "must be 'bytes' or a local Hugging Face tokenizer folder (the compute nodes cannot download"),
    ("stage1", ["--data-path", "/path/to/data/corpus"],
     "data_path=/path/to/data/corpus: still a placeholder"),
    ("stage1", ["--megatron-lm", ""], "megatron_lm not set"),
    ("convert", ["--checkpoint-root", ""], "checkpoint_root not set"),
    ("stage2", ["--set", "stop_at_switch=true"], "stop_at_switch needs attention_impl lighthouse"),
])
def test_bad_settings_are_refused(tmp_path, capsys, job, args, message):
    out = tmp_path / "job.sbatch"
    defaults = ["--checkpoint-root", "/c"]
    if job != "convert":
        defaults += ["--data-path", "/data/x", "--megatron-lm", "/m"]
    assert main(["slurm", "render", job, "-o", str(out), *defaults, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_placeholders_only_with_allow_placeholders(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    assert main(["slurm", "render", "stage1", "-o", str(out)]) == 2
    assert "checkpoint_root, data_path, megatron_lm not set" in capsys.readouterr().err
    assert main(["slurm", "render", "stage1", "-o", str(out), "--allow-placeholders"]) == 0
    assert out.exists()


def test_tokenizer_is_checked_against_the_dataset(tmp_path, capsys):
    from lighthouse_megatron.data import prepare_data

    (tmp_path / "doc.txt").write_text("some text\n" * 10)
    prefix = prepare_data([tmp_path / "doc.txt"], tmp_path / "bytes").prefix
    render(tmp_path, "stage1", "--data-path", prefix, "--tokenizer", "bytes")
    # A dataset of other tokens (ids above 256, int32): not byte-level.
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    other = str(tmp_path / "other")
    builder = IndexedDatasetBuilder(other + ".bin", dtype=np.int32)
    builder.add_document(np.array([5, 70000, 2], dtype=np.int32), [3])
    builder.finalize(other + ".idx")
    out = tmp_path / "x.sbatch"
    assert main(["slurm", "render", "stage1", "-o", str(out), "--data-path", other, "--megatron-lm", "/m",
                 "--checkpoint-root", "/c"]) == 2
    assert "not written with byte tokens" in capsys.readouterr().err
    tok = tmp_path / "tok"
    tok.mkdir()
    assert main(["slurm", "render", "stage1", "-o", str(out), "--data-path", prefix, "--megatron-lm", "/m",
                 "--checkpoint-root", "/c", "--tokenizer", str(tok)]) == 2
    assert "holds byte-level tokens" in capsys.readouterr().err
    script = render(tmp_path, "stage1", "--data-path", other, "--tokenizer", str(tok), name="hf.sbatch")
    proc, srun, _ = run_job(script, tmp_path, end_iter=10000)
    assert after(srun, "--tokenizer-type", 3) == ["HuggingFaceTokenizer", "--tokenizer-model", str(tok)]


def test_existing_script_needs_force(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    out.write_text("keep me")
    base = ["slurm", "render", "stage1", "-o", str(out), "--checkpoint-root", "/c", "--megatron-lm", "/m",
            "--data-path", "/d"]
    assert main(base) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main([*base, "--force", "--nodes", "2"]) == 0
    assert sbatch_option(out, "nodes") == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["job.sbatch"]  # no temporary left behind


def test_render_refused_leaves_neither_script_nor_log_folder(tmp_path, capsys):
    """The log folder is made before the script is written (a log folder that cannot be made left
    the script behind), and removed again when the script cannot be written."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "job.sbatch"
    base = ["slurm", "render", "stage1", "-o", str(out), *SITE]
    assert main([*base, "--log-dir", str(tmp_path / "file" / "logs")]) == 2
    assert f"error: log_dir {tmp_path}/file/logs: " in capsys.readouterr().err
    assert not out.exists()
    out.write_text("keep me")
    assert main([*base, "--log-dir", str(tmp_path / "logs" / "98k")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "keep me" and not (tmp_path / "logs").exists()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lighthouse_megatron.cli", "slurm", "render", "stage1", "-o",
         str(tmp_path / "x"), "--nodes", "3", "--data-parallel-size", "16", "--checkpoint-root", "/c",
         "--megatron-lm", "/m", "--data-path", "/d"],
        capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower()] == [
        "error: stage1: TP x CP x PP x DP = 1 x 2 x 1 x 16 = 32, but the job has 3 nodes x 8 GPUs = 24 GPUs; "
        "DP = 12 fits"]


def test_yaml_config_top_level_and_sections(tmp_path, capsys):
    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"nodes: 2\ncheckpoint_root: {tmp_path}/c\nmegatron_lm: /m\ndata_path: /d\n"
                   "stage1:\n  train_iters: 18000\n  time: '02:00:00'\n")
    s1 = render(tmp_path, "stage1", "--config", str(cfg), "--seq-length", "49152")
    s2 = render(tmp_path, "stage2", "--config", str(cfg))
    a1, a2 = settings(s1, "TRAIN_ARGS")["TRAIN_ARGS"], settings(s2, "TRAIN_ARGS")["TRAIN_ARGS"]
    assert after(a1, "--train-iters") == ["18000"] and after(a1, "--seq-length") == ["49152"]
    assert after(a2, "--train-iters") == ["16000"]
    assert sbatch_option(s1, "time") == "02:00:00" and sbatch_option(s2, "time") == "12:00:00"
    assert sbatch_option(s1, "nodes") == sbatch_option(s2, "nodes") == "2"
    cfg.write_text("stage9:\n  nodes: 2\n")
    assert main(["slurm", "render", "stage1", "-o", str(tmp_path / "x"), "--config", str(cfg)]) == 2
    assert "unknown section 'stage9'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ submit


REFUSED = "sbatch: error: Batch job submission failed: Invalid partition name specified"
SLURM_STUBS = {
    # Job ids 701, 702, ... in submission order; the STUB_SBATCH_FAILS-th submission is refused.
    "sbatch": r"""#!/bin/bash
echo "$*" >> "$STUB_LOG"
n=$(wc -l < "$STUB_LOG")
if [[ $n == "${STUB_SBATCH_FAILS:-0}" ]]; then
    echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
    exit 1
fi
echo "$((700 + n));cluster"
""",
    "scancel": r"""#!/bin/bash
echo "$*" >> "$STUB_LOG.scancel"
if [[ -n ${STUB_SCANCEL_FAILS:-} ]]; then
    echo "scancel: error: Unable to contact slurm controller" >&2
    exit 1
fi
""",
}


def fake_slurm(tmp_path: Path, monkeypatch, **env: str) -> Path:
    """sbatch and scancel stand-ins on PATH, logging their arguments to the returned file (sbatch)
    and that file + .scancel."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in SLURM_STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "sbatch.log"
    log.unlink(missing_ok=True)
    monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    for key in ("STUB_SBATCH_FAILS", "STUB_SCANCEL_FAILS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return log


SITE = ["--checkpoint-root", "/c", "--megatron-lm", "/m", "--data-path", "/d"]


def test_submit_chains_the_stages_with_afterok(tmp_path, capsys, monkeypatch):
    fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "jobs"
    assert main(["slurm", "submit", "--output-dir", str(out), *SITE]) == 0
    assert capsys.readouterr().out.split() == ["stage1", "701", "convert", "702", "stage2", "703"]
    assert (tmp_path / "sbatch.log").read_text().splitlines() == [
        f"--parsable {out}/stage1.sbatch",
        f"--parsable --dependency=afterok:701 --kill-on-invalid-dep=yes {out}/convert.sbatch",
        f"--parsable --dependency=afterok:702 --kill-on-invalid-dep=yes {out}/stage2.sbatch",
    ]
    assert settings(out / "convert.sbatch", "CONVERT_INPUT") == {"CONVERT_INPUT": "/c/stage1-lighthouse"}
    assert main(["slurm", "submit", "--output-dir", str(out), *SITE]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_submit_dry_run_and_failing_sbatch(tmp_path, capsys, monkeypatch):
    assert main(["slurm", "submit", "--output-dir", str(tmp_path / "a"), "--dry-run", *SITE]) == 0
    assert "--dependency=afterok:<stage1 job id>" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["convert.sbatch", "stage1.sbatch",
                                                                   "stage2.sbatch"]
    fake_slurm(tmp_path, monkeypatch, STUB_SBATCH_FAILS="1")
    assert main(["slurm", "submit", "--output-dir", str(tmp_path / "b"), *SITE]) == 2
    assert "Invalid partition name specified" in capsys.readouterr().err


def test_submit_refused_at_the_first_job_leaves_nothing(tmp_path, capsys, monkeypatch):
    """sbatch exists but refuses stage 1 (no Slurm configuration, a bad partition): nothing was
    submitted, so nothing is left written either, and the rerun needs no --force. Scripts that
    --force was to replace keep their text."""
    log = fake_slurm(tmp_path, monkeypatch, STUB_SBATCH_FAILS="1")
    out, logs = tmp_path / "jobs", tmp_path / "logs" / "98k"
    cmd = ["slurm", "submit", "--output-dir", str(out), "--log-dir", str(logs), *SITE]
    assert main(cmd) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: sbatch {out}/stage1.sbatch failed ({REFUSED}): nothing is left queued or written"]
    assert not out.exists() and not (tmp_path / "logs").exists()
    assert not Path(f"{log}.scancel").exists()
    out.mkdir()
    (out / "stage1.sbatch").write_text("the old stage 1")
    fake_slurm(tmp_path, monkeypatch, STUB_SBATCH_FAILS="1")
    assert main([*cmd, "--force"]) == 2
    capsys.readouterr()
    assert [p.name for p in out.iterdir()] == ["stage1.sbatch"]
    assert (out / "stage1.sbatch").read_text() == "the old stage 1"
    fake_slurm(tmp_path, monkeypatch)
    assert main([*cmd, "--force"]) == 0
    assert capsys.readouterr().out.split() == ["stage1", "701", "convert", "702", "stage2", "703"]


def test_submit_refused_mid_chain_cancels_what_it_submitted(tmp_path, capsys, monkeypatch):
    """sbatch takes stage 1 and refuses the conversion: stage 1 would train with nothing after it,
    and a rerun would queue it twice (two jobs writing one checkpoint folder). It is cancelled."""
    log = fake_slurm(tmp_path, monkeypatch, STUB_SBATCH_FAILS="2")
    out = tmp_path / "jobs"
    assert main(["slurm", "submit", "--output-dir", str(out), *SITE]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: sbatch {out}/convert.sbatch failed ({REFUSED}); cancelled the jobs it had submitted "
        "(stage1 701): nothing is left queued or written"]
    assert Path(f"{log}.scancel").read_text() == "701\n"
    assert not out.exists()
    fake_slurm(tmp_path, monkeypatch)
    assert main(["slurm", "submit", "--output-dir", str(out), *SITE]) == 0


def test_submit_says_which_jobs_stay_queued_when_scancel_fails(tmp_path, capsys, monkeypatch):
    log = fake_slurm(tmp_path, monkeypatch, STUB_SBATCH_FAILS="3", STUB_SCANCEL_FAILS="1")
    out = tmp_path / "jobs"
    assert main(["slurm", "submit", "--output-dir", str(out), *SITE]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: sbatch {out}/stage2.sbatch failed ({REFUSED}); stage1 701, convert 702 stay(s) queued, as "
        "scancel failed (scancel: error: Unable to contact slurm controller): cancel them (scancel 701 702) "
        f"before you submit again; the scripts stay in {out}"]
    assert Path(f"{log}.scancel").read_text() == "701 702\n"
    assert sorted(p.name for p in out.iterdir()) == ["convert.sbatch", "stage1.sbatch", "stage2.sbatch"]


@pytest.mark.parametrize("config, message", [
    ("stage2:\n  train_iters: 18000\n", "train_iters differs (16000 vs 18000)"),
    ("stage2:\n  lr: 1.0e-3\n", "lr differs (0.002 vs 0.001)"),
    ("stage1:\n  exit_interval: 16000\n", "stage1 must stop below train_iters 16000"),
    ("convert:\n  input: /other\n", "convert input '/other' is not stage1's save_dir"),
    ("stage2:\n  init_checkpoint: /other/stage1-dense\n",
     "stage2 init_checkpoint '/other/stage1-dense' is not convert's"),
    ("stage2:\n  num_layers: 24\n", "stage1's model and schedule: num_layers differs (30 vs 24)"),
])
def test_submit_refuses_an_inconsistent_chain(tmp_path, capsys, config, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config)
    out = tmp_path / "o"
    assert main(["slurm", "submit", "--output-dir", str(out), "--config", str(cfg), "--dry-run", *SITE]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_example_chain_submits(tmp_path, capsys):
    out = tmp_path / "jobs"
    assert main(["slurm", "submit", "--config", str(REPO / "slurm" / "chain-98k.yaml"), "--output-dir",
                 str(out), "--dry-run", "--log-dir", str(tmp_path / "logs")]) == 0
    s1, conv, s2 = out / "stage1.sbatch", out / "convert.sbatch", out / "stage2.sbatch"
    assert sbatch_option(s1, "nodes") == "4" and sbatch_option(s1, "partition") == "gpu"
    assert sbatch_option(conv, "partition") == "cpu" and sbatch_option(conv, "exclusive") is None
    a1, a2 = settings(s1, "TRAIN_ARGS")["TRAIN_ARGS"], settings(s2, "TRAIN_ARGS")["TRAIN_ARGS"]
    assert after(a1, "--exit-interval") == ["10000"] and after(a1, "--train-iters") == ["16000"]
    assert "--exit-interval" not in a2 and after(a2, "--train-iters") == ["16000"]
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing but the scripts
