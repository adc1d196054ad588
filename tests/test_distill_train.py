"""Fine-tuning: real optimisation, a frozen teacher, checkpoints, the NaN guard, validation and its cache."""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from test_distill_helpers import IMG, LABELS, state_equal, tiny_pair, write_images
from distill import NonFiniteLossError, TrainConfig, create_loss, evaluate, finetune, validate_pair
from distill.checkpoint import LAST, load_checkpoint, save_checkpoint
from distill.evaluate import TEACHER_CACHE, evaluate_folder
from distill.train import Trainer
from pruning.data import eval_transform, image_dataset

FAST = dict(batch_size=4, img_size=IMG, workers=0, lr=0.01, log_every=1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp("images")))


@pytest.fixture()
def pair():
    return tiny_pair("resnet18")


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_steps_on_a_fixed_batch_lower_the_loss(pair, data_root, tmp_path):
    teacher, student = pair
    trainer = Trainer(student, teacher, image_dataset(data_root), create_loss("inner"), TrainConfig(**{**FAST, "lr": 0.05}), str(tmp_path))
    images, labels = next(iter(trainer._loader()))
    losses = [trainer.train_step(images, labels)["loss"].item() for _ in range(6)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(trainer.train_step(images, labels)) == {"loss", "ce", "inner"}
    assert trainer.step == 7 and len(trainer.module.projections) > 0
    # the projections are trained with the student
    assert any(p is q for q in trainer.module.projections.parameters() for g in trainer.optimizer.param_groups for p in g["params"])


def test_teacher_is_left_unchanged(pair, data_root, tmp_path):
    """The teacher runs as a frozen copy: the caller's parent keeps its weights, mode and requires_grad flags."""
    teacher, student = pair
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    mode, flags = teacher.training, [p.requires_grad for p in teacher.parameters()]
    result = finetune(student, teacher, image_dataset(data_root), create_loss("inner"), TrainConfig(**FAST, max_steps=4), str(tmp_path), progress=False)
    assert result.steps == 4
    assert teacher.training == mode and [p.requires_grad for p in teacher.parameters()] == flags
    assert all(p.grad is None for p in teacher.parameters())
    assert state_equal(before, teacher.state_dict())
    assert not any(h for m in student.modules() for h in (m._forward_hooks,))  # no hook left behind


@pytest.mark.parametrize("autotune", [True, False])
def test_cudnn_autotuning_follows_the_config_during_the_run_only(pair, data_root, tmp_path, monkeypatch, autotune):
    teacher, student = pair
    trainer = Trainer(student, teacher, image_dataset(data_root), create_loss("inner"),
                      TrainConfig(**FAST, max_steps=1, cudnn_benchmark=autotune), str(tmp_path), progress=False)
    seen, step = [], trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a: (seen.append(torch.backends.cudnn.benchmark), step(*a))[1])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not autotune)
    trainer.run()
    assert seen == [autotune] and torch.backends.cudnn.benchmark is (not autotune)


def test_checkpoint_contents_and_finished_run(pair, data_root, tmp_path):
    teacher, student = pair
    cfg = TrainConfig(**FAST, epochs=2, checkpoint_every_steps=4, ema_decay=0.9)  # 24 images / 4: 6 steps per epoch
    result = finetune(student, teacher, image_dataset(data_root), create_loss("inner"), cfg, str(tmp_path), progress=False)
    ckpt = load_checkpoint(str(tmp_path / LAST))
    assert {"student", "projections", "optimizer", "scheduler", "ema", "epoch", "batch", "step", "rng", "history", "config"} <= set(ckpt)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (2, 0, 12) and result.steps == 12
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"][0]) and len(ckpt["rng"]) == 1
    assert state_equal(ckpt["student"], result.student.state_dict()) and state_equal(ckpt["ema"], result.ema.state_dict())
    assert ckpt["optimizer"]["state"] and ckpt["scheduler"]["t_initial"] == 12 and ckpt["scheduler"]["base_values"] == [0.01] * 2
    assert [h["step"] for h in result.history if "train/loss" in h] == list(range(1, 13))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    # a finished run resumes to nothing
    again = finetune(student, teacher, image_dataset(data_root), create_loss("inner"), cfg, str(tmp_path), progress=False)
    assert again.resumed_from == 12 and again.steps == 12


def test_checkpoint_write_is_atomic(tmp_path):
    path = str(tmp_path / LAST)
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    digest = _sha(path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # which one depends on where the lambda lives
        save_checkpoint(path, {"step": 2, "bad": lambda: None})  # cannot be pickled: fails mid-write
    assert _sha(path) == digest and load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == [LAST]


def test_resume_refuses_another_configuration(pair, data_root, tmp_path):
    teacher, student = pair
    finetune(student, teacher, image_dataset(data_root), create_loss("inner"), TrainConfig(**FAST, max_steps=2), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="gamma"):
        finetune(student, teacher, image_dataset(data_root), create_loss("inner", gamma=1.0), TrainConfig(**FAST, max_steps=2), str(tmp_path), progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(pair, data_root, tmp_path):
    teacher, student = pair
    calls = {"n": 0}

    def poison(module, inputs, output):  # the 3rd training forward returns NaN logits
        calls["n"] += module.training
        return output * float("nan") if calls["n"] == 3 and module.training else output

    student.register_forward_hook(poison)
    cfg = TrainConfig(**FAST, checkpoint_every_steps=1, epochs=2)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*loss=nan.*ce=nan") as err:
        finetune(student, teacher, image_dataset(data_root), create_loss("inner", proj_init="random"), cfg, str(tmp_path), progress=False)
    assert "left untouched" in str(err.value)
    ckpt = load_checkpoint(str(tmp_path / LAST))
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["student"].values() if v.is_floating_point())


def test_kd_with_ema_and_ce_without_teacher(pair, data_root, tmp_path):
    teacher, student = pair
    kd = finetune(student, teacher, image_dataset(data_root), create_loss("kd"), TrainConfig(**FAST, max_steps=3, ema_decay=0.5),
                  str(tmp_path / "kd"), progress=False)
    assert kd.ema is not None and {"train/kd", "train/ce"} <= set(kd.history[-1]) and len(kd.projections) == 0
    assert not state_equal(kd.ema.state_dict(), kd.student.state_dict())
    logs = []

    class Logger:
        def log(self, metrics, step):
            logs.append((step, metrics))

    val = image_dataset(data_root, eval_transform(student, IMG))
    ce = finetune(student, None, image_dataset(data_root), create_loss("ce"), TrainConfig(**FAST, epochs=1), str(tmp_path / "ce"),
                  logger=Logger(), progress=False, val_set=val)
    assert ce.steps == 6 and [s for s, _ in logs][:6] == list(range(1, 7))
    assert {"train/loss", "train/lr", "train/images_per_s"} <= set(logs[0][1]) and "val/top1" in logs[-1][1]


def _changed(loss, **fields):
    """``loss`` with fields set after it was built (and checked)."""
    for k, v in fields.items():
        setattr(loss, k, v)
    return loss


@pytest.mark.parametrize("kwargs,needle", [
    (dict(distill=_changed(create_loss("inner"), points="first")), "'first'"),
    (dict(distill=_changed(create_loss("kd"), ce_weight=-1.0)), "ce_weight=-1.0"),
    (dict(train=TrainConfig(amp="fp16")), "fp16.*CUDA"),
    (dict(train=TrainConfig(amp="fp8")), "'fp8'"),
    (dict(teacher=None), "needs the unpruned teacher"),
    (dict(train_set=TensorDataset(torch.zeros(0, 3), torch.zeros(0))), "empty"),
])
def test_bad_settings_fail_before_any_work(pair, data_root, tmp_path, kwargs, needle):
    teacher, student = pair
    args = dict(student=student, teacher=teacher, train_set=image_dataset(data_root), distill=create_loss("inner"), train=TrainConfig(),
                out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=needle):
        finetune(**{**args, **kwargs})
    assert not os.listdir(tmp_path)


class _Scores(nn.Module):
    """A 'model' whose logits are its input: the answer of every sample is known."""

    def forward(self, x):
        return x


def test_evaluate_top1_top5_known_answer():
    torch.manual_seed(0)
    n, classes = 11, 20
    labels = torch.arange(n) % classes
    ranks = torch.tensor([0, 0, 0, 1, 2, 4, 5, 7, 0, 3, 19])  # where the true class lands in each ranking
    scores = torch.zeros(n, classes)
    for i in range(n):
        others = [c for c in torch.randperm(classes).tolist() if c != labels[i]]
        order = others[: ranks[i]] + [labels[i].item()] + others[ranks[i]:]
        scores[i, order] = torch.linspace(1, 0, classes)
    m = evaluate(_Scores(), TensorDataset(scores, labels), batch_size=4, workers=0, progress=False)
    assert m["images"] == n and m["top1"] == pytest.approx(100 * 4 / 11) and m["top5"] == pytest.approx(100 * 8 / 11)
    assert m["images_per_s"] > 0


class _Tint(nn.Module):
    """Names each image's class by its tinted colour channel (write_images' rule); records the input sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: set[tuple[int, int]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.add(tuple(x.shape[-2:]))
        logits = torch.zeros(len(x), 1000)
        logits[torch.arange(len(x)), torch.tensor(LABELS)[x.mean((2, 3)).argmax(1)]] = 1.0
        return logits


def test_evaluate_folder_known_answer(data_root):
    """A model on an image folder at N px through timm's eval transform: every image seen, at N px."""
    model = _Tint()
    m = evaluate_folder(model, data_root, IMG + 8, batch_size=5, workers=0, device="cpu")
    assert m["images"] == 3 * 8 and m["top1"] == m["top5"] == 100.0 and model.sizes == {(IMG + 8, IMG + 8)}
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_folder(model, os.path.join(data_root, "missing"), IMG)


def test_teacher_metrics_are_cached(pair, data_root, tmp_path, caplog):
    teacher, student = pair
    val = image_dataset(data_root, eval_transform(teacher, IMG))
    first = validate_pair(student, teacher, val, str(tmp_path), "resnet18:test", batch_size=8, workers=0, progress=False)
    assert not first["teacher_cached"] and first["student"]["images"] == first["teacher"]["images"] == 3 * 8
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()  # a recomputation would now give different numbers
    second = validate_pair(student, teacher, val, str(tmp_path), "resnet18:test", batch_size=8, workers=0, progress=False)
    assert second["teacher_cached"] and second["teacher"] == first["teacher"]
    assert second["student"]["top1"] == first["student"]["top1"]
    other_size = image_dataset(data_root, eval_transform(teacher, IMG + 8))
    third = validate_pair(student, teacher, other_size, str(tmp_path), "resnet18:test", batch_size=8, workers=0, progress=False)
    assert not third["teacher_cached"]
    cache = json.loads((tmp_path / TEACHER_CACHE).read_text())
    assert sorted(e["resolution"] for e in cache.values()) == [[IMG, IMG], [IMG + 8, IMG + 8]]
    assert {e["teacher"] for e in cache.values()} == {"resnet18:test"}
    (tmp_path / TEACHER_CACHE).write_text((tmp_path / TEACHER_CACHE).read_text()[:40])  # truncated: recomputed
    with caplog.at_level("WARNING", logger="distill"):
        fourth = validate_pair(student, teacher, val, str(tmp_path), "resnet18:test", batch_size=8, workers=0,
                               progress=False)
    assert not fourth["teacher_cached"] and any("corrupt or truncated" in r.getMessage() for r in caplog.records)
    assert len(json.loads((tmp_path / TEACHER_CACHE).read_text())) == 1  # rewritten whole


@pytest.mark.parametrize("name,options", [
    ("efficientnet_b0", dict(channels_last=True)),
    ("mobilenetv3_large_100", dict(amp="bf16")),  # CPU autocast path
    ("resnet18", dict(teacher_fold_bn=False, teacher_channels_last=False, grad_clip=1.0)),
])
def test_inner_distillation_runs_on_each_architecture(name, options, data_root, tmp_path):
    teacher, student = tiny_pair(name)
    result = finetune(student, teacher, image_dataset(data_root), create_loss("inner"), TrainConfig(**FAST, max_steps=2, **options),
                      str(tmp_path), progress=False)
    assert result.steps == 2 and len(result.projections) > 0
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in result.history)
    if options.get("channels_last"):
        assert result.student.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
