"""BN recalibration: exact running statistics of the given images, weights and modes untouched."""
from __future__ import annotations

import torch

from pruning import build_channel_graph, create_model, prune_model
from pruning.recalibrate import recalibrate_bn
from _utils import random_keep
from pruning.lite_packages import load_pretrained_lite0


def test_statistics_are_the_batch_statistics():
    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    x = torch.randn(12, 3, 32, 32) * 2 + 1
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recalibrate_bn(model, [(x[:5], None), (x[5:], None)], num_images=12, progress=False) == 12
    with torch.no_grad():
        mean = model.conv1(x).mean((0, 2, 3))  # bn1's input over all 12 images
    torch.testing.assert_close(model.bn1.running_mean, mean, rtol=1e-4, atol=1e-5)
    assert not model.training and model.bn1.momentum == 0.1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_recalibration_repairs_a_pruned_model():
    """The pruned model's BN statistics drift; recalibration brings them back to its own activations."""
    torch.manual_seed(0)
    model = load_pretrained_lite0()  # real weights: real statistics to drift from
    graph = build_channel_graph(model, 64)
    pruned = prune_model(model, graph, random_keep(graph, low=0.2, high=0.4)).eval()
    x = torch.randn(16, 3, 64, 64)
    bn = pruned.blocks[4][0].bn3

    def drift() -> float:
        inputs = {}
        handle = bn.register_forward_hook(lambda m, i, o: inputs.setdefault("x", i[0]))
        with torch.no_grad():
            pruned(x)
        handle.remove()
        return (bn.running_mean - inputs["x"].mean((0, 2, 3))).abs().max().item()

    before = drift()
    recalibrate_bn(pruned, [(x[:8], None), (x[8:], None)], num_images=16, progress=False)
    assert drift() < 0.1 * before
