"""The report's plots, drawn from the loaded results into <root>/report/results/."""

from __future__ import annotations

from pathlib import Path


def plot_layer(results, out_dir: Path) -> Path | None:
    from lighthouse_megatron.bench.layer import plot

    runs = results.get("layer", [])
    if not runs:
        return None
    r = runs[0]
    rows = r.data["rows"]
    dense = {row["N"]: row for row in rows if "dense_fwd_bwd_ms" in row}
    path = out_dir / "layer_latency.png"
    plot(rows, dense, path, r.card)
    return path


def plot_e2e(results, out_dir: Path) -> Path | None:
    series = []
    for r in results.get("e2e", []):
        summ = [s for s in r.data.get("summary", []) if "speedup_vs_dense" in s]
        if summ:
            m = r.meta.get("model", {})
            series.append((f"{r.path.stem}: vocab {m.get('vocab')}, {m.get('layers')} layers", summ, r.card))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, summ, _ in series:
        line = ax.plot([s["N"] for s in summ], [s["speedup_vs_dense"] for s in summ], "-o", label=label)
        ceil = [s for s in summ if "ceiling_speedup_vs_dense" in s]
        if ceil:
            ax.plot(
                [s["N"] for s in ceil],
                [s["ceiling_speedup_vs_dense"] for s in ceil],
                ":",
                color=line[0].get_color(),
                label=f"{label} (free-selection ceiling)",
            )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("training step speed-up over dense")
    ax.set_title(f"End to end, {', '.join(sorted({c for _, _, c in series}))}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "e2e_speedup.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_retrieval(results, out_dir: Path) -> Path | None:
    from ..retrieval.run import plot_heatmap

    for r in results.get("retrieval", []):
        path = out_dir / "retrieval_heatmap.png"
        return path if plot_heatmap(r.data, path) else None
    return None
