"""ONNX export of pruned models and the ONNX Runtime runner: outputs equal torch's, batch is dynamic."""
from __future__ import annotations

import copy
import os
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import pruning.export as export
from _utils import random_keep
from conftest import SMALL, shared_data_dir
from pruning import artifacts, build_channel_graph, prune_model
from pruning.export import MIN_OPSET, export_onnx, ort_runner, ort_session

TOL = 1e-4  # max difference of logits, ONNX Runtime vs torch, relative to the largest logit (when above 1)
N_IMAGES = 8
REAL_SIZE = 128  # small enough for a fast test, large enough for every stride of the network


def _opset(path: str) -> int:
    """The default-domain opset of an ONNX file."""
    return next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))


def _max_diff(model: nn.Module, session, x: torch.Tensor) -> float:
    """Max abs difference between torch's and ONNX Runtime's outputs on ``x``, over max(1, largest |output|):
    float32 rounding grows with the outputs' scale (random norm statistics make logits of 50 and more)."""
    with torch.no_grad():
        ref = model(x).numpy()
    out = session.run(None, {export.INPUT_NAME: x.numpy()})[0]
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max()))


def _val_images(model: nn.Module, n: int, img_size: int) -> torch.Tensor:
    """The first ``n`` imagenet-val-1300 images through the model's eval transform; skips without the data."""
    from pruning.data import eval_transform, image_dataset

    root = shared_data_dir() / "imagenet-val-1300"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"real images not found at {root} (set KP_SHARED_DATA to the shared/data folder)")
    dataset = image_dataset(str(root), eval_transform(model, img_size))
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def _half_by_l1(model: nn.Module, img_size: int) -> nn.Module:
    """``model`` with each prunable group cut to the half of its channels with the largest L1 norms."""
    from pruning.importance import create_importance

    graph = build_channel_graph(model, img_size)
    scores = create_importance("l1")(model, graph)
    keep = {g: sorted(s.argsort(descending=True)[: max(1, len(s) // 2)].tolist()) for g, s in scores.items()}
    return prune_model(model, graph, keep).eval()


def test_real_pruned_lite0_matches_torch_on_real_images(tmp_path):
    from pruning.lite_packages import load_pretrained_lite0

    parent = load_pretrained_lite0()
    images = _val_images(parent, N_IMAGES, REAL_SIZE)
    pruned = _half_by_l1(parent, REAL_SIZE)
    params = [sum(p.numel() for p in m.parameters()) for m in (parent, pruned)]
    assert params[1] < 0.6 * params[0]  # a really pruned model, not the parent

    path = export_onnx(pruned, str(tmp_path / "pruned.onnx"), REAL_SIZE)
    assert path == str(tmp_path / "pruned.onnx")
    assert _opset(path) >= MIN_OPSET
    assert os.listdir(tmp_path) == ["pruned.onnx"]  # one file: no external data, no temp file left behind
    session = ort_session(path, threads=2)
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 4, len(images)):
        assert _max_diff(pruned, session, images[:batch]) <= TOL, f"batch {batch}"
    with torch.no_grad():
        logits = pruned(images)
    assert logits.std(0).max() > 1e-3  # distinct images give distinct logits: the comparison is not vacuous


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_random_pruned_models_match_torch(model_cache, tmp_path, name):
    model = model_cache(name)
    graph = build_channel_graph(model, SMALL)
    pruned = prune_model(model, graph, random_keep(graph, seed=1)).eval()
    path = export_onnx(pruned, str(tmp_path / f"{name}.onnx"), SMALL)
    onnx.checker.check_model(path)
    session = ort_session(path)
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        assert _max_diff(pruned, session, torch.randn(batch, 3, SMALL, SMALL, generator=gen)) <= TOL


def test_export_leaves_the_model_untouched_and_exports_eval_mode(model_cache, tmp_path):
    model = copy.deepcopy(model_cache("resnet18")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    session = ort_session(export_onnx(model, str(tmp_path / "m.onnx"), (SMALL, SMALL + 32)))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics not updated
    model.eval()
    x = torch.randn(2, 3, SMALL, SMALL + 32)
    assert _max_diff(model, session, x) <= TOL  # eval-mode batch norm, at the non-square size asked for


def test_static_batch_export(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    session = ort_session(export_onnx(model, str(tmp_path / "s.onnx"), 16, dynamic_batch=False))
    assert session.get_inputs()[0].shape == [1, 3, 16, 16]


def test_dynamo_fallback_when_the_torchscript_exporter_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("legacy exporter unavailable")

    monkeypatch.setattr(export, "_export_torchscript", broken)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).eval()
    path = export_onnx(model, str(tmp_path / "d.onnx"), 32)
    assert _opset(path) >= export.DYNAMO_MIN_OPSET
    session = ort_session(path)
    for batch in (1, 4):
        assert _max_diff(model, session, torch.randn(batch, 3, 32, 32)) <= TOL


def test_both_exporters_failing_names_both(tmp_path):
    class Unexportable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.qr(x)[0]  # no ONNX operator for a QR decomposition

    with pytest.raises(RuntimeError, match=r"TorchScript: UnsupportedOperatorError.*linalg_qr.*dynamo: "):
        export_onnx(Unexportable(), str(tmp_path / "u.onnx"), 8)
    assert not (tmp_path / "u.onnx").exists()


def test_ort_runner_single_conv():
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    x = torch.randn(1, 16, 20, 20)
    run = ort_runner(conv, (x,), threads=1)
    out = run()
    assert len(out) == 1 and out[0].shape == (1, 24, 10, 10)
    with torch.no_grad():
        assert np.abs(out[0] - conv(x).numpy()).max() <= TOL
    assert np.array_equal(run()[0], out[0])  # fixed inputs: every call computes the same thing


def test_ort_runner_two_input_add_and_batch_norm():
    class Add(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    a, b = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    out = ort_runner(Add(), (a, b))()
    assert out[0].shape == (2, 8, 5, 5)
    assert np.allclose(out[0], (a + b).numpy(), atol=1e-6)

    bn = nn.BatchNorm2d(8).train()  # exported in eval mode, the module keeps its mode
    bn.running_mean.uniform_(-1, 1)
    out = ort_runner(bn, (a,))()
    assert bn.training
    assert np.abs(out[0] - bn.eval()(a).detach().numpy()).max() <= TOL


def test_bad_arguments_are_named(tmp_path):
    path = export_onnx(nn.Conv2d(3, 2, 1), str(tmp_path / "c.onnx"), 4)
    with pytest.raises(ValueError, match="threads"):
        ort_session(path, threads=0)
    with pytest.raises(ValueError, match="opset 13"):
        export_onnx(nn.Conv2d(3, 2, 1), str(tmp_path / "old.onnx"), 4, opset=13)
    with pytest.raises(ValueError, match="img_size"):
        export_onnx(nn.Conv2d(3, 2, 1), str(tmp_path / "bad.onnx"), (4, 4, 4))
    assert os.listdir(tmp_path) == ["c.onnx"]


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_missing_package_names_it_and_the_install_command(monkeypatch, tmp_path, package):
    monkeypatch.setitem(sys.modules, package, None)  # what an uninstalled package looks like to import
    with pytest.raises(ImportError, match=rf"'{package}'.*pip install {package}"):
        if package == "onnx":
            export_onnx(nn.Conv2d(3, 2, 1), str(tmp_path / "c.onnx"), 4)
        else:
            ort_session(b"")


def test_save_pruned_writes_a_loadable_onnx(model_cache, tmp_path):
    model = model_cache("resnet18")
    graph = build_channel_graph(model, SMALL)
    keep = random_keep(graph, seed=2)
    pruned = prune_model(model, graph, keep).train()  # as fine-tuning leaves it
    files, skipped = artifacts.save_pruned(pruned, str(tmp_path), "resnet18", SMALL, keep, "pruned")
    onnx_path = str(tmp_path / artifacts.ONNX)
    assert onnx_path in files and all(os.path.isfile(f) for f in files) and skipped is None
    assert pruned.training
    onnx.checker.check_model(onnx_path)
    assert _opset(onnx_path) >= MIN_OPSET
    reloaded, _ = artifacts.load_pruned(str(tmp_path / artifacts.CHECKPOINT), model)
    assert _max_diff(reloaded, ort_session(onnx_path), torch.randn(2, 3, SMALL, SMALL)) <= TOL


def test_save_pruned_with_removed_blocks_skips_only_the_timm_spec(model_cache, tmp_path):
    """timm's spec cannot express a removed block: the run says so, and the other formats are still written."""
    from pruning.blocks import removable_blocks

    model = model_cache("efficientnet_b0")
    graph = build_channel_graph(model, SMALL)
    block = removable_blocks(model, graph)[0]
    keep = {g: [] for g in block.inner}
    (tmp_path / artifacts.SPEC).write_text("stale")  # from an earlier run without removal
    pruned = prune_model(model, graph, keep)
    files, skipped = artifacts.save_pruned(pruned, str(tmp_path), "efficientnet_b0", SMALL, keep, "pruned")
    assert skipped is not None and block.module in skipped
    assert not (tmp_path / artifacts.SPEC).exists() and not (tmp_path / artifacts.STATE_DICT).exists()
    assert {os.path.basename(f) for f in files} == {artifacts.CHECKPOINT, artifacts.ONNX}
    reloaded, _ = artifacts.load_pruned(str(tmp_path / artifacts.CHECKPOINT), model)
    assert _max_diff(reloaded, ort_session(str(tmp_path / artifacts.ONNX)), torch.randn(2, 3, SMALL, SMALL)) <= TOL
