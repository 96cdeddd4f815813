"""A Slurm job's own settings (`SlurmJob`): everything in a job file that is not a training
setting. A job file holds `job` (train or convert), a `recipe` to train (train jobs) and
settings; the trainer's settings override the recipe's, the others are these: the Slurm
header, the engine, the environment, the paths. `slurm render` and `slurm submit` take some of
both as flags (`render=True`), the rest with `--set KEY=VALUE`.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

from .fields import Spec, merged, setting, specs
from .tree import train_specs

JOB_KINDS = ("train", "convert")
ENGINES = ("megatron-lm", "trainer")
TIME_FORMATS = ("MINUTES", "MINUTES:SECONDS", "HOURS:MINUTES:SECONDS", "DAYS-HOURS", "DAYS-HOURS:MINUTES",
                "DAYS-HOURS:MINUTES:SECONDS")
TRAIN, CONVERT, BOTH = ("train",), ("convert",), JOB_KINDS
# The job settings written into #SBATCH lines: sbatch splits those at blanks, reads quotes and
# backslashes, and cuts them at '#'; no shell quotes them. So: these characters only (a pattern
# and its words). The job name is also the log file's name (%x): no '/'.
_NAME = (r"[\w.+-]+", "letters, digits, '.', '_', '+' and '-'")
_NAMES = (f"{_NAME[0]}(,{_NAME[0]})*", f"{_NAME[1]} (a list: comma-separated)")
SBATCH_VALUES = {"job_name": _NAME, "partition": _NAMES, "convert_partition": _NAMES, "account": _NAME,
                 "log_dir": (r"[\w./+,:=@-]+", "a path of letters, digits and / . _ + , : = @ -")}


@dataclass
class SlurmJob:
    job: str | None = setting(None, "train or convert", choices=JOB_KINDS, kinds=BOTH)
    recipe: str | None = setting(None, "the trainer settings to run: a recipe the package ships (98k, tiny, "
                                 "1m-cp8) or a YAML file, relative to the job file", kinds=TRAIN)
    stop_at_switch: bool = setting(False, "stop at the recipe's lighthouse_until_iter (stage 1 of the chain)",
                                   kinds=TRAIN)
    job_name: str | None = setting(None, "#SBATCH --job-name", derived="lighthouse-JOB", kinds=BOTH)
    nodes: int = setting(1, "#SBATCH --nodes", minimum=1, render=True, kinds=TRAIN)
    gpus_per_node: int = setting(0, "GPUs per node; 0: a CPU job of --nproc-per-node processes", minimum=0,
                                 render=True, kinds=TRAIN)
    nproc_per_node: int | None = setting(None, "processes per node", derived="--gpus-per-node", minimum=1,
                                         render=True, kinds=TRAIN)
    pipeline_model_parallel_size: int = setting(1, "PP (Megatron-LM)", minimum=1, render=True, kinds=TRAIN)
    data_parallel_size: str = setting("auto", "DP: auto (what the job's GPUs leave), or a number that is "
                                      "checked", render=True, kinds=TRAIN)
    engine: str = setting("megatron-lm", "megatron-lm (Megatron-LM's pretraining) or trainer "
                          "(lighthouse-megatron train, one node)", render=True, kinds=TRAIN)
    partition: str = setting("", "#SBATCH --partition", derived="Slurm's default partition", render=True,
                             kinds=BOTH)
    convert_partition: str = setting("", "the conversion's partition", derived="--partition", render=True,
                                     kinds=BOTH)
    account: str = setting("", "#SBATCH --account", derived="none", render=True, kinds=BOTH)
    time: str | None = setting(None, "#SBATCH --time, in one of Slurm's formats (" + ", ".join(TIME_FORMATS)
                               + "); Megatron-LM then saves and exits before it", render=True, kinds=BOTH)
    log_dir: str = setting("", "folder of the job logs", derived="the submission directory", render=True,
                           kinds=BOTH)
    checkpoint_root: str | None = setting(None, "folder holding the jobs' checkpoints", render=True,
                                          derived="none: required", kinds=BOTH)
    tokenizer: str = setting("bytes", "bytes (byte-level data from prepare-data) or a local Hugging Face "
                             "tokenizer folder", render=True, kinds=TRAIN)
    megatron_lm: str = setting("", "Megatron-LM checkout (engine megatron-lm)",
                               derived="none: required without --container-image", render=True, kinds=TRAIN)
    venv: str = setting("", "virtual environment the job activates", derived="none", render=True, kinds=BOTH)
    container_image: str = setting("", "pyxis/enroot image the job runs in", derived="none", render=True,
                                   kinds=BOTH)
    container_mounts: str = setting("", "the container's mounts", derived="none", kinds=BOTH)
    # The launcher passes --save and --load itself, from these: a recipe's are not used.
    save_dir: str | None = setting(None, "the job's checkpoints (under checkpoint_root)", kinds=TRAIN)
    init_checkpoint: str = setting("", "checkpoint of a first start (under checkpoint_root)", derived="none",
                                   kinds=TRAIN)
    input: str | None = setting(None, "convert: stage 1's checkpoints (under checkpoint_root)", kinds=CONVERT)
    output: str | None = setting(None, "convert: the dense checkpoint (under checkpoint_root)", kinds=CONVERT)
    exit_duration_mins: int | None = setting(None, "Megatron-LM's clean exit before the time limit (0: off)",
                                             derived="from --time: room to save before Slurm stops the job",
                                             minimum=0, kinds=TRAIN)
    extra_args: str = setting("", "more training arguments", derived="none", kinds=TRAIN)
    convert_args: str = setting("", "more convert arguments", derived="none", kinds=CONVERT)


@functools.cache
def job_specs() -> dict[str, Spec]:
    return specs(SlurmJob)


def takes(kind: str | None, key: str) -> bool:
    """Whether a job of `kind` takes setting `key`: a convert job takes its own keys only, a train
    job every training setting and its own keys."""
    spec = job_specs().get(key)
    if spec is None:
        return kind != "convert"
    return kind in spec.kinds


# Paths relative to checkpoint_root.
CHECKPOINT_PATHS = ("save_dir", "init_checkpoint", "input", "output")


def launcher_sets() -> tuple[str, ...]:
    """The training settings a job sets from its own keys (--save from save_dir, --load from
    init_checkpoint or save_dir), never from the recipe."""
    return ("save", "load")


@functools.cache
def render_specs() -> dict[str, Spec]:
    """The settings `slurm render` and `slurm submit` take as flags: the job's and a few trainer
    settings (the layout, the sequence, the data)."""
    own = {k: s for k, s in job_specs().items() if s.render}
    trained = {k: s for k, s in train_specs().items() if s.render}
    return merged(own, trained)


def add_render_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `render_specs` (dest `v_NAME`: unset stays None, so the job file's value stays)."""
    for key, s in render_specs().items():
        where = "the job file's" if key in job_specs() else "the job file's, else the recipe's"
        p.add_argument(s.flag, dest=f"v_{key}", type=s.kind if s.kind in (int, float) else str,
                       metavar=key.upper(), help=f"{s.render_help or s.help} (default: {where}, else "
                       f"{s.default_text()})")
