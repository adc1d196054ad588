"""Fine-tuning the pruned student under its frozen, unpruned parent (inner distillation), on 1 or N processes.

One entry, :func:`finetune`, runs the same way in a single process and under ``torchrun`` (DDP): the teacher
stays outside DDP and runs on each rank's own batch; the data are sharded by a DistributedSampler; only rank 0
writes checkpoints and logs. Recipe pieces are timm's: ``create_optimizer_v2`` (SGD Nesterov, no weight
decay on biases and norms), ``create_scheduler_v2`` (cosine with warm-up, stepped per update), ``ModelEmaV3``.

A run folder holds ``last.pth``; calling :func:`finetune` again on the same folder resumes from it and ends
in the same state, bit for bit on CPU, as a run that was never interrupted.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from pruning import distributed as D
from pruning.data import eval_loader
from pruning.errors import UserInputError
from pruning.speed import cudnn_autotuning

from .checkpoint import LAST, check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import EpochSeededDataset, ResumableSampler, train_loader, train_transform, with_transform
from .evaluate import check_dataset, evaluate
from .loss import DistillLoss, DistillStudent, build_projections, fit_projection, forward_no_grad, matched_feature_shapes
from .loss import point_key
from .precision import autocast, check_amp, grad_scaler
from .teacher import prepare_teacher

log = logging.getLogger(__name__)
_clock = time.monotonic  # wall clock of the time-triggered checkpoints (tests replace it)


class Logger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The loss (or, before a checkpoint, a weight) became NaN or infinite; the run stopped."""


@dataclass
class TrainConfig:
    """How the student is trained. Epochs and batch sizes are per process; the global batch is ``batch_size``
    times the number of processes.

    Attributes:
        epochs: epochs of the cosine decay; training runs ``epochs + cooldown_epochs`` epochs (timm's rule).
        max_steps: stop after this many updates; the whole schedule (warm-up, decay, cool-down) is compressed
            to fit them.
        warmup_epochs: linear warm-up from ``warmup_lr`` (may be fractional).
        cooldown_epochs: epochs at ``min_lr`` after the decay.
        ema_decay: keep an EMA of the student's weights (timm ModelEmaV3) with this decay; None = off.
        amp: ``"bf16"``, ``"fp16"`` (GPU only, with a grad scaler) or None (fp32).
        channels_last: run the student in channels-last layout.
        img_size: training resolution (used when ``train_set`` has no transform, and to size projections).
        checkpoint_every_steps: also checkpoint every N updates (always at every epoch end).
        checkpoint_minutes: also checkpoint once this many minutes of wall time have passed since the last
            checkpoint (or the start of this call), so a killed job loses at most about that much work;
            None = off. The clock is read only at logging updates (every ``log_every``), where no partly
            averaged loss is pending, so a run resumed from such a checkpoint also logs the same history;
            under DDP the ranks agree through one tiny all-reduce (the longest elapsed time decides).
        log_every: log and record history every N updates.
        val_every_steps: with a ``val_set``, also validate every N updates and after the last (a learning curve
            in the history); it runs in eval mode and draws no random numbers, so training is unchanged.
        grad_clip: clip the gradient norm to this value; None = off.
        teacher_fold_bn, teacher_channels_last: run the frozen teacher with batch norm folded into its
            convs and in channels-last layout (same outputs up to float rounding, faster).
        cudnn_benchmark: let cuDNN autotune each conv shape at its first use during :meth:`Trainer.run` (CUDA
            only; timm's train script does). Off by default: on an H200, b1 @240 bf16 inner distillation ran
            no faster with it (0.98x) after a first update of 80 s instead of 38 s
            (``benchmarks/bench_cudnn_autotune.py``); other GPUs may differ.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.02
    weight_decay: float = 1e-5
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-5
    cooldown_epochs: int = 0
    min_lr: float = 1e-6
    opt: str = "sgd"
    ema_decay: float | None = None
    amp: str | None = None
    channels_last: bool = False
    workers: int = 2
    img_size: int = 224
    seed: int = 0
    checkpoint_every_steps: int | None = None
    checkpoint_minutes: float | None = 10.0
    val_every_steps: int | None = None
    log_every: int = 10
    grad_clip: float | None = None
    teacher_fold_bn: bool = True
    teacher_channels_last: bool = True
    cudnn_benchmark: bool = False

    def check(self) -> None:
        """Raise a :class:`~pruning.errors.UserInputError` naming any bad field."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "img_size": self.img_size, "log_every": self.log_every}
        bad = [f"{k}={v!r}" for k, v in positive.items() if v < 1]
        optional = {"max_steps": self.max_steps, "checkpoint_every_steps": self.checkpoint_every_steps,
                    "val_every_steps": self.val_every_steps}
        bad += [f"{k}={v!r}" for k, v in optional.items() if v is not None and v < 1]
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            bad.append(f"ema_decay={self.ema_decay!r}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:  # also catches NaN
            bad.append(f"checkpoint_minutes={self.checkpoint_minutes!r}")
        if bad:
            raise UserInputError(f"invalid training settings: {', '.join(bad)} (counts must be >= 1, ema_decay in "
                                 "(0, 1) or None, checkpoint_minutes > 0 or None to checkpoint only by epoch and step "
                                 "count)")


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        student: the trained student itself (its raw weights, eval mode), on the training device.
        ema: the EMA of its weights when ``ema_decay`` was set, else None; validate both and keep the better.
        projections: the learned student-to-teacher projections (empty unless ``inner`` with narrower points).
        history: one dict per logged update (``train/...``) and per epoch end (``val/...`` with a val set).
        steps: optimiser updates done in total (across resumptions).
        resumed_from: the update count of the checkpoint this call resumed from, None for a fresh run.
    """

    student: nn.Module
    ema: nn.Module | None
    projections: nn.ModuleDict
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    resumed_from: int | None = None


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    train_set: Dataset,
    distill: DistillLoss,
    train: TrainConfig,
    out_dir: str,
    logger: Logger | None = None,
    progress: bool = True,
    val_set: Dataset | None = None,
    sample_weights: torch.Tensor | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` (in place) under ``teacher``; resume from ``out_dir/last.pth`` when present.

    Args:
        student: the pruned model, initialised from the parent's kept weights (moved to the device).
        teacher: the unpruned parent, left unchanged (a frozen copy runs). Not needed by losses without
            ``needs_teacher`` (``ce``).
        train_set: ``(image, label)`` pairs; when its ``transform`` is None, timm's training transform at
            ``train.img_size`` is used.
        distill: the loss (:func:`distill.create_loss`, e.g. ``create_loss("inner", gamma=30.0)``).
        train: the optimisation.
        out_dir: the run folder (checkpoints); every rank must see the same folder.
        logger: any object with ``log(metrics, step)``, called on rank 0; None = no logging.
        progress: tqdm bar on rank 0.
        val_set: when given, evaluated at every epoch end (``val/top1``, ``val/top5`` in the history).
        sample_weights: one weight per training image: each epoch then draws ``len(train_set)`` images with
            replacement in proportion to them (class- or source-balanced sampling); None visits each once.

    Raises:
        UserInputError: bad settings, an empty dataset, a missing teacher, or a checkpoint of another run.
        NonFiniteLossError: the loss became NaN/inf; the last checkpoint is left as it was.
    """
    return Trainer(student, teacher, train_set, distill, train, out_dir, logger, progress, val_set,
                   sample_weights).run()


def _check_inputs(distill: DistillLoss, train: TrainConfig, teacher, train_set: Dataset, device: torch.device) -> None:
    """Every cheap check, before any model is touched."""
    if not isinstance(distill, DistillLoss):
        raise TypeError(f"distill must be a DistillLoss (distill.create_loss), got {type(distill).__name__}")
    distill.check()
    train.check()
    check_amp(train.amp, device)
    check_dataset(train_set, "training")
    if distill.needs_teacher and teacher is None:
        raise UserInputError(f"loss {distill.name!r} needs the unpruned teacher; pass it, or use the loss 'ce'")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class Trainer:
    """The state of one run and its loop. :func:`finetune` is the entry; ``train_step`` serves benchmarks."""

    def __init__(self, student, teacher, train_set, distill, train, out_dir, logger=None, progress=True, val_set=None,
                 sample_weights=None) -> None:
        self.device = D.default_device()
        _check_inputs(distill, train, teacher, train_set, self.device)
        self.distill, self.cfg, self.out_dir = distill, train, out_dir
        self.logger, self.progress, self.val_set = logger, progress, val_set
        self.path = os.path.join(out_dir, LAST)
        _seed_everything(train.seed + D.rank())
        self._setup_data(train_set, student, sample_weights)
        self.points = distill.points_for(student, teacher)
        self.teacher = self._setup_teacher(teacher)
        self.module = self._setup_module(student)
        self._setup_optimisation()
        self.epoch = self.batch = self.step = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from = self._resume()
        self.net = self._wrap_ddp()
        self.last_save = _clock()  # when the last checkpoint was written (checkpoint_minutes); reset by run()

    # ------------------------------------------------------------------------------------------ setup

    def _setup_data(self, train_set: Dataset, student: nn.Module, weights: torch.Tensor | None) -> None:
        self.dataset = EpochSeededDataset(with_transform(train_set, train_transform(student, self.cfg.img_size)), self.cfg.seed)
        self.sampler = ResumableSampler(self.dataset, D.world_size(), D.rank(), self.cfg.seed, self.cfg.batch_size, weights)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise UserInputError(f"the training set ({len(train_set)} images over {D.world_size()} processes) is "
                                 f"smaller than one batch of {self.cfg.batch_size} per process; lower batch_size")
        natural = (self.cfg.epochs + self.cfg.cooldown_epochs) * self.steps_per_epoch
        self.total_steps = min(natural, self.cfg.max_steps or natural)
        self.schedule_scale = self.total_steps / natural  # max_steps compresses the whole schedule

    def _setup_teacher(self, teacher: nn.Module | None) -> nn.Module | None:
        if not self.distill.needs_teacher:
            return None
        return prepare_teacher(teacher, self.device, self.cfg.teacher_fold_bn, self.cfg.teacher_channels_last,
                               tuple(self.points))

    def _setup_module(self, student: nn.Module) -> DistillStudent:
        student.to(self.device)
        projections = None
        if self.points:
            size = min(self.cfg.img_size, 64)  # widths do not depend on resolution
            s, t = matched_feature_shapes(student, self.teacher, self.points, size, self.device)
            projections = build_projections(self.points, s, t).to(self.device)
        module = DistillStudent(student, self.points, projections).train()
        return module.to(memory_format=torch.channels_last) if self.cfg.channels_last else module

    def _setup_optimisation(self) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        cfg = self.cfg
        self.optimizer = create_optimizer_v2(self.module, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             momentum=cfg.momentum, filter_bias_and_bn=True)
        # everything in updates (updates_per_epoch=1): the schedule is stepped per update and may be compressed
        scale = self.schedule_scale * self.steps_per_epoch
        cooldown = min(round(cfg.cooldown_epochs * scale), self.total_steps - 1)  # a few max_steps: >= 1 decaying
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=self.total_steps - cooldown, decay_epochs=1,
            warmup_epochs=round(cfg.warmup_epochs * scale), cooldown_epochs=cooldown, min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr, step_on_epochs=False, updates_per_epoch=1)
        self.ema = ModelEmaV3(self.module.student, decay=cfg.ema_decay) if cfg.ema_decay else None
        self.scaler = grad_scaler(cfg.amp)

    def _wrap_ddp(self) -> nn.Module:
        if not D.is_distributed():
            return self.module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.module, device_ids=ids)

    # ------------------------------------------------------------------------------------ checkpoints

    def _config(self) -> dict[str, Any]:
        weights = self.sampler.weights
        sampling = None if weights is None else hashlib.sha1(weights.numpy().tobytes()).hexdigest()[:16]
        return {"train": asdict(self.cfg), "distill": {"method": self.distill.name, **self.distill.settings()},
                "run": {"world_size": D.world_size(), "images": len(self.dataset), "sampling": sampling}}

    def _state(self) -> dict[str, Any]:
        return {
            "student": self.module.student.state_dict(), "projections": self.module.projections.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "points": self.points,
            "history": self.history, "config": self._config(), "rng": D.all_gather_objects(rng_state()),
        }

    def _save(self) -> None:
        self._check_finite_weights()
        state = self._state()  # collective (random states of every rank): all ranks build it
        if D.is_main():
            save_checkpoint(self.path, state)
        self.last_save = _clock()

    def _checkpoint_due(self, logged: bool) -> bool:
        """Whether to checkpoint mid-epoch after this update (the same answer on every rank)."""
        every = self.cfg.checkpoint_every_steps
        if every and self.step % every == 0:
            return True
        if self.cfg.checkpoint_minutes is None or not logged:
            return False
        # the longest wall time over ranks since the last checkpoint: one 1-element all-reduce per log
        elapsed = torch.tensor([_clock() - self.last_save], dtype=torch.float64, device=D.collective_device())
        return D.all_reduce_max(elapsed).item() >= 60 * self.cfg.checkpoint_minutes

    def _resume(self) -> int | None:
        ckpt = load_checkpoint(self.path)
        if ckpt is None:
            self._init_projections()
            return None
        check_compatible(ckpt["config"], self._config(), self.path)
        self.module.student.load_state_dict(ckpt["student"])
        self.module.projections.load_state_dict(ckpt["projections"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema:
            self.ema.module.load_state_dict(ckpt["ema"])
        if self.scaler:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch, self.step, self.history = ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["history"]
        self.scheduler.step_update(self.step)
        set_rng_state(ckpt["rng"][D.rank()])
        if D.is_main():
            log.info("resuming %s at update %d of %d (epoch %d, batch %d of %d)", self.path, self.step,
                     self.total_steps, self.epoch, self.batch, self.steps_per_epoch)
        return self.step

    def _init_projections(self) -> None:
        """Fit the projections to the first batch (eval mode: the student's BN statistics stay untouched)."""
        if not self.distill.fit_projections or not len(self.module.projections):
            return
        images, _ = next(iter(self._loader()))
        images = images.to(self.device)
        _, t = forward_no_grad(self.teacher, self._teacher_input(images), self.points)
        was_training = self.module.training
        self.module.eval()
        _, s = forward_no_grad(self.module.student, self._student_input(images), self.points)
        self.module.train(was_training)
        for name, sf, tf in zip(self.points, s, t):
            if point_key(name) in self.module.projections:
                fit_projection(self.module.projections[point_key(name)], sf, tf)

    def _check_finite_weights(self) -> None:
        bad = [n for n, p in self.module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(f"weights {bad[:3]} became non-finite at step {self.step}; not saving, "
                                     f"{self.path} keeps the last good state")

    # ---------------------------------------------------------------------------------------- the loop

    def _loader(self):
        self.sampler.set_position(self.epoch, self.batch)
        self.dataset.set_epoch(self.epoch)
        return train_loader(self.dataset, self.sampler, self.cfg.workers, self.device.type == "cuda")

    def _student_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else images

    def _teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.cfg.teacher_channels_last else images

    def run(self) -> FinetuneResult:
        """Train until ``total_steps`` updates are done (none when a finished run was resumed)."""
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"finetune ({self.distill.name})", unit="step",
                   disable=not self.progress or not D.is_main())
        self.last_save = _clock()  # checkpoint_minutes counts from here, then from each checkpoint
        try:
            with cudnn_autotuning(self.cfg.cudnn_benchmark):
                while self.step < self.total_steps:
                    self._epoch(bar)
        finally:
            bar.close()
        self.module.student.eval()
        return FinetuneResult(self.module.student, self.ema.module if self.ema else None, self.module.projections,
                              self.history, self.step, self.resumed_from)

    def _epoch(self, bar: tqdm) -> None:
        meter = _Meter(self.cfg.batch_size * D.world_size())
        for images, labels in self._loader():
            meter.add(self.train_step(images, labels))
            self.batch += 1
            bar.update(1)
            logged = self.step % self.cfg.log_every == 0
            if logged:
                self._log(meter.flush(self.device), bar)
            if self.cfg.val_every_steps and (self.step % self.cfg.val_every_steps == 0 or self.step >= self.total_steps):
                self._validate()  # a learning curve: eval mode, no random draws, so the trajectory is unchanged
            if self.step >= self.total_steps:
                break
            if self.batch < self.steps_per_epoch and self._checkpoint_due(logged):  # epoch ends save below
                self._save()
        self._sync_buffers()
        if self.batch >= self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._validate()
        self._save()

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BN statistics (and EMA buffers): DDP broadcasts them before each forward
        anyway, so this changes no trajectory, but ranks end an epoch with identical models."""
        if not D.is_distributed():
            return
        modules = [self.module.student] + ([self.ema.module] if self.ema else [])
        for buffer in (b for m in modules for b in m.buffers()):
            torch.distributed.broadcast(buffer, src=0)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One update on one batch: teacher forward, student forward, loss, backward, optimiser, scheduler, EMA.

        Returns:
            The detached loss and its terms (``ce``, ``inner`` or ``kd``).
        """
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with autocast(self.cfg.amp, self.device):
            t_logits, t_feats = (forward_no_grad(self.teacher, self._teacher_input(images), self.points)
                                 if self.teacher is not None else (None, []))
            logits, s_feats = self.net(self._student_input(images))
            loss, terms = self.distill(logits, labels, s_feats, t_feats, t_logits)
        self._check_finite(loss, terms)
        self._update(loss)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}

    def _update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip true gradients
        else:
            loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.ema:
            self.ema.update(self.module.student, step=self.step)

    def _check_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Stop before a non-finite loss touches the weights; every rank agrees, so none waits forever."""
        finite = torch.isfinite(loss.detach()).to(D.collective_device(), torch.float32).reshape(1)
        if D.all_reduce_sum(finite).item() == D.world_size():
            return
        values = ", ".join(f"{k}={v.item():.6g}" for k, v in {"loss": loss, **terms}.items())
        saved = f"{self.path} was left untouched" if os.path.isfile(self.path) else "no checkpoint was written"
        raise NonFiniteLossError(f"non-finite loss at step {self.step + 1} (epoch {self.epoch}, batch {self.batch}) "
                                 f"on at least one rank; this rank's terms: {values}. The run stopped; {saved}.")

    @torch.no_grad()
    def held_out_loss(self, dataset: Dataset, batch_size: int = 64) -> dict[str, float]:
        """Mean loss terms of the current student (eval mode) against the teacher on ``dataset``, e.g.
        before and after training; all ranks take part and get the same numbers."""
        was_training = self.module.training
        self.module.eval()
        sums: dict[str, torch.Tensor] = {}
        try:
            for images, labels in eval_loader(dataset, batch_size, self.cfg.workers, shard=True):
                images, labels = images.to(self.device), labels.to(self.device)
                with autocast(self.cfg.amp, self.device):
                    t_logits, t_feats = (forward_no_grad(self.teacher, self._teacher_input(images), self.points)
                                         if self.teacher is not None else (None, []))
                    logits, s_feats = self.module(self._student_input(images))
                    loss, terms = self.distill(logits, labels, s_feats, t_feats, t_logits)
                for k, v in {"loss": loss, **terms}.items():
                    sums[k] = sums.get(k, 0) + v.double().cpu() * len(images)
        finally:
            self.module.train(was_training)
        total = D.all_reduce_sum(torch.stack(list(sums.values())).to(D.collective_device())).cpu() / len(dataset)
        return dict(zip(sums, total.tolist()))

    # ------------------------------------------------------------------------------------- reporting

    def _log(self, metrics: dict[str, float], bar: tqdm) -> None:
        metrics = {f"train/{k}": v for k, v in metrics.items()}
        metrics.update({"train/lr": self.optimizer.param_groups[0]["lr"], "epoch": self.epoch + self.batch / self.steps_per_epoch})
        self._record(metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}",
                        img_s=f"{metrics['train/images_per_s']:.1f}", refresh=False)

    def _record(self, metrics: dict[str, Any]) -> None:
        self.history.append({"step": self.step, **metrics})
        if self.logger is not None and D.is_main():
            self.logger.log(metrics, self.step)

    def _validate(self) -> None:
        if self.val_set is None or any(h["step"] == self.step and "val/top1" in h for h in self.history):
            return
        m = evaluate(self.module.student, self.val_set, self.cfg.batch_size, self.cfg.workers, self.cfg.amp, self.device, self.progress)
        self._record({"val/top1": m["top1"], "val/top5": m["top5"], "epoch": self.epoch})


class _Meter:
    """Loss terms summed on the device between logs (no per-term sync), averaged over ranks when logged."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float()
        self.count += 1

    def flush(self, device: torch.device) -> dict[str, float]:
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).to(D.collective_device())
        values = (D.all_reduce_sum(values) / (self.count * D.world_size())).tolist()
        out = dict(zip(keys, values))
        out["images_per_s"] = self.count * self.images_per_step / max(time.perf_counter() - self.start, 1e-9)
        self.sums, self.count, self.start = {}, 0, time.perf_counter()
        return out
