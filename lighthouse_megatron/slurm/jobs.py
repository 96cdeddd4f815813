"""A Slurm job's settings: its job file, the recipe it names, the site's `--config` and the
command line, merged and checked before anything is written.

A job file is YAML in the trainer's dialect: `job` (train or convert), `recipe` (the trainer
settings to run) and settings. Training settings (the trainer's flags with '_') override the
recipe's; the job's own keys are `settings.slurm.SlurmJob`'s. Values come from the job file,
then `--config FILE` (top-level keys for every job that takes them; a section named after a
job for that job), then the command line. Everything that can be checked here is (the layout
with the package's one layout check, the tokenizer against the dataset, placeholders and
unset paths, the time limit, a chain's stages against each other).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import recipes
from ..settings.fields import CONTINUED, SAME_MODEL, Values, unknown_names, with_role
from ..settings.layout import check_flags
from ..settings.slurm import (
    CHECKPOINT_PATHS,
    ENGINES,
    JOB_KINDS,
    SBATCH_VALUES,
    TIME_FORMATS,
    job_specs,
    launcher_sets,
    takes,
)
from ..settings.train import RECIPE, all_specs, as_flags, recipe_file, typed_settings, typed_value
from ..settings.tree import defaults
from ..settings.yaml_file import read_mapping

JOBS = recipes.JOBS
CHAIN = ("stage1", "convert", "stage2")
EXIT_MARGIN = 10  # minutes: the least time before the limit that Megatron-LM has to save and exit


@dataclass
class Job:
    name: str
    path: Any  # the job file: a Path, or a file of the package's data (a named job)
    values: dict[str, Any]


@dataclass
class Resolved:
    """A job's settings after the merge and the checks."""

    job: Job
    kind: str
    launch: Values  # the job's own settings (SlurmJob's)
    train: Values = field(default_factory=Values)  # trainer settings (recipe + overrides)
    recipe: str | None = None  # the recipe read: a shipped one's name, or a file's path
    dp: int | None = None


def load_job(name_or_path: str | os.PathLike) -> Job:
    """A job by name (stage1, convert, stage2, 1m: the package's) or by path."""
    name = str(name_or_path)
    if name in JOBS:
        path, stem = recipes.job(name), name
    else:
        path = Path(name)
        if not path.is_file():
            if os.sep not in name and not name.endswith((".yaml", ".yml")):
                raise ValueError(f"unknown job {name!r}; valid: {', '.join(JOBS)} or a path to a job file")
            raise ValueError(f"job file {path} not found")
        path, stem = path.resolve(), path.stem
    values = Values(read_mapping(path, "job file"))
    if values.job not in JOB_KINDS:
        raise ValueError(f"{recipes.shown(path)}: 'job' must be one of {', '.join(JOB_KINDS)}, got "
                         f"{values.job!r}")
    return Job(stem, path, values)


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    return {} if path is None else read_mapping(Path(path), "--config")


def values_for(job: Job, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """What applies to `job`: the config's top-level keys, its section, then the command line.
    Top-level keys a job does not take (convert: training settings) are skipped for it."""
    kind = job.values.get("job")
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            if key not in JOBS:
                raise ValueError(f"--config: unknown section {key!r}; sections: {', '.join(JOBS)}")
            continue
        if takes(kind, key):
            out[key] = value
    section = config.get(job.name)
    out.update(section if isinstance(section, Mapping) else {})
    out.update({k: v for k, v in overrides.items() if takes(kind, k)})
    return out


def _one_item(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A path-list setting (data_path) written as a string is one path here (it may hold
    spaces: bash gets it verbatim), where typing a list setting would split it."""
    table = all_specs()
    return {k: [v] if isinstance(v, str) and k in table and table[k].item is str else v
            for k, v in settings.items()}


def _is_placeholder(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_is_placeholder(v) for v in value)
    return isinstance(value, str) and value.startswith("/path/to")


def _minutes(time_limit: Any) -> int:
    """Slurm's --time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in minutes, seconds rounded up as Slurm
    does (0: no limit). Slurm reads every form, but a field after the first beyond its unit (25:99:99)
    is a typo here, and M:S under an hour is almost surely meant as H:M."""
    text = str(time_limit).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise _time_error(time_limit)
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:
        fields = {"hours": (a, 24), "minutes": (b, 60), "seconds": (c, 60)}
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:
        fields, seconds = {"minutes": (b, 60), "seconds": (c, 60)}, (a * 60 + b) * 60 + c
    else:
        fields, seconds = {"seconds": (b, 60)}, a * 60 + (b or 0)
    over = [f"{unit} {n} must be below {top}" for unit, (n, top) in fields.items() if (n or 0) >= top]
    if over:
        raise _time_error(time_limit, ", ".join(over))
    if days is None and c is None and b is not None and a < 60:
        shown = _count(a, "minute") + (f" {_count(b, 'second')}" if b else "")
        minutes = f" (or {a} for {_count(a, 'minute')})" if a else ""
        raise ValueError(f"time {text!r} is {shown} to Slurm, which reads MINUTES:SECONDS; did you mean "
                         f"{text}:00?{minutes}")
    return -(-seconds // 60)


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}{'s' * (n != 1)}"


def _time_error(value: Any, why: str = "") -> ValueError:
    """Slurm reads only its own formats; anything else would reach #SBATCH and fail at submission
    (and the clean-exit margin, computed from it, would be 0)."""
    return ValueError(f"time {value!r} is not a Slurm time limit{f' ({why})' if why else ''}; use one of "
                      f"{', '.join(TIME_FORMATS)} (e.g. 24:00:00 or 2-00:00:00)")


def _time_limit(value: Any) -> int:
    """The job's time limit in minutes; 0 if none (unset, or Slurm's 0: no limit)."""
    return 0 if value in (None, "") else _minutes(value)


def _check_header(job: Job, launch: Values) -> None:
    """What goes into #SBATCH lines, which no shell quotes: the log folder absolute (the job runs
    elsewhere), the job name derived, each value of the characters sbatch reads as one word."""
    if launch.log_dir:
        launch.log_dir = str(Path(str(launch.log_dir)).resolve())
    derived = None if launch.job_name else f"lighthouse-{job.name}"
    launch.job_name = launch.job_name or derived
    for key, (pattern, allowed) in SBATCH_VALUES.items():
        value = launch.get(key)
        if value not in (None, "") and not re.fullmatch(pattern, str(value)):
            how = " (lighthouse- and the job file's name; set job_name)" if value == derived else ""
            raise ValueError(f"{key} {str(value)!r}{how} cannot go into an #SBATCH line; use {allowed} only")


def resolve(job: Job, values: Mapping[str, Any] = {}, *, allow_placeholders: bool = False) -> Resolved:
    """The job's settings with `values` applied, checked (ValueError naming what is wrong)."""
    try:
        return _resolve(job, values, allow_placeholders)
    except ValueError as e:
        raise ValueError(f"{job.name}: {e}") from None


def _read_recipe(job: Job, recipe: str) -> tuple[str, Values]:
    """(its name or path, its typed settings) of the recipe a job names: one the package ships,
    or a file relative to the job file."""
    path = recipe_file(recipe, str(job.path))
    shown = recipe if recipe in recipes.RECIPES else str(path)
    settings = {k: v for k, v in read_mapping(path, RECIPE).items() if k not in launcher_sets()}
    return shown, Values(typed_settings(_one_item(settings), f"recipe {shown}"))


def _resolve(job: Job, values: Mapping[str, Any], allow_placeholders: bool) -> Resolved:
    merged = Values({**job.values, **values})
    kind, recipe = merged.job, merged.recipe
    del merged.job, merged.recipe
    recipe_path, train = None, Values()
    if kind == "train":
        if not recipe:
            raise ValueError("a train job needs 'recipe', the trainer YAML with the model and schedule")
        recipe_path, train = _read_recipe(job, str(recipe))
    wrong = sorted(k for k in merged if not takes(kind, k) and (k in job_specs() or kind == "convert"))
    if wrong:
        raise ValueError(f"a {kind} job has no setting(s) {', '.join(wrong)}")
    launch = Values()
    for key, value in merged.items():
        if key in job_specs():
            launch[key] = value
        elif key in all_specs():
            train[key] = typed_value(key, _one_item({key: value})[key], "job file, --config or --set")
        else:
            valid = sorted(job_specs()) + sorted(set(all_specs()) - set(launcher_sets()))
            raise ValueError(unknown_names([key], valid))
    for key, s in job_specs().items():
        if kind in s.kinds and s.default is not None:
            launch.setdefault(key, s.default)
    _time_limit(launch.time)  # refuses a time Slurm would misread
    _check_header(job, launch)
    _check_placeholders(kind, launch, train, allow_placeholders)
    root = str(launch.checkpoint_root or "")
    for key in CHECKPOINT_PATHS:
        if launch.get(key) and not os.path.isabs(str(launch[key])):
            launch[key] = str(Path(root) / str(launch[key]))
    resolved = Resolved(job, kind, launch, train, recipe_path)
    if kind == "train":
        _check_training(resolved)
    return resolved


def _check_placeholders(kind: str, launch: Values, train: Values, allowed: bool) -> None:
    """Placeholders and unset paths fail here, not after the queue wait."""
    if allowed:
        return
    shown = lambda v: " ".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    bad = [f"{k}={shown(v)}" for k, v in {**launch, **train}.items() if _is_placeholder(v)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: still a placeholder; set the real path (or pass "
                         "--allow-placeholders to write the script anyway)")
    needed = {"checkpoint_root": launch.checkpoint_root}
    if kind == "train":
        if not train.mock_data:
            needed.update(data_path=train.data_path)
        if launch.engine == "megatron-lm" and not launch.container_image:
            needed.update(megatron_lm=launch.megatron_lm)
    unset = [k for k, v in needed.items() if not v]
    if unset:
        raise ValueError(f"{', '.join(unset)} not set (a train job with mock_data: true needs no data_path); "
                         "set them, or pass --allow-placeholders to write the script anyway")


def _int(value: Any, key: str, minimum: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or n < minimum or str(n) != str(value).strip():
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return n


def _check_processes(launch: Values) -> tuple[int, int]:
    """(nodes, processes per node) of a train job: one process per GPU, or a CPU job."""
    for key, s in job_specs().items():  # the job's whole numbers, as their fields say
        if s.kind is int and launch.get(key) is not None:
            launch[key] = _int(launch[key], key, s.minimum)
    engine, nodes, gpus = launch.engine, launch.nodes, launch.gpus_per_node
    pp = launch.pipeline_model_parallel_size
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if gpus == 0:
        if launch.nproc_per_node is None:
            raise ValueError("gpus_per_node 0 (a CPU job) needs nproc_per_node, the processes per node")
        if engine != "trainer":
            raise ValueError("a CPU job (gpus_per_node 0) needs engine trainer: Megatron-LM's pretraining "
                             "needs CUDA")
    elif launch.nproc_per_node not in (None, gpus):
        raise ValueError(f"nproc_per_node {launch.nproc_per_node} != gpus_per_node {gpus}: the launcher "
                         "starts one process per GPU")
    launch.nproc_per_node = launch.nproc_per_node if gpus == 0 else gpus
    if engine == "trainer" and (nodes > 1 or pp > 1):
        raise ValueError(f"engine trainer runs on one node without pipeline parallelism (got nodes {nodes}, "
                         f"PP {pp}); use engine megatron-lm")
    tokenizer = str(launch.tokenizer)
    if tokenizer != "bytes":
        if engine == "trainer":
            raise ValueError(f"tokenizer {tokenizer}: the trainer reads byte-level data only "
                             "(tokenizer bytes)")
        if not Path(tokenizer).is_dir():
            raise ValueError(f"tokenizer {tokenizer!r} must be 'bytes' or a local Hugging Face tokenizer "
                             "folder (the compute nodes cannot download a hub name)")
    return nodes, launch.nproc_per_node


def _training_settings(launch: Values, train: Values) -> Values:
    """The settings the launcher passes: the Lighthouse ones only for a Lighthouse model, stage 1
    stopped at the switch, the tokenizer's left to the launcher, and the settings whose default
    Megatron-LM does not share written out, so that both engines train the same model."""
    if train.attention_impl in (None, "dense"):
        train = Values({k: v for k, v in train.items() if not k.startswith("lighthouse_")})
    # The two-stage chain: stage 1 stops at the recipe's switch.
    if launch.stop_at_switch and train.exit_interval is None:
        if train.attention_impl != "lighthouse" or train.lighthouse_until_iter is None:
            raise ValueError("stop_at_switch needs attention_impl lighthouse and lighthouse_until_iter (the "
                             "switch) in the recipe")
        train.exit_interval = train.lighthouse_until_iter
    del train.tokenizer_type  # the launcher passes the tokenizer's flags itself
    if launch.tokenizer == "bytes":
        del train.vocab_size
    for key in with_role(all_specs(), SAME_MODEL):
        if train.get(key) is None and defaults()[key] is not None:
            train[key] = defaults()[key]
    if train.max_position_embeddings is None and train.seq_length is not None:
        train.max_position_embeddings = train.seq_length
    return train


def _check_training(r: Resolved) -> None:
    launch = r.launch
    nodes, nproc = _check_processes(launch)
    train = r.train = _training_settings(launch, r.train)
    unit = "GPUs" if launch.gpus_per_node else "processes"
    job_desc = f"{nodes} node{'s' if nodes > 1 else ''} x {nproc} {unit} = {nodes * nproc} {unit}"
    r.dp = check_flags(["--pipeline-model-parallel-size", str(launch.pipeline_model_parallel_size),
                        *as_flags(train)], nodes * nproc, launch.data_parallel_size, job_desc)
    # Typed by the trainer's fields already; the trainer's checks would refuse these on the cluster.
    train_iters = train.train_iters
    if not isinstance(train_iters, int) or train_iters < 1:
        raise ValueError(f"train_iters must be an integer >= 1, got {train_iters!r}")
    if train.exit_interval is not None and train.exit_interval < 1:
        raise ValueError(f"exit_interval must be an integer >= 1, got {train.exit_interval!r}")
    if train.exit_interval is not None and train.exit_interval > train_iters:
        raise ValueError(f"exit_interval {train.exit_interval} must be <= train_iters {train_iters}")
    launch.target_iteration = train.exit_interval or train_iters
    limit = _time_limit(launch.time)
    if limit and launch.exit_duration_mins is None:
        # Room to save a checkpoint and exit before Slurm kills the job.
        margin = max(EXIT_MARGIN, limit // 20)
        if limit <= margin:
            raise ValueError(f"time {launch.time!r} is {_count(limit, 'minute')}: a train job needs more "
                             f"than {EXIT_MARGIN} (Megatron-LM saves and exits {EXIT_MARGIN} minutes before "
                             "the limit; set exit_duration_mins for a shorter margin)")
        launch.exit_duration_mins = limit - margin
    exit_after = launch.exit_duration_mins = launch.exit_duration_mins or 0
    if limit and exit_after >= limit:
        raise ValueError(f"exit_duration_mins {exit_after} must be below the time limit ({launch.time} = "
                         f"{limit} min): Megatron-LM saves and exits then, before Slurm kills the job")
    if train.data_path:
        _check_tokenizer(train.data_path, str(launch.tokenizer))


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


def check_chain(resolved: dict[str, Resolved]) -> None:
    """Stage 1, the conversion and stage 2 fit together: each reads what the one before wrote,
    and stage 2 continues stage 1's model and schedule to the end."""
    s1, conv, s2 = (resolved[n] for n in CHAIN)
    if conv.launch.input != s1.launch.save_dir:
        raise ValueError(f"convert input {conv.launch.input!r} is not stage1's save_dir "
                         f"{s1.launch.save_dir!r}")
    if s2.launch.init_checkpoint != conv.launch.output:
        raise ValueError(f"stage2 init_checkpoint {s2.launch.init_checkpoint!r} is not convert's "
                         f"output {conv.launch.output!r}")
    for key in with_role(all_specs(), CONTINUED):
        if s1.train.get(key) != s2.train.get(key):
            raise ValueError(f"stage2 continues stage1's model and schedule: {key} differs "
                             f"({s1.train.get(key)} vs {s2.train.get(key)})")
    stop = s1.train.exit_interval
    if not stop or int(stop) >= int(s1.train.train_iters):
        raise ValueError(f"stage1 must stop below train_iters {s1.train.train_iters} (exit_interval, or "
                         f"the recipe's lighthouse_until_iter; got {stop or 'none'}): stage 2 trains the "
                         "rest")
