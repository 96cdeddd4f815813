"""`lighthouse-megatron slurm render/submit`: the one launcher filled from a job file and its
recipe (`jobs`: the settings merged and checked; `script`: the filled launcher), and the
two-stage chain submitted with afterok dependencies (`cli`).

Python API: `load_job(name_or_path) -> Job`; `resolve(job, values) -> Resolved`;
`render(job, values) -> str`; `render_chain(config, overrides) -> {stage: script}`;
`write_script(text, path, force)`; `submit_chain({stage: path}) -> {stage: job id}` (SubmitError
when sbatch refuses a job: the ones before it are cancelled).
"""

from .cli import SubmitError, add_slurm_parser, submit_chain
from .jobs import CHAIN, JOBS, Job, Resolved, load_config, load_job, resolve, values_for
from .script import LAUNCHER, SETTINGS_END, SETTINGS_START, render, render_chain, write_script

__all__ = ["CHAIN", "JOBS", "LAUNCHER", "SETTINGS_END", "SETTINGS_START", "Job", "Resolved", "SubmitError",
           "add_slurm_parser", "load_config", "load_job", "render", "render_chain", "resolve", "submit_chain",
           "values_for", "write_script"]
