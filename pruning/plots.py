"""PNG plots of a run (kept fraction per layer) and of a sweep (accuracy / speed against MACs)."""
from __future__ import annotations

from typing import Mapping, Sequence

from matplotlib.figure import Figure

from .graph import ChannelGraph


def _figure(width: float, height: float):
    """A figure and its axes outside pyplot: saving needs no backend, so importing this module leaves the
    user's matplotlib backend (and any open figures) alone."""
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def plot_kept_fractions(graph: ChannelGraph, series: Mapping[str, Mapping[str, int]], path: str, title: str) -> str:
    """Bar chart of kept/full width per prunable group, one bar series per entry of ``series``."""
    groups = graph.prunable_groups()
    fig, ax = _figure(max(8, len(groups) * 0.22), 4)
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
    return path


def plot_against_macs(rows: Sequence[Mapping], y: str, ylabel: str, path: str, title: str) -> str | None:
    """Scatter of ``y`` against achieved MACs over the runs of a sweep, one series per method label."""
    points = [r for r in rows if r.get(y) is not None and r.get("macs_after") is not None]
    if not points:
        return None
    fig, ax = _figure(6, 4)
    for label in sorted({r["method"] for r in points}):
        mine = sorted((r["macs_after"] / 1e6, r[y]) for r in points if r["method"] == label)
        ax.plot([m for m, _ in mine], [v for _, v in mine], marker="o", label=label)
    return _finish(fig, ax, "MACs (millions)", ylabel, title, path)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    """Labels, grid and legend of a line plot, saved to ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_learning_curve(curve: Sequence[Sequence[float]], teacher_top1: float | None, path: str, title: str) -> str:
    """Student top-1 against fine-tuning updates, with the teacher's top-1 as a line."""
    fig, ax = _figure(6, 4)
    ax.plot([s for s, _ in curve], [t for _, t in curve], marker="o", label="student")
    if teacher_top1 is not None:
        ax.axhline(teacher_top1, color="gray", linestyle="--", label="teacher (unpruned parent)")
    return _finish(fig, ax, "fine-tuning updates", "top-1 (%)", title, path)
