"""PNG plots of a run (kept fraction per layer) and of a sweep (accuracy / speed against MACs)."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .graph import ChannelGraph  # noqa: E402


def plot_kept_fractions(graph: ChannelGraph, series: Mapping[str, Mapping[str, int]], path: str, title: str) -> str:
    """Bar chart of kept/full width per prunable group, one bar series per entry of ``series``."""
    groups = graph.prunable_groups()
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 0.22), 4))
    width = 0.8 / max(1, len(series))
    for i, (label, widths) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [widths[g.name] / g.width for g in groups], width=width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([g.name for g in groups], rotation=90, fontsize=6)
    ax.set_ylabel("kept fraction of channels")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach the top
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_against_macs(rows: Sequence[Mapping], y: str, ylabel: str, path: str, title: str) -> str | None:
    """Scatter of ``y`` against achieved MACs over the runs of a sweep, one series per method label."""
    points = [r for r in rows if r.get(y) is not None and r.get("macs_after") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted({r["method"] for r in points}):
        mine = sorted((r["macs_after"] / 1e6, r[y]) for r in points if r["method"] == label)
        ax.plot([m for m, _ in mine], [v for _, v in mine], marker="o", label=label)
    ax.set_xlabel("MACs (millions)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
