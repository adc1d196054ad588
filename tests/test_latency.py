"""Latency tables: per-node graph records, the measured cost's structure, caching, errors, the CLI, ORT.

Timings are never asserted tightly (the machine is shared): only structure and loose bounds. Speed and
prediction accuracy are measured by ``benchmarks/bench_latency_prediction.py``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SMALL
from pruning import build_channel_graph
from pruning import latency as lat
from pruning.cost import Interpolated
from pruning.latency import (LatencyTable, LatencyTableError, check_settings, load_or_profile, measure_latency,
                             profile_latency)

# quick tables: two sampled widths, one pass, one timing per shape, few calibration rounds
QUICK = dict(grid=(0.5, 1.0), align=1, repeats=1, min_seconds=0.0, passes=1, rounds=2, calibration=(0.5,),
             progress=False)
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def graphs(model_cache):
    cache = {}

    def get(name, size=SMALL):
        if (name, size) not in cache:
            cache[name, size] = build_channel_graph(model_cache(name), size)
        return cache[name, size]

    return get


@pytest.fixture(scope="module")
def b0_table(model_cache, graphs):
    return profile_latency(model_cache("efficientnet_b0"), graphs("efficientnet_b0", 32), **QUICK)


def _fail(*args, **kwargs):
    raise AssertionError("a measurement was made")


# --------------------------------------------------------------------------------------- graph records


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_every_work_node_has_its_groups(graphs, model_cache, name):
    graph = graphs(name)
    from pruning.graph import trace

    work = [n for n in trace(model_cache(name)).graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    assert [u.name for u in graph.nodes] == [n.name for n in work]  # every work node, in execution order
    for u in graph.nodes:
        assert u.out_group in graph.groups and all(g in graph.groups for g in u.in_groups)
        assert len(u.in_groups) == len(u.input_shapes) == len(u.inputs) >= 1
        assert 1 <= len(u.groups) <= 2


def test_node_records_of_efficientnet_block(graphs):
    graph = graphs("efficientnet_b0")
    by_name = {u.name: u for u in graph.nodes}
    layers = {layer.module: layer for layer in graph.layers}
    pw = by_name["blocks_2_1_conv_pw"]  # dense conv: its output group and its input group
    assert pw.op == "call_module" and pw.module_scope == "blocks.2.1.conv_pw"
    assert (pw.out_group, pw.in_groups) == (layers["blocks.2.1.conv_pw"].out_group, (layers["blocks.2.1.conv_pw"].in_group,))
    assert pw.groups == (pw.out_group, pw.in_groups[0]) and pw.out_group != pw.in_groups[0]
    dw = by_name["blocks_2_1_conv_dw"]  # depthwise: one group
    assert dw.groups == (pw.out_group,)
    gate = next(u for u in graph.nodes if u.target == "mul" and u.module_scope == "blocks.2.1.se")
    assert gate.in_groups == (pw.out_group, pw.out_group) and gate.input_shapes[1][2:] == (1, 1)
    add = next(u for u in graph.nodes if u.target == "add" and u.module_scope == "blocks.2.1")
    stream = layers["blocks.2.1.conv_pwl"].out_group
    assert add.groups == (stream,) and add.in_groups == (stream, stream)
    head = by_name["classifier"]
    assert head.in_groups == (layers["conv_head"].out_group,) and head.output_shape == (1, 1000)


# --------------------------------------------------------------------------------------- the table


def test_cost_structure_monotone_and_close_to_parent(b0_table, graphs):
    graph = graphs("efficientnet_b0", 32)
    cost = b0_table.cost(graph)
    assert cost.name == "latency" and cost.unit == "ms" and not cost.integral
    assert all(len(t.groups) <= 2 for t in cost.terms)
    assert {g for t in cost.terms for g in t.groups} <= {g.name for g in graph.prunable_groups()}
    rng = np.random.default_rng(0)
    grids = {g: np.unique(np.r_[0, 1, b0_table.grids.get(g, ()), rng.integers(1, w + 1, 5), w]).astype(int)
             for g, w in cost.full_widths.items()}
    assert cost.is_monotone(grids)
    full = cost(None)
    assert b0_table.parent_ms / 3 < full < 3 * b0_table.parent_ms  # calibrated on the parent; loose on purpose
    small = cost({g.name: 1 for g in graph.prunable_groups()})
    assert 0 < small < full
    assert b0_table.measured < b0_table.node_points  # a pass of a stage's blocks repeats shapes


def test_shapes_measured_once(model_cache, graphs):
    graph = graphs("resnet18", 32)
    table = profile_latency(model_cache("resnet18"), graph, **{**QUICK, "grid": (1.0,), "calibration": ()})
    assert table.node_points == len(graph.nodes)
    assert table.measured < len(graph.nodes) - 10  # the blocks of a stage repeat shapes


def test_removed_block_costs_nothing(b0_table, graphs):
    graph = graphs("efficientnet_b0", 32)
    cost = b0_table.cost(graph)
    assert b0_table.blocks, "efficientnet_b0 has removable inverted residuals"
    block = b0_table.blocks[0]
    names = {u.name for u in graph.nodes if (u.module_scope + ".").startswith(block["module"] + ".")}
    inside = [t for t in cost.terms if t.layer in names or t.layer.startswith(block["module"] + " ")]
    assert inside and all(isinstance(t, Interpolated) and any(t.zero_at) for t in inside)
    low = {g: 1 for g in block["inner"]}
    removed = {g: 0 for g in block["inner"]}
    at_low = sum(float(t(*(np.asarray({**cost.full_widths, **low}[g]) for g in t.groups))) for t in inside)
    assert cost(removed) == pytest.approx(cost(low) - at_low, rel=1e-9, abs=1e-9)
    assert cost(removed) < cost(low)


def test_save_load_roundtrip(b0_table, graphs, tmp_path):
    path = tmp_path / "t.json"
    b0_table.save(path)
    again = LatencyTable.load(path)
    widths = {g: max(1, w // 3) for g, w in b0_table.cost().full_widths.items() if g in b0_table.grids}
    assert again.cost(graphs("efficientnet_b0", 32))(widths) == pytest.approx(b0_table.cost()(widths))
    assert again.meta == b0_table.meta and again.align == b0_table.align
    assert again.phase_seconds == b0_table.phase_seconds


def test_profiling_time_is_split_into_phases(b0_table):
    phases = b0_table.phase_seconds
    assert set(phases) == {"alignment", "nodes", "blocks", "calibration"}
    assert all(v >= 0 for v in phases.values()) and phases["nodes"] > 0 and phases["calibration"] > 0
    assert sum(phases.values()) <= b0_table.seconds
    assert "nodes" in b0_table.summary()


def test_profiling_turns_cudnn_autotuning_off_and_restores_it(model_cache, graphs, monkeypatch):
    seen = []
    measure = lat.profiler._measure_jobs

    def spy(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return measure(*args, **kwargs)

    monkeypatch.setattr(lat.profiler, "_measure_jobs", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as timm's train script leaves it
    profile_latency(model_cache("resnet18"), graphs("resnet18", 32), **{**QUICK, "grid": (1.0,), "calibration": ()})
    assert seen and not any(seen)  # autotuning every shape of a table costs more than timing it
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))])
def test_node_inputs_are_drawn_on_the_device_and_seeded(device):
    from pruning.latency.nodes import _random_inputs

    shapes = [(2, 3, 4, 4), (1, 5)]
    first = _random_inputs(shapes, device, torch.bfloat16)
    again = _random_inputs(shapes, device, torch.bfloat16)
    assert [tuple(x.shape) for x in first] == shapes
    assert all(x.device.type == device and x.dtype == torch.bfloat16 for x in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and first[0].std() > 0.5


@pytest.mark.parametrize("points, expected", [
    ([(10.0, 14.0), (6.0, 10.0), (3.0, 7.0)], (4.0, 1.0)),      # CPU: what only the whole model pays
    ([(7.0, 6.7), (6.5, 5.2), (6.2, 4.3)], (0.0, 107.36 / 129.69)),  # GPU, overlapping launches: the origin
])
def test_calibration_fit(points, expected):
    from pruning.latency.profiler import _fit_calibration

    assert _fit_calibration(points) == pytest.approx(expected, abs=0.02)


def test_monotone_keeps_the_lower_envelope():
    noisy = np.array([[1.0, 5.0, 2.0], [0.5, 3.0, 4.0]])  # 5.0: a noisy narrow point
    out = lat._monotone(noisy)
    assert np.all(np.diff(out, axis=0) >= 0) and np.all(np.diff(out, axis=1) >= 0)
    assert np.all(out <= noisy) and out[-1, -1] == 4.0


def test_alignment_is_detected():
    assert lat.detect_alignment(batch=1) in (1, 4, 8, 16, 32)


# --------------------------------------------------------------------------------------- cache and errors


def test_cache_reuses_and_rebuilds_on_a_new_key(model_cache, graphs, tmp_path, monkeypatch):
    model, graph = model_cache("resnet18"), graphs("resnet18")
    settings = {**QUICK, "batch": 1, "threads": 1}
    first = load_or_profile(model, graph, "resnet18", tmp_path, **settings)
    assert not first.reused and first.path.startswith(str(tmp_path))
    # patched where they are looked up: the timing loop, block overheads, the calibration
    monkeypatch.setattr("pruning.latency.timing._time_ms", _fail)
    monkeypatch.setattr("pruning.latency.profiler._time_ms", _fail)
    monkeypatch.setattr("pruning.latency.profiler.measure_latency", _fail)
    again = load_or_profile(model, graph, "resnet18", tmp_path, **settings)
    assert again.reused and again.path == first.path and again.parent_ms == first.parent_ms
    for changed in ({"batch": 2}, {"threads": 2}):
        with pytest.raises(AssertionError, match="a measurement was made"):
            load_or_profile(model, graph, "resnet18", tmp_path, **{**settings, **changed})


def test_corrupt_or_foreign_table_gives_a_clear_error(model_cache, graphs, tmp_path):
    model, graph = model_cache("resnet18"), graphs("resnet18")
    table = load_or_profile(model, graph, "resnet18", tmp_path, **QUICK)
    with open(table.path, "w") as f:
        f.write('{"meta": {"format": 1}, "nodes": [tru')
    with pytest.raises(LatencyTableError, match="corrupt.*delete it") as e:
        load_or_profile(model, graph, "resnet18", tmp_path, **QUICK)
    assert table.path in str(e.value) and "pruning.profile" in str(e.value)
    with open(table.path, "w") as f:
        json.dump({"meta": {"format": 1}, "grids": {}}, f)
    with pytest.raises(LatencyTableError, match="corrupt"):
        LatencyTable.load(table.path)
    with open(table.path, "w") as f:
        json.dump({"meta": {"format": 0}}, f)
    with pytest.raises(LatencyTableError, match="format"):
        LatencyTable.load(table.path)
    with pytest.raises(LatencyTableError, match="does not match"):
        table.cost(graphs("resnet18", 32))


@pytest.mark.parametrize("settings, message", [
    ({"backend": "tensorrt"}, "torch, onnxruntime"),
    ({"batch": 0}, "batch"),
    ({"threads": 0}, "threads"),
    ({"device": "tpu"}, "device"),
    ({"dtype": "int8"}, "dtype"),
    pytest.param({"device": "cuda"}, "no CUDA GPU", marks=pytest.mark.skipif(HAS_CUDA, reason="a GPU is here")),
])
def test_bad_settings_fail_before_any_work(model_cache, graphs, tmp_path, monkeypatch, settings, message):
    monkeypatch.setattr("pruning.latency.timing._time_ms", _fail)
    monkeypatch.setattr("pruning.latency.profiler._time_ms", _fail)
    monkeypatch.setattr("pruning.latency.nodes.trace", _fail)
    with pytest.raises(ValueError, match=message):
        check_settings(**settings)
    with pytest.raises(ValueError, match=message):
        load_or_profile(model_cache("resnet18"), graphs("resnet18"), "resnet18", tmp_path, **settings)
    with pytest.raises(ValueError, match=message):
        profile_latency(model_cache("resnet18"), graphs("resnet18"), **settings)


def test_measure_latency_interleaved(model_cache):
    out = measure_latency({"a": model_cache("resnet18"), "b": model_cache("resnet18")}, 32, batch=1, threads=1,
                          rounds=1)
    assert set(out) == {"a", "b"} and all(v > 0 for v in out.values())


# --------------------------------------------------------------------------------------- CLI and ORT


def test_cli_builds_then_reuses(tmp_path, capsys):
    from pruning.profile import main

    args = ["resnet18", "--img-size", "32", "--batch", "1", "--threads", "1", "--cache-dir", str(tmp_path), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "latency table:" in out and "(new)" in out and "parent: measured" in out and "distinct shapes" in out
    assert main(args) == 0
    assert "reused" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--backend", "tensorrt"], "unknown latency backend"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(HAS_CUDA, reason="a GPU is here")),
    (["--batch", "0"], "batch"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, args, message):
    from pruning.profile import main

    assert main(["resnet18", "--img-size", "32", "--cache-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_unknown_model_exits_2(tmp_path, capsys):
    from pruning.profile import main

    assert main(["resnet_eighteen", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown timm model" in capsys.readouterr().err


def test_onnxruntime_backend_builds_a_table(model_cache, graphs):
    pytest.importorskip("onnxruntime")
    graph = graphs("resnet18", 32)
    table = profile_latency(model_cache("resnet18"), graph, backend="onnxruntime", threads=1,
                            **{**QUICK, "grid": (1.0,)})
    assert table.meta["backend"] == "onnxruntime" and "onnxruntime" in table.meta["versions"]
    cost = table.cost(graph)
    assert np.isfinite(cost(None)) and cost(None) > 0 and table.parent_ms > 0
