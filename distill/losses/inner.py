"""``inner``: inner distillation (the authors'), matched inner features through 1x1 projections plus CE."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pruning.errors import UserInputError
from ..loss import TeacherLoss, register_loss
from ..points import check_points, matched_points

PROJ_INITS = ("lstsq", "random")


@register_loss("inner")
@dataclass
class InnerDistillation(TeacherLoss):
    """``ce_weight * CE + gamma / M * sum_m mean((P_m(f_S^m) - f_T^m)^2)`` over the M matched points.

    Attributes:
        gamma: weight of the inner term; the mean over points is taken first (gamma / M * sum).
        points: ``all`` (the default: stem, stages, head, pooled features, logits), ``authors`` (the output of
            every top-level child and of every stage) or ``last`` (last stage only); see :mod:`distill.points`.
        proj_init: ``lstsq`` fits each projection to one batch by ridge least squares before training, so
            the inner term starts from the best linear map instead of noise; ``random`` keeps torch's init.
    """

    gamma: float = 30.0
    points: str = "all"
    proj_init: str = "lstsq"

    def check(self) -> None:
        super().check()
        check_points(self.points)
        if self.proj_init not in PROJ_INITS:
            raise UserInputError(f"unknown projection init {self.proj_init!r}; choose one of {list(PROJ_INITS)}")

    @property
    def fit_projections(self) -> bool:
        return self.proj_init == "lstsq"

    def points_for(self, student: nn.Module, teacher: nn.Module | None) -> list[str]:
        points = matched_points(student, self.points)
        names = {n for n, _ in teacher.named_modules()}
        missing = [p for p in points if p not in names]
        if missing:
            raise ValueError(f"the teacher has no modules {missing}; is it the student's unpruned parent?")
        return points

    def terms(self, logits, labels, student_feats, teacher_feats, teacher_logits) -> dict[str, torch.Tensor]:
        if not student_feats or len(student_feats) != len(teacher_feats):
            raise ValueError(f"inner distillation needs as many student as teacher features, got {len(student_feats)} "
                             f"and {len(teacher_feats)}")
        mse = [_FeatureMSE.apply(s.float(), t.float()) for s, t in zip(student_feats, teacher_feats)]
        return {"inner": self.gamma / len(mse) * torch.stack(mse).sum()}


class _FeatureMSE(torch.autograd.Function):
    """``mean((s - t)^2)`` whose gradient has ``s``'s memory layout, whatever ``t``'s.

    ``F.mse_loss`` returns a contiguous gradient even for channels-last inputs, which turns the rest of a
    channels-last student's backward into slow layout conversions (+50% backward time on CPU). A channels-last
    teacher feature against a contiguous student one is subtracted as is: cheaper than converting it first.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        diff = _layout_like(student - teacher, student)
        ctx.save_for_backward(diff)
        return torch.linalg.vector_norm(diff).square() / diff.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (diff,) = ctx.saved_tensors
        return diff * (2 * grad / diff.numel()), None


def _layout_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory layout (a no-op when it already is, the usual case)."""
    if t.dim() != 4 or like.is_contiguous() == t.is_contiguous():
        return t
    return t.contiguous(memory_format=torch.contiguous_format if like.is_contiguous() else torch.channels_last)


