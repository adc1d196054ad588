"""Latency measured on the user's own device, as a cost over group widths (:class:`pruning.cost.Cost`).

Every fx node that does work (convs, batch norms, activations, the SE pooling and gate, residual adds,
pooling, the classifier; :attr:`pruning.graph.ChannelGraph.nodes`) is timed *in isolation*, rebuilt at a few
sampled widths of the (at most two) prunable channel groups it touches, and interpolated in between. Nodes of
one shape are timed once for the whole model (the blocks of a stage repeat shapes: efficientnet_b0 @224 needs
3,428 (node, width) timings and measures 1,566 shapes). The sum of isolated times misses what only the whole
model pays (container calls, caches cold between ops), so the whole model is also timed end to end at full
width and at two uniformly pruned widths, and ``latency = overhead + scale * sum(node times)`` is fitted to
those points. A removable residual block (:mod:`pruning.blocks`) costs nothing, call overhead included, once
its inner groups keep width 0.

What the measurements showed, and the design choices they forced (2-core AVX-512 CPU, torch 2.14):

* **Alignment.** Conv kernels are up to 2x faster at channel counts that are multiples of 16 (a 3x3
  depthwise conv at 56x56: 0.16 ms at 128 and 144 channels, 0.32-0.35 ms at every width in between), so
  latency is not monotone in the width, and no monotone cost (which the knapsack needs) can be right at both
  aligned and unaligned widths. The table samples multiples of the alignment :func:`detect_alignment` finds
  (``table.align``), where latency is smooth and monotone; prune with ``round_to = table.align``.
* **Noise.** Each shape is timed in several passes through all shapes and the fastest timing is kept: a
  busy machine only ever adds time, in bursts longer than one shape's repeats. Values are then made
  monotone by a running minimum from the full width down, so that an outlier at a narrow width cannot leak
  to wider ones.
* **Allocator.** glibc page-faults torch's activations in on every forward pass unless told to keep freed
  memory (:func:`steady_allocator`), which made end-to-end times depend on the process's history (b0 @224
  batch 32: 800 vs 270 ms); timings here run with the steady allocator.

On a GPU (H200, eager torch) small models run launch-bound: the GPU runs one node while the host launches the
next, so node times add up to more than the whole model, and pruned models floor at the host's launch time
(efficientnet_b0 @224 batch 64: 6.8 ms, 8.2-8.7 ms of node times, ~5 ms at any narrower width). The calibrated
sum then predicts within 8-19% median, 15-23% max (``benchmarks/README.md``, GPU paths); CUDA tables are
profiled with cuDNN autotuning off and their inputs drawn on the GPU (13-17 s for b0 @224).

Tables are cached on disk, keyed by everything they depend on (device, threads, batch, dtype, backend,
library versions, model, input size, groups, grid)::

    table = load_or_profile(model, graph, "efficientnet_b0", "outputs/cache/latency", batch=1)
    cost = table.cost(graph)            # a Cost in ms: cost(widths) predicts a pruned model's latency
    table.parent_ms, table.align        # the unpruned model as measured; the width multiple to prune to

Command line: ``python -m pruning.profile efficientnet_b0 --img-size 224 --batch 1``.

Modules: :mod:`~pruning.latency.settings` (accepted settings, cache keys and paths), :mod:`~pruning.latency.table`
(:class:`LatencyTable` and its cost), :mod:`~pruning.latency.timing` (timing primitives, backends,
:func:`measure_latency`), :mod:`~pruning.latency.nodes` (one node rebuilt in isolation),
:mod:`~pruning.latency.profiler` (:func:`profile_latency`, :func:`load_or_profile`).
"""
from .profiler import detect_alignment, load_or_profile, profile_latency
from .settings import (BACKENDS, CALIBRATION_FRACTIONS, DEFAULT_GRID, DTYPES, FORMAT_VERSION, LatencyTableError,
                       check_settings, device_name, table_meta, table_path)
from .table import LatencyTable, NodeTiming, align_width, make_grids
from .timing import _monotone, measure_latency, steady_allocator  # noqa: F401  (_monotone: tests use it)

__all__ = [
    "BACKENDS", "CALIBRATION_FRACTIONS", "DEFAULT_GRID", "DTYPES", "FORMAT_VERSION", "LatencyTable",
    "LatencyTableError", "NodeTiming", "align_width", "check_settings", "detect_alignment", "device_name",
    "load_or_profile", "make_grids", "measure_latency", "profile_latency", "steady_allocator", "table_meta",
    "table_path",
]
