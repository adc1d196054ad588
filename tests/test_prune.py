"""Physical pruning: equivalence to masking, bit-identity when nothing is removed, and input checks."""
from __future__ import annotations

import pytest
import torch

from _utils import masked_reference, random_keep
from conftest import MODELS, SMALL
from pruning import prune_model


def _images(n=2, size=SMALL):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", MODELS)
def test_pruned_equals_masked_original(model_cache, graph_of, name):
    model, graph = model_cache(name), graph_of(name)
    keep = random_keep(graph, seed=2)
    pruned = prune_model(model, graph, keep).eval()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    x = _images()
    with torch.no_grad():
        expected = masked_reference(model, graph, keep).eval()(x)
        got = pruned(x)
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_removed_channels_matter(model_cache, graph_of):
    """Guards the equivalence test: without masking, the outputs differ."""
    model, graph = model_cache("efficientnet_b0"), graph_of("efficientnet_b0")
    pruned = prune_model(model, graph, random_keep(graph, seed=2)).eval()
    with torch.no_grad():
        expected = model(_images())
        assert (pruned(_images()) - expected).abs().max() > 1e-2 * expected.abs().max()


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100", "resnet50"])
def test_keeping_everything_is_bit_identical(model_cache, graph_of, name):
    model, graph = model_cache(name), graph_of(name)
    keep = {g.name: range(g.width) for g in graph.groups.values()}
    same = prune_model(model, graph, keep).eval()
    with torch.no_grad():
        assert torch.equal(same(_images()), model(_images()))
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in model.state_dict().items())


def test_pruning_keeps_selected_weights_and_bn_stats(model_cache, graph_of):
    model, graph = model_cache("efficientnet_b0"), graph_of("efficientnet_b0")
    keep = {"blocks.2.0.conv_pw": [0, 5, 17, 40]}
    pruned = prune_model(model, graph, keep)
    idx = torch.tensor(keep["blocks.2.0.conv_pw"])
    assert torch.equal(pruned.blocks[2][0].conv_pw.weight, model.blocks[2][0].conv_pw.weight[idx])
    assert torch.equal(pruned.blocks[2][0].bn1.running_var, model.blocks[2][0].bn1.running_var[idx])
    assert torch.equal(pruned.blocks[2][0].conv_dw.weight, model.blocks[2][0].conv_dw.weight[idx])
    assert pruned.blocks[2][0].conv_dw.groups == 4
    assert torch.equal(pruned.blocks[2][0].conv_pwl.weight, model.blocks[2][0].conv_pwl.weight[:, idx])


def test_original_model_is_untouched(model_cache, graph_of):
    model, graph = model_cache("resnet18"), graph_of("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, graph, random_keep(graph))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pruned_model_trains(model_cache, graph_of):
    model, graph = model_cache("mobilenetv3_large_100"), graph_of("mobilenetv3_large_100")
    pruned = prune_model(model, graph, random_keep(graph)).train()
    loss = pruned(_images(4)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)
    model.eval()


def test_resnet_classifier_width_follows_last_stage(model_cache, graph_of):
    model, graph = model_cache("resnet18"), graph_of("resnet18")
    pruned = prune_model(model, graph, {"layer4.0.conv2": range(200)})
    assert pruned.fc.in_features == pruned.num_features == 200


@pytest.mark.parametrize("keep,error,needle", [
    ({"conv_stem": range(16)}, ValueError, "cannot be pruned: protected"),
    ({"blocks.1.0.conv_pw": []}, ValueError, "kept indices"),
    ({"blocks.1.0.conv_pw": [0, 0, 1]}, ValueError, "distinct"),
    ({"blocks.1.0.conv_pw": [0, 96]}, ValueError, r"\[0, 96\)"),
    ({"blocks.1.9.conv_pw": [0]}, KeyError, "unknown channel group"),
])
def test_bad_keep_is_rejected(model_cache, graph_of, keep, error, needle):
    with pytest.raises(error, match=needle):
        prune_model(model_cache("efficientnet_b0"), graph_of("efficientnet_b0"), keep)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_equivalence_sees_norm_and_bias_slicing_errors(model_cache, graph_of, name):
    """Guards the equivalence test: a norm or bias sliced with the wrong indices changes the output, because the
    cached models' norms and biases are random (a fresh timm model's are not)."""
    model, graph = model_cache(name), graph_of(name)
    keep = random_keep(graph, seed=2)
    x = _images()
    with torch.no_grad():
        expected = masked_reference(model, graph, keep).eval()(x)
        for tensor in ("running_var", "running_mean", "bias"):
            pruned = prune_model(model, graph, keep).eval()
            norm = next(m for m in pruned.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.num_features > 1)
            values = getattr(norm, tensor)
            values.copy_(values.roll(1))  # the slice of the neighbouring channels
            assert (pruned(x) - expected).abs().max() > 1e-4 * expected.abs().max(), tensor
