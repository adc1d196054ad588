"""Importance criteria: the formulas, invariances, no side effects, persistence, and torch.distributed."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from pruning import build_channel_graph, create_model
from pruning.importance import IMPORTANCES, create_importance, load_scores, save_scores, scored_layers

SIZE = 32


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("efficientnet_b0")
    graph = build_channel_graph(model, SIZE)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, 1000, (8,), generator=gen)
    return model, graph, images, labels


def _score(name, model, graph, batches, **kw):
    if IMPORTANCES[name].needs_data:
        kw = {"num_images": 10**9, "progress": False, **kw}
    return create_importance(name, **kw)(model, graph, batches)


@pytest.mark.parametrize("name", sorted(IMPORTANCES))
def test_scores_cover_prunable_groups(setup, name):
    model, graph, x, y = setup
    scores = _score(name, model, graph, [(x, y)])
    assert list(scores) == [g.name for g in graph.prunable_groups()]
    assert all(len(scores[g.name]) == g.width and (scores[g.name] >= 0).all() for g in graph.prunable_groups())
    assert all(torch.isfinite(s).all() for s in scores.values())


@pytest.mark.parametrize("name", sorted(IMPORTANCES))
def test_model_is_unchanged(setup, name):
    model, graph, x, y = setup
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _score(name, model, graph, [(x, y)])
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BN statistics
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_taylor_weight_formula(setup):
    model, graph, x, y = setup
    scores = _score("taylor_weight", model, graph, [(x[:3], y[:3]), (x[3:], y[3:])])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # eval mode: mean CE over all 8 images
    group = "blocks.2.0.conv_pw"
    blk = model.blocks[2][0]
    expected = sum(
        (m.weight * m.weight.grad).abs().flatten(1).sum(1) for m in (blk.conv_pw, blk.conv_dw, blk.se.conv_expand)
    )
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(scores[group].float(), expected.detach(), rtol=1e-4, atol=1e-12)


def test_taylor_activation_formula(setup):
    model, graph, x, y = setup
    scores = _score("taylor_activation", model, graph, [(x[:5], y[:5]), (x[5:], y[5:])])
    group = "blocks.1.0.se.conv_reduce"  # produced by one layer only
    captured = {}
    h = model.blocks[1][0].se.conv_reduce.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    loss = F.cross_entropy(model(x), y, reduction="sum")  # per-image losses: dL/da of image i is its own
    h.remove()
    (g,) = torch.autograd.grad(loss, captured["a"])
    expected = (captured["a"] * g).flatten(2).mean(2).abs().mean(0)
    torch.testing.assert_close(scores[group].float(), expected.detach(), rtol=1e-4, atol=1e-12)


def test_taylor_activation_of_a_channels_last_linear_averages_over_space():
    """ConvNeXt's MLP runs on channels-last features: a Linear's channels are on the last dim, not dim 1."""
    torch.manual_seed(0)
    model = create_model("convnext_tiny").eval()
    graph = build_channel_graph(model, SIZE)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, SIZE, SIZE, generator=gen), torch.randint(0, 1000, (4,), generator=gen)
    scores = _score("taylor_activation", model, graph, [(x, y)])
    group, fc1 = "stages.1.blocks.0.mlp.fc1", model.stages[1].blocks[0].mlp.fc1
    captured = {}
    h = fc1.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    loss = F.cross_entropy(model(x), y, reduction="sum")
    h.remove()
    (g,) = torch.autograd.grad(loss, captured["a"])
    assert captured["a"].dim() == 4 and captured["a"].shape[-1] == fc1.out_features  # (N, H, W, C)
    expected = (captured["a"] * g).mean((1, 2)).abs().mean(0)
    torch.testing.assert_close(scores[group].float(), expected.detach(), rtol=1e-4, atol=1e-12)


def test_num_images_limits_the_data(setup):
    model, graph, x, y = setup
    limited = _score("taylor_weight", model, graph, [(x[:4], y[:4]), (x[4:], y[4:])], num_images=6)
    first6 = _score("taylor_weight", model, graph, [(x[:6], y[:6])])
    for g in first6:
        torch.testing.assert_close(limited[g], first6[g], rtol=1e-4, atol=1e-12)


def test_deterministic_and_data_dependent(setup):
    model, graph, x, y = setup
    a = _score("taylor_weight", model, graph, [(x, y)])
    b = _score("taylor_weight", model, graph, [(x, y)])
    c = _score("taylor_weight", model, graph, [(x.flip(0), y)])
    assert all(torch.equal(a[g], b[g]) for g in a)
    assert any(not torch.allclose(a[g], c[g]) for g in a)
    assert all(torch.equal(_score("random", model, graph, None, seed=3)[g], _score("random", model, graph, None, seed=3)[g]) for g in a)


def test_scored_layers_are_the_producers(setup):
    model, graph, _, _ = setup
    layers = {m for g, m, _ in scored_layers(graph, model) if g == "blocks.1.0.conv_pw"}
    assert layers == {"blocks.1.0.conv_pw", "blocks.1.0.conv_dw", "blocks.1.0.se.conv_expand"}


def test_data_criteria_need_data(setup):
    model, graph, _, _ = setup
    with pytest.raises(ValueError, match="needs images"):
        create_importance("taylor_weight", progress=False)(model, graph, None)
    with pytest.raises(ValueError, match="unknown importance criterion 'taylor'.*l1"):
        create_importance("taylor")


def test_save_and_load(setup, tmp_path):
    model, graph, x, y = setup
    scores = _score("l1", model, graph, None)
    path = tmp_path / "scores.pt"
    save_scores(path, scores, {"criterion": "l1", "img_size": SIZE})
    loaded = load_scores(path, graph, {"criterion": "l1"})
    assert all(torch.equal(scores[g], loaded[g]) for g in scores)
    with pytest.raises(ValueError, match="criterion='l1'"):
        load_scores(path, graph, {"criterion": "taylor_weight"})
    other = build_channel_graph(create_model("efficientnet_b1"), SIZE)
    with pytest.raises(ValueError, match="do not match"):
        load_scores(path, other)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("efficientnet_b0")
    graph = build_channel_graph(model, SIZE)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, SIZE, SIZE, generator=gen), torch.randint(0, 1000, (8,), generator=gen)
    shard = slice(rank * 4, rank * 4 + 4)  # each rank sees half of the images
    for name in ("taylor_weight", "taylor_activation"):
        scores = create_importance(name, num_images=8, progress=False)(model, graph, [(x[shard], y[shard])])
        torch.save(scores, os.path.join(out_dir, f"{name}-{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_scores_are_all_reduced(setup, tmp_path):
    model, graph, x, y = setup
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name in ("taylor_weight", "taylor_activation"):
        r0, r1 = (torch.load(tmp_path / f"{name}-{r}.pt") for r in (0, 1))
        single = _score(name, model, graph, [(x, y)])
        for g in single:
            assert torch.equal(r0[g], r1[g])  # identical on every rank
            torch.testing.assert_close(r0[g], single[g], rtol=1e-4, atol=1e-12)  # equals one process on all data
