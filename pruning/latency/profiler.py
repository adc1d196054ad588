"""Profiling a model's latency table: the alignment probe, per-node timings, the removable blocks' call overhead,
the end-to-end calibration, and the on-disk cache (:func:`load_or_profile`)."""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..graph import ChannelGraph, NodeUse
from ..layers import UnsupportedLayerError
from ..speed import cudnn_autotuning
from .nodes import _Job, _Planner, _random_inputs, _resize
from .settings import (CALIBRATION_FRACTIONS, DEFAULT_GRID, DTYPES, LatencyTableError, _dtype_name, check_settings,
                       table_meta, table_path)
from .table import LatencyTable, NodeTiming, _block_finder, align_width, make_grids
from .timing import (_lookup, _measure_jobs, _monotone, _node_runner, _stopwatch, _sync, _threads, _time_ms,
                     measure_latency, steady_allocator)


# ------------------------------------------------------------------------------------------------ alignment


def detect_alignment(*, batch: int = 1, device: str = "cpu", backend: str = "torch",
                     dtype: torch.dtype = torch.float32, runner=None, candidates: Sequence[int] = (4, 8, 16, 32),
                     threshold: float = 0.8) -> int:
    """The channel multiple at which this device's conv kernels are fast (1: no such multiple).

    Vectorised kernels work on blocks of channels (oneDNN's blocks of 16 floats with AVX-512, 8 with AVX2;
    tensor cores take multiples of 8): a conv whose channels are not a multiple of the block takes a slower
    path. Measured here (AVX-512, 2 threads): torch's 3x3 depthwise conv at 56x56, batch 1, takes 0.14-0.16 ms
    at 128, 144 and 160 channels and 0.29-0.34 ms at every width in between; at batch 32 and 28x28, 1.0 ms at
    144 and 1.6-1.9 ms at 143 and 145; 1x1 convs take 20-40% longer off the multiples. ONNX Runtime's
    depthwise conv is 2.5x faster at multiples of 4. Latency is then not monotone in the width, which a cost
    for the knapsack must be: tables sample multiples of the alignment, and pruning keeps multiples of it
    (``round_to``).

    Probes (a depthwise 3x3 and a 1x1 conv, timed apart, at 56x56) run at ``128 + a`` and ``128 + a +- 1``
    channels for each candidate ``a``; the smallest ``a`` at which either probe is faster than ``threshold``
    times both unaligned neighbours is returned. On the CPU at batch 1 (channel blocking does not depend on
    the batch, and batch 1 shows it clearest); on a GPU at batch >= 8 (below, kernel launches dominate).
    """
    runner = runner or _node_runner(backend, torch.get_num_threads())
    if str(device) == "cpu":
        steady_allocator()
        batch = 1
    else:
        batch = max(batch, 8)
    jobs: dict[str, _Job] = {}

    def probe(depthwise: bool, width: int) -> str:
        def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
            conv = (nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False) if depthwise
                    else nn.Conv2d(width, width, 1, bias=False))
            return conv.to(device, dtype).eval(), _random_inputs([(batch, width, 56, 56)], device, dtype)

        key = f"probe:{'dw' if depthwise else 'pw'}:{width}"
        jobs[key] = _Job(key, build)
        return key

    probes = {a: [(probe(dw, 128 + a), probe(dw, 127 + a), probe(dw, 129 + a)) for dw in (True, False)]
              for a in sorted(candidates)}
    times = _measure_jobs(jobs, runner, device, progress=False, repeats=3, min_seconds=2e-3)
    for a, triples in probes.items():
        if any(times[aligned] < threshold * min(times[below], times[above]) for aligned, below, above in triples):
            return a
    return 1


# ------------------------------------------------------------------------------------------------ profiling


def profile_latency(model: nn.Module, graph: ChannelGraph, *, batch: int = 1, threads: int | None = None,
                    device: str = "cpu", backend: str = "torch", dtype: torch.dtype | str = torch.float32,
                    progress: bool = True, model_name: str | None = None, grid: Sequence[float] = DEFAULT_GRID,
                    align: int | str = "auto", repeats: int = 3, min_seconds: float = 1e-3, passes: int = 2,
                    rounds: int = 7,
                    calibration: Sequence[float] = CALIBRATION_FRACTIONS) -> "LatencyTable":
    """Measure ``model``'s latency table on this device.

    Args:
        model: the unpruned model ``graph`` was built from (left unchanged).
        graph: its channel graph (fixes the input size).
        batch: images per forward pass.
        threads: torch intra-op threads (ONNX Runtime intra-op threads); None: torch's current setting.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        backend: ``torch`` (eager) or ``onnxruntime``.
        dtype: ``torch.float32``; ``bfloat16`` (CPU or CUDA) or ``float16`` (CUDA) with the torch backend.
        progress: show a progress bar with ETA.
        model_name: name recorded in the table (default: the graph's).
        grid: sampled fractions of each prunable group's width.
        align: the channel multiple the kernels are fast at (sampled widths are its multiples, see
            :func:`detect_alignment`); ``"auto"`` measures it. Prune with ``round_to = table.align``.
        repeats, min_seconds: per node shape and pass: the fastest of ``repeats`` timings, each of enough calls
            to last ``min_seconds``.
        passes: passes through all shapes; the table keeps each shape's fastest (see ``_measure_jobs``).
        rounds: interleaved end-to-end rounds of the calibration.
        calibration: uniform keep fractions of the pruned models the calibration is fitted on (with the parent).

    On CUDA, cuDNN picks each conv's kernel by its heuristics while profiling (``cudnn.benchmark`` is switched
    off, then restored): autotuning would try every algorithm at each of the table's shapes (1,566 for
    efficientnet_b0 @224).

    Returns:
        The :class:`LatencyTable` (``phase_seconds``: where the profiling time went).

    Raises:
        ValueError: bad settings (before any work).
    """
    check_settings(batch=batch, threads=threads, device=device, backend=backend, dtype=dtype)
    check_profilable(graph)
    if align != "auto" and (not isinstance(align, int) or align < 1):
        raise ValueError(f"align must be a positive int or 'auto', got {align!r}")
    start = time.perf_counter()
    torch_dtype = DTYPES[_dtype_name(dtype)]
    meta = table_meta(graph, model_name or graph.model_name, batch=batch, threads=threads, device=device,
                      backend=backend, dtype=dtype, grid=grid, align=align)
    if str(device) == "cpu":
        steady_allocator()
    phases: dict[str, float] = {}
    with _threads(threads) as n_threads, torch.no_grad(), cudnn_autotuning(False):
        torch.set_flush_denormal(True)  # in-place activations timed over and over must not reach denormals
        runner = _node_runner(backend, n_threads)
        with _stopwatch(phases, "alignment"):
            if align == "auto":
                align = detect_alignment(batch=batch, device=device, backend=backend, dtype=torch_dtype, runner=runner)
        grids = make_grids(graph, grid, align)
        planner = _Planner(model, graph, grids, batch, torch_dtype, device)
        plans = [(use, *planner.plan(use)) for use in graph.nodes]
        blocks = _removable_blocks(model, graph)
        with _stopwatch(phases, "nodes"):
            times = _measure_jobs(planner.jobs, runner, device, progress=progress, repeats=repeats,
                                  min_seconds=min_seconds, passes=passes)
        with _stopwatch(phases, "blocks"):
            overheads = _block_overheads(model, graph, blocks, runner, device=device, dtype=torch_dtype,
                                         repeats=repeats, min_seconds=min_seconds, passes=passes)
        nodes = [NodeTiming(use.name, use.module_scope, varying, _monotone(_lookup(times, keys)))
                 for use, varying, keys in plans]
        table = LatencyTable(meta=meta, grids=grids, nodes=nodes, parent_ms=float("nan"), align=align, blocks=blocks,
                             block_overhead_ms=overheads, measured=len(planner.jobs),
                             node_points=int(sum(keys.size for _, _, keys in plans)),
                             phase_seconds=phases)  # the calibration's time is added below
        with _stopwatch(phases, "calibration"):
            _calibrate(table, model, graph, calibration, batch=batch, threads=n_threads, device=device,
                       backend=backend, dtype=torch_dtype, rounds=rounds)
        torch.set_flush_denormal(False)
    table.seconds = time.perf_counter() - start
    return table


def check_profilable(graph: ChannelGraph) -> None:
    """Refuse a graph with concatenated or split channels (DenseNet, GhostNet, MixNet, CSP, ReXNet): a node
    reading them depends on more than two groups, which a latency table's terms cannot hold.

    Raises:
        UnsupportedLayerError: naming the first such node.
    """
    use = next((u for u in graph.nodes if u.segmented), None)
    if use is not None:
        raise UnsupportedLayerError(
            f"latency tables do not support concatenated or split channels: node {use.name!r} ({use.target}) of "
            f"{graph.model_name} uses {len(use.groups)} channel groups side by side; limit MACs or parameters instead "
            "(budget.limits)")
    use = next((u for u in graph.nodes if u.channels_last), None)
    if use is not None:  # the profiler resizes dim 1 of every tensor it times
        raise UnsupportedLayerError(
            f"latency tables do not support channels-last tensors: node {use.name!r} ({use.target}) of "
            f"{graph.model_name} has its channels on the last dim; limit MACs or parameters instead (budget.limits)")


def _uniform_widths(grids: Mapping[str, tuple[int, ...]], full: Mapping[str, int], fraction: float,
                    align: int) -> dict[str, int]:
    return {g: align_width(fraction * full[g], full[g], align) for g in grids}


def _fit_calibration(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``measured = overhead + scale * node_sum`` with overhead >= 0 and scale > 0.

    A negative overhead is refused (the line through the origin is fitted instead), although a GPU produces
    one: there the GPU runs one node while the host launches the next, so the whole model takes less than
    the sum of its nodes (H200, efficientnet_b0 @224 batch 64: 6.8 ms end to end, 8.2-8.7 ms of node times),
    and pruned models floor at the host's launch time (uniform 60% and 30% widths: both 4.9-5.5 ms). A line
    with a negative overhead would predict small models far too fast (below zero at the narrowest widths);
    through the origin it predicts them too slow, which a latency budget survives.
    """
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    if len(points) >= 2 and np.ptp(x) > 1e-9:
        scale, overhead = np.polyfit(x, y, 1)
        if overhead >= 0 and scale > 0:
            return float(overhead), float(scale)
    scale = float(np.dot(x, y) / np.dot(x, x))  # through the origin
    return 0.0, scale if scale > 0 else 1.0


def _calibrate(table: LatencyTable, model: nn.Module, graph: ChannelGraph, fractions: Sequence[float], *,
               batch: int, threads: int, device: str, backend: str, dtype: torch.dtype, rounds: int) -> None:
    """Measure the parent and uniformly pruned models end to end; fit overhead and scale on them."""
    from ..prune import prune_to_widths

    full = graph.full_widths()
    configs = {"parent": {}}
    for f in fractions:
        configs[f"uniform {f:g}"] = _uniform_widths(table.grids, full, f, table.align)
    models = {name: (model if not w else prune_to_widths(model, graph, w)) for name, w in configs.items()}
    measured = measure_latency(models, graph.input_size[1:], batch=batch, threads=threads, device=device,
                               backend=backend, rounds=rounds, dtype=dtype, in_chans=graph.input_size[0])
    points = []
    for name, widths in configs.items():
        s = table.node_sum(widths)
        points.append((s, measured[name]))
        table.calibration.append({"config": name, "node_sum_ms": s, "measured_ms": measured[name]})
    table.parent_ms = measured["parent"]
    overhead, table.scale = _fit_calibration(points)
    # the blocks' own call overhead is a separate term of the cost (unscaled), present in every fitted model
    table.overhead_ms = overhead - sum(table.block_overhead_ms.values())


def _removable_blocks(model: nn.Module, graph: ChannelGraph) -> list[dict[str, Any]]:
    """The model's removable residual blocks (:func:`pruning.blocks.removable_blocks`) as plain dicts.

    ``stream_ops_stay`` is True when a removed block still applies work to the stream (a post-add
    activation: the block becomes ``post_add(x + bias)``), so its stream-only nodes keep their cost.
    """
    from ..blocks import find_block_rule, removable_blocks

    out = []
    for b in removable_blocks(model, graph):
        rule = find_block_rule(model.get_submodule(b.module))
        out.append({"module": b.module, "inner": list(b.inner), "stream": b.stream,
                    "stream_ops_stay": rule is not None and rule.post_add is not None})
    return out


def _block_overheads(model: nn.Module, graph: ChannelGraph, blocks: Sequence[Mapping[str, Any]], runner,
                     *, device: str, dtype: torch.dtype, repeats: int, min_seconds: float,
                     passes: int = 2) -> dict[str, float]:
    """Per removable block, the time only the whole block pays: its own and its containers' Python calls.

    Measured at batch 1 whatever the table's batch (call overhead does not grow with the batch, and at batch 1
    it is not buried in the noise of the layers' work): the block timed whole at full width minus its nodes
    timed alone. Blocks of one shape are measured once.
    """
    if not blocks:
        return {}
    planner = _Planner(model, graph, {}, 1, dtype, device)
    find = _block_finder(blocks)
    keys: dict[str, list[str]] = {b["module"]: [] for b in blocks}
    first_input: dict[str, NodeUse] = {}
    for use in graph.nodes:
        block = find(use.module_scope)
        if block is not None:
            keys[block["module"]].append(planner.plan(use)[1][()])
            first_input.setdefault(block["module"], use)
    node_ms = _measure_jobs(planner.jobs, runner, device, progress=False, repeats=repeats, min_seconds=min_seconds,
                            passes=passes)
    sync, seen, out = _sync(device), {}, {}
    for b in blocks:
        module = model.get_submodule(b["module"])
        shape = _resize(first_input[b["module"]].input_shapes[0], 1, None)
        signature = f"{module!r}|{shape}"
        if signature not in seen:
            whole = copy.deepcopy(module).to(device, dtype).eval()
            seen[signature] = _time_ms(runner(whole, _random_inputs([shape], device, dtype)), sync,
                                       min_seconds=min_seconds, repeats=repeats)
        out[b["module"]] = max(0.0, seen[signature] - sum(node_ms[k] for k in keys[b["module"]]))
    return out


def load_or_profile(model: nn.Module, graph: ChannelGraph, model_name: str, cache_dir: str | os.PathLike,
                    **settings: Any) -> LatencyTable:
    """The cached latency table for these settings, profiling (and caching) it when absent.

    Args:
        model, graph: see :func:`profile_latency`.
        model_name: the timm name (part of the cache key).
        cache_dir: folder of the cached tables.
        **settings: :func:`profile_latency`'s keyword arguments (batch, threads, device, backend, dtype, ...).

    Raises:
        ValueError: bad settings (before any work).
        LatencyTableError: the cached file is corrupt or does not match (delete it to rebuild).
    """
    check_settings(**{k: settings[k] for k in ("batch", "threads", "device", "backend", "dtype") if k in settings})
    key_settings = {k: settings[k] for k in ("batch", "threads", "device", "backend", "dtype", "grid", "align")
                    if k in settings}
    meta = table_meta(graph, model_name, **key_settings)
    path = table_path(cache_dir, meta)
    if os.path.exists(path):
        table = LatencyTable.load(path)
        if table.meta != meta:
            raise LatencyTableError(
                f"latency table {path!r} was measured with other settings than its name says; delete it, or rebuild "
                "it with `python -m pruning.profile`")
        table.check_graph(graph)
        table.path, table.reused = path, True
        return table
    table = profile_latency(model, graph, model_name=model_name, **settings)
    table.save(path)
    table.path = path
    return table
