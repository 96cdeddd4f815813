"""`python -m benchmarks.quality.run`: the time-to-dense-quality study's runs, in the background.

    python -m benchmarks.quality.run start --work DIR [--preset default] [--iters 2560] [--seeds 1-6]
                                           [--switches 62.5,75] [--jobs 6] [--time-budget S]
    python -m benchmarks.quality.run status --work DIR        # poll: one line per run
    python -m benchmarks.quality.run stop --work DIR
    python -m benchmarks.quality.run budget --work DIR --time-budget S [--sec-per-iter X]

`start` copies the project into DIR/src (a later sync of the working tree cannot touch what runs),
writes DIR/plan.json (and appends it to DIR/plans.jsonl) and starts a scheduler in a new process
session (it outlives the shell that started it) that builds the corpus (`corpus.py`: every distinct
Python source of the machine, read once) and runs the trainer jobs, up to --jobs at once on the one
GPU. Per seed:

    dense            dense attention from scratch for --iters iterations (the control)
    lighthouse_S     Lighthouse attention up to switch S, a chain of resumed segments (one per switch)
    recovered_S      resumes lighthouse_S's checkpoint with every layer dense from S on (the trainer's
                     in-run switch, `--lighthouse-until-iter S`: the same weights, optimizer state,
                     schedule and data position as a dense relaunch), to --iters; its first iteration
                     also records the switch probe (that batch's loss under both attentions)

`--recipes` adds the two-stage recipe's variants beside the paper's hard switch (`paper`):
`dense-every-M`, `progressive-P`, `grow-P` (P: percent of stage 1; the window recipes run stage 1
from scratch for each switch, named lighthouse-<recipe>_S and recovered-<recipe>_S), `topk-M` (all of
stage 1 at M times the preset's k); every recipe shares the seed's dense control. `recipe@S1/S2`
runs that recipe at its own switches (percent) instead of --switches: `paper,grow-10@75` gives the
hard switch at every --switches point and the variant at 75% only, beside one dense control per seed.

Each finished job becomes one JSON, DIR/runs/<preset>-<iters>/seed<N>_<arm>.json (settings, command,
device, versions, corpus digest, every logged loss), the unit that `analyze.py` aggregates; copy
them to benchmarks/quality/runs/ to commit them. Running `start` again on the same DIR (same plan)
runs only the jobs without a JSON, so a cut lease loses only the jobs that were running;
`--reuse DIR` (for example benchmarks/quality/runs) takes a planned job's JSON from DIR/<batch>/ instead
of running it, so a recipe variant pairs with the committed dense control of its seed. A run found
either way must come from this machine's corpus (the same digest), or the scheduler stops. `budget`
replaces a running scheduler's time budget (S seconds from now) and speed estimate, which it reads
before it next starts or skips a job; its running jobs go on.
Every run reads each training token at most once (`--allow-repeat` to override, recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._common import UsageError, main, nvidia_smi_name, usage_errors_as_exit_2, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EVALS_PER_RUN = 40
HELDOUT_SEQUENCES = 32
BUDGET = "budget.json"  # `budget`'s deadline and speed estimate, read by the running scheduler

OPTIMIZER = dict(adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1, clip_grad=1.0)


@dataclass(frozen=True)
class Preset:
    model: dict[str, Any]
    lighthouse: dict[str, Any]
    iters: int
    lr: float
    sec_per_iter: float  # per iteration with --jobs processes sharing the GPU (estimates only)
    corpus_mb: float | None  # None: every source file of the machine
    describe: str


LIGHTHOUSE_DEFAULT = dict(lighthouse_levels=3, lighthouse_pooling_factor=4, lighthouse_topk=256,
                          lighthouse_tile_topk=64, lighthouse_dense_layers=[0, -1])
PRESETS = {
    # S = 16384/16 + 2*4*256 = 3,072 gathered of 16,384 tokens (S/N 0.19, the paper's 98K ratio).
    "default": Preset(dict(num_layers=6, hidden_size=512, num_attention_heads=8, num_query_groups=8,
                           seq_length=16384, micro_batch_size=2, global_batch_size=2),
                      LIGHTHOUSE_DEFAULT, 2560, 1.5e-3, 0.3, None, "6 x 512, 16K tokens, batch 2"),
    # sec_per_iter: the default's 0.3 (measured, six jobs on an H100) times the FLOPs ratio, about 3.4.
    "wide": Preset(dict(num_layers=12, hidden_size=768, num_attention_heads=12, num_query_groups=12,
                        seq_length=16384, micro_batch_size=2, global_batch_size=2),
                   LIGHTHOUSE_DEFAULT, 2560, 1e-3, 1.0, None, "12 x 768, 16K tokens, batch 2"),
    # CPU tests: seconds. S = 256/16 + 2*4*16 = 144 of 256.
    "tiny": Preset(dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        seq_length=256, micro_batch_size=2, global_batch_size=2),
                   dict(LIGHTHOUSE_DEFAULT, lighthouse_topk=16, lighthouse_tile_topk=8), 80, 3e-3, 0.1, 3,
                   "3 x 32, 256 tokens, batch 2"),
}


@dataclass
class Job:
    name: str  # <batch>/seed<N>/<arm>
    arm: str  # dense, lighthouse, recovered
    seed: int
    settings: dict[str, Any]
    iters: int  # iterations this job trains
    deps: list[str] = field(default_factory=list)
    switch: int | None = None  # recovered: the switch; lighthouse: where the segment stops
    recipe: str = "paper"  # the two-stage recipe of lighthouse and recovered runs (RECIPES)
    status: str = "pending"  # pending, running, ok, failed, skipped
    why: str = ""
    seconds: float | None = None


# ---------------------------------------------------------------------------- plan


def parse_seeds(text: str) -> list[int]:
    """'1-6' or '1,2,5' -> seeds."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected a range '1-6' or a list '1,2,5'") from None
    if not seeds or min(seeds) < 1:
        raise UsageError(f"--seeds {text!r}: seeds are integers >= 1")
    return seeds


def switch_iteration(frac: float, iters: int, interval: int) -> int:
    """The switch, on an evaluation (stage 1 is evaluated where it ends), strictly inside the run."""
    it = round(frac * iters / interval) * interval
    if not 0 < it < iters:
        raise UsageError(f"switch {100 * frac:g}% of {iters} iterations falls outside the run")
    return it


def parse_switches(text: str, setting: str | None = None, sep: str = ",") -> list[float]:
    """Percent switch points -> sorted fractions; `setting` names the value in errors."""
    setting = setting or f"--switches {text!r}"
    out = []
    for part in text.split(sep):
        try:
            v = float(part.strip().rstrip("%"))
        except ValueError:
            raise UsageError(f"{setting}: percentages such as 62.5{sep}75") from None
        if not 0 < v < 100:
            raise UsageError(f"{setting}: each switch must lie strictly between 0 and 100")
        out.append(v / 100)
    return sorted(set(out))


def common_settings(preset: Preset, iters: int, work: Path, corpus: dict) -> dict[str, Any]:
    """The trainer settings every arm shares: the model, the paper's optimizer, a linear warm-up
    over the first 12.5% then a constant learning rate, the held-out set (HELDOUT_SEQUENCES
    sequences, the same for every seed and arm) evaluated EVALS_PER_RUN times."""
    gbs = preset.model["global_batch_size"]
    return {
        **preset.model, **OPTIMIZER, "lr": preset.lr, "min_lr": 0.0, "lr_warmup_iters": max(1, iters // 8),
        "lr_decay_iters": iters, "lr_decay_style": "constant", "train_iters": iters,
        "eval_interval": max(1, iters // EVALS_PER_RUN), "eval_iters": HELDOUT_SEQUENCES // gbs,
        "data_path": [corpus["train"]["prefix"]], "valid_data_path": [corpus["heldout"]["prefix"]],
        "log_interval": 1, "progress": False,
    }


# The two-stage recipes (issue: close the lag), as trainer settings for a switch at iteration S:
# "paper" the hard switch; "dense-every-M" every M-th stage-1 iteration dense; "progressive-P"
# the layers turn dense one by one over the last P% of stage 1; "grow-P" k doubles up to the
# largest valid k over the last P% of stage 1; "topk-M" all of stage 1 at M times the preset's k
# (M a power of two: the k that `bench e2e --recipe-steps` times at 98K for the growth ladder);
# "mean-merge" all of stage 1 with `--lighthouse-level-merge mean` (each token averages, not sums,
# the outputs of the entries covering it).
RECIPE_KINDS = ("paper", "dense-every", "progressive", "grow", "topk")
FIXED_RECIPES = {"paper": {}, "mean-merge": {"lighthouse_level_merge": "mean"}}
RECIPES_HELP = ("one of paper, mean-merge, dense-every-M (M >= 2), progressive-P, grow-P (P: percent of "
                "stage 1, 1..100), topk-M (M = 2, 4, 8, ...), each optionally @S1/S2 (its own switches, "
                "percent)")


def split_recipe(text: str) -> tuple[str, str]:
    """`recipe@S1/S2` -> (recipe, "S1/S2"); no `@`: (recipe, "")."""
    name, _, switches = text.partition("@")
    return name, switches


def parse_recipe(text: str) -> str:
    name, switches = split_recipe(text)
    if "@" in text:
        parse_switches(switches, f"--recipes {text!r}", sep="/")
    kind, _, value = name.rpartition("-")
    if name in FIXED_RECIPES:
        return text
    ok = kind in RECIPE_KINDS[1:] and value.isdigit() and int(value) >= (2 if kind in ("dense-every", "topk")
                                                                         else 1)
    if not ok or (kind in ("progressive", "grow") and int(value) > 100) or (
            kind == "topk" and int(value) & (int(value) - 1)):
        raise UsageError(f"--recipes {text!r}: {RECIPES_HELP}")
    return text


def check_recipe(recipe: str, preset: Preset) -> None:
    """Refuse at start-up a topk-M whose k the preset's sequence length cannot hold."""
    from lighthouse_megatron.config import LighthouseConfig

    if not recipe.startswith("topk-"):
        return
    lh = preset.lighthouse
    k = lh["lighthouse_topk"] * int(recipe.rpartition("-")[2])
    try:
        LighthouseConfig(levels=lh["lighthouse_levels"], pooling_factor=lh["lighthouse_pooling_factor"],
                         topk=k, tile_topk=lh["lighthouse_tile_topk"]).validate(preset.model["seq_length"])
    except ValueError as e:
        raise UsageError(f"--recipes {recipe}: k = {k} does not fit this preset ({e})") from e


def recipe_settings(recipe: str, switch: int, lighthouse: dict) -> dict[str, Any]:
    """The trainer settings of `recipe` for a stage 1 that ends at `switch` (`lighthouse`: the
    preset's Lighthouse settings)."""
    if recipe in FIXED_RECIPES:
        return dict(FIXED_RECIPES[recipe])
    kind, _, value = recipe.rpartition("-")
    if kind == "dense-every":
        return {"lighthouse_dense_every": int(value)}
    if kind == "topk":
        return {"lighthouse_topk": lighthouse["lighthouse_topk"] * int(value)}
    window = max(1, round(int(value) / 100 * switch))
    flag = "lighthouse_progressive_iters" if kind == "progressive" else "lighthouse_grow_topk_iters"
    return {"lighthouse_until_iter": switch, flag: window}


def chained(recipe: str) -> bool:
    """Can one stage-1 run serve every switch (no window that ends at the switch)?"""
    return recipe in FIXED_RECIPES or recipe.startswith(("dense-every", "topk"))


def plan_jobs(preset: Preset, iters: int, seeds: list[int], switches: list[float], common: dict,
              work: Path, batch: str, recipes: tuple[str, ...] = ("paper",)) -> list[Job]:
    """Every job, seed by seed (a seed's runs finish before the next seed's start, given the slots):
    one dense control per seed, and per recipe its stage-1 runs and a recovered run per switch (the
    recipe's own switches where it names them, `grow-10@75`)."""
    interval = common["eval_interval"]
    jobs: list[Job] = []
    for seed in seeds:
        key, s = f"{batch}/seed{seed}", {**common, "seed": seed}
        jobs.append(Job(f"{key}/dense", "dense", seed, {**s, "attention_impl": "dense"}, iters))
        for recipe in recipes:
            name, own = split_recipe(recipe)
            mine = parse_switches(own, sep="/") if own else switches
            points = sorted({switch_iteration(f, iters, interval) for f in mine})
            jobs += _recipe_jobs(preset, iters, points, name, work, key, seed, s)
    for j in jobs:
        d = work / "jobs" / j.name
        j.settings.update(metrics_file=str(d / "metrics.jsonl"), data_cache_path=str(d / "data_cache"))
    return jobs


def _recipe_jobs(preset, iters, points, recipe, work, key, seed, s) -> list[Job]:
    tag = "" if recipe == "paper" else f"-{recipe}"
    lighthouse = {**s, **preset.lighthouse, "attention_impl": "lighthouse"}
    jobs, prev = [], None
    for sw in points:
        extra = recipe_settings(recipe, sw, preset.lighthouse)
        name = f"{key}/lighthouse{tag}_{sw}"
        seg = {**lighthouse, **extra, "exit_interval": sw, "save": str(work / "jobs" / name / "ckpt")}
        deps = []
        if prev is not None and chained(recipe):
            seg["load"] = str(work / "jobs" / f"{key}/lighthouse{tag}_{prev}" / "ckpt")
            deps = [f"{key}/lighthouse{tag}_{prev}"]
        start = prev if deps else 0
        jobs.append(Job(name, "lighthouse", seed, seg, sw - start, deps, switch=sw, recipe=recipe))
        rec = {**lighthouse, **extra, "lighthouse_until_iter": sw, "load": seg["save"]}
        jobs.append(Job(f"{key}/recovered{tag}_{sw}", "recovered", seed, rec, iters - sw, [name], switch=sw,
                        recipe=recipe))
        prev = sw
    return jobs


def result_path(work: Path, name: str) -> Path:
    batch, seed, arm = name.split("/")
    return work / "runs" / batch / f"{seed}_{arm}.json"


def finished_earlier(work: Path, name: str, reuse: str | None, digest: str) -> Path | None:
    """Job `name`'s JSON if it has one already, in WORK/runs or else in the --reuse folder. Raises
    ValueError for one made on another corpus: its seed's runs would not pair."""
    path = result_path(work, name)
    if not path.is_file() and reuse:
        path = Path(reuse) / path.relative_to(work / "runs")
    if not path.is_file():
        return None
    theirs = json.loads(path.read_text()).get("corpus")
    if theirs != digest:
        raise ValueError(f"{path}: made on corpus {theirs}, this machine's is {digest}; its seed's runs "
                         "would not pair (remove it, or run on the corpus it came from)")
    return path


def _keep_checkpoints_that_jobs_need(jobs: list[Job], earlier: dict[str, Path | None], work: Path) -> None:
    """A job taken from --reuse left its checkpoint on another machine: where a job that will run
    resumes from it, run it again too (and so on up its chain)."""
    changed = True
    while changed:
        changed = False
        for j in jobs:
            if earlier[j.name] is None:
                for d in j.deps:
                    if earlier[d] is not None and earlier[d] != result_path(work, d):
                        earlier[d], changed = None, True


# -------------------------------------------------------------------------- a run's JSON


def versions() -> dict:
    import importlib.metadata as md

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"python": sys.version.split()[0], "torch": v("torch"), "megatron_core": v("megatron-core"),
            "transformer_engine": v("transformer-engine") or v("transformer_engine"), "triton": v("triton")}


def run_record(job: Job, plan: dict, command: list[str], started: float, seconds: float) -> dict:
    """The per-run JSON: what ran (settings, command, device, versions, corpus) and every record
    the trainer logged (train losses per iteration, evaluations, the switch probe)."""
    lines = Path(job.settings["metrics_file"]).read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    train = [[r["iteration"], r["loss"]] for r in records if r["kind"] == "train"]
    evals: dict[str, list] = {}
    for r in records:
        if r["kind"] == "eval":
            evals.setdefault(r["attention"], []).append([r["iteration"], r["loss"]])
    switch = [r for r in records if r["kind"] == "switch"]
    return {
        "study": "quality", "run": job.name, "arm": job.arm, "seed": job.seed, "switch": job.switch,
        "recipe": job.recipe,
        "batch": plan["batch"], "preset": plan["preset"], "iters": plan["iters"],
        "settings": {k: v for k, v in job.settings.items() if k not in ("metrics_file", "data_cache_path")},
        "command": command, "device": plan["device"], "versions": plan["versions"],
        "corpus": plan["corpus_digest"], "epochs": plan["epochs"], "allow_repeat": plan["allow_repeat"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "wall_s": seconds,
        "train": train, "eval": evals, "switch_probe": switch[0] if switch else None,
        "time_per_iter_s": [r["time_per_iter_s"] for r in records if r["kind"] == "train"][-1:],
    }


# -------------------------------------------------------------------------- the scheduler


def read_budget(work: Path, deadline: float | None, sec_per_iter: float) -> tuple[float | None, float]:
    """The deadline and seconds per iteration of the scheduler in `work`: `budget`'s latest, else
    the given ones (those of the start)."""
    try:
        b = json.loads((work / BUDGET).read_text())
        return float(b["deadline"]), float(b["sec_per_iter"])
    except (OSError, ValueError, KeyError, TypeError):
        return deadline, sec_per_iter


class Scheduler:
    """Runs the plan's jobs, `parallel` at once, dependencies first; writes status.json."""

    def __init__(self, work: Path, plan: dict, jobs: list[Job], parallel: int, deadline: float | None):
        self.work, self.plan, self.jobs, self.parallel, self.deadline = work, plan, jobs, parallel, deadline
        self.by = {j.name: j for j in jobs}
        self.running: dict[str, tuple[subprocess.Popen, float, list[str]]] = {}

    def command(self, job: Job) -> list[str]:
        import yaml

        d = self.work / "jobs" / job.name
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "config.yaml"
        cfg.write_text(yaml.safe_dump(job.settings, sort_keys=False))
        return [sys.executable, "-m", "lighthouse_megatron.cli", "train", "--config", str(cfg), "--force"]

    def start(self, job: Job) -> None:
        argv = self.command(job)
        log = open(self.work / "jobs" / job.name / "train.log", "w")
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        Path(job.settings["metrics_file"]).unlink(missing_ok=True)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.plan["src"])
        log.close()
        self.running[job.name] = (proc, time.time(), argv)
        job.status = "running"
        print(f"[{time.strftime('%H:%M:%S')}] start {job.name}", flush=True)

    def finish(self, job: Job, rc: int) -> None:
        proc, started, argv = self.running.pop(job.name)
        job.seconds = time.time() - started
        job.status = "ok" if rc == 0 else "failed"
        if rc == 0:
            record = run_record(job, self.plan, argv, started, job.seconds)
            write_json(result_path(self.work, job.name), record)
        else:
            job.why = f"exit {rc}; log {self.work / 'jobs' / job.name / 'train.log'}"
        print(f"[{time.strftime('%H:%M:%S')}] {job.name}: {job.status} in {job.seconds:.0f} s {job.why}",
              flush=True)

    def blocked(self, job: Job) -> str | None:
        dead = [d for d in job.deps if self.by[d].status in ("failed", "skipped")]
        if dead:
            return f"{dead[0]} {self.by[dead[0]].status}"
        deadline, sec_per_iter = read_budget(self.work, self.deadline, self.plan["sec_per_iter"])
        need = job.iters * sec_per_iter + 30
        if deadline is not None and time.time() + need > deadline:
            return f"would not finish within the time budget (~{need:.0f} s)"
        return None

    def loop(self) -> None:
        while True:
            for name, (proc, _, _) in list(self.running.items()):
                if proc.poll() is not None:
                    self.finish(self.by[name], proc.returncode)
            for j in self.jobs:
                if j.status == "pending" and (why := self.blocked(j)):
                    j.status, j.why = "skipped", why
                    print(f"skip {j.name}: {why}", flush=True)
            ready = [j for j in self.jobs if j.status == "pending"
                     and all(self.by[d].status == "ok" for d in j.deps)]
            for j in ready[: max(0, self.parallel - len(self.running))]:
                self.start(j)
            self.write_status()
            if not self.running and not any(j.status == "pending" for j in self.jobs):
                return
            time.sleep(1.0)

    def write_status(self) -> None:
        write_json(self.work / "status.json", {"time": time.time(), "pid": os.getpid(),
                                               "jobs": [asdict(j) | {"settings": None} for j in self.jobs]})

    def stop(self) -> None:
        for proc, _, _ in self.running.values():
            proc.terminate()
        for name, (proc, _, _) in list(self.running.items()):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            self.by[name].status, self.by[name].why = "failed", "the study was stopped"
        self.running.clear()
        self.write_status()


# -------------------------------------------------------------------------- commands


def copy_project(dest: Path) -> None:
    """The package, the studies and pyproject into `dest` (replaced), as the runs import them."""
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "results")
    for name in ("lighthouse_megatron", "benchmarks"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")


def start(args) -> int:
    """Write the request, copy the project, start `serve` in a new session; return at once."""
    work = Path(args.work).resolve()
    pid = _serving(work)
    if pid:
        raise UsageError(f"--work {work}: a scheduler (pid {pid}) is still running; `stop` it first")
    preset = PRESETS[args.preset]
    iters = args.iters or preset.iters
    recipes = [parse_recipe(r) for r in args.recipes.split(",")]
    names = [split_recipe(r)[0] for r in recipes]
    if len(set(names)) < len(names):
        raise UsageError(f"--recipes {args.recipes!r}: a recipe is named twice (give one entry its "
                         "switches: grow-10@62.5/75)")
    for name in names:
        check_recipe(name, preset)
    if args.reuse and not Path(args.reuse).is_dir():
        raise UsageError(f"--reuse {args.reuse}: not a folder (the runs folder to take finished jobs from, "
                         "for example benchmarks/quality/runs)")
    request = {"preset": args.preset, "iters": iters, "seeds": parse_seeds(args.seeds),
               "switches": parse_switches(args.switches), "jobs": args.jobs,
               "recipes": recipes,
               "allow_repeat": args.allow_repeat,
               "reuse": str(Path(args.reuse).resolve()) if args.reuse else None,
               "time_budget_s": args.time_budget, "sec_per_iter": args.sec_per_iter or preset.sec_per_iter,
               "corpus_mb": args.corpus_mb if args.corpus_mb is not None else preset.corpus_mb,
               "data": str(Path(args.data).resolve()) if args.data else str(work / "data"),
               "command": " ".join(["python", "-m", "benchmarks.quality.run", *sys.argv[1:]])}
    work.mkdir(parents=True, exist_ok=True)
    (work / BUDGET).unlink(missing_ok=True)  # an earlier scheduler's
    write_json(work / "request.json", request)
    copy_project(work / "src")
    path = os.pathsep.join(x for x in (str(work / "src"), os.environ.get("PYTHONPATH")) if x)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    with open(work / "serve.log", "a") as log:
        argv = [sys.executable, "-m", "benchmarks.quality.run", "serve", "--work", str(work)]
        proc = subprocess.Popen(argv, cwd=work / "src", env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    (work / "serve.pid").write_text(str(proc.pid))
    print(f"started the scheduler (pid {proc.pid}); poll with: python -m benchmarks.quality.run status "
          f"--work {work}")
    if args.foreground:
        return proc.wait()
    return 0


def serve(args) -> int:
    """The background scheduler: corpus, plan, jobs (`start` launches it)."""
    from .corpus import build_corpus, check_read_once

    work = Path(args.work).resolve()
    req = json.loads((work / "request.json").read_text())
    preset = PRESETS[req["preset"]]
    deadline = time.time() + req["time_budget_s"] if req["time_budget_s"] else None
    gbs, seq = preset.model["global_batch_size"], preset.model["seq_length"]
    try:
        corpus = build_corpus(Path(req["data"]), heldout_tokens=2 * HELDOUT_SEQUENCES * (seq + 1),
                              limit_mb=req["corpus_mb"])
        epochs = check_read_once(corpus["train"]["tokens"], seq, req["iters"] * gbs, req["allow_repeat"])
    except ValueError as e:
        print(f"error: {e}", flush=True)
        return 2
    batch = f"{req['preset']}-{req['iters']}"
    common = common_settings(preset, req["iters"], work, corpus)
    jobs = plan_jobs(preset, req["iters"], req["seeds"], req["switches"], common, work, batch,
                     tuple(req.get("recipes", ["paper"])))
    plan = {**req, "batch": batch, "src": str(work / "src"), "device": nvidia_smi_name() or "cpu",
            "versions": versions(), "corpus_digest": corpus["digest"], "corpus": corpus, "epochs": epochs,
            "preset_describe": preset.describe, "common": common}
    write_json(work / "plan.json", plan)
    with open(work / "plans.jsonl", "a") as f:  # every start's plan: a later start replaces plan.json
        f.write(json.dumps({k: plan[k] for k in ("command", "batch", "device", "versions", "corpus_digest")})
                + "\n")
    try:  # every earlier JSON checked before any is copied in
        earlier = {j.name: finished_earlier(work, j.name, req.get("reuse"), corpus["digest"]) for j in jobs}
    except ValueError as e:
        print(f"error: {e}", flush=True)
        return 2
    _keep_checkpoints_that_jobs_need(jobs, earlier, work)
    for j in jobs:
        found, mine = earlier[j.name], result_path(work, j.name)
        if found is not None:
            j.status, j.why = "ok", "finished earlier" if found == mine else "taken from --reuse"
            if found != mine:
                mine.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(found, mine)
    sched = Scheduler(work, plan, jobs, req["jobs"], deadline)
    signal.signal(signal.SIGTERM, lambda *_: (sched.stop(), sys.exit(143)))
    print(f"corpus: {corpus['unique_files']:,} files, {corpus['train']['tokens']:,} training tokens; "
          f"each run reads {epochs:.2f} of an epoch; {sum(j.status == 'pending' for j in jobs)} jobs to run",
          flush=True)
    try:
        sched.loop()
    finally:
        sched.stop()
    failed = [j.name for j in jobs if j.status == "failed"]
    print(f"done: {sum(j.status == 'ok' for j in jobs)} ok, {len(failed)} failed, "
          f"{sum(j.status == 'skipped' for j in jobs)} skipped", flush=True)
    return 1 if failed else 0


def _serving(work: Path) -> int | None:
    """The scheduler's pid while it runs."""
    try:
        pid = int((work / "serve.pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    # A reused pid is not ours. A process reads as an empty command line for a moment while it
    # execs (and for good once it is a zombie): wait up to a second for it to read as one.
    for _ in range(20):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid
        if cmd:
            break
        time.sleep(0.05)
    return pid if b"benchmarks.quality.run" in cmd else None


def _progress(work: Path, name: str) -> str:
    path = work / "jobs" / name / "metrics.jsonl"
    try:
        last = [x for x in path.read_text().splitlines() if '"train"' in x][-1]
    except (OSError, IndexError):
        return ""
    r = json.loads(last)
    return f"iteration {r['iteration']} loss {r['loss']:.3f} ({r['time_per_iter_s'] * 1000:.0f} ms/it)"


def status(args) -> int:
    work = Path(args.work).resolve()
    pid = _serving(work)
    print(f"scheduler: {f'running, pid {pid}' if pid else 'not running'}")
    try:
        st = json.loads((work / "status.json").read_text())
    except (OSError, ValueError):
        print("no status yet (building the corpus?); serve.log says:")
        log = work / "serve.log"
        print("\n".join(log.read_text().splitlines()[-5:]) if log.is_file() else "(nothing)")
        return 0
    counts: dict[str, int] = {}
    for j in st["jobs"]:
        counts[j["status"]] = counts.get(j["status"], 0) + 1
        extra = _progress(work, j["name"]) if j["status"] == "running" else j["why"]
        secs = f"{j['seconds']:.0f} s" if j["seconds"] else ""
        print(f"  {j['name']:<40} {j['status']:<8} {secs:>7}  {extra}")
    print("  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) +
          f"; status written {time.time() - st['time']:.0f} s ago")
    return 0


def stop(args) -> int:
    work = Path(args.work).resolve()
    pid = _serving(work)
    if not pid:
        print("no scheduler is running")
        return 0
    os.kill(pid, signal.SIGTERM)
    print(f"sent SIGTERM to the scheduler (pid {pid}); its jobs stop and are marked failed")
    return 0


def budget(args) -> int:
    """Give the running scheduler a new time budget (from now) and speed estimate."""
    work = Path(args.work).resolve()
    pid = _serving(work)
    if not pid:
        raise UsageError(f"--work {work}: no scheduler is running")
    if args.time_budget <= 0 or (args.sec_per_iter is not None and args.sec_per_iter <= 0):
        raise UsageError("--time-budget and --sec-per-iter must be positive numbers of seconds")
    _, sec = read_budget(work, None, json.loads((work / "request.json").read_text())["sec_per_iter"])
    sec = args.sec_per_iter or sec
    write_json(work / BUDGET, {"deadline": time.time() + args.time_budget, "sec_per_iter": sec})
    print(f"the scheduler (pid {pid}) now skips jobs that would end more than {args.time_budget:.0f} s "
          f"from now at {sec} s per iteration")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="command", required=True)
    s = cmds.add_parser("start", help="start (or resume) the study's runs in the background")
    s.add_argument("--work", required=True, help="folder for the copy of the project, data, jobs, runs")
    s.add_argument("--preset", choices=sorted(PRESETS), default="default")
    s.add_argument("--iters", type=int, default=None, help="iterations per run (default: the preset's)")
    s.add_argument("--seeds", default="1-6", help="'1-6' or '1,2,5' (default 1-6)")
    s.add_argument("--switches", default="62.5,75",
                   help="switch points, percent of --iters (default 62.5,75)")
    s.add_argument("--recipes", default="paper",
                   help="two-stage recipes, comma-separated: " + RECIPES_HELP + "; default paper")
    s.add_argument("--jobs", type=int, default=6, help="trainer processes at once (default 6)")
    s.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="skip jobs that would end more than S seconds after the start (estimate)")
    s.add_argument("--sec-per-iter", type=float, default=None,
                   help="seconds per iteration with --jobs processes, for that estimate (default: preset's)")
    s.add_argument("--data", default=None, metavar="DIR",
                   help="the corpus folder (default WORK/data; studies on one machine can share it)")
    s.add_argument("--corpus-mb", type=float, default=None, help="use only the first MB of the corpus")
    s.add_argument("--allow-repeat", action="store_true", help="let a run read training tokens twice")
    s.add_argument("--reuse", default=None, metavar="DIR",
                   help="take a planned job's JSON from DIR/<batch>/ instead of running it (for example "
                        "the committed dense controls in benchmarks/quality/runs)")
    s.add_argument("--foreground", action="store_true", help="wait for the scheduler (tests)")
    s.set_defaults(func=usage_errors_as_exit_2(start))
    for name, fn in (("serve", serve), ("status", status), ("stop", stop)):
        c = cmds.add_parser(name)
        c.add_argument("--work", required=True)
        c.set_defaults(func=usage_errors_as_exit_2(fn))
    b = cmds.add_parser("budget", help="a running scheduler's new time budget; its jobs go on")
    b.add_argument("--work", required=True)
    b.add_argument("--time-budget", type=float, required=True, metavar="S",
                   help="skip jobs that would end more than S seconds from now")
    b.add_argument("--sec-per-iter", type=float, default=None, help="the new speed estimate (default: kept)")
    b.set_defaults(func=usage_errors_as_exit_2(budget))


if __name__ == "__main__":
    sys.exit(main(add_parser, "benchmarks.quality.run"))
