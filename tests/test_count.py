"""The counter: published MACs/params, agreement with torch's FlopCounterMode, and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import MODELS, SMALL
from pruning.count import count_model, main
from pruning.timm_spec import spec_from_model

PUBLISHED = [
    ("efficientnet_b1_pruned", 240, 391_208_019, 6_331_916),
    ("efficientnet_b2_pruned", 260, 715_749_145, 8_309_737),
    ("efficientnet_b3_pruned", 300, 1_020_257_090, 9_855_020),
    ("efficientnet_b0", 224, 385_814_752, 5_288_548),
    ("efficientnet_b1", 240, 686_802_832, 7_794_184),
    ("efficientnet_b3", 300, 1_827_141_392, 12_233_232),
]


@pytest.mark.parametrize("name,img_size,macs,params", PUBLISHED)
def test_reproduces_published_counts(model_cache, name, img_size, macs, params):
    count = count_model(model_cache(name), img_size)
    assert (count.macs, count.params) == (macs, params)


def _flop_counter_macs(model, img_size):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size))
    return fc.get_total_flops() / 2


@pytest.mark.parametrize("name", MODELS + ["efficientnet_b1_pruned"])
def test_agrees_with_torch_flop_counter(model_cache, name):
    model = model_cache(name)
    assert count_model(model, SMALL).macs == _flop_counter_macs(model, SMALL)


def test_count_does_not_change_the_model(model_cache):
    model = model_cache("efficientnet_b0").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_model(model, SMALL)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()


def test_cli_json(capsys):
    assert main(["efficientnet_b1_pruned", "--img-size", "240", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"model": "efficientnet_b1_pruned", "img_size": 240, "macs": 391_208_019, "params": 6_331_916}


def test_cli_default_size_and_spec(tmp_path, capsys, model_cache):
    spec = tmp_path / "spec.txt"
    spec.write_text(spec_from_model(model_cache("efficientnet_b1_pruned")))
    assert main(["efficientnet_b1", "--spec", str(spec), "--json"]) == 0  # b1's own size: 240
    out = json.loads(capsys.readouterr().out)
    assert (out["img_size"], out["macs"], out["params"]) == (240, 391_208_019, 6_331_916)
    assert main(["efficientnet_b1", "--spec", str(spec)]) == 0
    assert "391,208,019 MACs" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["efficientnet_b9"], "unknown timm model 'efficientnet_b9'"),
    (["efficientnet_b1", "--spec", "/nonexistent/spec.txt"], "/nonexistent/spec.txt"),
])
def test_cli_errors(capsys, args, needle):
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def test_cli_rejects_malformed_spec(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("conv_stem.weight:32,3***")
    assert main(["efficientnet_b1", "--spec", str(bad)]) == 2
    assert "malformed timm spec entry" in capsys.readouterr().err
