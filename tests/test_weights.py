"""Tests for pruning.weights: the real EfficientNet-Lite0 weights mapped onto timm's tf_efficientnet_lite0."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T

from pruning.weights import MODEL_NAME, convert_lite0_state_dict, lite0_state_dict_path, load_pretrained_lite0

N_IMAGES = 64
BATCH = 32
MIN_TOP1 = 0.55  # chance is 0.1%; the full 1300-image set gives 75.15% with this transform


def _shared_data() -> Path:
    """Return the shared data dir: ``$KP_SHARED_DATA`` or the repo root's sibling ``shared/data``."""
    env = os.environ.get("KP_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _transform() -> T.Compose:
    """Bicubic squash to 224x224, then ImageNet mean/std normalisation."""
    return T.Compose([
        T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def _val_samples(n: int) -> list[tuple[Path, int]]:
    """Return the first ``n`` (image path, label) pairs of imagenet-val-1300, skipping if the data is absent."""
    root = _shared_data() / "imagenet-val-1300"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"ImageNet val subset not found at {root} (set KP_SHARED_DATA to the shared/data dir)")
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    return [(root / r["file"], int(r["label_index"])) for r in rows]


@pytest.fixture(scope="module")
def src() -> dict[str, torch.Tensor]:
    """The package's original (EfficientNet-PyTorch style) state dict."""
    return torch.load(lite0_state_dict_path(), map_location="cpu", weights_only=True)


def test_converted_state_dict_loads_strictly_and_is_a_bijection(src: dict[str, torch.Tensor]) -> None:
    out = convert_lite0_state_dict(src)
    model = timm.create_model(MODEL_NAME, pretrained=False)
    assert set(out) == set(model.state_dict())
    assert len(out) == len(src)
    # every source tensor is used exactly once (the conversion passes tensors through without copying)
    assert sorted(id(v) for v in out.values()) == sorted(id(v) for v in src.values())
    model.load_state_dict(out, strict=True)


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


def test_real_weights_classify_imagenet_val() -> None:
    samples = _val_samples(N_IMAGES)
    model, tf = load_pretrained_lite0(), _transform()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(samples), BATCH):
            chunk = samples[i:i + BATCH]
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in chunk])
            y = torch.tensor([label for _, label in chunk])
            correct += (model(x).argmax(1) == y).sum().item()
    top1 = correct / len(samples)
    assert top1 >= MIN_TOP1, f"top-1 {top1:.1%} on {len(samples)} val images; the key mapping is likely wrong"


def test_lite0_transform_uses_imagenet_statistics():
    """The package's weights expect ImageNet mean/std; timm's TF-port config (0.5/0.5) would cost accuracy."""
    from timm.data import IMAGENET_DEFAULT_MEAN

    from pruning.data import eval_transform

    normalize = eval_transform(load_pretrained_lite0(), 224).transforms[-1]
    assert tuple(normalize.mean.tolist()) == pytest.approx(IMAGENET_DEFAULT_MEAN)
