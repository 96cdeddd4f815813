"""The demo's table, checks and loss-curve plot, from the trainer's metrics records.

Records (the trainer's metrics JSONL): {"kind": "train", "iteration", "loss",
"tokens_per_s", "attention", ...} and {"kind": "eval", "iteration", "loss", "attention"}.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..config import LighthouseConfig
from ..settings.fields import Values

# The recovered model should match the dense control: its dense eval loss may be at most
# this much (nats per byte) above the control's. The paper reports the recovered model
# matching or beating dense training; a tiny model trained for minutes is noisier.
MATCH_TOLERANCE = 0.10
TAIL = 0.1  # the train loss of a stage: mean over its last 10% of iterations


def _train(records, lo: int, hi: int) -> list[dict]:
    return [r for r in records if r["kind"] == "train" and lo <= r["iteration"] <= hi]


def _last_eval(records, attention: str, at_most: int) -> float | None:
    evals = [r for r in records if r["kind"] == "eval" and r["attention"] == attention
             and r["iteration"] <= at_most]
    return max(evals, key=lambda r: r["iteration"])["loss"] if evals else None


def _stats(name, label, records, lo, hi, seconds, tokens_per_iter, eval_attentions=("dense",)):
    train = _train(records, lo, hi)
    if not train:
        raise ValueError(f"{name}: the trainer logged no training iterations between {lo} and {hi}")
    tail = train[-max(1, math.ceil(TAIL * len(train))):]
    speeds = [r["tokens_per_s"] for r in train[1:] or train if r.get("tokens_per_s")]
    steps = [r["time_per_iter_s"] for r in train if r.get("time_per_iter_s") is not None]
    row = {
        "stage": name, "label": label, "iterations": f"{lo}-{hi}", "tokens": (hi - lo + 1) * tokens_per_iter,
        "start_loss": train[0]["loss"], "end_loss": train[-1]["loss"],
        "train_loss": statistics.fmean(r["loss"] for r in tail),
        "tokens_per_s": statistics.median(speeds) if speeds else None, "seconds": seconds,
        # The cost that grows with the run: iterations x the median time of one (no start-up,
        # kernel compilation, evaluation or checkpoints).
        "step_seconds": (hi - lo + 1) * statistics.median(steps) if steps else None,
    }
    for attention in eval_attentions:
        row[f"eval_{attention}"] = _last_eval(records, attention, hi)
    return row


def summarize(metrics: dict[str, list[dict]], seconds: dict[str, float], n1: int, total: int,
              config: dict[str, Any]) -> list[dict]:
    c = Values(config)
    tokens = c.global_batch_size * c.seq_length
    s1 = _stats("stage1", "stage 1: Lighthouse", metrics["stage1"], 1, n1, seconds["stage1"], tokens,
                ("dense", "lighthouse"))
    s2 = _stats("stage2", "stage 2: dense recovery", metrics["stage2"], n1 + 1, total, seconds["stage2"],
                tokens)
    ctl = _stats("control", "control: dense from scratch", metrics["control"], 1, total, seconds["control"],
                 tokens)
    both = {
        "stage": "two-stage", "label": "stage 1 + convert + stage 2", "iterations": f"1-{total}",
        "tokens": s1["tokens"] + s2["tokens"], "start_loss": s1["start_loss"], "train_loss": s2["train_loss"],
        "eval_dense": s2["eval_dense"], "tokens_per_s": None,
        "seconds": seconds["stage1"] + seconds["convert"] + seconds["stage2"],
        "step_seconds": None if None in (s1["step_seconds"], s2["step_seconds"])
        else s1["step_seconds"] + s2["step_seconds"],
    }
    convert = {"stage": "convert", "label": "convert", "seconds": seconds["convert"]}
    return [s1, convert, s2, both, ctl]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = ("", "iterations", "tokens", "train loss", "dense eval", "Lighthouse eval", "tokens/s",
              "seconds")
    lines = [header]
    for r in rows:
        lines.append((r["label"], r.get("iterations", ""), _fmt(r.get("tokens"), ","),
                      _fmt(r.get("train_loss"), ".3f"), _fmt(r.get("eval_dense"), ".3f"),
                      _fmt(r.get("eval_lighthouse"), ".3f"), _fmt(r.get("tokens_per_s"), ",.0f"),
                      _fmt(r.get("seconds"), ".1f")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for i, line in enumerate(lines):
        cells = [c.ljust(w) if j == 0 else c.rjust(w)
                 for j, (c, w) in enumerate(zip(line, widths, strict=True))]
        print("  ".join(cells))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("train loss: mean over the stage's last 10% of iterations; dense eval / Lighthouse eval: loss on "
          "held-out data with dense / Lighthouse attention at the stage's end (nats per byte); seconds: "
          "wall-clock of the stage, start-up, evaluation and checkpoints included")


def check_results(rows: list[dict]) -> list[dict]:
    by = {r["stage"]: r for r in rows}
    s1, s2, ctl = by["stage1"], by["stage2"], by["control"]
    start, final = s1["start_loss"], s2["eval_dense"]
    finite = final is not None and math.isfinite(final)
    # A stage 2 that silently started from fresh weights would begin near the starting loss.
    resumed = (start + s1["end_loss"]) / 2
    return [
        {"name": "stage 2 continued from the converted stage-1 checkpoint: its first train loss is below "
                 "the midpoint of stage 1's first and last", "value": s2["start_loss"],
         "threshold": f"< {resumed:.3f}", "ok": s2["start_loss"] < resumed},
        {"name": "the recovered dense model learned: its dense eval loss is finite and below the starting "
                 "train loss", "value": final, "threshold": f"< {start:.3f}", "ok": finite and final < start},
        {"name": f"the recovered model matches dense training: dense eval loss at most {MATCH_TOLERANCE} "
                 "above the dense control's", "value": final,
         "threshold": f"<= {_fmt(ctl['eval_dense'], '.3f')} + {MATCH_TOLERANCE}",
         "ok": finite and ctl["eval_dense"] is not None and final <= ctl["eval_dense"] + MATCH_TOLERANCE},
    ]


def print_checks(checks: list[dict], rows: list[dict], config: dict[str, Any]) -> None:
    print()
    for c in checks:
        verdict = "ok" if c["ok"] else "FAILED"
        print(f"check  {c['name']}: {_fmt(c['value'], '.3f')} {c['threshold']}  {verdict}")
    by = {r["stage"]: r for r in rows}
    c = Values(config)
    lh = LighthouseConfig(levels=c.lighthouse_levels, pooling_factor=c.lighthouse_pooling_factor,
                          topk=c.lighthouse_topk, tile_topk=c.lighthouse_tile_topk)
    n = c.seq_length
    s1 = by["stage1"]
    lh_eval, dense_eval = _fmt(s1["eval_lighthouse"], ".3f"), _fmt(s1["eval_dense"], ".3f")
    print(f"info   stage-1 weights at the switch, held-out loss: {lh_eval} with Lighthouse attention, "
          f"{dense_eval} with dense attention (the gap the recovery stage closes)")
    print(f"info   Lighthouse layers attend over S = {lh.gathered_length(n)} gathered entries instead of "
          f"N = {n} tokens ({lh.attention_flops_ratio(n):.1f}x fewer attention FLOPs)")
    speed, ctl = s1["tokens_per_s"], by["control"]["tokens_per_s"]
    if speed and ctl:
        note = ("; at this length attention is a small part of the work and selecting costs more than it "
                "saves: the speed-up grows with the context (benchmarks/layer: 25x for one layer at 128K "
                "tokens on an H100)") if speed < ctl else ""
        print(f"info   stage 1 ran at {speed / ctl:.2f}x the dense control's tokens/s (median over its "
              f"iterations; noisy on a busy machine){note}")


def plot_losses(metrics: dict[str, list[dict]], n1: int, path: Path,
                title: str = "Lighthouse then dense recovery vs dense from scratch") -> bool:
    """Training loss of the two-stage run and of the control, the switch marked; False
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # The control underneath, paler: the two-stage run is the subject.
    runs = [("control", "control: dense from scratch", "tab:gray", 0.55),
            ("stage1", "stage 1: Lighthouse", "tab:orange", 0.95),
            ("stage2", "stage 2: dense recovery", "tab:blue", 0.95)]
    for name, label, color, alpha in runs:
        train = [r for r in metrics[name] if r["kind"] == "train"]
        ax.plot([r["iteration"] for r in train], [r["loss"] for r in train], color=color, label=label,
                linewidth=1.1, alpha=alpha)
        evals = [r for r in metrics[name] if r["kind"] == "eval" and r["attention"] == "dense"]
        ax.plot([r["iteration"] for r in evals], [r["loss"] for r in evals], "o", color=color,
                markersize=5, markeredgecolor="black", markeredgewidth=0.5)
    ax.axvline(n1 + 0.5, color="black", linestyle="--", linewidth=1)
    ax.annotate("switch to dense (convert)", (n1 + 0.5, 0.97), xycoords=("data", "axes fraction"),
                ha="right", va="top", rotation=90, fontsize=8)
    ax.plot([], [], "o", color="white", markeredgecolor="black", label="held-out loss, dense attention")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True
