"""`lighthouse-megatron slurm`: fill the sbatch templates in slurm/ and submit the two-stage chain.

The templates are sbatch scripts that run as they are: a `#SBATCH` header, a block of
`NAME=value` settings between `# ---- settings ----` and `# ---- end of settings ----`, then
the launch code. Rendering rewrites only header options and settings' values, so a rendered
script is the template with other values, and it is checked before anything is written:
TP x CP x PP x DP against the job's processes, the batch sizes against DP, the heads against
TP and the sequence and Lighthouse settings against the CP degree.

Values come from the template, then a YAML file, then the command line. In the YAML file,
top-level keys apply to every template that has the setting and a section named after a
template (`stage1:`, `convert:`, `stage2:`, `1m:`) to that template only. Keys are the
settings' names in lower case plus `nodes`, `gpus_per_node` (0: a CPU job of
`nproc_per_node` processes per node), `partition`, `account`, `time`, `job_name` and
`log_dir` (the `#SBATCH` header).

Python API: `load_template(name_or_path) -> Template`; `resolve(template, values) -> dict`
(the checked values); `render(template, values) -> str` (the script); `render_chain(config,
overrides) -> {stage: script}` (stage1, convert, stage2, also checked as a chain);
`write_script(text, path, force)`; `submit_chain({stage: path}) -> {stage: job id}`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LighthouseConfig, nearest_multiples

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "slurm"
TEMPLATES = {
    "stage1": "stage1_lighthouse.sbatch",
    "convert": "convert.sbatch",
    "stage2": "stage2_dense.sbatch",
    "1m": "lighthouse_1m.sbatch",
}
CHAIN = ("stage1", "convert", "stage2")
ENGINES = ("megatron-lm", "trainer")
ATTENTION_IMPLS = ("dense", "lighthouse")
# Keys that set `#SBATCH` options; nodes and GPUs only exist for the training templates.
SBATCH_OPTIONS = {"job_name": "job-name", "time": "time", "partition": "partition", "account": "account"}
LAYOUT_OPTIONS = {"nodes": "nodes", "gpus_per_node": "gpus-per-node"}
# Stage 2 continues stage 1's model and schedule: these must agree between them.
CONTINUED_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "seq_length", "train_iters", "lr", "min_lr", "lr_warmup_iters", "global_batch_size")

_SETTING = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")
_SBATCH = re.compile(r"^#(#?)SBATCH --([a-z-]+)=(.*)$")


@dataclass
class Template:
    name: str
    path: Path
    lines: list[str]
    settings: dict[str, int]  # UPPER_NAME -> line index
    sbatch: dict[str, int]  # option -> line index, enabled (#SBATCH) or not (##SBATCH)

    @property
    def is_training(self) -> bool:
        return "NPROC_PER_NODE" in self.settings

    def keys(self) -> list[str]:
        keys = [name.lower() for name in self.settings]
        options = {**SBATCH_OPTIONS, **(LAYOUT_OPTIONS if self.is_training else {})}
        keys += [key for key, option in options.items() if option in self.sbatch]
        return sorted(keys + ["log_dir"])

    def defaults(self) -> dict[str, str]:
        out = {}
        for name, i in self.settings.items():
            words = shlex.split(_SETTING.match(self.lines[i]).group(2))
            out[name.lower()] = " ".join(words)
        for key, option in {**SBATCH_OPTIONS, **LAYOUT_OPTIONS}.items():
            if option in self.sbatch:
                disabled, _, value = _SBATCH.match(self.lines[self.sbatch[option]]).groups()
                out[key] = "" if disabled else value
        if self.is_training and out.get("gpus_per_node", "") == "":
            out["gpus_per_node"] = "0"
        out["log_dir"] = ""
        return out


def load_template(name_or_path: str | os.PathLike) -> Template:
    """A template by name (stage1, convert, stage2, 1m) or by path (a copy of one)."""
    name = str(name_or_path)
    path = TEMPLATE_DIR / TEMPLATES[name] if name in TEMPLATES else Path(name)
    if not path.is_file():
        if name not in TEMPLATES and os.sep not in name and not name.endswith(".sbatch"):
            raise ValueError(f"unknown template {name!r}; valid: {', '.join(TEMPLATES)} or a path to a file")
        raise ValueError(f"template {path} not found (the templates are in the repository's slurm/ folder)")
    lines = path.read_text().splitlines()
    try:
        start = lines.index("# ---- settings ----")
        end = lines.index("# ---- end of settings ----")
    except ValueError:
        raise ValueError(
            f"{path} is not a lighthouse-megatron template: no '# ---- settings ----' block") from None
    settings = {}
    for i in range(start + 1, end):
        m = _SETTING.match(lines[i])
        if m:
            settings[m.group(1)] = i
    sbatch = {}
    for i, line in enumerate(lines[:start]):
        m = _SBATCH.match(line)
        if m:
            sbatch[m.group(2)] = i
    stem = next((k for k, v in TEMPLATES.items() if path.name == v), path.stem)
    return Template(stem, path, lines, settings, sbatch)


def _as_str(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number or a string, got {value!r}")
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
        if any(not v or any(c.isspace() for c in v) for v in items):
            raise ValueError(f"{key}: list items must be single words, got {value!r}")
        return " ".join(items)
    if isinstance(value, Mapping):
        raise ValueError(f"{key} must be a value, got a mapping (sections are only allowed at the top level)")
    return str(value)


def resolve(template: Template, values: Mapping[str, Any]) -> dict[str, str]:
    """The template's values with `values` applied, checked (ValueError naming what is wrong)."""
    valid = template.keys()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(
            f"{template.name}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    out = template.defaults()
    out.update({k: _as_str(k, v) for k, v in values.items()})
    if template.is_training:
        _check_training(template.name, out, values)
    return out


def _int(v: Mapping[str, str], key: str, minimum: int = 1) -> int:
    try:
        n = int(v[key])
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {v[key]!r}") from None
    if n < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {n}")
    return n


def _check_training(name: str, v: dict[str, str], given: Mapping[str, Any]) -> None:
    """Fill in processes per node, then check the layout, batch, heads and Lighthouse settings."""
    try:
        engine, impl = v["engine"], v["attention_impl"]
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
        nodes, gpus = _int(v, "nodes"), _int(v, "gpus_per_node", minimum=0)
        if gpus == 0:
            if "nproc_per_node" not in given:
                raise ValueError("gpus_per_node 0 (a CPU job) needs nproc_per_node, the processes per node")
            if engine != "trainer":
                raise ValueError("a CPU job (gpus_per_node 0) needs engine trainer: Megatron-LM's "
                                 "pretraining needs CUDA")
        elif "nproc_per_node" in given and str(given["nproc_per_node"]) != str(gpus):
            raise ValueError(f"nproc_per_node {given['nproc_per_node']} != gpus_per_node {gpus}: "
                             "the templates start one process per GPU")
        else:
            v["nproc_per_node"] = str(gpus)
        nproc = _int(v, "nproc_per_node")
        cp = _int(v, "context_parallel_size")
        tp, pp = _int(v, "tensor_model_parallel_size"), _int(v, "pipeline_model_parallel_size")
        if engine == "trainer" and (nodes > 1 or pp > 1):
            raise ValueError(f"engine trainer runs on one node without pipeline parallelism (got nodes "
                             f"{nodes}, PP {pp}); use engine megatron-lm")
        dp = _check_layout(nodes, nproc, tp, cp, pp, v["data_parallel_size"], "GPUs" if gpus else "processes")

        micro, global_batch = _int(v, "micro_batch_size"), _int(v, "global_batch_size")
        if global_batch % (micro * dp):
            near = nearest_multiples(global_batch, micro * dp)
            raise ValueError(f"global_batch_size {global_batch} must be a multiple of micro_batch_size x "
                             f"DP = {micro} x {dp} = {micro * dp}; nearest valid: {near}")
        heads, groups = _int(v, "num_attention_heads"), _int(v, "num_query_groups")
        if heads % groups:
            raise ValueError(f"num_attention_heads {heads} must be a multiple of num_query_groups {groups}")
        if groups % tp:
            raise ValueError(f"num_query_groups {groups} (and num_attention_heads {heads}) must be "
                             f"multiples of TP = {tp}")
        seq, layers = _int(v, "seq_length"), _int(v, "num_layers")
        if layers % pp:
            raise ValueError(f"num_layers {layers} must be a multiple of PP = {pp}")
        if cp > 1 and seq % (2 * cp):
            raise ValueError(f"seq_length {seq} must be a multiple of 2 x CP = {2 * cp} (Megatron cuts a "
                             f"sequence into 2 x CP chunks); nearest valid: {nearest_multiples(seq, 2 * cp)}")
        if impl == "lighthouse":
            cfg = LighthouseConfig(
                levels=_int(v, "lighthouse_levels"), pooling_factor=_int(v, "lighthouse_pooling_factor"),
                topk=_int(v, "lighthouse_topk"), tile_topk=_int(v, "lighthouse_tile_topk"),
                dense_layers=[int(i) for i in v["lighthouse_dense_layers"].split()])
            cfg.validate(seq, cp)
            cfg.resolve_dense_layers(layers)
        train_iters = _int(v, "train_iters")
        if v["exit_interval"] and _int(v, "exit_interval") > train_iters:
            raise ValueError(f"exit_interval {v['exit_interval']} must be <= train_iters {train_iters}")
        limit = _minutes(v.get("time", ""))
        if limit and "time" in given and "exit_duration_mins" not in given:
            # Room to save a checkpoint and exit before Slurm kills the job.
            v["exit_duration_mins"] = str(max(limit - max(10, limit // 20), 1))
        exit_after = _int(v, "exit_duration_mins", minimum=0)
        if limit and exit_after >= limit:
            raise ValueError(f"exit_duration_mins {exit_after} must be below the time limit ({v['time']} = "
                             f"{limit} min): Megatron-LM saves and exits then, before Slurm kills the job")
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _minutes(time_limit: str) -> int | None:
    """Slurm's --time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes; None if not one."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", time_limit.strip())
    if not m:
        return None
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 1440 + a * 60 + (b or 0)
    if c is not None:  # H:M:S
        return a * 60 + b
    return a  # M or M:S


def _check_layout(nodes: int, nproc: int, tp: int, cp: int, pp: int, dp_setting: str, unit: str) -> int:
    world, mp = nodes * nproc, tp * cp * pp
    job = f"{nodes} node{'s' if nodes > 1 else ''} x {nproc} {unit} = {world} {unit}"
    if dp_setting == "auto":
        if world % mp:
            raise ValueError(f"TP x CP x PP = {tp} x {cp} x {pp} = {mp} does not divide the job's {job}")
        return world // mp
    try:
        dp = int(dp_setting)
    except ValueError:
        raise ValueError(f"data_parallel_size must be auto or an integer, got {dp_setting!r}") from None
    if dp < 1 or mp * dp != world:
        hints = []
        if world % mp == 0:
            hints.append(f"DP = {world // mp}")
        if dp >= 1 and (mp * dp) % nproc == 0:
            hints.append(f"{mp * dp // nproc} nodes")
        hint = f"; use {' or '.join(hints)}" if hints else ""
        raise ValueError(f"TP x CP x PP x DP = {tp} x {cp} x {pp} x {dp} = {mp * dp}, but the job has "
                         f"{job}{hint}")
    return dp


def render(template: Template, values: Mapping[str, Any]) -> str:
    """The script: the template with `values` (checked by `resolve`) in its header and settings."""
    v = resolve(template, values)
    defaults = template.defaults()
    lines = list(template.lines)
    for name, i in template.settings.items():
        key = name.lower()
        if key in values or v[key] != defaults[key]:  # given, or derived (processes, clean exit)
            lines[i] = f"{name}={shlex.quote(v[key]) if v[key] else ''}"
    options = {**SBATCH_OPTIONS, **(LAYOUT_OPTIONS if template.is_training else {})}
    for key, option in options.items():
        if key in values and option in template.sbatch:
            value = v[key]
            off = value == "" or (key == "gpus_per_node" and value == "0")
            prefix = "##" if off else "#"
            lines[template.sbatch[option]] = f"{prefix}SBATCH --{option}={value or option.upper()}"
    if v["log_dir"]:
        i = template.sbatch["output"]
        lines[i] = f"#SBATCH --output={Path(v['log_dir']).resolve() / '%x-%j.out'}"
    lines.insert(1, f"# Rendered by lighthouse-megatron slurm render from {template.path.name}.")
    return "\n".join(lines) + "\n"


def write_script(text: str, path: Path, force: bool = False) -> None:
    """Write atomically (a temporary name, then rename); an existing file only with force."""
    path = Path(path)
    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ------------------------------------------------------------------------- configs


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must be a mapping of settings, got {type(data).__name__}")
    return data


def values_for(template: Template, config: Mapping[str, Any], overrides: Mapping[str, Any],
               known: set[str]) -> dict[str, Any]:
    """What applies to `template`: top-level keys it has, its section, then command-line values
    it has. Keys no template has are refused; `known` is the union of the templates' keys."""
    mine = set(template.keys())
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            if key not in TEMPLATES:
                raise ValueError(f"--config: unknown section {key!r}; sections: {', '.join(TEMPLATES)}")
            continue
        if key not in known:
            raise ValueError(f"--config: unknown setting {key!r}; valid: {', '.join(sorted(known))}")
        if key in mine:
            out[key] = value
    out.update(config.get(template.name, {}) if isinstance(config.get(template.name), Mapping) else {})
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown setting {key!r}; valid: {', '.join(sorted(known))}")
        if key in mine:
            out[key] = value
    return out


def _known_keys(templates: list[Template]) -> set[str]:
    return set().union(*(t.keys() for t in templates))


def _path(v: Mapping[str, str], key: str) -> str:
    """A path setting with $CHECKPOINT_ROOT, which the templates use, substituted."""
    root = v.get("checkpoint_root", "")
    return v[key].replace("${CHECKPOINT_ROOT}", root).replace("$CHECKPOINT_ROOT", root)


def _check_chain(resolved: dict[str, dict[str, str]]) -> None:
    s1, conv, s2 = (resolved[n] for n in CHAIN)
    if _path(conv, "input") != _path(s1, "save_dir"):
        raise ValueError(f"convert input {_path(conv, 'input')!r} is not stage1's save_dir "
                         f"{_path(s1, 'save_dir')!r}")
    if _path(s2, "init_checkpoint") != _path(conv, "output"):
        raise ValueError(f"stage2 init_checkpoint {_path(s2, 'init_checkpoint')!r} is not convert's output "
                         f"{_path(conv, 'output')!r}")
    for key in CONTINUED_KEYS:
        if s1[key] != s2[key]:
            raise ValueError(f"stage2 continues stage1's model and schedule: {key} differs "
                             f"({s1[key]} vs {s2[key]})")
    stop = s1["exit_interval"]
    if not stop or int(stop) >= int(s1["train_iters"]):
        raise ValueError(f"stage1 exit_interval must be set below train_iters {s1['train_iters']} (got "
                         f"{stop or 'none'}): stage 1 stops there and stage 2 trains the rest")
    if s2["exit_interval"] and int(s2["exit_interval"]) <= int(stop):
        raise ValueError(f"stage2 exit_interval {s2['exit_interval']} must be empty or above stage1's {stop}")


def render_chain(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, str]:
    """Scripts for stage1, convert and stage2, checked alone and as a chain."""
    templates = [load_template(n) for n in CHAIN]
    known = _known_keys(templates)
    values = {t.name: values_for(t, config, overrides, known) for t in templates}
    resolved = {t.name: resolve(t, values[t.name]) for t in templates}
    _check_chain(resolved)
    return {t.name: render(t, values[t.name]) for t in templates}


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


# ---------------------------------------------------------------------------- CLI

_NAMED = [  # (flag, key, type)
    ("--nodes", "nodes", int),
    ("--gpus-per-node", "gpus_per_node", int),
    ("--nproc-per-node", "nproc_per_node", int),
    ("--tensor-model-parallel-size", "tensor_model_parallel_size", int),
    ("--context-parallel-size", "context_parallel_size", int),
    ("--pipeline-model-parallel-size", "pipeline_model_parallel_size", int),
    ("--data-parallel-size", "data_parallel_size", str),
    ("--seq-length", "seq_length", int),
    ("--engine", "engine", str),
    ("--partition", "partition", str),
    ("--account", "account", str),
    ("--time", "time", str),
    ("--log-dir", "log_dir", str),
    ("--checkpoint-root", "checkpoint_root", str),
    ("--data-path", "data_path", str),
    ("--megatron-lm", "megatron_lm", str),
    ("--venv", "venv", str),
    ("--container-image", "container_image", str),
]


def _add_value_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of settings (top level: every template; a section "
                   "named after a template: that template)")
    for flag, key, typ in _NAMED:
        p.add_argument(flag, dest=f"v_{key}", type=typ, metavar=key.upper())
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, by its name in lower case (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite existing scripts")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    for _, key, _ in _NAMED:
        value = getattr(args, f"v_{key}")
        if value is not None:
            out[key] = value
    return out


def add_slurm_parser(sub: argparse._SubParsersAction) -> None:
    slurm = sub.add_parser("slurm", help="fill the Slurm templates and submit the two-stage chain")
    cmds = slurm.add_subparsers(dest="slurm_command", required=True)
    r = cmds.add_parser("render", help="write one filled, checked sbatch script")
    r.add_argument("template", help=f"{', '.join(TEMPLATES)} or a path to a template")
    r.add_argument("--output", "-o", required=True, help="the script to write")
    _add_value_args(r)
    r.set_defaults(func=_run_render)
    s = cmds.add_parser("submit", help="render stage1, convert and stage2; submit them chained with afterok")
    s.add_argument("--output-dir", required=True, help="where the three scripts are written")
    s.add_argument("--dry-run", action="store_true", help="write the scripts, print the sbatch commands")
    _add_value_args(s)
    s.set_defaults(func=_run_submit)


def _error(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _make_log_dir(text: str) -> None:
    # Slurm does not create the --output directory: without it the job fails with no log.
    m = re.search(r"^#SBATCH --output=(.*)/[^/]*$", text, re.M)
    if m:
        Path(m.group(1)).mkdir(parents=True, exist_ok=True)


def _run_render(args: argparse.Namespace) -> int:
    try:
        template = load_template(args.template)
        known = _known_keys([template] + [load_template(n) for n in TEMPLATES])
        values = values_for(template, load_config(args.config), _overrides(args), known)
        extra = sorted(set(_overrides(args)) - set(template.keys()))
        if extra:
            raise ValueError(f"{template.name} has no setting(s) {', '.join(extra)}; valid: "
                             f"{', '.join(template.keys())}")
        text = render(template, values)
        write_script(text, Path(args.output), args.force)
        _make_log_dir(text)
    except (ValueError, OSError) as e:
        return _error(e)
    print(f"wrote {args.output}")
    return 0


def _run_submit(args: argparse.Namespace) -> int:
    try:
        scripts = render_chain(load_config(args.config), _overrides(args))
        out = Path(args.output_dir)
        paths = {name: out / f"{name}.sbatch" for name in CHAIN}
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing and not args.force:
            raise ValueError(f"{', '.join(existing)} exist(s); pass --force to overwrite")
        for name, text in scripts.items():
            write_script(text, paths[name], force=True)
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
