"""`lighthouse-megatron slurm`: fill the one launcher (slurm/launch.sbatch) from a job file and submit
the two-stage chain.

A job file (slurm/stage1.yaml, convert.yaml, stage2.yaml, 1m.yaml, or a copy) is YAML in the
trainer's dialect: `job` (train or convert), `recipe` (a trainer YAML file, e.g.
examples/98k.yaml, relative to the job file) and settings. Keys that are the trainer's flags
with '_' (`num_layers`, `lr`, `lighthouse_topk`, ...) are training settings and override the
recipe's; the others (LAUNCH_KEYS) describe the job: the Slurm header, the engine, the
environment, the paths. Values come from the job file, then `--config FILE` (top-level keys
for every job that takes them; a section named after a job for that job), then the command
line.

`render` checks everything it can before writing (the layout with the package's one layout
check, the tokenizer against the dataset, placeholders and unset paths) and writes the
launcher with a generated settings block (bash variables and arrays): bash reads the values
as they are, nothing is parsed back.

Python API: `load_job(name_or_path) -> Job`; `resolve(job, values) -> Resolved`;
`render(job, values) -> str`; `render_chain(config, overrides) -> {stage: script}`;
`write_script(text, path, force)`; `submit_chain({stage: path}) -> {stage: job id}`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..settings.files import writable_dir_problem
from ..settings.layout import check_flags
from ..settings.train import DEFAULTS, build_parser, typed_settings, typed_value
from ..settings.yaml_file import load_yaml, read_mapping

SLURM_DIR = Path(__file__).resolve().parent.parent.parent / "slurm"
LAUNCHER = SLURM_DIR / "launch.sbatch"
JOBS = ("stage1", "convert", "stage2", "1m")
CHAIN = ("stage1", "convert", "stage2")
ENGINES = ("megatron-lm", "trainer")
KINDS = ("train", "convert")
SETTINGS_START = "# ---- settings (written by lighthouse-megatron slurm render) ----"
SETTINGS_END = "# ---- end of settings ----"
# The job's own keys (everything else is a training setting, by the trainer's flag names).
LAUNCH_KEYS = {
    "job": "train or convert", "recipe": "trainer YAML with the model and schedule",
    "stop_at_switch": "stop at the recipe's lighthouse_until_iter (stage 1 of the chain)",
    "job_name": "#SBATCH --job-name", "nodes": "#SBATCH --nodes",
    "gpus_per_node": "GPUs per node (0: a CPU job of nproc_per_node processes)",
    "nproc_per_node": "processes per node (default: gpus_per_node)", "partition": "#SBATCH --partition",
    "convert_partition": "the conversion's partition (default: partition)", "account": "#SBATCH --account",
    "time": "#SBATCH --time", "log_dir": "folder of the job logs", "engine": "megatron-lm or trainer",
    "megatron_lm": "Megatron-LM checkout", "venv": "virtual environment to activate",
    "container_image": "pyxis/enroot image", "container_mounts": "its mounts",
    "tokenizer": "bytes or a local Hugging Face tokenizer folder", "checkpoint_root": "checkpoint folder",
    "save_dir": "the job's checkpoints (under checkpoint_root)",
    "init_checkpoint": "checkpoint of a first start (under checkpoint_root)",
    "input": "convert: stage 1's checkpoints", "output": "convert: the dense checkpoint",
    "pipeline_model_parallel_size": "PP (Megatron-LM)", "data_parallel_size": "auto or DP, checked",
    "exit_duration_mins": "Megatron-LM's clean exit before the time limit (0: off)",
    "extra_args": "more training arguments", "convert_args": "more convert arguments",
}
PATH_KEYS = ("megatron_lm", "venv", "data_path", "checkpoint_root", "log_dir", "tokenizer")
# Set by the launcher itself, from save_dir / init_checkpoint.
NOT_FROM_RECIPE = ("save", "load")
# Where Megatron-LM's defaults differ from the trainer's: written out, so that both engines
# train the same model from the same recipe.
SAME_MODEL_KEYS = ("position_embedding_type", "normalization", "swiglu",
                   "untie_embeddings_and_output_weights", "add_bias_linear", "attention_dropout",
                   "hidden_dropout", "rotary_base", "init_method_std",
                   "norm_epsilon", "split", "eval_iters", "lr_decay_style", "weight_decay", "adam_beta1",
                   "adam_beta2", "clip_grad", "min_lr", "micro_batch_size")
CONTINUED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
             "seq_length", "train_iters", "lr", "min_lr", "lr_warmup_iters", "lr_decay_style",
             "global_batch_size", "weight_decay", "adam_beta1", "adam_beta2")


@dataclass
class Job:
    name: str
    path: Path
    values: dict[str, Any]


@dataclass
class Resolved:
    """A job's settings after the merge and the checks."""

    job: Job
    kind: str
    launch: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)  # trainer settings (recipe + overrides)
    recipe: Path | None = None
    dp: int | None = None


def load_job(name_or_path: str | os.PathLike) -> Job:
    """A job by name (stage1, convert, stage2, 1m: slurm/NAME.yaml) or by path."""
    name = str(name_or_path)
    path = SLURM_DIR / f"{name}.yaml" if name in JOBS else Path(name)
    if not path.is_file():
        if name not in JOBS and os.sep not in name and not name.endswith((".yaml", ".yml")):
            raise ValueError(f"unknown job {name!r}; valid: {', '.join(JOBS)} or a path to a job file")
        raise ValueError(f"job file {path} not found")
    values = read_mapping(path, "job file")
    if values.get("job") not in KINDS:
        raise ValueError(f"{path}: 'job' must be one of {', '.join(KINDS)}, got {values.get('job')!r}")
    return Job(path.stem, path.resolve(), values)


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    return {} if path is None else read_mapping(Path(path), "--config")


def _trainer_keys() -> set[str]:
    return set(vars(build_parser().parse_args([]))) - {"config"}


def _flags(settings: Mapping[str, Any]) -> list[str]:
    """Training settings as flags (the trainer's names, which are Megatron-LM's)."""
    out: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            out.append(flag)
        elif value is False:
            if key != "add_bias_linear":
                raise ValueError(f"{key}: false is not supported in a Slurm job (leave the key out)")
            out.append("--disable-bias-linear")
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _one_data_path(settings: dict[str, Any]) -> dict[str, Any]:
    """A data_path string is one prefix here (it may hold spaces: bash gets it verbatim), where
    typing a list setting would split it."""
    if isinstance(settings.get("data_path"), str):
        return {**settings, "data_path": [settings["data_path"]]}
    return settings


def _is_placeholder(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_is_placeholder(v) for v in value)
    return isinstance(value, str) and value.startswith("/path/to")


def _under(root: str, value: str) -> str:
    return value if not value or os.path.isabs(value) else str(Path(root) / value)


TIME_FORMATS = ("MINUTES", "MINUTES:SECONDS", "HOURS:MINUTES:SECONDS", "DAYS-HOURS", "DAYS-HOURS:MINUTES",
                "DAYS-HOURS:MINUTES:SECONDS")


def _minutes(time_limit: str) -> int | None:
    """Slurm's --time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes; None if not one."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", time_limit.strip())
    if not m:
        return None
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:
        return days * 1440 + a * 60 + (b or 0)
    if c is not None:
        return a * 60 + b
    return a


def _check_time(value: Any) -> None:
    """Slurm reads only its own formats; anything else would reach #SBATCH and fail at submission
    (and the clean-exit margin, computed from it, would be 0)."""
    if value in (None, "") or _minutes(str(value)) is not None:
        return
    raise ValueError(f"time {value!r} is not a Slurm time limit; use one of {', '.join(TIME_FORMATS)} "
                     "(e.g. 24:00:00 or 2-00:00:00)")


def resolve(job: Job, values: Mapping[str, Any] = {}, *, allow_placeholders: bool = False) -> Resolved:
    """The job's settings with `values` applied, checked (ValueError naming what is wrong)."""
    try:
        return _resolve(job, values, allow_placeholders)
    except ValueError as e:
        raise ValueError(f"{job.name}: {e}") from None


def _resolve(job: Job, values: Mapping[str, Any], allow_placeholders: bool) -> Resolved:
    merged = {**job.values, **values}
    kind = merged.pop("job")
    recipe_path = None
    train: dict[str, Any] = {}
    if kind == "train":
        if not merged.get("recipe"):
            raise ValueError("a train job needs 'recipe', the trainer YAML with the model and schedule")
        recipe_path = (job.path.parent / str(merged["recipe"])).resolve()
        train = typed_settings(_one_data_path({k: v for k, v in read_mapping(recipe_path, "recipe").items()
                                               if k not in NOT_FROM_RECIPE}), f"recipe {recipe_path}")
    merged.pop("recipe", None)
    trainer_keys = _trainer_keys() if kind == "train" else set()
    wrong = sorted(k for k in merged if not _takes_kind(kind, k) and (k in LAUNCH_KEYS or kind == "convert"))
    if wrong:
        raise ValueError(f"a {kind} job has no setting(s) {', '.join(wrong)}")
    launch = {}
    for key, value in merged.items():
        if key in LAUNCH_KEYS:
            launch[key] = value
        elif key in trainer_keys:
            train[key] = typed_value(key, _one_data_path({key: value})[key], "job file, --config or --set")
        else:
            valid = sorted(LAUNCH_KEYS) + sorted(trainer_keys - set(NOT_FROM_RECIPE))
            raise ValueError(f"unknown setting {key!r}; valid: {', '.join(valid)}")
    launch.setdefault("engine", "megatron-lm")
    launch.setdefault("tokenizer", "bytes")
    for key in ("venv", "container_image", "container_mounts", "megatron_lm", "partition", "account",
                "convert_partition", "log_dir", "init_checkpoint", "extra_args", "convert_args"):
        launch.setdefault(key, "")
    _check_time(launch.get("time"))
    _check_placeholders(kind, launch, train, allow_placeholders)
    root = str(launch.get("checkpoint_root") or "")
    for key in ("save_dir", "init_checkpoint", "input", "output"):
        if launch.get(key):
            launch[key] = _under(root, str(launch[key]))
    resolved = Resolved(job, kind, launch, train, recipe_path)
    if kind == "train":
        _check_training(resolved)
    return resolved


def _check_placeholders(kind: str, launch: dict, train: dict, allowed: bool) -> None:
    """Placeholders and unset paths fail here, not after the queue wait."""
    if allowed:
        return
    shown = lambda v: " ".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    bad = [f"{k}={shown(v)}" for k, v in {**launch, **train}.items() if _is_placeholder(v)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: still a placeholder; set the real path (or pass "
                         "--allow-placeholders to write the script anyway)")
    needed = ["checkpoint_root"]
    if kind == "train":
        if not train.get("mock_data"):
            needed.append("data_path")
        if launch["engine"] == "megatron-lm" and not launch["container_image"]:
            needed.append("megatron_lm")
    unset = [k for k in needed if not (launch.get(k) or train.get(k))]
    if unset:
        raise ValueError(f"{', '.join(unset)} not set (a train job with mock_data: true needs no data_path); "
                         "set them, or pass --allow-placeholders to write the script anyway")


def _check_training(r: Resolved) -> None:
    launch, train = r.launch, r.train
    engine = launch["engine"]
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    nodes, gpus = _int(launch, "nodes", 1), _int(launch, "gpus_per_node", 0)
    if gpus == 0:
        if "nproc_per_node" not in launch:
            raise ValueError("gpus_per_node 0 (a CPU job) needs nproc_per_node, the processes per node")
        if engine != "trainer":
            raise ValueError("a CPU job (gpus_per_node 0) needs engine trainer: Megatron-LM's pretraining "
                             "needs CUDA")
    elif "nproc_per_node" in launch and _int(launch, "nproc_per_node", 1) != gpus:
        raise ValueError(f"nproc_per_node {launch['nproc_per_node']} != gpus_per_node {gpus}: the launcher "
                         "starts one process per GPU")
    nproc = _int(launch, "nproc_per_node", 1) if gpus == 0 else gpus
    launch["nproc_per_node"] = nproc
    pp = _int(launch, "pipeline_model_parallel_size", 1) if "pipeline_model_parallel_size" in launch else 1
    launch["pipeline_model_parallel_size"] = pp
    if engine == "trainer" and (nodes > 1 or pp > 1):
        raise ValueError(f"engine trainer runs on one node without pipeline parallelism (got nodes {nodes}, "
                         f"PP {pp}); use engine megatron-lm")
    tokenizer = str(launch["tokenizer"])
    if tokenizer != "bytes":
        if engine == "trainer":
            raise ValueError(f"tokenizer {tokenizer}: the trainer reads byte-level data only "
                             "(tokenizer bytes)")
        if not Path(tokenizer).is_dir():
            raise ValueError(f"tokenizer {tokenizer!r} must be 'bytes' or a local Hugging Face tokenizer "
                             "folder (the compute nodes cannot download a hub name)")
    if train.get("attention_impl", "dense") == "dense":
        train = r.train = {k: v for k, v in train.items() if not k.startswith("lighthouse_")}
    # The two-stage chain: stage 1 stops at the recipe's switch.
    if launch.get("stop_at_switch") and "exit_interval" not in train:
        if train.get("attention_impl") != "lighthouse" or train.get("lighthouse_until_iter") is None:
            raise ValueError("stop_at_switch needs attention_impl lighthouse and lighthouse_until_iter (the "
                             "switch) in the recipe")
        train["exit_interval"] = train["lighthouse_until_iter"]
    train.pop("tokenizer_type", None)  # the launcher passes the tokenizer's flags itself
    if tokenizer == "bytes":
        train.pop("vocab_size", None)
    for key in SAME_MODEL_KEYS:
        if train.get(key) is None and DEFAULTS.get(key) is not None:
            train[key] = DEFAULTS[key]
    if train.get("max_position_embeddings") is None and train.get("seq_length") is not None:
        train["max_position_embeddings"] = train["seq_length"]
    if isinstance(train.get("data_path"), str):
        train["data_path"] = [train["data_path"]]
    unit = "GPUs" if gpus else "processes"
    job_desc = f"{nodes} node{'s' if nodes > 1 else ''} x {nproc} {unit} = {nodes * nproc} {unit}"
    r.dp = check_flags(["--pipeline-model-parallel-size", str(pp), *_flags(train)], nodes * nproc,
                       launch.get("data_parallel_size", "auto"), job_desc)
    launch.setdefault("data_parallel_size", "auto")
    train_iters = _int(train, "train_iters", 1)
    if train.get("exit_interval") is not None and _int(train, "exit_interval", 1) > train_iters:
        raise ValueError(f"exit_interval {train['exit_interval']} must be <= train_iters {train_iters}")
    launch["target_iteration"] = train.get("exit_interval") or train_iters
    limit = _minutes(str(launch.get("time", "")))
    if limit and "exit_duration_mins" not in launch:
        # Room to save a checkpoint and exit before Slurm kills the job.
        launch["exit_duration_mins"] = max(limit - max(10, limit // 20), 1)
    launch.setdefault("exit_duration_mins", 0)
    exit_after = _int(launch, "exit_duration_mins", 0)
    if limit and exit_after >= limit:
        raise ValueError(f"exit_duration_mins {exit_after} must be below the time limit ({launch['time']} = "
                         f"{limit} min): Megatron-LM saves and exits then, before Slurm kills the job")
    if train.get("data_path"):
        _check_tokenizer(train["data_path"], tokenizer)


def _int(d: Mapping[str, Any], key: str, minimum: int) -> int:
    value = d.get(key)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or n < minimum or str(n) != str(value).strip():
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return n


def _check_tokenizer(data_path: list[str], tokenizer: str) -> None:
    """The tokenizer against the dataset, where this machine can read it: byte-level data
    (prepare-data's default) ends each document with id 256 in uint16 tokens."""
    prefixes = [str(p) for p in data_path]
    prefixes = prefixes[1::2] if len(prefixes) > 1 else prefixes
    from ..data import BYTE_EOD, open_indexed_dataset

    for prefix in prefixes:
        if not (os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")):
            continue  # on a file system this machine does not see: checked when the job starts
        ds = open_indexed_dataset(prefix, "data_path")
        if not len(ds):
            continue
        first = ds[0]
        is_bytes = first.dtype.itemsize == 2 and int(first[-1]) == BYTE_EOD and int(first.max()) <= BYTE_EOD
        if tokenizer == "bytes" and not is_bytes:
            raise ValueError(f"tokenizer bytes, but data_path {prefix} was not written with byte tokens (its "
                             f"{first.dtype} documents end with id {int(first[-1])}, not {BYTE_EOD}); pass "
                             "the tokenizer folder it was written with (--tokenizer DIR)")
        if tokenizer != "bytes" and is_bytes:
            raise ValueError(f"tokenizer {tokenizer}, but data_path {prefix} holds byte-level tokens "
                             f"(documents end with {BYTE_EOD}, as `prepare-data` writes them); "
                             "use --tokenizer bytes")


# --------------------------------------------------------------------------- render


def _bash(value: Any) -> str:
    text = str(value)
    if "," in text and shlex.quote(text) == text:
        return f"'{text}'"  # an unquoted comma in an array reads as a typo to shellcheck (SC2054)
    return shlex.quote(text) if text else "''"


def _words(key: str, value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return shlex.split(str(value or ""))


def render(job: Job, values: Mapping[str, Any] = {}, *, allow_placeholders: bool = False) -> str:
    """The launcher with this job's header and settings."""
    r = resolve(job, values, allow_placeholders=allow_placeholders)
    return _render(r)


def _render(r: Resolved) -> str:
    launch, train = r.launch, r.train
    log_dir = launch["log_dir"]
    output = f"{Path(log_dir).resolve() / '%x-%j.out'}" if log_dir else "%x-%j.out"
    sbatch = [f"--job-name={launch.get('job_name') or 'lighthouse-' + r.job.name}"]
    if r.kind == "train":
        gpus = _int(launch, "gpus_per_node", 0)
        sbatch += [f"--nodes={launch['nodes']}", "--ntasks-per-node=1"]
        sbatch += [f"--gpus-per-node={gpus}"] if gpus else []
        sbatch += ["--exclusive"]
        partition = launch["partition"]
        layout = (f"{launch['nodes']} node(s) x {gpus or launch['nproc_per_node']} "
                  f"{'GPUs' if gpus else 'CPU processes'}, DP {r.dp}")
        what = f"training ({launch['engine']}), {layout}, recipe {_shown_path(r.recipe)}"
    else:
        sbatch += ["--nodes=1", "--ntasks=1"]
        partition = launch["convert_partition"] or launch["partition"]
        what = "the checkpoint conversion, one process, no GPU"
    sbatch += ["--requeue", "--open-mode=append"]
    sbatch += [f"--time={launch['time']}"] if launch.get("time") else []
    sbatch += [f"--output={output}"]
    sbatch += [f"--partition={partition}"] if partition else []
    sbatch += [f"--account={launch['account']}"] if launch["account"] else []
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"# {r.job.name}: {what}.",
            f"# Rendered by lighthouse-megatron slurm render from {_shown_path(r.job.path)} on {stamp}."]
    head += [f"#SBATCH {opt}" for opt in sbatch]

    s = {"JOB": r.kind, "VENV": launch["venv"], "CONTAINER_IMAGE": launch["container_image"],
         "CONTAINER_MOUNTS": launch["container_mounts"]}
    arrays: dict[str, list[str]] = {}
    if r.kind == "convert":
        s.update(CONVERT_INPUT=launch.get("input", ""), CONVERT_OUTPUT=launch.get("output", ""))
        arrays["CONVERT_ARGS"] = _words("convert_args", launch["convert_args"])
    else:
        s.update(ENGINE=launch["engine"], MEGATRON_LM=launch["megatron_lm"], TOKENIZER=launch["tokenizer"],
                 NPROC_PER_NODE=launch["nproc_per_node"],
                 PIPELINE_MODEL_PARALLEL_SIZE=launch["pipeline_model_parallel_size"],
                 DATA_PARALLEL_SIZE=launch["data_parallel_size"], SAVE_DIR=launch.get("save_dir", ""),
                 INIT_CHECKPOINT=launch["init_checkpoint"], TARGET_ITERATION=launch["target_iteration"],
                 EXIT_DURATION_MINS=launch["exit_duration_mins"])
        arrays["TRAIN_ARGS"] = _flags(train)
        groups, heads = train.get("num_query_groups"), train.get("num_attention_heads")
        # Megatron-LM reads --num-query-groups only with this switch; the trainer has no such flag.
        arrays["MEGATRON_ARGS"] = ["--group-query-attention"] if groups and groups != heads else []
        arrays["EXTRA_ARGS"] = _words("extra_args", launch["extra_args"])
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
    block.append(SETTINGS_END)

    lines = LAUNCHER.read_text().splitlines()
    start, end = lines.index(SETTINGS_START), lines.index(SETTINGS_END)
    body = [line for line in lines[1:start] if not line.startswith("#")] + lines[end + 1:]
    return "\n".join([lines[0], *head, *block, *body]) + "\n"


def _shown_path(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return str(path.relative_to(SLURM_DIR.parent))
    except ValueError:
        return str(path)


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


# -------------------------------------------------------------------------- configs


def values_for(job: Job, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """What applies to `job`: the config's top-level keys, its section, then the command line.
    Top-level keys a job does not take (convert: training settings) are skipped for it."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            if key not in JOBS:
                raise ValueError(f"--config: unknown section {key!r}; sections: {', '.join(JOBS)}")
            continue
        if _takes(job, key):
            out[key] = value
    section = config.get(job.name)
    out.update(section if isinstance(section, Mapping) else {})
    out.update({k: v for k, v in overrides.items() if _takes(job, k)})
    return out


_CONVERT_KEYS = {"job_name", "partition", "convert_partition", "account", "time", "log_dir", "venv",
                 "container_image", "container_mounts", "checkpoint_root", "input", "output", "convert_args"}


def _takes(job: Job, key: str) -> bool:
    return _takes_kind(job.values.get("job"), key)


def _takes_kind(kind: str, key: str) -> bool:
    return key in _CONVERT_KEYS if kind == "convert" else key not in ("input", "output", "convert_args")


def _check_chain(resolved: dict[str, Resolved]) -> None:
    s1, conv, s2 = (resolved[n] for n in CHAIN)
    if conv.launch.get("input") != s1.launch.get("save_dir"):
        raise ValueError(f"convert input {conv.launch.get('input')!r} is not stage1's save_dir "
                         f"{s1.launch.get('save_dir')!r}")
    if s2.launch.get("init_checkpoint") != conv.launch.get("output"):
        raise ValueError(f"stage2 init_checkpoint {s2.launch.get('init_checkpoint')!r} is not convert's "
                         f"output {conv.launch.get('output')!r}")
    for key in CONTINUED:
        if s1.train.get(key) != s2.train.get(key):
            raise ValueError(f"stage2 continues stage1's model and schedule: {key} differs "
                             f"({s1.train.get(key)} vs {s2.train.get(key)})")
    stop = s1.train.get("exit_interval")
    if not stop or int(stop) >= int(s1.train["train_iters"]):
        raise ValueError(f"stage1 must stop below train_iters {s1.train['train_iters']} (exit_interval, or "
                         f"the recipe's lighthouse_until_iter; got {stop or 'none'}): stage 2 trains the "
                         "rest")


def render_chain(config: Mapping[str, Any], overrides: Mapping[str, Any], *,
                 allow_placeholders: bool = False) -> dict[str, str]:
    """Scripts for stage1, convert and stage2, checked alone and as a chain."""
    jobs = [load_job(n) for n in CHAIN]
    resolved = {j.name: resolve(j, values_for(j, config, overrides), allow_placeholders=allow_placeholders)
                for j in jobs}
    _check_chain(resolved)
    return {name: _render(r) for name, r in resolved.items()}


def submit_chain(scripts: Mapping[str, Path], sbatch: str = "sbatch") -> dict[str, str]:
    """Submit the chain with afterok dependencies; job ids by stage. A job that fails cancels
    the ones waiting for it (--kill-on-invalid-dep) instead of leaving them pending forever."""
    ids: dict[str, str] = {}
    previous = None
    for name in CHAIN:
        cmd = [sbatch, "--parsable"]
        if previous:
            cmd += [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"]
        cmd.append(str(scripts[name]))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            raise ValueError(f"{sbatch} not found: submit needs Slurm's sbatch on PATH") from None
        if proc.returncode:
            done = f" (submitted so far: {ids})" if ids else ""
            raise ValueError(f"sbatch {scripts[name]} failed{done}: {proc.stderr.strip()}")
        # --parsable prints "jobid" or "jobid;cluster".
        previous = ids[name] = proc.stdout.strip().split(";")[0]
    return ids


# ----------------------------------------------------------------------------- CLI

# (flag, key, type, what, the default when neither the job file nor --config sets it)
_NAMED = [
    ("--nodes", "nodes", int, "#SBATCH --nodes", "1"),
    ("--gpus-per-node", "gpus_per_node", int, "GPUs per node; 0: a CPU job of --nproc-per-node processes",
     "0"),
    ("--nproc-per-node", "nproc_per_node", int, "processes per node", "--gpus-per-node"),
    ("--tensor-model-parallel-size", "tensor_model_parallel_size", int, "TP", "the recipe's, else 1"),
    ("--context-parallel-size", "context_parallel_size", int, "CP", "the recipe's, else 1"),
    ("--pipeline-model-parallel-size", "pipeline_model_parallel_size", int, "PP (Megatron-LM)", "1"),
    ("--data-parallel-size", "data_parallel_size", str, "DP: auto (what the job's GPUs leave), or a number "
     "that is checked", "auto"),
    ("--seq-length", "seq_length", int, "tokens per sample", "the recipe's"),
    ("--engine", "engine", str, "megatron-lm (Megatron-LM's pretraining) or trainer (lighthouse-megatron "
     "train, one node)", "megatron-lm"),
    ("--partition", "partition", str, "#SBATCH --partition", "Slurm's default partition"),
    ("--convert-partition", "convert_partition", str, "the conversion's partition", "--partition"),
    ("--account", "account", str, "#SBATCH --account", "none"),
    ("--time", "time", str, "#SBATCH --time, in one of Slurm's formats (" + ", ".join(TIME_FORMATS) + "); "
     "Megatron-LM then saves and exits before it", "none"),
    ("--log-dir", "log_dir", str, "folder of the job logs", "the submission directory"),
    ("--checkpoint-root", "checkpoint_root", str, "folder holding the jobs' checkpoints", "none: required"),
    ("--data-path", "data_path", str, "Megatron indexed dataset prefix (PREFIX.bin/.idx)",
     "none: required unless mock_data"),
    ("--tokenizer", "tokenizer", str, "bytes (byte-level data from prepare-data) or a local Hugging Face "
     "tokenizer folder", "bytes"),
    ("--megatron-lm", "megatron_lm", str, "Megatron-LM checkout (engine megatron-lm)",
     "none: required without --container-image"),
    ("--venv", "venv", str, "virtual environment the job activates", "none"),
    ("--container-image", "container_image", str, "pyxis/enroot image the job runs in", "none"),
]


def _add_value_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of settings (top level: every job; a section named after a "
                   "job: that job) (default: none)")
    for flag, key, typ, what, default in _NAMED:
        p.add_argument(flag, dest=f"v_{key}", type=typ, metavar=key.upper(),
                       help=f"{what} (default: the job file's, else {default})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, by its name (the trainer's flags with '_', or a job key); "
                        "repeatable (default: none)")
    p.add_argument("--allow-placeholders", action="store_true",
                   help="write scripts with /path/to/... or unset data/checkpoint paths (they fail when run) "
                        "(default: off)")
    p.add_argument("--force", action="store_true", help="overwrite existing scripts (default: off)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = load_yaml(value) if value else ""
    for _, key, *_ in _NAMED:
        value = getattr(args, f"v_{key}")
        if value is not None:
            out[key] = value
    return out


def add_slurm_parser(sub: argparse._SubParsersAction) -> None:
    slurm = sub.add_parser("slurm", help="fill the Slurm launcher from a recipe and submit the chain")
    cmds = slurm.add_subparsers(dest="slurm_command", required=True)
    r = cmds.add_parser("render", help="write one filled, checked sbatch script")
    r.add_argument("job", help=f"{', '.join(JOBS)} (slurm/JOB.yaml) or a path to a job file")
    r.add_argument("--output", "-o", required=True, help="the script to write (required)")
    _add_value_args(r)
    r.set_defaults(run="lighthouse_megatron.slurm.jobs:run_render")
    s = cmds.add_parser("submit", help="render stage1, convert and stage2; submit them chained with afterok")
    s.add_argument("--output-dir", required=True, help="where the three scripts are written (required)")
    s.add_argument("--dry-run", action="store_true",
                   help="write the scripts, print the sbatch commands, submit nothing (default: off)")
    _add_value_args(s)
    s.set_defaults(run="lighthouse_megatron.slurm.jobs:run_submit")


def _error(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _make_log_dir(text: str) -> None:
    # Slurm does not create the --output directory: without it the job fails with no log.
    m = re.search(r"^#SBATCH --output=(.*)/[^/]*$", text, re.M)
    if m:
        problem = writable_dir_problem(m.group(1))
        if problem:
            raise ValueError(f"log_dir {m.group(1)}: {problem}")
        Path(m.group(1)).mkdir(parents=True, exist_ok=True)


def run_render(args: argparse.Namespace) -> int:
    try:
        job = load_job(args.job)
        values = values_for(job, load_config(args.config), {})
        values.update(_overrides(args))
        text = render(job, values, allow_placeholders=args.allow_placeholders)
        write_script(text, Path(args.output), args.force, what="-o")
        _make_log_dir(text)
    except (ValueError, OSError) as e:
        return _error(e)
    print(f"wrote {args.output}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    try:
        scripts = render_chain(load_config(args.config), _overrides(args),
                               allow_placeholders=args.allow_placeholders)
        out = Path(args.output_dir)
        paths = {name: out / f"{name}.sbatch" for name in CHAIN}
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing and not args.force:
            raise ValueError(f"{', '.join(existing)} exist(s); pass --force to overwrite")
        if not args.dry_run and shutil.which("sbatch") is None:
            # Before writing: a rerun on a machine with Slurm must not need --force.
            raise ValueError("sbatch not found: submit needs Slurm's sbatch on PATH (nothing was written; "
                             "--dry-run writes the scripts and prints the commands)")
        problem = writable_dir_problem(out)
        if problem:
            raise ValueError(f"--output-dir {out}: {problem}")
        for name, text in scripts.items():
            write_script(text, paths[name], force=True, what="--output-dir")
            if not args.dry_run:
                _make_log_dir(text)
        if args.dry_run:
            print(f"sbatch --parsable {paths['stage1']}")
            for prev, name in zip(CHAIN, CHAIN[1:], strict=False):
                print(f"sbatch --parsable --dependency=afterok:<{prev} job id> --kill-on-invalid-dep=yes "
                      f"{paths[name]}")
            return 0
        ids = submit_chain(paths)
    except (ValueError, OSError) as e:
        return _error(e)
    for name in CHAIN:
        print(f"{name} {ids[name]}")
    return 0
