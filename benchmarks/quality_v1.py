"""`python -m benchmarks.quality`: does Lighthouse pretraining followed by dense recovery
train as well as dense attention? Measured as the paper (arXiv 2605.06554, sections 6.1-6.2)
states it, with several seeds and error bars.

The paper's protocol (the default): AdamW betas (0.9, 0.95), weight decay 0.1, clip 1, linear
warm-up then a constant learning rate; Lighthouse for the first 62.5% of the iterations, then
dense attention resumed from that checkpoint with the same optimizer state and data
continuation (the trainer's `--load` restores weights, optimizer, scheduler, RNG and the
consumed-samples position; the stage-2 run loads the Lighthouse checkpoint directly under
`--attention-impl dense`: torch_dist checkpoints carry no core-attention state, so no
conversion is needed, and this is the cheapest path that is still the product's workflow).
Compared with dense attention from scratch, same seed (the trainer's `--seed` drives the
model's initialisation and megatron-core's data order), same data, same schedule.

Per seed and as mean +- standard deviation over seeds:
  final_heldout_gap   recovered - dense held-out loss at the last iteration (dense attention)
  final_train_gap     recovered - dense training loss, averaged over the last 5% of the
                      iterations (paired: the same batches; the paper's metric)
  spike               first dense training loss after the switch - last Lighthouse one
  recovery_iters      dense iterations until the recovered held-out loss is within
                      --tolerance of (or below) the dense arm's at the same iteration
  stage1_gap          stage-1 held-out loss under Lighthouse attention - dense arm's, at the
                      switch (and the same weights under dense attention)
Verdict (on each gap): "cannot tell" with fewer than 2 seeds; otherwise with threshold
max(--tolerance, 2 x standard error of the per-seed gap): "beats" when the mean gap is below
-threshold, "matches" when it is <= threshold, else "worse".

Efficiency: every trainer run is a subprocess (`python -m lighthouse_megatron.cli train
--config FILE.yaml`, its log next to it) and up to --jobs run at once on the one GPU. Per
(schedule, seed) ONE Lighthouse run serves every switch point: it runs as a chain of resumed
segments that stop and save exactly at each switch (bitwise the same run), and each switch
gets one dense stage-2 branch that loads its segment's checkpoint. Per (schedule, seed) one
dense control. A stage-2 branch waits for its checkpoint; --time-budget skips jobs that could
not finish in time; an estimate is printed before anything starts.

Also (flags): the leak probe (`benchmarks.leak`: the stage-1 checkpoint and the dense control
at the switch) and retrieval (`benchmarks.retrieval` over depth x length on the dense control
and the recovered model) for the paper's protocol, every seed; passkey documents
(`benchmarks.passkey`) mixed into the training data so that retrieval can be learnt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._common import (
    UsageError,
    check_writable,
    main,
    nvidia_smi,
    nvidia_smi_name,
    run_meta,
    usage_errors_as_exit_2,
    write_json,
)
from .retrieval import CHANCE, RETRIEVES

SCHEDULES = ("constant", "wsd", "cosine")
TOLERANCE = 0.02
RETRIEVAL_TOLERANCE = 0.05  # benchmarks.retrieval's: token accuracy
LAST = 0.05  # the paper's metric averages the training loss over this last share of iterations

OPTIMIZER = dict(adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1, clip_grad=1.0)
LIGHTHOUSE = dict(
    attention_impl="lighthouse",
    lighthouse_levels=3,
    lighthouse_pooling_factor=4,
    lighthouse_dense_layers=[0, -1],
)


@dataclass(frozen=True)
class Preset:
    model: dict[str, Any]
    iters: int
    eval_interval: int
    sec_per_iter: tuple[float, float]  # (Lighthouse, dense), assumed for the estimate
    corpus_mb: float  # site-packages sources added to the standard library, up to this many MB
    stdlib_mb: float | None  # the standard library's sources up to this many MB (None: all)
    passkey_lengths: tuple[int, int]
    jobs: int
    speedup: float  # assumed aggregate speed-up of `jobs` concurrent processes on one GPU
    describe: str


PRESETS = {
    # One H200, the package's trainer: ~90 ms per Lighthouse and ~60 ms per dense iteration,
    # < 20 GB per process. L=3, p=4, k=256, T=64 gather S = 16384/16 + 2*4*256 = 3,072 of
    # 16,384 (S/N = 0.19, the paper's 98K ratio); the first and last layers dense.
    "default": Preset(
        model=dict(
            num_layers=6,
            hidden_size=512,
            num_attention_heads=8,
            num_query_groups=8,
            seq_length=16384,
            micro_batch_size=2,
            global_batch_size=2,
            lr=1.5e-3,
            lighthouse_topk=256,
            lighthouse_tile_topk=64,
            eval_iters=2,
        ),
        iters=1000,
        eval_interval=25,
        sec_per_iter=(0.09, 0.06),
        corpus_mb=0,
        stdlib_mb=None,
        passkey_lengths=(512, 4096),
        jobs=6,
        speedup=1.75,
        describe="6 x 512, 16K tokens, batch 2, 1,000 iterations",
    ),
    # 12 x 1024 at 32K, batch 1 (32K tokens per iteration, as the default). Arithmetic: ~151M
    # parameters (12 x 12 x 1024^2) is 8x the default's 19M and attention per token is
    # 12 x 1024 x 32K = 8x 6 x 512 x 16K, so ~8x its time per iteration: ~0.5 s dense, about
    # as much Lighthouse (~60 ms x 8). Per seed: dense 256 + Lighthouse 160 + dense 96 iterations
    # = 512 x ~0.5 s; 2 seeds = 512 GPU-s; one process nearly fills the GPU at this size (assumed
    # 1.2x from concurrency), so ~7 minutes, ~8 with start-up and the probes, at 4 processes.
    # L=3, p=4, k=512, T=64: S = 32768/16 + 2*4*512 = 6,144 (S/N = 0.1875).
    "large": Preset(
        model=dict(
            num_layers=12,
            hidden_size=1024,
            num_attention_heads=8,
            num_query_groups=8,
            seq_length=32768,
            micro_batch_size=1,
            global_batch_size=1,
            lr=1e-3,
            lighthouse_topk=512,
            lighthouse_tile_topk=64,
            eval_iters=2,
        ),
        iters=256,
        eval_interval=16,
        sec_per_iter=(0.5, 0.5),
        corpus_mb=64,
        stdlib_mb=None,
        passkey_lengths=(2048, 16384),
        jobs=4,
        speedup=1.2,
        describe="12 x 1024, 32K tokens, batch 1, 256 iterations",
    ),
    # CPU tests: seconds. 256 tokens, k=16, T=8: S = 16 + 2*4*16 = 144.
    "tiny": Preset(
        model=dict(
            num_layers=3,
            hidden_size=32,
            num_attention_heads=4,
            num_query_groups=2,
            seq_length=256,
            micro_batch_size=2,
            global_batch_size=2,
            lr=3e-3,
            lighthouse_topk=16,
            lighthouse_tile_topk=8,
            eval_iters=1,
        ),
        iters=40,
        eval_interval=1,
        sec_per_iter=(0.05, 0.03),
        corpus_mb=0,
        stdlib_mb=2,
        passkey_lengths=(96, 200),
        jobs=2,
        speedup=1.5,
        describe="3 x 32, 256 tokens, batch 2, 40 iterations",
    ),
}


# --------------------------------------------------------------------- settings


def parse_switch(text: str) -> float:
    """'62.5' or '62.5%' (a percentage) or '0.625' (a fraction) -> 0.625."""
    raw = text.strip().rstrip("%")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"--switch {text!r}: expected a percentage (62.5) or a fraction (0.625)") from None
    frac = value / 100 if value > 1 or text.strip().endswith("%") else value
    if not 0 < frac < 1:
        raise UsageError(f"--switch {text!r}: must lie strictly between 0 and 100% of the iterations")
    return frac


def switch_iteration(frac: float, iters: int, interval: int) -> int:
    """The switch on an evaluation (stage 1 is evaluated where it ends), inside the run."""
    it = round(frac * iters / interval) * interval
    if not 0 < it < iters:
        raise UsageError(
            f"switch {100 * frac:g}% of {iters} iterations falls outside the run at "
            f"--eval-interval {interval}"
        )
    return it


def schedule_settings(schedule: str, iters: int, lr: float, wsd_decay: float) -> dict[str, Any]:
    """Warm-up over the first 12.5% (the paper: 2,000 of 16,000 steps), then the schedule."""
    warmup = max(1, iters // 8)
    s = dict(lr=lr, lr_warmup_iters=warmup, lr_decay_iters=iters, min_lr=lr / 10)
    if schedule == "constant":
        s.update(lr_decay_style="constant", min_lr=0.0)
    elif schedule == "cosine":
        s.update(lr_decay_style="cosine")
    else:
        s.update(
            lr_decay_style="WSD",
            lr_wsd_decay_style="linear",
            lr_wsd_decay_iters=max(1, min(round(wsd_decay * iters), iters - warmup)),
        )
    return s


# ------------------------------------------------------------------------ jobs


@dataclass
class Job:
    name: str
    argv: list[str]
    log: Path
    est_s: float  # seconds alone: start-up (CPU) + `gpu_s`
    deps: list[str] = field(default_factory=list)
    status: str = "pending"  # pending, running, ok, failed, skipped
    rc: int | None = None
    seconds: float | None = None
    why: str = ""
    gpu_s: float = 0.0  # of est_s, the part that keeps the GPU busy
    proc: Any = None
    started: float = 0.0


def run_jobs(
    jobs: list[Job], parallel: int, deadline: float | None, env: dict[str, str], speedup: float = 1.0
) -> None:
    """Run `jobs` (in list order when ready), at most `parallel` at once; a job waits for its
    dependencies, is skipped when one failed or was skipped, or when it could not finish before
    `deadline` (time.monotonic()) sharing the GPU with the running ones (`speedup`: the assumed
    aggregate speed-up of `parallel` processes). Each job's output goes to its log."""
    by = {j.name: j for j in jobs}
    running: list[Job] = []
    try:
        _schedule(jobs, by, running, parallel, deadline, env, speedup)
    finally:  # killed or interrupted: no trainer outlives the study
        for j in running:
            j.proc.terminate()
        for j in running:
            try:
                j.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                j.proc.kill()
            j.status, j.why = "failed", "the study was stopped"


def _expected(job: Job, running: int, parallel: int, speedup: float) -> float:
    """Seconds `job` would take started now, sharing the GPU with up to `parallel` processes
    that together run `speedup` times faster than one."""
    sharing = min(running + 1, parallel)
    return job.est_s - job.gpu_s + job.gpu_s * max(1.0, sharing / speedup)


def _schedule(jobs, by, running, parallel, deadline, env, speedup) -> None:
    while True:
        for j in list(running):
            rc = j.proc.poll()
            if rc is None:
                continue
            j.proc.stdout.close()
            j.rc, j.seconds = rc, time.monotonic() - j.started
            j.status = "ok" if rc == 0 else "failed"
            running.remove(j)
            print(
                f"[{time.strftime('%H:%M:%S')}] {j.name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} "
                f"in {j.seconds:.0f} s" + ("" if rc == 0 else f"; log: {j.log}"),
                flush=True,
            )
        for j in jobs:
            if j.status != "pending":
                continue
            dead = [d for d in j.deps if by[d].status in ("failed", "skipped")]
            if dead:
                j.status, j.why = "skipped", f"{dead[0]} {by[dead[0]].status}"
                print(f"skip {j.name}: {j.why}", flush=True)
            elif deadline is not None and time.monotonic() + _expected(
                j, len(running), parallel, speedup
            ) > deadline:
                j.status, j.why = "skipped", "time budget"
                print(f"skip {j.name}: would not finish within the time budget", flush=True)
        ready = [j for j in jobs if j.status == "pending" and all(by[d].status == "ok" for d in j.deps)]
        for j in ready[: max(0, parallel - len(running))]:
            j.log.parent.mkdir(parents=True, exist_ok=True)
            out = open(j.log, "w")
            out.write("$ " + " ".join(j.argv) + "\n")
            out.flush()
            j.proc = subprocess.Popen(j.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            j.proc.stdout = out
            j.started, j.status = time.monotonic(), "running"
            running.append(j)
            print(f"[{time.strftime('%H:%M:%S')}] start {j.name}", flush=True)
        if not running and not any(j.status == "pending" for j in jobs):
            return
        time.sleep(0.2)


def estimate(jobs: list[Job], parallel: int, gain: float) -> dict:
    # Start-up (imports, data indices) overlaps other jobs' GPU work: the GPU time is what adds up.
    serial = sum(j.gpu_s for j in jobs)
    by = {j.name: j for j in jobs}
    memo: dict[str, float] = {}

    def path(name: str) -> float:
        if name not in memo:
            memo[name] = by[name].est_s + max((path(d) for d in by[name].deps), default=0.0)
        return memo[name]

    critical = max((path(j.name) for j in jobs), default=0.0)
    return {
        "jobs": len(jobs),
        "serial_s": serial,
        "critical_path_s": critical,
        "wall_s": max(critical, serial / min(gain, parallel)),
        "aggregate_speedup_assumed": gain,
    }


# ------------------------------------------------------------------------ data


def _capped(files: list[Path], mb: float | None) -> list[Path]:
    if mb is None:
        return files
    out, budget = [], int(mb * 2**20)
    for p in files:
        if budget <= 0:
            break
        out.append(p)
        budget -= p.stat().st_size
    return out


def corpus_files(extra_mb: float, stdlib_mb: float | None = None) -> list[Path]:
    """The standard library's sources (up to `stdlib_mb`), then site-packages' Python sources
    (sorted) up to `extra_mb`."""
    from lighthouse_megatron.data import default_inputs

    files = _capped(default_inputs(), stdlib_mb)
    if extra_mb > 0:
        site = Path(sysconfig.get_paths()["purelib"])
        sources = [p for p in sorted(site.rglob("*.py")) if p.is_file() and "__pycache__" not in p.parts]
        files += _capped(sources, extra_mb)
    return files


def prepare_corpus(
    folder: Path, extra_mb: float, fraction: float, lengths: tuple[int, int], seed: int,
    stdlib_mb: float | None = None,
) -> dict:
    """The training data: the corpus files with passkey documents at `fraction` of the bytes,
    interleaved at random places (megatron-core splits by document order, so every split gets
    some). Reused when `folder` already holds it."""
    from lighthouse_megatron.data import prepare_data

    from .passkey import passkey_documents

    info_path = folder / "corpus.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    import numpy as np

    files = corpus_files(extra_mb, stdlib_mb)
    total = sum(p.stat().st_size for p in files)
    docs = []
    if fraction > 0:
        sample = b"".join(p.read_bytes() for p in files[:: max(1, len(files) // 200)])
        count = max(1, round(fraction * total / statistics.fmean(lengths)))
        docs = passkey_documents(sample, count, lengths[0], lengths[1], seed)
    pk_dir = folder / "passkey"
    shutil.rmtree(pk_dir, ignore_errors=True)
    pk_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    slots = sorted(rng.integers(0, len(files) + 1, size=len(docs)).tolist())
    inputs: list[Path] = []
    k = 0
    for i, f in enumerate([*files, None]):
        while k < len(slots) and slots[k] == i:
            path = pk_dir / f"{k:06d}.txt"
            path.write_bytes(docs[k].document)
            inputs.append(path)
            k += 1
        if f is not None:
            inputs.append(f)
    summary = prepare_data(inputs, folder / "corpus", force=True, progress=False)
    info = {
        "prefix": str(folder / "corpus"),
        "files": len(files),
        "documents": summary.documents,
        "tokens": summary.tokens,
        "corpus_bytes": total,
        "source": f"Python {sys.version.split()[0]} standard library"
        + (f" (its first {stdlib_mb:g} MB)" if stdlib_mb else "")
        + (f" + site-packages Python sources (up to {extra_mb:g} MB)" if extra_mb else ""),
        "passkey": {
            "documents": len(docs),
            "fraction_of_bytes": sum(len(d.document) for d in docs) / total,
            "lengths": list(lengths),
            "format": "benchmarks.retrieval NEEDLE/QUERY, 6 digits",
        },
    }
    write_json(info_path, info)
    return info


# ------------------------------------------------------------------------ plan


@dataclass
class Plan:
    runs: dict[str, dict]  # run name -> {"kind", "schedule", "seed", ...}
    jobs: list[Job]
    settings: dict[str, dict]  # schedule -> trainer settings


def build_plan(args, preset: Preset, data_prefix: str, work: Path) -> Plan:
    """Every trainer run and probe as a job, the paper's protocol first."""
    iters, interval = args.iters, args.eval_interval
    py = [sys.executable]
    train = [*py, "-m", "lighthouse_megatron.cli", "train", "--config"]
    lh_s, dense_s = preset.sec_per_iter
    if args.sec_per_iter:
        lh_s, dense_s = args.sec_per_iter
    startup = 20.0 if args.device != "cpu" else 8.0
    runs: dict[str, dict] = {}
    jobs: list[Job] = []
    settings: dict[str, dict] = {}
    paper_switch = switch_iteration(args.main_switch, iters, interval)
    for schedule in args.schedules:
        common = {
            **preset.model,
            **OPTIMIZER,
            **schedule_settings(schedule, iters, args.lr or preset.model["lr"], args.wsd_decay),
            "train_iters": iters,
            "eval_interval": interval,
            "data_path": [data_prefix],
            "device": args.device,
            "log_interval": 1,
            "progress": False,
        }
        settings[schedule] = common
        seeds = args.seeds if schedule == args.paper_schedule else args.sweep_seeds
        fracs = args.switches if schedule == args.paper_schedule else args.sweep_switches
        switches = sorted({switch_iteration(f, iters, interval) for f in fracs})
        for seed in range(1, seeds + 1):
            base = work / schedule / f"seed{seed}"
            s = {**common, "seed": seed}

            def add(name, settings_, est, deps=(), base=base, schedule=schedule, seed=seed, **info):
                d = base / name
                d.mkdir(parents=True, exist_ok=True)
                cfg = d / "config.yaml"
                import yaml

                cfg.write_text(
                    # Each run its own index cache: megatron-core would otherwise write the same
                    # cache files from concurrent runs of one seed.
                    yaml.safe_dump(
                        {**settings_, "metrics_file": str(d / "metrics.jsonl"),
                         "data_cache_path": str(d / "data_cache")},
                        sort_keys=False,
                    )
                )
                full = f"{schedule}/seed{seed}/{name}"
                jobs.append(
                    Job(
                        full,
                        [*train, str(cfg)],
                        d / "train.log",
                        est + startup,
                        [f"{schedule}/seed{seed}/{x}" for x in deps],
                        gpu_s=est,
                    )
                )
                runs[full] = {"schedule": schedule, "seed": seed, "dir": str(d), **info}

            keep_paper = schedule == args.paper_schedule and paper_switch in switches
            add(
                "dense",
                {
                    **s,
                    "attention_impl": "dense",
                    "save": str(base / "dense" / "ckpt"),
                    "save_interval": paper_switch,
                }
                if keep_paper
                else {**s, "attention_impl": "dense"},
                iters * dense_s,
                kind="dense",
            )
            prev = None
            for sw in switches:
                seg = {
                    **s,
                    **LIGHTHOUSE,
                    "save": str(base / f"lighthouse_{sw}" / "ckpt"),
                    "exit_interval": sw,
                }
                if prev is not None:
                    seg["load"] = str(base / f"lighthouse_{prev}" / "ckpt")
                add(
                    f"lighthouse_{sw}",
                    seg,
                    (sw - (prev or 0)) * lh_s,
                    deps=[f"lighthouse_{prev}"] if prev else [],
                    kind="lighthouse",
                    until=sw,
                    start=prev or 0,
                )
                branch = {**s, "attention_impl": "dense", "load": str(base / f"lighthouse_{sw}" / "ckpt")}
                if sw == paper_switch and keep_paper:
                    branch["save"] = str(base / f"recovered_{sw}" / "ckpt")
                add(
                    f"recovered_{sw}",
                    branch,
                    (iters - sw) * dense_s,
                    deps=[f"lighthouse_{sw}"],
                    kind="recovered",
                    switch=sw,
                )
                prev = sw
            if keep_paper:
                probe_py = [*py, "-m"]
                if args.leak_probe:
                    d = base / "leak"
                    view = _checkpoint_view(base / "dense" / "ckpt", paper_switch, base / "dense_at_switch")
                    jobs.append(
                        Job(
                            f"{schedule}/seed{seed}/leak",
                            [
                                *probe_py,
                                "benchmarks.leak",
                                "--lighthouse",
                                str(base / f"lighthouse_{paper_switch}" / "ckpt"),
                                "--control",
                                str(view),
                                "--data-path",
                                data_prefix,
                                "--device",
                                args.device,
                                "--seed",
                                str(seed),
                                "--out",
                                str(d / "leak.json"),
                            ],
                            d / "leak.log",
                            startup + 20,
                            [
                                f"{schedule}/seed{seed}/dense",
                                f"{schedule}/seed{seed}/lighthouse_{paper_switch}",
                            ],
                            gpu_s=5.0,
                        )
                    )
                    runs[f"{schedule}/seed{seed}/leak"] = {
                        "schedule": schedule,
                        "seed": seed,
                        "dir": str(d),
                        "kind": "leak",
                    }
                if args.retrieval:
                    d = base / "retrieval"
                    d.mkdir(parents=True, exist_ok=True)
                    spec = {
                        "meta": {"command": "benchmarks.quality"},
                        "data_prefix": data_prefix,
                        "checkpoints": {
                            "dense": str(base / "dense" / "ckpt"),
                            "recovered": str(base / f"recovered_{paper_switch}" / "ckpt"),
                        },
                    }
                    write_json(d / "models.json", spec)
                    jobs.append(
                        Job(
                            f"{schedule}/seed{seed}/retrieval",
                            [
                                *probe_py,
                                "benchmarks.retrieval",
                                "--quality",
                                str(d / "models.json"),
                                "--device",
                                args.device,
                                "--trials",
                                str(args.retrieval_trials),
                                "--out",
                                str(d),
                                "--name",
                                "retrieval",
                                "--force",
                            ],
                            d / "retrieval.log",
                            startup + 30,
                            [
                                f"{schedule}/seed{seed}/dense",
                                f"{schedule}/seed{seed}/recovered_{paper_switch}",
                            ],
                            gpu_s=10.0,
                        )
                    )
                    runs[f"{schedule}/seed{seed}/retrieval"] = {
                        "schedule": schedule,
                        "seed": seed,
                        "dir": str(d),
                        "kind": "retrieval",
                    }

    # The paper's protocol first (its seeds' chains up to its switch), then the rest, in order.
    def rank(j: Job) -> tuple:
        r = runs[j.name]
        paper = r["schedule"] == args.paper_schedule
        near = r.get("until", r.get("switch", paper_switch)) <= paper_switch
        return (not paper, r["seed"] > 3, not near)

    jobs.sort(key=rank)
    return Plan(runs, jobs, settings)


def _checkpoint_view(root: Path, iteration: int, view: Path) -> Path:
    """A folder whose tracker names `root`'s checkpoint at `iteration` (a link to it), so that
    a loader that follows the tracker reads that iteration."""
    view.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:07d}"
    link = view / name
    if not link.exists() and not link.is_symlink():
        os.symlink(root / name, link)
    (view / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return view


# --------------------------------------------------------------------- analysis


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train(recs):
    return {r["iteration"]: r["loss"] for r in recs if r["kind"] == "train"}


def _eval(recs, attention="dense"):
    return {r["iteration"]: r["loss"] for r in recs if r["kind"] == "eval" and r["attention"] == attention}


def seed_row(
    dense: list[dict], stage1: list[dict], stage2: list[dict], switch: int, iters: int, tolerance: float
) -> dict:
    """The per-seed numbers of one switch point from the three runs' metrics records (stage1:
    the Lighthouse run up to the switch; stage2: its dense branch)."""
    d_tr, d_ev = _train(dense), _eval(dense)
    s1_tr, s1_lh, s1_dense = _train(stage1), _eval(stage1, "lighthouse"), _eval(stage1)
    s2_tr, s2_ev = _train(stage2), _eval(stage2)
    last = range(iters - max(1, round(LAST * iters)) + 1, iters + 1)
    rec_ev = {**{i: v for i, v in s1_dense.items() if i <= switch}, **s2_ev}
    within = next(
        (i for i in sorted(set(s2_ev) & set(d_ev)) if i > switch and s2_ev[i] <= d_ev[i] + tolerance), None
    )
    return {
        "switch": switch,
        "final_heldout_gap": s2_ev[iters] - d_ev[iters],
        "final_heldout": {"recovered": s2_ev[iters], "dense": d_ev[iters]},
        "final_train_gap": statistics.fmean(s2_tr[i] for i in last) - statistics.fmean(d_tr[i] for i in last),
        "last_iters": [last.start, last.stop - 1],
        "spike": s2_tr[switch + 1] - s1_tr[switch],
        "heldout_jump": s1_dense[switch] - s1_lh[switch],
        "recovery_iters": None if within is None else within - switch,
        "stage1_gap": s1_lh[switch] - d_ev[switch],
        "stage1_dense_gap": s1_dense[switch] - d_ev[switch],
        "curve": {
            "iterations": sorted(rec_ev),
            "recovered_minus_dense": [rec_ev[i] - d_ev[i] for i in sorted(rec_ev) if i in d_ev],
        },
    }


def stats(values: list[float]) -> dict:
    """mean, sample standard deviation, standard error, n (NaN where undefined)."""
    xs = [v for v in values if v is not None]
    n = len(xs)
    sd = statistics.stdev(xs) if n > 1 else float("nan")
    return {
        "n": n,
        "mean": statistics.fmean(xs) if xs else float("nan"),
        "std": sd,
        "se": sd / math.sqrt(n) if n > 1 else float("nan"),
    }


def verdict(gaps: list[float], tolerance: float = TOLERANCE) -> dict:
    """The rule of the module doc on per-seed gaps (recovered - dense)."""
    s = stats(gaps)
    if s["n"] < 2:
        return {**s, "threshold": None, "verdict": "cannot tell"}
    thr = max(tolerance, 2 * s["se"])
    word = "beats" if s["mean"] < -thr else "matches" if s["mean"] <= thr else "worse"
    return {**s, "threshold": thr, "verdict": word}


RULE = (
    "'cannot tell' with fewer than 2 seeds; otherwise threshold = max({tol}, 2 x standard error of the "
    "per-seed gap over seeds): 'beats' when the mean gap (recovered - dense) < -threshold, 'matches' "
    "when it is <= threshold, else 'worse'"
)
METRICS = (
    "final_train_gap",
    "final_heldout_gap",
    "spike",
    "heldout_jump",
    "recovery_iters",
    "stage1_gap",
    "stage1_dense_gap",
)


def aggregate(rows: list[dict], tolerance: float) -> list[dict]:
    """One protocol row per (schedule, switch): every metric's stats, verdicts on both gaps."""
    out = []
    for key in sorted({(r["schedule"], r["switch"]) for r in rows}):
        group = [r for r in rows if (r["schedule"], r["switch"]) == key]
        agg = {
            "schedule": key[0],
            "switch": key[1],
            "switch_frac": group[0]["switch_frac"],
            "seeds": sorted(r["seed"] for r in group),
            "never_recovered": sum(r["recovery_iters"] is None for r in group),
        }
        for m in METRICS:
            agg[m] = stats([r[m] for r in group])
        agg["verdict_train"] = verdict([r["final_train_gap"] for r in group], tolerance)
        agg["verdict_heldout"] = verdict([r["final_heldout_gap"] for r in group], tolerance)
        out.append(agg)
    return out


# ------------------------------------------------------------------------ plot


def plot(result: dict, runs_metrics: dict, path: Path) -> bool:
    """Left: the paper protocol's training loss (mean +- std over seeds, 25-iteration means)
    for dense and Lighthouse -> dense; right: the sweep's final training-loss gaps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    paper = result["paper_protocol"]
    iters = result["meta"]["iters"]
    if paper is not None:
        for label, key, color in (
            ("dense from scratch", "dense", "tab:gray"),
            ("Lighthouse then dense", "two_stage", "tab:blue"),
        ):
            curves = runs_metrics.get(key, [])
            if not curves:
                continue
            arr = np.array([[c.get(i, np.nan) for i in range(1, iters + 1)] for c in curves])
            w = max(1, iters // 40)
            k = arr.shape[1] // w
            arr = np.nanmean(arr[:, : k * w].reshape(len(curves), k, w), axis=2)
            x = (np.arange(k) + 0.5) * w
            m, sd = arr.mean(0), arr.std(0)
            ax.plot(x, m, color=color, label=f"{label} (n={len(curves)})")
            ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.25)
        ax.axvline(paper["switch"], color="black", ls="--", lw=1)
        ax.set_title(f"paper protocol: constant LR, switch at {paper['switch']}", fontsize=9)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (nats per byte)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    protos = result["protocols"]
    labels = [f"{p['schedule']} {100 * p['switch_frac']:g}%" for p in protos]
    means = [p["final_train_gap"]["mean"] for p in protos]
    errs = [0 if math.isnan(p["final_train_gap"]["std"]) else p["final_train_gap"]["std"] for p in protos]
    bx.barh(range(len(protos)), means, xerr=errs, color="tab:blue", alpha=0.7)
    bx.set_yticks(range(len(protos)), labels, fontsize=8)
    bx.axvline(0, color="black", lw=1)
    bx.axvline(result["meta"]["tolerance"], color="tab:red", ls=":", lw=1)
    bx.set_xlabel("final training-loss gap, recovered - dense (mean +- std over seeds)")
    bx.set_title("where recovery holds", fontsize=9)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


# ------------------------------------------------------------------------- CLI


def _schedules(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in SCHEDULES]
    if not items or bad:
        raise UsageError(f"--schedules {text!r}: each must be one of {list(SCHEDULES)}")
    return items


def add_quality_parser(sub) -> None:
    p = sub.add_parser("quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="; ".join(f"{k}: {v.describe}" for k, v in PRESETS.items()),
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        help="the schedule of the main protocol (default constant, the paper's)",
    )
    p.add_argument(
        "--schedules",
        default=None,
        help="sweep: comma-separated schedules (the --schedule one gets --seeds seeds, the others "
        "--sweep-seeds), e.g. constant,wsd,cosine",
    )
    p.add_argument(
        "--switch", default="62.5", help="Lighthouse share: a percentage (62.5) or fraction (0.625)"
    )
    p.add_argument(
        "--switches", default=None, help="sweep: comma-separated switch points, e.g. 50,62.5,75,80"
    )
    p.add_argument(
        "--sweep-switches", default=None,
        help="switch points of the other schedules (default: those of --switch and --switches)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds of the main protocol (default 3)")
    p.add_argument(
        "--sweep-seeds", type=int, default=None, help="seeds of the other schedules (default --seeds)"
    )
    p.add_argument("--iters", type=int, default=None, help="iterations of every run (default: the preset's)")
    p.add_argument("--eval-interval", type=int, default=None, help="default: the preset's")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--wsd-decay", type=float, default=0.2, help="WSD: share of iterations in the anneal")
    p.add_argument("--tolerance", type=float, default=TOLERANCE)
    p.add_argument("--jobs", type=int, default=None, help="concurrent processes (default: the preset's)")
    p.add_argument(
        "--time-budget", type=float, default=0, help="seconds; jobs that would end later are skipped"
    )
    p.add_argument(
        "--sec-per-iter",
        type=float,
        nargs=2,
        default=None,
        metavar=("LIGHTHOUSE", "DENSE"),
        help="seconds per iteration of one process alone, for the estimate (default: the preset's)",
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=None,
        help="assumed aggregate speed-up of concurrent processes, for the estimate (default: the preset's)",
    )
    p.add_argument("--leak-probe", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--retrieval", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--retrieval-trials", type=int, default=4)
    p.add_argument(
        "--passkey-fraction",
        type=float,
        default=0.05,
        help="share of the training bytes in passkey documents (default 0.05; 0: none)",
    )
    p.add_argument(
        "--corpus-mb",
        type=float,
        default=None,
        help="MB of site-packages Python sources added to the standard library (default: preset's)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the prepared corpus lives or is written (default WORK_DIR/data; reused)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--work-dir", type=Path, default=None, help="runs, logs, checkpoints (default OUT/NAME_runs)"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/quality"))
    p.add_argument("--name", default=None, help="output stem (default paper_protocol[_PRESET])")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate, run nothing")
    p.add_argument("--force", action="store_true", help="replace NAME.json and the runs in --work-dir")
    p.set_defaults(func=usage_errors_as_exit_2(run))


def resolve(args) -> Preset:
    preset = PRESETS[args.preset]
    args.iters = args.iters or preset.iters
    args.eval_interval = args.eval_interval or preset.eval_interval
    args.jobs = args.jobs or preset.jobs
    args.speedup = args.speedup or preset.speedup
    args.sweep_seeds = args.seeds if args.sweep_seeds is None else args.sweep_seeds
    args.corpus_mb = preset.corpus_mb if args.corpus_mb is None else args.corpus_mb
    args.name = args.name or (
        "paper_protocol" if args.preset == "default" else f"paper_protocol_{args.preset}"
    )
    args.paper_schedule = args.schedule
    args.schedules = _schedules(args.schedules) if args.schedules else [args.schedule]
    if args.schedule not in args.schedules:
        args.schedules.insert(0, args.schedule)
    args.main_switch = parse_switch(args.switch)
    args.switches = sorted(
        {args.main_switch, *(parse_switch(s) for s in (args.switches or "").split(",") if s.strip())}
    )
    args.sweep_switches = (
        sorted({parse_switch(s) for s in args.sweep_switches.split(",") if s.strip()})
        if args.sweep_switches
        else args.switches
    )
    if not args.sweep_switches:
        raise UsageError("--sweep-switches: give at least one switch point")
    for name in ("seeds", "iters", "eval_interval", "jobs", "retrieval_trials"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sweep_seeds < 1:
        raise UsageError(f"--sweep-seeds must be >= 1, got {args.sweep_seeds}")
    if not 0 <= args.passkey_fraction < 0.5:
        raise UsageError(f"--passkey-fraction must lie in [0, 0.5), got {args.passkey_fraction}")
    if not 0 < args.wsd_decay < 1:
        raise UsageError(f"--wsd-decay must lie in (0, 1), got {args.wsd_decay}")
    if args.tolerance < 0:
        raise UsageError(f"--tolerance must be >= 0, got {args.tolerance}")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for frac in [*args.switches, *args.sweep_switches]:
        switch_iteration(frac, args.iters, args.eval_interval)
    return preset


def run(args) -> int:
    preset = resolve(args)
    out_json, out_png = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    check_writable(out_json, args.force)
    work = (args.work_dir or args.out / f"{args.name}_runs").resolve()
    if work.exists() and any(work.glob("*/seed*")) and not args.force and not args.dry_run:
        raise UsageError(f"--work-dir {work} holds earlier runs; pass --force to replace them")
    for schedule in SCHEDULES:
        shutil.rmtree(work / schedule, ignore_errors=True) if args.force and not args.dry_run else None
    # Every trainer setting is checked (mock data) before data or runs are touched.
    from lighthouse_megatron.training import settings_args

    t0 = time.monotonic()
    for schedule in args.schedules:
        probe = {
            **preset.model,
            **OPTIMIZER,
            **schedule_settings(schedule, args.iters, args.lr or preset.model["lr"], args.wsd_decay),
            "train_iters": args.iters,
            "eval_interval": args.eval_interval,
            "mock_data": True,
            "device": args.device,
            **LIGHTHOUSE,
        }
        try:
            settings_args(probe, world_size=1)
        except ValueError as e:
            raise UsageError(f"{schedule} schedule: {e}") from None
    data_dir = (args.data_dir or work / "data").resolve()
    print(
        f"data: {data_dir} (standard library{' + site-packages' if args.corpus_mb else ''}, passkey "
        f"documents {100 * args.passkey_fraction:g}% of bytes)",
        flush=True,
    )
    corpus = prepare_corpus(data_dir, args.corpus_mb, args.passkey_fraction, preset.passkey_lengths, 1234,
                            preset.stdlib_mb)
    plan = build_plan(args, preset, corpus["prefix"], work)
    est = estimate(plan.jobs, args.jobs, args.speedup)
    print(
        f"plan: {est['jobs']} jobs, {est['serial_s']:.0f} s of process time at the assumed speeds; critical "
        f"path {est['critical_path_s']:.0f} s; estimated wall {est['wall_s']:.0f} s with {args.jobs} "
        f"concurrent "
        f"(assumed aggregate speed-up {args.speedup:g}x)",
        flush=True,
    )
    if args.dry_run:
        for j in plan.jobs:
            print(f"  {j.name}  ~{j.est_s:.0f} s  after {', '.join(j.deps) or '-'}")
        return 0
    deadline = t0 + args.time_budget if args.time_budget > 0 else None
    # `timeout` and `kill` send SIGTERM: unwind, so that run_jobs stops the trainers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep),
    }
    try:
        run_jobs(plan.jobs, args.jobs, deadline, env, args.speedup)
    except SystemExit:
        # Stopped from outside (its time limit): the trainers are stopped; what finished is
        # still analysed and written.
        print("stopped: writing what finished", flush=True)
    result = analyze(args, plan, corpus, preset, est, time.monotonic() - t0)
    write_json(out_json, result["json"])
    plotted = plot(result["json"], result["curves"], out_png)
    print_summary(result["json"])
    print(f"\nwrote {out_json}" + (f" and {out_png}" if plotted else " (no plot: no matplotlib)"), flush=True)
    failed = [j.name for j in plan.jobs if j.status == "failed"]
    return 1 if failed or result["json"]["paper_protocol"] is None else 0


def analyze(args, plan: Plan, corpus: dict, preset: Preset, est: dict, wall: float) -> dict:
    runs, by = plan.runs, {j.name: j for j in plan.jobs}
    metrics = {
        name: read_metrics(Path(r["dir"]) / "metrics.jsonl")
        for name, r in runs.items()
        if r["kind"] in ("dense", "lighthouse", "recovered")
    }
    rows = []
    paper_switch = switch_iteration(args.main_switch, args.iters, args.eval_interval)
    curves: dict[str, list[dict]] = {"dense": [], "two_stage": []}
    for name, r in runs.items():
        if r["kind"] != "recovered" or by[name].status != "ok":
            continue
        sw, prefix = r["switch"], f"{r['schedule']}/seed{r['seed']}/"
        if by[prefix + "dense"].status != "ok":
            continue
        stage1 = [
            m
            for n, rr in runs.items()
            if n.startswith(prefix) and rr["kind"] == "lighthouse" and rr["until"] <= sw
            for m in metrics[n]
        ]
        row = seed_row(metrics[prefix + "dense"], stage1, metrics[name], sw, args.iters, args.tolerance)
        frac = next(
            f
            for f in [*args.switches, *args.sweep_switches]
            if switch_iteration(f, args.iters, args.eval_interval) == sw
        )
        rows.append({"schedule": r["schedule"], "seed": r["seed"], "switch_frac": frac, **row})
        if r["schedule"] == args.paper_schedule and sw == paper_switch:
            curves["dense"].append(_train(metrics[prefix + "dense"]))
            s1 = {i: v for i, v in _train(stage1).items() if i <= sw}
            curves["two_stage"].append({**s1, **_train(metrics[name])})
    protocols = aggregate(rows, args.tolerance)
    paper = next(
        (p for p in protocols if p["schedule"] == args.paper_schedule and p["switch"] == paper_switch), None
    )
    leak, retrieval = [], []
    for name, r in runs.items():
        if r["kind"] == "leak" and by[name].status == "ok":
            leak.append({"seed": r["seed"], **json.loads((Path(r["dir"]) / "leak.json").read_text())})
        if r["kind"] == "retrieval" and by[name].status == "ok":
            data = json.loads((Path(r["dir"]) / "retrieval.json").read_text())
            retrieval.append(
                {
                    "seed": r["seed"],
                    **{m: data["models"][m] for m in ("dense", "recovered")},
                    "accuracy_gap": data["accuracy_gap"],
                }
            )
    leak_agg = None
    if leak:
        leak_agg = {
            m: {a: stats([x[m][a]["mean"] for x in leak]) for a in ("lighthouse", "dense")}
            for m in ("lighthouse_trained", "dense_trained")
        }
        leak_agg["dense_exactly_zero"] = all(x["check"]["ok"] for x in leak)
    ret_agg = None
    if retrieval:
        ret_agg = {
            # The rule on dense - recovered token accuracy (higher accuracy is better), with
            # benchmarks.retrieval's tolerance.
            "accuracy_deficit": verdict([-x["accuracy_gap"] for x in retrieval], RETRIEVAL_TOLERANCE),
            # As benchmarks.retrieval: it says something only where the dense control retrieves.
            "informative": statistics.fmean(x["dense"]["summary"]["token_accuracy"] for x in retrieval)
            >= CHANCE + RETRIEVES,
            **{
                m: stats([x[m]["summary"]["token_accuracy"] for x in retrieval])
                for m in ("dense", "recovered")
            },
        }
    meta = run_meta(_Cpu())
    meta.update(
        device=(nvidia_smi_name() or args.device) if args.device != "cpu" else "cpu",
        nvidia_smi=nvidia_smi() if args.device != "cpu" else None,
        preset=args.preset,
        preset_describe=preset.describe,
        iters=args.iters,
        eval_interval=args.eval_interval,
        schedules=args.schedules,
        paper_schedule=args.paper_schedule,
        main_switch=args.main_switch,
        switches=args.switches,
        sweep_switches=args.sweep_switches,
        seeds=args.seeds,
        sweep_seeds=args.sweep_seeds,
        tolerance=args.tolerance,
        jobs=args.jobs,
        time_budget_s=args.time_budget,
        estimate=est,
        wall_s=wall,
        settings=plan.settings,
        data=corpus,
        lighthouse=LIGHTHOUSE,
        verdict_rule=RULE.format(tol=args.tolerance),
        metric_notes={
            "final_train_gap": f"mean training loss over the last {100 * LAST:g}% of iterations, "
            "recovered - dense, paired by seed",
            "switch_frac": "requested share; 'switch' is the iteration (on an evaluation)",
        },
    )
    jobs = [
        {
            "name": j.name,
            "status": j.status,
            "rc": j.rc,
            "seconds": j.seconds,
            "why": j.why,
            "log": str(j.log),
        }
        for j in plan.jobs
    ]
    for row in rows:
        row.pop("curve", None) if len(rows) > 60 else None
    js = {
        "meta": meta,
        "paper_protocol": paper,
        "protocols": protocols,
        "rows": rows,
        "leak_probe": {"rows": leak, "aggregate": leak_agg} if leak else None,
        "retrieval": {"rows": retrieval, "aggregate": ret_agg} if retrieval else None,
        "jobs": jobs,
    }
    return {"json": js, "curves": curves}


class _Cpu:
    """run_meta's device argument without touching CUDA in this (scheduling) process."""

    type = "cpu"


def _fmt(s: dict, spec: str = "+.3f") -> str:
    if s["n"] == 0 or math.isnan(s["mean"]):
        return "-"
    return f"{s['mean']:{spec}}" + ("" if math.isnan(s["std"]) else f" +- {s['std']:{spec.lstrip('+')}}")


def print_summary(js: dict) -> None:
    print(
        f"\n{'schedule':>9} {'switch':>7} {'seeds':>5} {'train gap':>17} {'held-out gap':>17} {'spike':>15} "
        f"{'recovery it':>13}  verdict (train / held-out)"
    )
    for p in js["protocols"]:
        print(
            f"{p['schedule']:>9} {p['switch']:>7} {p['final_train_gap']['n']:>5} "
            f"{_fmt(p['final_train_gap']):>17} "
            f"{_fmt(p['final_heldout_gap']):>17} {_fmt(p['spike']):>15} "
            f"{_fmt(p['recovery_iters'], '.0f'):>13}"
            f"  {p['verdict_train']['verdict']} / {p['verdict_heldout']['verdict']}"
        )
    print(f"rule: {js['meta']['verdict_rule']}")
    paper = js["paper_protocol"]
    if paper is None:
        print("paper protocol: not measured (its runs failed or were skipped)")
    else:
        print(
            f"paper protocol ({paper['schedule']}, switch at {paper['switch']}): recovered vs dense "
            f"{paper['verdict_train']['verdict']} on the final training loss, "
            f"{paper['verdict_heldout']['verdict']} on held-out loss"
        )
    if js["leak_probe"]:
        a = js["leak_probe"]["aggregate"]
        for m in ("lighthouse_trained", "dense_trained"):
            print(
                f"leak {m}: Lighthouse attention {_fmt(a[m]['lighthouse'], '+.2e')}, "
                f"dense {_fmt(a[m]['dense'], '+.2e')}"
            )
        print(
            "check  leak probe under dense attention exactly 0: "
            f"{'ok' if a['dense_exactly_zero'] else 'FAILED'}"
        )
    if js["retrieval"]:
        a = js["retrieval"]["aggregate"]
        print(
            f"retrieval token accuracy: dense {_fmt(a['dense'], '.3f')}, "
            f"recovered {_fmt(a['recovered'], '.3f')}; "
            f"recovered vs dense: {a['accuracy_deficit']['verdict']}"
            + ("" if a["informative"] else " (uninformative: the dense control does not retrieve)")
        )
    skipped = [j["name"] for j in js["jobs"] if j["status"] != "ok"]
    if skipped:
        print(
            f"not run or failed: {len(skipped)} jobs "
            f"({', '.join(skipped[:6])}{'...' if len(skipped) > 6 else ''})"
        )


if __name__ == "__main__":
    sys.exit(main(add_quality_parser, "benchmarks.quality"))
