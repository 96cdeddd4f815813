"""`lighthouse-megatron slurm render/submit`: the one launcher filled from a job file and its
recipe, and the two-stage chain submitted with afterok dependencies (`jobs`)."""

from .jobs import (
    CHAIN,
    JOBS,
    LAUNCHER,
    SETTINGS_END,
    SETTINGS_START,
    SLURM_DIR,
    Job,
    Resolved,
    add_slurm_parser,
    load_config,
    load_job,
    render,
    render_chain,
    resolve,
    submit_chain,
    values_for,
    write_script,
)

__all__ = ["CHAIN", "JOBS", "LAUNCHER", "SETTINGS_END", "SETTINGS_START", "SLURM_DIR", "Job", "Resolved",
           "add_slurm_parser", "load_config", "load_job", "render", "render_chain", "resolve", "submit_chain",
           "values_for", "write_script"]
