"""Matched points, projections, the three losses, and the faster frozen teacher."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_distill_helpers import IMG, tiny_pair
from distill import create_loss, matched_points
from distill.loss import DistillStudent, build_projections, fit_projection, matched_feature_shapes, point_key
from distill.losses.inner import _FeatureMSE
from distill.teacher import conv_norm_pairs, fold_batchnorm, prepare_teacher

EFFNET = ["bn1"] + [f"blocks.{i}" for i in range(7)] + ["bn2", "global_pool", "classifier"]
EXPECTED = {
    "efficientnet_b0": (EFFNET, "blocks.6"),
    "mobilenetv3_large_100": (["bn1"] + [f"blocks.{i}" for i in range(7)] + ["global_pool", "flatten", "classifier"], "blocks.6"),
    "resnet18": (["maxpool", "layer1", "layer2", "layer3", "layer4", "global_pool", "fc"], "layer4"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_points_follow_the_structure(name, model_cache):
    """Stem, every stage, head, pooled features, logits; 'last' is the last stage alone."""
    model = model_cache(name)
    expected, last = EXPECTED[name]
    assert matched_points(model, "all") == expected
    assert matched_points(model, "last") == [last]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_authors_points_are_every_child_and_stage(name, model_cache):
    """The authors' list: every top-level child in order, stage containers as their stages; every point runs
    and none is overwritten in place (ResNet's bn1 is, by act1: act1 stands for it)."""
    model = model_cache(name)
    points = matched_points(model, "authors")
    container = EXPECTED[name][1].rpartition(".")[0]  # "blocks" (EfficientNet, MobileNetV3); ResNet has none
    flat = [n for c, child in model.named_children()
            for n in ([f"{c}.{i}" for i in range(len(child))] if c == container else [c])]
    assert points == [n for n in flat if n in points]  # in execution order
    assert all(n in points for n in flat if n.startswith(f"{container}.") or n.startswith("layer"))  # every stage
    assert len(points) >= len(flat) - 2  # at most the outputs overwritten in place are left out
    from distill.loss import forward_no_grad

    x = torch.randn(2, 3, 64, 64)
    _, feats = forward_no_grad(model.eval(), x, points)  # pop() checks in-place changes
    assert len(feats) == len(points)
    # the fast teacher keeps every matched conv unfolded: same features at every point, conv_stem included
    fast = prepare_teacher(_randomised_bn(model), torch.device("cpu"), points=tuple(points))
    _, ref = forward_no_grad(_randomised_bn(model).eval(), x, points)
    _, got = forward_no_grad(fast, x.contiguous(memory_format=torch.channels_last), points)
    for name, a, b in zip(points, ref, got):
        assert (a - b).abs().max() <= 1e-4 * (1 + a.abs().max()), name  # float rounding of the fold only


def _randomised_bn(model: nn.Module) -> nn.Module:
    """A copy whose batch norms are not the identity (random-init statistics would hide a wrong fold)."""
    import copy

    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("name", list(EXPECTED))
def test_projections_only_where_the_student_is_narrower(name):
    teacher, student = tiny_pair(name)
    points = matched_points(student)
    s, t = matched_feature_shapes(student, teacher, points, IMG, torch.device("cpu"))
    proj = build_projections(points, s, t)
    narrower = {point_key(p) for p, a, b in zip(points, s, t) if a.shape[1] != b.shape[1]}
    assert narrower and set(proj) == narrower  # pruning narrowed some points, and only those get projections
    assert point_key(points[-1]) not in proj  # logits keep their 1000 classes
    for p, a, b in zip(points, s, t):
        if point_key(p) in proj:
            m = proj[point_key(p)]
            assert isinstance(m, nn.Conv2d if a.dim() == 4 else nn.Linear) and m.bias is None
            assert m(a).shape == b.shape


def test_inner_loss_is_ce_plus_gamma_over_m_times_the_mses():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    s = [torch.randn(4, 8, 5, 5), torch.randn(4, 6), torch.randn(4, 10)]
    t = [torch.randn(4, 8, 5, 5), torch.randn(4, 6), torch.randn(4, 10)]
    loss = create_loss("inner", gamma=7.0, label_smoothing=0.1)
    total, terms = loss(logits, labels, s, t)
    mses = [F.mse_loss(a, b) for a, b in zip(s, t)]
    assert torch.allclose(terms["inner"], 7.0 / 3 * sum(mses))
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert torch.allclose(total, terms["ce"] + terms["inner"]) and set(terms) == {"ce", "inner"}
    one, _ = loss(logits, labels, s[:1], t[:1])
    assert torch.allclose(one, terms["ce"] + 7.0 * mses[0])  # M = 1: gamma times the one MSE


def test_last_point_gives_one_feature():
    teacher, student = tiny_pair("resnet18")
    points = matched_points(student, "last")
    module = DistillStudent(student, points).eval()
    logits, feats = module(torch.randn(2, 3, IMG, IMG))
    assert len(feats) == 1 and feats[0].shape[:2] == (2, student.layer4[-1].conv2.out_channels)
    assert not student._forward_hooks and not student.layer4._forward_hooks  # hooks live for one call only


def test_kd_loss_is_temperature_scaled_kl():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    loss = create_loss("kd", temperature=3.0, kd_weight=0.5, label_smoothing=0.0)
    total, terms = loss(s, y, teacher_logits=t)
    p_t = F.softmax(t / 3, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 3, 1))).sum(1).mean()
    assert torch.allclose(terms["kd"], 0.5 * 9 * kl, atol=1e-6)
    assert torch.allclose(total, F.cross_entropy(s, y) + terms["kd"])
    _, same = loss(s, y, teacher_logits=s.clone())
    assert same["kd"].abs() < 1e-6


def test_ce_weight_and_unlabelled_images():
    """Labels -1 drop out of CE; ce_weight scales it; 0 leaves the teacher only, with CE still logged."""
    torch.manual_seed(0)
    logits, t_logits = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    labels = torch.tensor([1, -1, 3, -1])
    loss = create_loss("kd", label_smoothing=0.0, ce_weight=0.5)
    total, terms = loss(logits, labels, teacher_logits=t_logits)
    assert torch.allclose(terms["ce"], F.cross_entropy(logits[[0, 2]], labels[[0, 2]]))
    assert torch.allclose(total, 0.5 * terms["ce"] + terms["kd"])
    zero, terms0 = create_loss("kd", ce_weight=0.0)(logits, labels, teacher_logits=t_logits)
    assert torch.allclose(zero, terms0["kd"]) and terms0["ce"] > 0
    unlabelled = torch.full((4,), -1)
    _, none = create_loss("kd", ce_weight=1.0)(logits, unlabelled, teacher_logits=t_logits)
    assert none["ce"].item() == 0.0 and none["ce"].requires_grad  # no NaN from an all-unlabelled batch


def test_default_ce_weight_is_one_only_for_an_imagenet_scale_pool():
    from distill.loss import default_ce_weight

    assert default_ce_weight(list(range(1000)) * 100) == 1.0
    assert default_ce_weight(list(range(1000)) * 99 + [-1] * 10_000) == 0.0  # every class, too few images each
    assert default_ce_weight(list(range(999)) * 200) == 0.0  # a class missing
    assert default_ce_weight([-1] * 50) == 0.0


def test_ce_needs_no_teacher():
    s, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    total, terms = create_loss("ce", label_smoothing=0.0)(s, y)
    assert set(terms) == {"ce"} and torch.allclose(total, F.cross_entropy(s, y))


@pytest.mark.parametrize("name,fields,needle", [
    ("dark", {}, "'dark'.*ce.*inner.*kd"),
    ("inner", {"points": "some"}, "'some'.*all.*authors.*last"),
    ("inner", {"proj_init": "zeros"}, "'zeros'.*lstsq"),
    ("kd", {"ce_weight": -1.0}, "ce_weight=-1.0 must be >= 0"),
    ("kd", {"temperature": 0.0}, "temperature > 0"),
    ("ce", {"label_smoothing": 1.0}, "label_smoothing < 1"),
    ("ce", {"gamma": 1.0}, "loss 'ce' cannot take.*'gamma'.*label_smoothing"),  # a field another loss reads
])
def test_bad_distill_config(name, fields, needle):
    with pytest.raises(ValueError, match=needle):
        create_loss(name, **fields)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_feature_mse_matches_torch_and_keeps_the_layout(fmt):
    s = torch.randn(2, 8, 6, 6).contiguous(memory_format=fmt).requires_grad_()
    t = torch.randn(2, 8, 6, 6).contiguous(memory_format=fmt)
    loss = _FeatureMSE.apply(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    (ref,) = torch.autograd.grad(F.mse_loss(s, t), s)
    assert torch.allclose(loss, F.mse_loss(s, t)) and torch.allclose(grad, ref)
    assert grad.is_contiguous(memory_format=fmt)


def test_least_squares_projection_recovers_a_linear_map():
    torch.manual_seed(0)
    proj, true = nn.Conv2d(4, 6, 1, bias=False), torch.randn(6, 4)
    s = torch.randn(3, 4, 5, 5)
    t = torch.einsum("oc,nchw->nohw", true, s)
    fit_projection(proj, s, t, ridge=1e-9)
    assert torch.allclose(proj.weight.view(6, 4), true, atol=1e-4)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_folded_teacher_matches_the_original(name):
    teacher, _ = tiny_pair(name)
    torch.manual_seed(1)
    for m in teacher.modules():  # non-trivial statistics, or folding would be an identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    folded = fold_batchnorm(teacher.eval())
    assert len(conv_norm_pairs(teacher)) > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert set(matched_points(teacher)) <= set(dict(folded.named_modules()))  # the points survive folding
    fast = prepare_teacher(teacher, torch.device("cpu"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = teacher(x)
        assert torch.allclose(folded(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the original is untouched
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's model stays trainable: a parent
    assert not any(p.requires_grad for p in fast.parameters())  # may be pruned again after teaching


def test_prepare_teacher_leaves_the_callers_model_alone_without_folding():
    teacher, _ = tiny_pair(next(iter(EXPECTED)))
    teacher.train()
    fast = prepare_teacher(teacher, torch.device("cpu"), fold_bn=False, channels_last=False)
    assert fast is not teacher and not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_folding_keeps_real_lite0_predictions():
    """Real weights, real images: the faster teacher predicts what the original predicts."""
    from conftest import shared_data_dir
    from pruning.data import eval_transform, image_dataset, subset
    from pruning.lite_packages import load_pretrained_lite0

    root = shared_data_dir() / "imagenet-val-1300"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    teacher = load_pretrained_lite0()
    data = subset(image_dataset(str(root), eval_transform(teacher, 160)), 16)
    x = torch.stack([data[i][0] for i in range(len(data))])
    fast = prepare_teacher(teacher, torch.device("cpu"))
    with torch.no_grad():
        ref, out = teacher(x), fast(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-3 * ref.abs().max().item())
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_feature_mse_gradient_follows_the_student_not_the_teacher():
    s = torch.randn(2, 8, 6, 6).requires_grad_()
    t = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(_FeatureMSE.apply(s, t), s)
    assert grad.is_contiguous() and torch.allclose(grad, 2 * (s - t).detach() / s.numel())


def test_capture_refuses_a_feature_changed_in_place():
    from distill.points import FeatureCapture

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    with FeatureCapture(model, ["0"]) as capture:
        model(torch.randn(2, 4))
        with pytest.raises(RuntimeError, match="modified in place"):
            capture.pop()
