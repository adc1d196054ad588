"""Block removal: which residual blocks can go, and the pruned model equals the masked one when they do.

Every equivalence check runs on a copy of the model whose batch norms (statistics and affine) and conv/linear
biases are randomised: timm's random init has BN gamma=1, beta=0, mean=0, var=1 and zero-init last BNs in
ResNets, under which a wrong slice or a wrong (or missing) folded bias would go unnoticed.
"""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from _utils import random_keep
from conftest import SMALL
from pruning import build_channel_graph, count_model, prune_model
from pruning.artifacts import load_pruned
from pruning.blocks import RemovedBlock, RemovedBlockBias, ResidualBlock, removable_blocks, removed_blocks
from pruning.timm_spec import SpecUnsupportedError, save_timm_format, spec_from_model

MODELS = ["efficientnet_b0", "mobilenetv3_large_100", "resnet18", "resnet50"]

# Read off the models: EfficientNet-B0 has 16 blocks (stage repeats 1,2,2,3,3,4,1), 15 of them inverted
# residuals; those with a skip are all but the first of each stage, and stage 0 (a depthwise-separable block)
# is protected. MobileNetV3-Large: 16 blocks, 14 inverted residuals, stage repeats 1,2,3,4,2,3,1. ResNet:
# identity skips everywhere but each stage's first block; layer1 is protected.
EXPECTED = {
    "efficientnet_b0": ["blocks.1.1", "blocks.2.1", "blocks.3.1", "blocks.3.2", "blocks.4.1", "blocks.4.2",
                        "blocks.5.1", "blocks.5.2", "blocks.5.3"],
    "mobilenetv3_large_100": ["blocks.1.1", "blocks.2.1", "blocks.2.2", "blocks.3.1", "blocks.3.2", "blocks.3.3",
                              "blocks.4.1", "blocks.5.1", "blocks.5.2"],
    "resnet18": ["layer2.1", "layer3.1", "layer4.1"],
    "resnet50": ["layer2.1", "layer2.2", "layer2.3", "layer3.1", "layer3.2", "layer3.3", "layer3.4", "layer3.5",
                 "layer4.1", "layer4.2"],
}

# one block; a chain of consecutive blocks ending a stage; blocks in several stages; every removable block
SCENARIOS = {
    "efficientnet_b0": {
        "one": ["blocks.2.1"], "chain": ["blocks.5.1", "blocks.5.2", "blocks.5.3"],
        "stages": ["blocks.1.1", "blocks.3.2", "blocks.4.1", "blocks.4.2"],
    },
    "mobilenetv3_large_100": {
        "one": ["blocks.4.1"], "chain": ["blocks.3.1", "blocks.3.2", "blocks.3.3"],
        "stages": ["blocks.1.1", "blocks.2.2", "blocks.5.2"],
    },
    "resnet18": {"one": ["layer3.1"], "stages": ["layer2.1", "layer4.1"]},
    "resnet50": {
        "one": ["layer2.2"], "chain": ["layer3.3", "layer3.4", "layer3.5"],
        "stages": ["layer2.1", "layer3.2", "layer4.2"],
    },
}
CASES = [(m, s) for m in MODELS for s in [*SCENARIOS[m], "all"]]


# ------------------------------------------------------------------------------------------- helpers


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with random BN statistics and affine parameters and random conv/linear biases."""
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.5 * torch.randn(n, generator=gen))
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
    return model


def _zero_removed(mask: torch.Tensor, module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x * mask.to(x).view(1, -1, *([1] * (x.dim() - 2))), *args[1:])


def masked_model(model: nn.Module, graph, keep: dict[str, list[int]]) -> nn.Module:
    """A copy of ``model`` whose channel-mixing layers see removed channels as zeros (forward pre-hooks).

    Uses only the graph's consumers, nothing of the pruning code: a block whose inner groups keep nothing
    gets its last conv's whole input zeroed, exactly as removal assumes.
    """
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for name, idx in keep.items():
        mask = torch.zeros(graph.groups[name].width)
        mask[list(idx)] = 1.0
        for member in graph.groups[name].members:
            if member.role == "in":
                modules[member.module].register_forward_pre_hook(partial(_zero_removed, mask))
    return ref


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(0))


def removal_keep(graph, blocks: list[ResidualBlock], names: list[str], seed: int | None = 2) -> dict:
    """Random widths for every prunable group (none when ``seed`` is None), width 0 for the named blocks."""
    keep = random_keep(graph, seed=seed) if seed is not None else {}
    by_name = {b.module: b for b in blocks}
    for name in names:
        keep.update({g: [] for g in by_name[name].inner})
    return keep


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    err = (got - expected).abs().max().item()
    assert err <= 1e-5 * max(1.0, expected.abs().max().item()), f"max abs error {err}"


@pytest.fixture(scope="module")
def setup(model_cache):
    """name -> (randomised model, its graph, its removable blocks), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            model = randomise(model_cache(name))
            graph = build_channel_graph(model, SMALL)
            cache[name] = model, graph, removable_blocks(model, graph)
        return cache[name]

    return get


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ finding blocks


@pytest.mark.parametrize("name", MODELS)
def test_removable_blocks_found(setup, name):
    model, graph, blocks = setup(name)
    print(name, len(blocks), [b.module for b in blocks])
    assert [b.module for b in blocks] == EXPECTED[name]
    for block in blocks:
        assert block.inner and all(graph.groups[g].prunable for g in block.inner)
        assert all(m.module.startswith(block.module + ".") for g in block.inner for m in graph.groups[g].members)
        assert not any(m.module.startswith(p) for p in graph.protected_patterns
                       for g in block.inner for m in graph.groups[g].members)
        assert block.stream in graph.groups and block.stream not in block.inner


@pytest.mark.parametrize("name,block,expected", [
    ("efficientnet_b0", "blocks.2.1",
     ResidualBlock("blocks.2.1", ("blocks.2.1.conv_pw", "blocks.2.1.se.conv_reduce"), "blocks.2.0.conv_pwl")),
    ("mobilenetv3_large_100", "blocks.1.1",
     ResidualBlock("blocks.1.1", ("blocks.1.1.conv_pw",), "blocks.1.0.conv_pwl")),
    ("resnet18", "layer3.1", ResidualBlock("layer3.1", ("layer3.1.conv1",), "layer3.0.conv2")),
    ("resnet50", "layer4.2", ResidualBlock("layer4.2", ("layer4.2.conv1", "layer4.2.conv2"), "layer4.0.conv3")),
])
def test_block_inner_groups_and_stream(setup, name, block, expected):
    assert {b.module: b for b in setup(name)[2]}[block] == expected


def test_protected_blocks_are_not_removable(model_cache):
    model = model_cache("resnet18")
    unprotected = removable_blocks(model, build_channel_graph(model, SMALL, protected=()))
    assert [b.module for b in unprotected] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    graph = build_channel_graph(model, SMALL, protected=("conv1", "layer1", "layer3"))
    assert [b.module for b in removable_blocks(model, graph)] == ["layer2.1", "layer4.1"]
    with pytest.raises(ValueError, match="width 0 is allowed only"):
        prune_model(model, graph, {"layer3.1.conv1": []})


# --------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name,scenario", CASES)
def test_removed_blocks_equal_masked_model(setup, name, scenario):
    model, graph, blocks = setup(name)
    names = [b.module for b in blocks] if scenario == "all" else SCENARIOS[name][scenario]
    keep = removal_keep(graph, blocks, names)
    pruned = prune_model(model, graph, keep).eval()
    with torch.no_grad():
        expected = masked_model(model, graph, keep).eval()(images())
        got = pruned(images())
    assert_close(got, expected)
    assert removed_blocks(pruned) == names
    assert _params(pruned) < _params(prune_model(model, graph, removal_keep(graph, blocks, [])))


@pytest.mark.parametrize("name", MODELS)
def test_removed_block_matters(setup, name):
    """Guards the equivalence test: the removed branches change the output, so a no-op would fail it."""
    model, graph, blocks = setup(name)
    keep = removal_keep(graph, blocks, SCENARIOS[name]["stages"], seed=None)
    with torch.no_grad():
        expected = masked_model(model, graph, keep).eval()(images())
        assert (model(images()) - expected).abs().max() > 1e-2 * expected.abs().max()


@pytest.mark.parametrize("name,chain,producer", [
    ("efficientnet_b0", ["blocks.5.1", "blocks.5.2", "blocks.5.3"], "blocks.5.0.bn3"),
    ("mobilenetv3_large_100", ["blocks.2.1", "blocks.2.2"], "blocks.2.0.bn3"),
])
def test_chain_folds_into_previous_bn(setup, name, chain, producer):
    """A chain of removed inverted residuals leaves identities; the first kept producer's BN absorbs every
    branch constant ``beta - gamma * mean / sqrt(var + eps)`` (computed here from the formula)."""
    model, graph, blocks = setup(name)
    pruned = prune_model(model, graph, removal_keep(graph, blocks, chain, seed=None))
    for block in chain:
        replacement = pruned.get_submodule(block)
        assert type(replacement) is RemovedBlock and isinstance(replacement, nn.Identity)
    shift = sum(
        bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
        for bn in (model.get_submodule(f"{b}.bn3") for b in chain)
    )
    expected = model.get_submodule(producer).bias + shift
    assert shift.abs().max() > 0.1  # the fold is not a no-op
    assert torch.allclose(pruned.get_submodule(producer).bias, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_block_becomes_bias_and_relu(setup, name):
    model, graph, blocks = setup(name)
    block = SCENARIOS[name]["one"][0]
    pruned = prune_model(model, graph, removal_keep(graph, blocks, [block], seed=None))
    replacement = pruned.get_submodule(block)
    assert isinstance(replacement, RemovedBlockBias) and isinstance(replacement.post_add, nn.ReLU)
    last_bn = model.get_submodule(block).bn2 if name == "resnet18" else model.get_submodule(block).bn3
    expected = last_bn.bias - last_bn.weight * last_bn.running_mean / torch.sqrt(last_bn.running_var + last_bn.eps)
    assert torch.allclose(replacement.bias, expected, atol=1e-6)
    state = pruned.state_dict()
    assert f"{block}.bias" in state and not any(k.startswith(f"{block}.conv") for k in state)


# --------------------------------------------------------------------------- the pruned model downstream


@pytest.mark.parametrize("name", MODELS)
def test_pruned_model_works_downstream(setup, name):
    """timm's forward_features/forward_head, graph discovery and pruning again, training."""
    model, graph, blocks = setup(name)
    names = SCENARIOS[name]["stages"]
    pruned = prune_model(model, graph, removal_keep(graph, blocks, names)).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(pruned.forward_head(pruned.forward_features(x)), pruned(x))

    regraph = build_channel_graph(pruned, SMALL)
    assert [b.module for b in removable_blocks(pruned, regraph)] == [n for n in EXPECTED[name] if n not in names]
    assert not any(m.module.startswith(f"{n}.") for n in names for g in regraph.groups.values() for m in g.members)
    assert count_model(pruned, SMALL).params == _params(pruned)
    again_keep = random_keep(regraph, seed=5)  # slices the stream, and with it any RemovedBlockBias
    again = prune_model(pruned, regraph, again_keep).eval()
    with torch.no_grad():
        assert_close(again(x), masked_model(pruned, regraph, again_keep).eval()(x))

    again.train()
    again(images(4)).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in again.parameters() if p.requires_grad)


def test_bias_module_is_a_stream_member_after_regraph(setup):
    model, graph, blocks = setup("resnet50")
    pruned = prune_model(model, graph, removal_keep(graph, blocks, ["layer3.2"], seed=None))
    regraph = build_channel_graph(pruned, SMALL)
    stream = {b.module: b for b in blocks}["layer3.2"].stream
    assert ("layer3.2", "channel") in {(m.module, m.role) for m in regraph.groups[stream].members}


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(setup, model_cache, tmp_path, name):
    """What load_pruned does: prune a fresh parent with the same keep, then load the state_dict strictly."""
    model, graph, blocks = setup(name)
    keep = removal_keep(graph, blocks, SCENARIOS[name]["stages"])
    pruned = prune_model(model, graph, keep).eval()
    torch.save(pruned.state_dict(), tmp_path / "sd.pth")

    parent = model_cache(name)  # not randomised: every value must come from the state_dict
    fresh = prune_model(parent, build_channel_graph(parent, SMALL), keep).eval()
    fresh.load_state_dict(torch.load(tmp_path / "sd.pth", weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(images()), pruned(images()))


def test_load_pruned_round_trip(setup, model_cache, tmp_path):
    """pruning.artifacts.load_pruned rebuilds a model with removed blocks (folded and bias modules alike)."""
    for name in ("resnet18", "efficientnet_b0"):
        model, graph, blocks = setup(name)
        keep = removal_keep(graph, blocks, SCENARIOS[name]["stages"])
        pruned = prune_model(model, graph, keep).eval()
        path = tmp_path / f"{name}.pth"
        torch.save({"base_model": name, "img_size": SMALL, "keep": keep, "stage": "prune",
                    "state_dict": pruned.state_dict()}, path)
        loaded, meta = load_pruned(str(path), parent=model_cache(name))
        with torch.no_grad():
            assert torch.equal(loaded(images()), pruned(images()))
        assert meta["keep"] == keep


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name,keep,needle", [
    ("efficientnet_b0", {"blocks.2.1.conv_pw": []}, r"block 'blocks.2.1'.*blocks.2.1.se.conv_reduce"),
    ("efficientnet_b0", {"blocks.2.1.conv_pw": [], "blocks.2.1.se.conv_reduce": [0, 1]}, "block 'blocks.2.1'"),
    ("resnet50", {"layer2.1.conv1": [0, 3], "layer2.1.conv2": []}, r"block 'layer2.1'.*layer2.1.conv1"),
])
def test_partial_removal_is_rejected(setup, name, keep, needle):
    model, graph, _ = setup(name)
    with pytest.raises(ValueError, match=needle):
        prune_model(model, graph, keep)


@pytest.mark.parametrize("keep", [
    {"blocks.2.0.conv_pw": [], "blocks.2.0.se.conv_reduce": []},  # no skip: the branch is the only path
    {"blocks.2.0.conv_pwl": []},  # the residual stream itself
])
def test_width_zero_elsewhere_is_rejected(setup, keep):
    model, graph, _ = setup("efficientnet_b0")
    with pytest.raises(ValueError, match="kept indices"):
        prune_model(model, graph, keep)


def test_timm_spec_refuses_removed_blocks(setup, tmp_path):
    model, graph, blocks = setup("efficientnet_b0")
    pruned = prune_model(model, graph, removal_keep(graph, blocks, ["blocks.2.1", "blocks.4.2"]))
    with pytest.raises(SpecUnsupportedError, match=r"blocks\.2\.1, blocks\.4\.2.*pruned_checkpoint\.pth.*load_pruned"):
        save_timm_format(pruned, tmp_path / "pruned_spec.txt", tmp_path / "pruned.pth")
    assert not list(tmp_path.iterdir())  # nothing half-written
    assert issubclass(SpecUnsupportedError, ValueError)
    with pytest.raises(SpecUnsupportedError):
        spec_from_model(pruned)
    spec_from_model(prune_model(model, graph, random_keep(graph)))  # ordinary pruning still exports


@pytest.mark.parametrize("name", MODELS)
def test_cost_model_stays_exact_with_removed_blocks(name, model_cache):
    """MACs and params predicted from widths (0 for removed blocks) equal the counts of the built model."""
    from pruning import CostModel

    model = model_cache(name)
    graph = build_channel_graph(model, SMALL)
    cost = CostModel(graph, model)
    blocks = removable_blocks(model, graph)
    keep = random_keep(graph, seed=3)
    keep.update({g: [] for b in blocks[::2] for g in b.inner})
    widths = {g: len(k) for g, k in keep.items()}
    count = count_model(prune_model(model, graph, keep), SMALL)
    assert (cost.macs(widths), cost.params(widths)) == (count.macs, count.params)
