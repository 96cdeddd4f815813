"""The report's detail sections: every committed run in full, below the claims tables."""

from __future__ import annotations

from .._common import format_length
from ..retrieval.needle import CHANCE, RETRIEVES
from .claims import cell
from .extract import retrieval_word, v1_studies
from .results import Result

NOT_MEASURED_QUALITY = (
    "Not measured yet: no `quality/results/summary.json`. The runs take hours of one GPU in the "
    "background: `bash benchmarks/quality/lease.sh start --work DIR --iters 2560 --seeds 1-3 --jobs 5`, "
    "their run JSONs copied into `benchmarks/quality/runs/`, then `python -m benchmarks.quality.analyze` "
    "([quality/README.md](quality/README.md))."
)


# ------------------------------------------------------------------------- end to end


def _e2e_row(row: dict) -> str:
    if "step_ms" not in row:
        return f"| {format_length(row['N'])} | {row['mode']} | | | {cell(row.get('error', ''))} | | |"
    return (
        f"| {format_length(row['N'])} | {row['mode']} | {row.get('topk')} | {row.get('S')} | "
        f"{row['step_ms']:.0f} | {row['tokens_per_s']:,.0f} | {row.get('peak_mem_gib', float('nan')):.1f} |"
    )


def e2e_section(results: dict) -> list[str]:
    lines = []
    for r in results.get("e2e", []):
        m = r.meta
        model = m.get("model", {})
        lines += [
            f"### {r.path.as_posix()}",
            "",
            f"{r.card} ({m.get('nvidia_smi')}), megatron-core {m.get('megatron_core')}, TE "
            f"{m.get('transformer_engine')}, {m.get('spec')} spec, stage 5 {m.get('stage5_kernel')}, "
            f"recompute {m.get('recompute')}, {model.get('layers')} layers, hidden {model.get('hidden')}, "
            f"vocab {model.get('vocab')}, {m.get('parameters') or 0:,} parameters, {m.get('date')}. "
            f"Command: `{r.command}`",
            "",
            "| N | mode | k | S | step ms | tok/s | peak GiB |",
            "|---|---|---|---|---|---|---|",
            *map(_e2e_row, r.data.get("rows", [])),
            "",
        ]
    return lines


# ------------------------------------------------------------------------- failure modes


def _short(d: dict) -> list[str]:
    return [
        "Short sequences, one layer fwd+bwd (ms):",
        "",
        "| N | k | S | Lighthouse | dense | speed-up |",
        "|---|---|---|---|---|---|",
        *(
            f"| {format_length(x['N'])} | {x['topk']} | {x['S']} | {x['fwd_bwd_ms']:.2f} | "
            f"{x['dense_fwd_bwd_ms']:.2f} | {x['speedup']:.2f}x |"
            for x in d["rows"]
        ),
        "",
    ]


def _memory(d: dict) -> list[str]:
    def line(x):
        return x.get("error") or (
            f"peak {x.get('peak_mem_gib', float('nan')):.1f} GiB ({x['inputs_gib']:.1f} GiB "
            "of q, k, v and the output gradient)"
        )

    return [
        "Peak memory, one layer fwd+bwd:",
        "",
        *(f"- {format_length(x['N'])}, k={x['topk']}: {line(x)}" for x in d["rows"]),
        "",
    ]


def _topk(d: dict) -> list[str]:
    lines = [
        "k up to its largest valid value N/p^(L-1) (output error: exact fp32, probe inputs):",
        "",
        "| N | k | S/N | rel. error vs dense |",
        "|---|---|---|---|",
        *(
            f"| {x['N']} | {x['topk']} | {x['S_over_N']:.2f} | {x['rel_err_vs_dense']:.3f} |"
            for x in d["errors"]
        ),
    ]
    if d["timings"]:
        lines += [
            "",
            "| N | k | S/N | Lighthouse ms | dense ms | speed-up |",
            "|---|---|---|---|---|---|",
            *(
                f"| {format_length(x['N'])} | {x['topk']} | {x['S_over_N']:.2f} | {x['fwd_bwd_ms']:.2f} | "
                f"{x['dense_fwd_bwd_ms']:.2f} | {x['speedup']:.2f}x |"
                for x in d["timings"]
            ),
        ]
    return lines + [
        "",
        "Each token sums one output per level, so Lighthouse's output is not an approximation "
        "of dense attention's that improves with k: the error is a distance, not a quality score.",
        "",
    ]


def _qknorm(d: dict) -> list[str]:
    m = d["mean"]
    return [
        f"QK layer-norm (N={d['N']}, mean of {len(d['draws'])} draws): the spread (std/mean) of the query "
        f"norms is {m['norm_cv_q']:.3f} raw and {m['norm_cv_q_layernormed']:.1e} after layer-norm, of the "
        f"key norms {m['norm_cv_k']:.3f} and {m['norm_cv_k_layernormed']:.1e}. Tokens attended at full "
        f"resolution: overlap (Jaccard) {m['overlap_raw_vs_layernormed']:.2f} between raw and layer-normed "
        "scoring in fp32 "
        f"({m.get('overlap_raw_vs_layernormed_bf16', float('nan')):.2f} with bf16 q and k, whose rounding "
        "erases the tiny norm differences LayerNorm's epsilon leaves), "
        f"{m['overlap_raw_vs_random']:.2f} between raw scoring and a random selection. Output distance "
        f"against dense: raw {m['rel_err_raw']:.3f} (random selection "
        f"{m['rel_err_raw_random_selection']:.3f}),"
        f" layer-normed {m['rel_err_layernormed']:.3f} (random selection "
        f"{m['rel_err_layernormed_random_selection']:.3f}).",
        "",
    ]


def _causality(c: dict) -> list[str]:
    return [
        f"Non-causal selection (N={c['N']}, q and k of the tokens after t scaled by {c['factor']}):",
        "",
        "| t | offset in tile | out[..t] rel. change | tokens changed | earliest changed | dense |",
        "|---|---|---|---|---|---|",
        *(
            f"| {x['t']} | {x['position_in_tile']} / {x['tile_length']} | {x['rel_change_out_upto_t']:.2e} | "
            f"{100 * x['tokens_changed_frac']:.1f}% | {x['earliest_changed_token']} | "
            f"{x['dense_rel_change_out_upto_t']:.1e} |"
            for x in c["rows"]
        ),
        "",
    ]


FAILURE_PARTS = {
    "short": _short,
    "memory": _memory,
    "topk": _topk,
    "qknorm": _qknorm,
    "causality": _causality,
}


def failure_section(results: dict) -> list[str]:
    lines = []
    for r in results.get("failure_modes", []):
        lines += [f"### {r.path.as_posix()} ({r.card})", "", f"Command: `{r.command}`", ""]
        for part, render in FAILURE_PARTS.items():
            if part in r.data:
                lines += render(r.data[part])
    return lines


# ------------------------------------------------------------------ time to dense quality


def quality_section(results: dict) -> list[str]:
    """The time-to-dense-quality study: the tables its analysis writes, from its summary JSON."""
    from ..quality.analyze import markdown

    studies = results.get("quality", [])
    if not studies:
        return [NOT_MEASURED_QUALITY, ""]
    r = studies[0]
    body = [line for line in markdown(r.data).splitlines() if not line.startswith("<!--")]
    return [
        f"### {r.path.as_posix()}",
        "",
        f"{r.data['runs']} runs on {r.card}; every run's JSON under [quality/runs/](quality/runs/).",
        *body,
        "",
    ]


# ------------------------------------------------------------------ the earlier protocol


def _stat(s: dict, spec: str = "+.3f") -> str:
    if not s["n"] or s["mean"] != s["mean"]:  # none, or NaN
        return "-"
    return f"{s['mean']:{spec}}" + ("" if s["std"] != s["std"] else f" +- {s['std']:.3f}")


def _v1_header(r: Result) -> list[str]:
    m = r.meta
    s = m["settings"][m["paper_schedule"]]
    reads = m["iters"] * s["global_batch_size"] * s["seq_length"] / m["data"]["tokens"]
    return [
        f"### {r.path.as_posix()}",
        "",
        f"{r.card}, megatron-core {m.get('megatron_core')}, {m.get('date')}. Command: `{r.command}`. "
        f"{m.get('preset_describe')}; main protocol: {m['paper_schedule']} LR, switch at "
        f"{m['main_switch']:.1%}, "
        f"{m['seeds']} seeds (other schedules: {m['sweep_seeds']}). Data: {m['data']['source']}, "
        f"{m['data']['tokens']:,} tokens, each run reads them {reads:.1f} times; passkey documents "
        f"{100 * m['data']['passkey']['fraction_of_bytes']:.1f}% of bytes. Verdict rule: "
        f"{m['verdict_rule']}.",
        "",
        "Mean +- standard deviation over seeds; gaps are recovered - dense (negative: recovered better); "
        "train gap: training loss over the last 5% of iterations; held-out gap and stage 1: held-out loss "
        "(stage 1 under Lighthouse attention at the switch, minus the dense arm's).",
        "",
    ]


def _v1_protocols(d: dict) -> list[str]:
    lines = [
        "| schedule | switch | seeds | train gap | held-out gap | spike at switch | recovery iters | "
        "stage 1 held-out (Lighthouse) - dense | verdict (train / held-out) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pp = d.get("paper_protocol") or {}
    most = max((len(p["seeds"]) for p in d["protocols"]), default=0)
    for p in d["protocols"]:
        main = " (main)" if (p["switch"], p["schedule"]) == (pp.get("switch"), pp.get("schedule")) else ""
        never = f", {p['never_recovered']} never" if p["never_recovered"] else ""
        fewer = "" if len(p["seeds"]) == most else " (fewer seeds)"
        lines.append(
            f"| {p['schedule']}{main} | {p['switch_frac']:.1%} (it {p['switch']}) | "
            f"{len(p['seeds'])}{fewer} | "
            f"{_stat(p['final_train_gap'])} | {_stat(p['final_heldout_gap'])} | {_stat(p['spike'])} | "
            f"{_stat(p['recovery_iters'], '.0f')}{never} | {_stat(p['stage1_gap'])} | "
            f"{p['verdict_train']['verdict']} / {p['verdict_heldout']['verdict']} |"
        )
    if not d["protocols"]:
        lines.append("| (no protocol finished) | | | | | | | | |")
    return lines + [""]


def _v1_probes(d: dict) -> list[str]:
    lines = []
    lp = d.get("leak_probe")
    if lp:
        lines += [
            "Leak probe (mean over seeds of the per-seed mean loss change before t, +- standard error):",
            "",
            "| model | Lighthouse attention | dense attention |",
            "|---|---|---|",
        ]
        for name in ("lighthouse_trained", "dense_trained"):
            a = lp["aggregate"][name]
            lines.append(
                f"| {name.replace('_', ' ')} | {a['lighthouse']['mean']:+.2e} +- {a['lighthouse']['se']:.1e} "
                f"| {a['dense']['mean']:+.2e} |"
            )
        lines += [
            "",
            f"Dense attention exactly 0: {'yes' if lp['aggregate']['dense_exactly_zero'] else 'NO'}.",
            "",
        ]
    rt = d.get("retrieval")
    if rt:
        a = rt["aggregate"]
        word = retrieval_word(f"verdict {a['accuracy_deficit']['verdict']}", a["informative"])
        lines += [
            f"Retrieval (value token accuracy, chance {CHANCE}): dense {_stat(a['dense'], '.3f')}, recovered "
            f"{_stat(a['recovered'], '.3f')}; {word}.",
            "",
        ]
    return lines


def _v1_one_seed(r: Result) -> list[str]:
    d, m = r.data, r.meta
    c = m["config"]
    smi = f" ({m['nvidia_smi']})" if m.get("nvidia_smi") else ""
    lines = [
        f"### {r.path.as_posix()}",
        "",
        f"{r.card}{smi}, megatron-core {m.get('megatron_core')}, {m.get('date')}. Command: `{r.command}`. "
        f"{c['num_layers']} layers x {c['hidden_size']}, {c['seq_length']:,} tokens, batch "
        f"{c['global_batch_size']}, L={c['lighthouse_levels']}, p={c['lighthouse_pooling_factor']}, "
        f"k={c['lighthouse_topk']}, dense layers {c['lighthouse_dense_layers']}; {m['stage1_iters']} "
        f"Lighthouse + {m['total_iters'] - m['stage1_iters']} dense iterations against {m['total_iters']} "
        "dense; one seed.",
        "",
    ]
    if "final_loss_gap" not in d:
        return lines + [f"Cut short by its time budget: {', '.join(m.get('skipped', []))} did not run.", ""]
    rows = {row["stage"]: row for row in d["rows"]}
    lines += [
        "| run | iterations | dense eval loss | training-step s | wall-clock s | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("stage1", "stage2", "two-stage", "control"):
        row = rows[key]
        speed = f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else ""
        lines.append(
            f"| {row['label']} | {row['iterations']} | {row['eval_dense']:.4f} | {row['step_seconds']:.1f} | "
            f"{row['seconds']:.1f} | {speed} |"
        )
    sw, rec = d["switch"], d["recovery"]
    tol = rec["tolerance"]
    if rec["steps"] is None:
        recovered = f"does not come within {tol} of the dense arm inside the run"
    else:
        recovered = f"comes within {tol} of the dense arm after {rec['steps']} dense iterations"
    return lines + [
        "",
        f"At the switch the stage-1 weights score {sw['eval_lighthouse']:.4f} with Lighthouse and "
        f"{sw['eval_dense']:.4f} with dense attention (held-out; jump {sw['eval_jump']:+.4f}; training "
        f"loss {sw['train_jump']:+.4f}); the dense arm is at {sw['dense_arm_eval']:.4f}. The recovered "
        f"model {recovered}.",
        "",
    ]


def v1_section(results: dict) -> list[str]:
    """The earlier protocol's runs in full (quality/v1/)."""
    lines = []
    for r in v1_studies(results):
        lines += [
            *_v1_header(r),
            *_v1_protocols(r.data),
            f"![loss curves and sweep]({r.path.with_suffix('.png').as_posix()})",
            "",
            *_v1_probes(r.data),
        ]
    for r in results.get("quality_v1", []):
        if "protocols" not in r.data:
            lines += _v1_one_seed(r) + [f"![loss curves]({r.path.with_suffix('.png').as_posix()})", ""]
    return lines


# ------------------------------------------------------------------------------ retrieval


def retrieval_section(results: dict) -> list[str]:
    lines = []
    for r in results.get("retrieval", []):
        d, m = r.data, r.meta
        lines += [
            f"### {r.path.as_posix()}",
            "",
            f"{r.card}, {m.get('date')}. Command: `{r.command}`. {m['trials']} samples per cell, "
            f"{m['digits']}-digit values, depths {m['depths']}, lengths "
            f"{', '.join(map(format_length, m['lengths']))}.",
            "",
            "| model | checkpoint iteration | token accuracy | exact match | value loss (nats) |",
            "|---|---|---|---|---|",
        ]
        for name, model in d["models"].items():
            sm = model["summary"]
            lines.append(
                f"| {name} | {model['iteration']} | {sm['token_accuracy']:.3f} | {sm['exact']:.3f} | "
                f"{sm['loss']:.3f} |"
            )
        if not d["verdict"].get("informative", True):
            lines += [
                "",
                f"Uninformative: the dense model's value token accuracy is below chance ({CHANCE}) + "
                f"{RETRIEVES}, so this probe says nothing about the recovered model's retrieval at this "
                "scale.",
            ]
        lines.append("")
    return lines
