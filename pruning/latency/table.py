"""The latency table: per-node timings on a grid of widths, the calibration, persistence, and the table as a
:class:`pruning.cost.Cost`."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .._io import atomic_write_text
from ..cost import Constant, Cost, Interpolated
from ..graph import ChannelGraph
from .settings import DEFAULT_GRID, FORMAT_VERSION, LatencyTableError


# --------------------------------------------------------------------------------------------------- widths


def align_width(width: float, full: int, align: int = 1) -> int:
    """``width`` rounded to a multiple of ``align`` within ``[align, full]`` (groups narrower than ``2 * align``:
    to an integer within ``[1, full]``)."""
    if align <= 1 or full < 2 * align:
        return max(1, min(full, round(width)))
    return max(align, min(full, align * round(width / align)))


def make_grids(graph: ChannelGraph, fractions: Sequence[float] = DEFAULT_GRID,
               align: int = 1) -> dict[str, tuple[int, ...]]:
    """Sampled widths per prunable group: ``f * width`` for each fraction, aligned (see :func:`align_width`),
    distinct, the full width last; a grouped conv's groups (``blocks``) keep equal counts, so multiples of it."""
    return {g.name: tuple(sorted({_block_width(align_width(f * g.width, g.width, math.lcm(align, g.blocks)), g.blocks)
                                  for f in fractions} | {g.width}))
            for g in graph.prunable_groups()}


def _block_width(width: int, blocks: int) -> int:
    """``width`` as the nearest multiple of ``blocks`` (at least ``blocks``)."""
    return max(blocks, blocks * round(width / blocks))


# ------------------------------------------------------------------------------------------------ the table


@dataclass
class NodeTiming:
    """One node's measured time (ms) on the grid of the prunable groups it depends on (none: a constant)."""

    node: str
    scope: str
    groups: tuple[str, ...]
    values: np.ndarray  # shape (len(grid[g]) for g in groups); a 0-d array for a constant


@dataclass
class LatencyTable:
    """Measured per-node latency on a grid of widths, with the end-to-end calibration.

    Attributes:
        meta: the cache key (see :func:`table_meta`).
        grids: sampled widths per prunable group (ascending, the full width last).
        nodes: every node's timing, in execution order.
        parent_ms: the unpruned model, measured end to end (median of interleaved rounds).
        overhead_ms, scale: the calibration ``latency = overhead_ms + scale * sum(node times)``.
        calibration: the points the calibration was fitted on (widths fraction, sum of nodes, measured).
        blocks: removable residual blocks (``module``, ``inner`` groups, ``stream`` group), see :meth:`cost`.
        block_overhead_ms: per removable block, time only the whole block pays (its container calls).
        align: sampled widths are multiples of this (see :func:`detect_alignment`): the cost is exact there, and
            the knapsack should keep multiples of it (``round_to``).
        measured: number of distinct shapes measured.
        node_points: number of (node, grid point) pairs the measured shapes cover (deduplication).
        seconds: wall time the profiling took.
        phase_seconds: where it went: ``alignment`` (the probe), ``nodes`` (the per-node timings), ``blocks``
            (the blocks' call overhead) and ``calibration`` (the end-to-end fit).
    """

    meta: dict[str, Any]
    grids: dict[str, tuple[int, ...]]
    nodes: list[NodeTiming]
    parent_ms: float
    align: int = 1
    overhead_ms: float = 0.0
    scale: float = 1.0
    calibration: list[dict[str, float]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    block_overhead_ms: dict[str, float] = field(default_factory=dict)
    measured: int = 0
    node_points: int = 0
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    path: str | None = None  # where it was loaded from or saved to (not stored)
    reused: bool = False  # True when load_or_profile found it in the cache (not stored)

    # -- prediction
    def node_sum(self, widths: Mapping[str, int] | None = None) -> float:
        """Sum of isolated node times (uncalibrated, ms) at the given widths (others full)."""
        cost = _node_cost(self, self.full_widths(), scale=1.0, overhead=0.0, blocks=False)
        return cost(widths)

    def full_widths(self) -> dict[str, int]:
        return {name: int(w) for name, (w, _) in self.meta["groups"].items()}

    def cost(self, graph: ChannelGraph | None = None) -> Cost:
        """The latency cost (ms, calibrated) as a function of the group widths.

        Args:
            graph: the model's channel graph; checked against the table (same groups and widths).

        Raises:
            LatencyTableError: the graph's groups differ from the table's.
        """
        if graph is not None:
            self.check_graph(graph)
        return _node_cost(self, self.full_widths(), scale=self.scale, overhead=self.overhead_ms, blocks=True)

    def check_graph(self, graph: ChannelGraph) -> None:
        """Raise :class:`LatencyTableError` when ``graph`` is not the graph the table was measured on."""
        ours = {name: tuple(v) for name, v in self.meta["groups"].items()}
        theirs = {name: (g.width, g.prunable) for name, g in graph.groups.items()}
        if ours != theirs or list(graph.input_size) != list(self.meta["input_size"]):
            diff = sorted(set(ours.items()) ^ set(theirs.items()))[:4]
            raise LatencyTableError(
                f"latency table of {self.meta['model']} at {self.meta['input_size']} does not match this model's "
                f"channel graph (input {list(graph.input_size)}; differing groups, first few: {diff}); "
                "profile this model (python -m pruning.profile)"
            )

    def summary(self) -> str:
        """Parent measured vs predicted, distinct shapes measured, profiling time."""
        m = self.meta
        predicted = self.cost()(None)
        return (
            f"{m['model']} @ {m['input_size'][1]}x{m['input_size'][2]}, batch {m['batch']}, {m['threads']} threads, "
            f"{m['backend']} on {m['device']} ({m['device_name']}), {m['dtype']}\n"
            f"parent: measured {self.parent_ms:.2f} ms, predicted {predicted:.2f} ms "
            f"(sum of nodes {self.node_sum():.2f} ms, calibration {self.overhead_ms:+.2f} ms + {self.scale:.3f} x)\n"
            f"{len(self.nodes)} nodes x grid points = {self.node_points} timings needed, {self.measured} distinct "
            f"shapes measured; {len(self.grids)} prunable groups sampled at multiples of {self.align} (prune with "
            f"round_to={self.align}); {len(self.blocks)} removable blocks; profiled in {self.seconds:.0f} s"
            + (f" ({', '.join(f'{k} {v:.0f} s' for k, v in self.phase_seconds.items())})" if self.phase_seconds else "")
        )

    # -- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "grids": {g: list(map(int, v)) for g, v in self.grids.items()},
            "nodes": [{"node": n.node, "scope": n.scope, "groups": list(n.groups),
                       "values": np.asarray(n.values).tolist()} for n in self.nodes],
            "parent_ms": self.parent_ms, "align": self.align, "overhead_ms": self.overhead_ms, "scale": self.scale,
            "calibration": self.calibration, "blocks": self.blocks, "block_overhead_ms": self.block_overhead_ms,
            "measured": self.measured, "node_points": self.node_points, "seconds": self.seconds,
            "phase_seconds": self.phase_seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyTable":
        grids = {g: tuple(int(x) for x in v) for g, v in d["grids"].items()}
        nodes = []
        for n in d["nodes"]:
            values = np.asarray(n["values"], dtype=np.float64)
            groups = tuple(n["groups"])
            expected = tuple(len(grids[g]) for g in groups)
            if values.shape != expected:
                raise ValueError(f"node {n['node']!r}: values of shape {values.shape}, expected {expected}")
            nodes.append(NodeTiming(n["node"], n["scope"], groups, values))
        return cls(
            meta=dict(d["meta"]), grids=grids, nodes=nodes, parent_ms=float(d["parent_ms"]), align=int(d["align"]),
            overhead_ms=float(d["overhead_ms"]), scale=float(d["scale"]), calibration=list(d.get("calibration", [])),
            blocks=list(d.get("blocks", [])), block_overhead_ms=dict(d.get("block_overhead_ms", {})),
            measured=int(d.get("measured", 0)), node_points=int(d.get("node_points", 0)),
            seconds=float(d.get("seconds", 0.0)), phase_seconds=dict(d.get("phase_seconds", {})),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        """Read a table written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            LatencyTableError: the file is corrupt or not a latency table of this format version.
        """
        path = os.fspath(path)
        fix = "delete it, or rebuild it with `python -m pruning.profile MODEL --img-size N --batch B`"
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LatencyTableError(f"latency table {path!r} is corrupt ({e}); {fix}") from None
        version = d.get("meta", {}).get("format") if isinstance(d, dict) and isinstance(d.get("meta"), dict) else None
        if version != FORMAT_VERSION:
            raise LatencyTableError(
                f"latency table {path!r} has format {version!r}, this version reads {FORMAT_VERSION}; {fix}")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LatencyTableError(f"latency table {path!r} is corrupt ({type(e).__name__}: {e}); {fix}") from None


def _node_cost(table: LatencyTable, full_widths: dict[str, int], *, scale: float, overhead: float,
               blocks: bool) -> Cost:
    """The table as a :class:`Cost`: one term per node (values times ``scale``) plus the overhead.

    With ``blocks``, the nodes of a removable block cost 0 once its inner groups are at width 0: terms over an
    inner group get ``zero_at`` for it, and the block's other nodes (the residual add) get the block's first
    inner group as a second group, cost 0 at width 0. The block's own call overhead is one more such term.
    """
    scope_block = _block_finder(table.blocks) if blocks else (lambda scope: None)
    terms: list = []
    constant = overhead
    for n in table.nodes:
        values = scale * np.asarray(n.values, dtype=np.float64)
        groups, grids = tuple(n.groups), tuple(table.grids[g] for g in n.groups)
        zero = ()
        block = scope_block(n.scope)
        if block is not None:
            inner = set(block["inner"])
            zero = tuple(g in inner for g in groups)
            if not any(zero) and not block.get("stream_ops_stay") and len(groups) < 2:
                first = block["inner"][0]  # gone with the block: cost 0 when its first inner group is
                groups, grids = (*groups, first), (*grids, (1, full_widths[first]))
                values, zero = np.stack([values, values], axis=-1), (*zero, True)
        if not groups:
            constant += float(values)
            continue
        terms.append(Interpolated(groups, grids, values, zero if any(zero) else (), n.node))
    if blocks:
        for b in table.blocks:
            extra = table.block_overhead_ms.get(b["module"], 0.0)
            if extra > 0:
                first = b["inner"][0]
                terms.append(Interpolated((first,), ((1, full_widths[first]),), np.array([extra, extra]), (True,),
                                          f"{b['module']} (block call overhead)"))
    terms.append(Constant(constant, "overhead (calibration and fixed-width nodes)"))
    meta = {k: table.meta[k] for k in ("model", "input_size", "device_name", "threads", "batch", "dtype", "backend")}
    meta["parent_ms"] = table.parent_ms
    meta["round_to"] = table.align
    return Cost("latency", "ms", terms, dict(full_widths), integral=False, meta=meta)


def _block_finder(blocks: Sequence[Mapping[str, Any]]) -> Callable[[str], Mapping[str, Any] | None]:
    def find(scope: str) -> Mapping[str, Any] | None:
        for b in blocks:
            if scope == b["module"] or scope.startswith(b["module"] + "."):
                return b
        return None

    return find
