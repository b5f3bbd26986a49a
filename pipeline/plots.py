"""PNG plots of the statistics dict (`pipeline.stats.compute`, or its stats.json read back).

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`, rendered by Agg), so nothing
touches pyplot's global state and each function returns its Figure for inspection; `save_all` writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

MAX_LINES = 8  # epochs drawn as separate histogram lines; more are thinned evenly
MAX_BARS = 40  # classes drawn as bars; more are shown as a histogram of per-class rates


def _shown_epochs(by_epoch: list[dict]) -> list[dict]:
    if len(by_epoch) <= MAX_LINES:
        return by_epoch
    keep = np.unique(np.linspace(0, len(by_epoch) - 1, MAX_LINES).round().astype(int))
    return [by_epoch[i] for i in keep]


def _histogram_lines(ax, series: list[tuple[str, dict]]) -> None:
    """One step line per (label, distribution), as the share of its views per bin."""
    for label, dist in series:
        if not dist.get("count"):
            continue
        counts = np.asarray(dist["histogram"]["counts"], float)
        ax.stairs(counts / counts.sum(), dist["histogram"]["edges"], label=f"{label} (n={dist['count']})")
    ax.legend(fontsize="small")


def mass_histogram(stats: dict) -> Figure:
    """The top-K probability mass per view, one line per cache epoch (and val)."""
    c = stats["cache"]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    series = [(f"train epoch {e['epoch']}", e["mass"]) for e in _shown_epochs(stats["train"]["by_epoch"])]
    _histogram_lines(ax, series + [("val", stats["val"]["mass"])])
    ax.axvline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"probability held by the top-{c['top_k']} classes  (sum of exp(z_i - lse))")
    ax.set_ylabel("share of views")
    ax.set_title(f"Top-K probability mass per cached view, by epoch (K={c['top_k']} of {c['num_classes']} classes)")
    return fig


def entropy_histogram(stats: dict) -> Figure:
    """The teacher's entropy per view (from the sparse reconstruction), one line per cache epoch (and val)."""
    c = stats["cache"]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    series = [(f"train epoch {e['epoch']}", e["entropy"]) for e in _shown_epochs(stats["train"]["by_epoch"])]
    _histogram_lines(ax, series + [("val", stats["val"]["entropy"])])
    ax.set_xlabel(f"teacher entropy (nats; uniform over {c['num_classes']} classes = {np.log(c['num_classes']):.2f})")
    ax.set_ylabel("share of views")
    ax.set_title("Teacher entropy per cached view, by epoch (rebuilt from the top-K)")
    return fig


def per_class(stats: dict) -> Figure:
    """Per-class teacher top-1 on val, and each run's joint-prediction agreement with the teacher."""
    classes = stats["cache"]["classes"]
    series = [("teacher top-1", stats["val"]["per_class"]["teacher_top1"])]
    series += [(f"{name}: joint agrees with teacher", run["per_class_agree"]["joint"])
               for name, run in stats["runs"].items()]
    fig = Figure(figsize=(max(7.0, 0.35 * len(classes) * len(series) ** 0.5), 4.5), layout="constrained")
    ax = fig.add_subplot()
    if len(classes) <= MAX_BARS:
        width = 0.8 / len(series)
        x = np.arange(len(classes))
        for i, (label, values) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
                   label=label)
        ax.set_xticks(x, classes, rotation=90 if max(map(len, classes)) > 3 else 0)
        ax.set_xlabel("ground-truth class")
        ax.set_ylabel("share of the class's val samples")
        ax.set_ylim(0, 1.05)
    else:
        for label, values in series:
            ax.hist([v for v in values if v is not None], bins=20, range=(0, 1), histtype="step", label=label)
        ax.set_xlabel("per-class rate")
        ax.set_ylabel("number of classes")
    fig.legend(fontsize="small", loc="outside lower center", ncols=2)
    ax.set_title("Per-class teacher top-1 accuracy and student-teacher agreement (val)")
    return fig


def disagreement_heatmap(stats: dict) -> Figure:
    """DeiT's Table 4 as a heatmap with the rates written in."""
    table = stats["disagreement"]
    labels, matrix = table["labels"], np.array(table["matrix"], float)
    side = max(4.5, 0.7 * len(labels) + 2)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0, vmax=max(float(np.nanmax(matrix)), 1e-9), cmap="viridis")
    fig.colorbar(image, ax=ax, label="disagreement rate")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize="small",
                    color="white" if matrix[i, j] < 0.5 * np.nanmax(matrix) else "black")
    ax.set_xlabel("predictor")
    ax.set_ylabel("predictor")
    ax.set_title(f"Pairwise disagreement on val, DeiT Table 4 ({table['samples']} samples)")
    return fig


PLOTS = {"mass": mass_histogram, "entropy": entropy_histogram, "per_class": per_class,
         "disagreement": disagreement_heatmap}


def save_all(stats: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write every plot as `<out_dir>/<name>.png`; returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, draw in PLOTS.items():
        path = out_dir / f"{name}.png"
        draw(stats).savefig(path, dpi=120)
        paths[name] = path
    return paths
