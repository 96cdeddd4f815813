"""The launcher filled for one job: its #SBATCH header and a generated settings block (bash
variables and arrays) between two marker lines. Bash reads the values as they are; nothing is
parsed back. Scripts are written atomically and never over an existing one without force."""

from __future__ import annotations

import datetime
import os
import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import recipes
from ..settings.files import writable_dir_problem
from ..settings.train import as_flags
from .jobs import CHAIN, Job, Resolved, check_chain, load_job, resolve, values_for

LAUNCHER = recipes.launcher()
SETTINGS_START = "# ---- settings (written by lighthouse-megatron slurm render) ----"
SETTINGS_END = "# ---- end of settings ----"


def _bash(value: Any) -> str:
    text = str(value)
    if "," in text and shlex.quote(text) == text:
        return f"'{text}'"  # an unquoted comma in an array reads as a typo to shellcheck (SC2054)
    return shlex.quote(text) if text else "''"


def _words(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return shlex.split(str(value or ""))


def render(job: Job, values: Mapping[str, Any] = {}, *, allow_placeholders: bool = False) -> str:
    """The launcher with this job's header and settings."""
    return render_resolved(resolve(job, values, allow_placeholders=allow_placeholders))


def _header(r: Resolved) -> list[str]:
    launch = r.launch
    output = f"{launch.log_dir}/%x-%j.out" if launch.log_dir else "%x-%j.out"
    sbatch = [f"--job-name={launch.job_name}"]
    if r.kind == "train":
        gpus = launch.gpus_per_node
        sbatch += [f"--nodes={launch.nodes}", "--ntasks-per-node=1"]
        sbatch += [f"--gpus-per-node={gpus}"] if gpus else []
        sbatch += ["--exclusive"]
        partition = launch.partition
        layout = (f"{launch.nodes} node(s) x {gpus or launch.nproc_per_node} "
                  f"{'GPUs' if gpus else 'CPU processes'}, DP {r.dp}")
        what = f"training ({launch.engine}), {layout}, recipe {r.recipe}"
    else:
        sbatch += ["--nodes=1", "--ntasks=1"]
        partition = launch.convert_partition or launch.partition
        what = "the checkpoint conversion, one process, no GPU"
    sbatch += ["--requeue", "--open-mode=append"]
    sbatch += [f"--time={launch.time}"] if launch.time else []
    sbatch += [f"--output={output}"]
    sbatch += [f"--partition={partition}"] if partition else []
    sbatch += [f"--account={launch.account}"] if launch.account else []
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"# {r.job.name}: {what}.",
            f"# Rendered by lighthouse-megatron slurm render from {recipes.shown(r.job.path)} on {stamp}."]
    # A file name with a line break must not end the comment (the rest would run).
    return [" ".join(line.splitlines()) for line in head] + [f"#SBATCH {opt}" for opt in sbatch]


def _settings_block(r: Resolved) -> list[str]:
    launch, train = r.launch, r.train
    s = {"JOB": r.kind, "VENV": launch.venv, "CONTAINER_IMAGE": launch.container_image,
         "CONTAINER_MOUNTS": launch.container_mounts}
    arrays: dict[str, list[str]] = {}
    if r.kind == "convert":
        s.update(CONVERT_INPUT=launch.input or "", CONVERT_OUTPUT=launch.output or "")
        arrays["CONVERT_ARGS"] = _words(launch.convert_args)
    else:
        s.update(ENGINE=launch.engine, MEGATRON_LM=launch.megatron_lm, TOKENIZER=launch.tokenizer,
                 NPROC_PER_NODE=launch.nproc_per_node,
                 PIPELINE_MODEL_PARALLEL_SIZE=launch.pipeline_model_parallel_size,
                 DATA_PARALLEL_SIZE=launch.data_parallel_size, SAVE_DIR=launch.save_dir or "",
                 INIT_CHECKPOINT=launch.init_checkpoint, TARGET_ITERATION=launch.target_iteration,
                 EXIT_DURATION_MINS=launch.exit_duration_mins)
        arrays["TRAIN_ARGS"] = as_flags(train)
        # Megatron-LM reads --num-query-groups only with this switch; the trainer has no such flag.
        gqa = train.num_query_groups and train.num_query_groups != train.num_attention_heads
        arrays["MEGATRON_ARGS"] = ["--group-query-attention"] if gqa else []
        arrays["EXTRA_ARGS"] = _words(launch.extra_args)
    block = [SETTINGS_START]
    block += [f"{k}={_bash(v)}" for k, v in s.items()]
    for name, words in arrays.items():
        # One flag and its values per line.
        groups: list[list[str]] = []
        for w in words:
            if w.startswith("--") or not groups:
                groups.append([])
            groups[-1].append(_bash(w))
        if len(groups) <= 1:
            block.append(f"{name}=(" + " ".join(sum(groups, [])) + ")")
        else:
            block += [f"{name}=(", *("    " + " ".join(g) for g in groups), ")"]
    return block + [SETTINGS_END]


def render_resolved(r: Resolved) -> str:
    """The launcher filled with a resolved job's header and settings."""
    lines = LAUNCHER.read_text().splitlines()
    start, end = lines.index(SETTINGS_START), lines.index(SETTINGS_END)
    body = [line for line in lines[1:start] if not line.startswith("#")] + lines[end + 1:]
    return "\n".join([lines[0], *_header(r), *_settings_block(r), *body]) + "\n"


def write_script(text: str, path: Path, force: bool = False, what: str = "") -> None:
    """Write atomically (a temporary name, then rename); an existing file only with force.
    Errors are ValueErrors naming `what` (the flag) and `path`, never the temporary name."""
    path = Path(path)
    where = f"{what} {path}".strip()
    if path.is_dir():
        raise ValueError(f"{where} is a directory; name the script file to write")
    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force to overwrite it")
    problem = writable_dir_problem(path.parent)
    if problem:
        raise ValueError(f"{where}: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ValueError(f"{where}: cannot write in {path.parent} ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise ValueError(f"{where}: cannot write it ({e.strerror or e})") from None
    except BaseException:
        os.unlink(tmp)
        raise


def render_chain(config: Mapping[str, Any], overrides: Mapping[str, Any], *,
                 allow_placeholders: bool = False) -> dict[str, str]:
    """Scripts for stage1, convert and stage2, checked alone and as a chain."""
    jobs = [load_job(n) for n in CHAIN]
    resolved = {j.name: resolve(j, values_for(j, config, overrides), allow_placeholders=allow_placeholders)
                for j in jobs}
    check_chain(resolved)
    return {name: render_resolved(r) for name, r in resolved.items()}
