"""The fine-tuning losses: inner distillation (the authors'), logit distillation, plain cross-entropy.

``inner``: ``ce_weight * CE(student, y) + gamma / M * sum_m mean((P_m(f_S^m) - f_T^m)^2)`` over the M matched
points (:mod:`distill.points`), where ``P_m`` is a learned bias-free 1x1 projection at points where the pruned
student is narrower than the teacher and the identity elsewhere. ``kd``: ``ce_weight * CE + kd_weight * T^2 *
KL(softmax(t/T) || softmax(s/T))``. ``ce``: cross-entropy alone, no teacher. CE uses label smoothing and skips
images labelled -1 (no ImageNet class); with ``ce_weight=0`` the student learns from the teacher only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pruning.distributed import all_reduce_sum
from pruning.errors import UserInputError
from .points import FeatureCapture, check_points, matched_points

METHODS = ("inner", "kd", "ce")
PROJ_INITS = ("lstsq", "random")


@dataclass
class DistillConfig:
    """What the student learns from.

    Attributes:
        method: ``inner`` (matched inner features + CE), ``kd`` (temperature KL on logits + CE) or ``ce``.
        gamma: weight of the inner term; the mean over points is taken first (gamma / M * sum).
        points: ``all`` (the default: stem, stages, head, pooled features, logits), ``authors`` (the output of
            every top-level child and of every stage) or ``last`` (last stage only); see :mod:`distill.points`.
        temperature: softmax temperature of ``kd``.
        kd_weight: weight of the KL term of ``kd``.
        label_smoothing: of the cross-entropy term (every method).
        ce_weight: weight of the cross-entropy term of ``inner`` and ``kd``; 0 = the teacher only (label-free).
            None: chosen from the training labels by :func:`default_ce_weight` (the pipeline does this); 1
            when used directly. ``ce`` always uses 1.
        proj_init: ``lstsq`` fits each projection to one batch by ridge least squares before training, so
            the inner term starts from the best linear map instead of noise; ``random`` keeps torch's init.
    """

    method: str = "inner"
    gamma: float = 30.0
    points: str = "all"
    temperature: float = 4.0
    kd_weight: float = 1.0
    label_smoothing: float = 0.1
    proj_init: str = "lstsq"
    ce_weight: float | None = None

    def check(self) -> None:
        """Raise a :class:`~pruning.errors.UserInputError` naming any bad field and its accepted forms."""
        if self.method not in METHODS:
            raise UserInputError(f"unknown distillation method {self.method!r}; choose one of {list(METHODS)}")
        check_points(self.points)
        if self.proj_init not in PROJ_INITS:
            raise UserInputError(f"unknown projection init {self.proj_init!r}; choose one of {list(PROJ_INITS)}")
        if self.temperature <= 0 or not 0 <= self.label_smoothing < 1:
            raise UserInputError(f"need temperature > 0 and 0 <= label_smoothing < 1, got {self.temperature}, "
                                 f"{self.label_smoothing}")
        if self.ce_weight is not None and self.ce_weight < 0:
            raise UserInputError(f"distill.ce_weight={self.ce_weight} must be >= 0 (0: learn from the teacher only) or "
                             "null (chosen from the training labels)")

    @property
    def needs_teacher(self) -> bool:
        """Every method but ``ce`` runs the teacher."""
        return self.method != "ce"


def _projection(student_width: int, teacher_width: int, ndim: int) -> nn.Module:
    """Bias-free map from student to teacher channels: a 1x1 conv on feature maps, a linear on vectors."""
    if ndim == 4:
        return nn.Conv2d(student_width, teacher_width, 1, bias=False)
    if ndim == 2:
        return nn.Linear(student_width, teacher_width, bias=False)
    raise ValueError(f"cannot project a {ndim}-d feature; matched points must output (N, C) or (N, C, H, W)")


def build_projections(points: list[str], student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> nn.ModuleDict:
    """One projection per point whose student width differs from the teacher's (keys: ``.`` -> ``_``)."""
    projections = nn.ModuleDict()
    for name, s, t in zip(points, student_feats, teacher_feats):
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
            raise ValueError(f"point {name!r}: student output {tuple(s.shape)} and teacher {tuple(t.shape)} differ beyond channels")
        if s.shape[1] != t.shape[1]:
            projections[point_key(name)] = _projection(s.shape[1], t.shape[1], s.dim())
    return projections


def point_key(name: str) -> str:
    """ModuleDict keys cannot hold dots."""
    return name.replace(".", "_")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Features as (samples, channels) rows in float64: every pixel of every image is a sample."""
    return (x.movedim(1, -1) if x.dim() > 2 else x).reshape(-1, x.shape[1]).double()


@torch.no_grad()
def fit_projection(projection: nn.Module, student: torch.Tensor, teacher: torch.Tensor, ridge: float = 1e-3) -> None:
    """Set ``projection`` to the ridge least-squares map from ``student`` to ``teacher`` features.

    The normal equations are summed over ranks, so every rank gets the same fit on the union of its batches.
    """
    s, t = _rows(student), _rows(teacher)
    gram = all_reduce_sum(s.T @ s)
    cross = all_reduce_sum(s.T @ t)
    gram += torch.eye(len(gram), dtype=gram.dtype, device=gram.device) * (ridge * gram.trace() / len(gram) + 1e-12)
    weight = torch.linalg.solve(gram, cross).T  # (teacher channels, student channels)
    projection.weight.copy_(weight.reshape(projection.weight.shape).to(projection.weight.dtype))


class DistillStudent(nn.Module):
    """The student and its projections in one module: what the optimiser, DDP and checkpoints see.

    ``forward(x)`` returns the logits and the projected features at ``points`` (empty when none).
    """

    def __init__(self, student: nn.Module, points: list[str], projections: nn.ModuleDict | None = None) -> None:
        super().__init__()
        self.student = student
        self.points = list(points)
        self.projections = projections if projections is not None else nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not self.points:
            return self.student(x), []
        # hooks live only for this call: no copy of the student ever carries them (EMA, checkpoints)
        with FeatureCapture(self.student, self.points) as capture:
            logits = self.student(x)
            feats = capture.pop()
        return logits, [self._project(n, f) for n, f in zip(self.points, feats)]

    def _project(self, name: str, feat: torch.Tensor) -> torch.Tensor:
        key = point_key(name)
        return self.projections[key](feat) if key in self.projections else feat

    def no_weight_decay(self) -> set[str]:
        """timm's optimiser factory asks the top module; pass the student's own list through."""
        inner = getattr(self.student, "no_weight_decay", None)
        return {f"student.{n}" for n in inner()} if callable(inner) else set()


def forward_no_grad(model: nn.Module, x: torch.Tensor, points: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and features at ``points`` without autograd (the frozen teacher's step).

    ``no_grad``, not ``inference_mode``: the MSE against these features saves them for backward.
    """
    with torch.no_grad():
        if not points:
            return model(x), []
        with FeatureCapture(model, points) as capture:
            logits = model(x)
            return logits, capture.pop()


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


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the images with a label (>= 0); 0 (still attached to the graph) when none has."""
    labelled = labels >= 0
    per_image = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none", label_smoothing=label_smoothing)
    return (per_image * labelled).sum() / labelled.sum().clamp(min=1)


# Cross-entropy helps where the pool is ImageNet-like: every class, many images each (the paper's setting).
FULL_IMAGENET_MIN_PER_CLASS = 100


def default_ce_weight(labels: list[int]) -> float:
    """The weight of cross-entropy next to a teacher for training images with these labels (-1: none).

    1 (the paper's recipe) when every one of the 1000 ImageNet classes has at least
    :data:`FULL_IMAGENET_MIN_PER_CLASS` labelled images; 0 otherwise. On a smaller or class-skewed pool, one-hot
    labels teach the student the pool's class frequencies and overfit its few images per class (a pruned Lite0
    fine-tuned with labels on Imagenette's 10 classes scored 1.2% top-1 on ImageNet val, its parent 54%), while
    the teacher's outputs keep ImageNet's 1000-way knowledge on every image, labelled or not.
    """
    counts = torch.bincount(torch.tensor([label for label in labels if label >= 0], dtype=torch.long), minlength=1000)
    return 1.0 if len(counts) == 1000 and int(counts.min()) >= FULL_IMAGENET_MIN_PER_CLASS else 0.0


def distill_loss(
    config: DistillConfig,
    logits: torch.Tensor,
    labels: torch.Tensor,
    student_feats: list[torch.Tensor] = (),
    teacher_feats: list[torch.Tensor] = (),
    teacher_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and its terms (``ce`` and ``inner`` or ``kd``), all computed in float32.

    Args:
        config: the method and its weights.
        logits: student logits.
        labels: class indices.
        student_feats: projected student features at the matched points (``inner``).
        teacher_feats: teacher features at the same points (``inner``).
        teacher_logits: teacher logits (``kd``).
    """
    terms = {"ce": labelled_cross_entropy(logits, labels, config.label_smoothing)}  # logged even at weight 0
    if config.method == "inner":
        if not student_feats or len(student_feats) != len(teacher_feats):
            raise ValueError(f"inner distillation needs as many student as teacher features, got {len(student_feats)} and {len(teacher_feats)}")
        mse = [_FeatureMSE.apply(s.float(), t.float()) for s, t in zip(student_feats, teacher_feats)]
        terms["inner"] = config.gamma / len(mse) * torch.stack(mse).sum()
    elif config.method == "kd":
        if teacher_logits is None:
            raise ValueError("kd distillation needs the teacher's logits")
        temp = config.temperature
        kl = F.kl_div(F.log_softmax(logits.float() / temp, 1), F.log_softmax(teacher_logits.float() / temp, 1),
                      reduction="batchmean", log_target=True)
        terms["kd"] = config.kd_weight * temp * temp * kl
    ce_weight = 1.0 if config.method == "ce" or config.ce_weight is None else config.ce_weight
    # 0 * CE, not no CE: every parameter stays in the graph (DDP expects a gradient for each)
    return ce_weight * terms["ce"] + sum(v for k, v in terms.items() if k != "ce"), terms


def matched_feature_shapes(
    student: nn.Module, teacher: nn.Module, points: list[str], img_size: int, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Student and teacher features at ``points`` for one random image (eval mode; modes are restored)."""
    x = torch.randn(1, 3, img_size, img_size, device=device)
    was_training = student.training
    student.eval()
    try:
        _, s = forward_no_grad(student, x, points)
        _, t = forward_no_grad(teacher, x, points)
    finally:
        student.train(was_training)
    return s, t


def points_for(config: DistillConfig, student: nn.Module, teacher: nn.Module | None) -> list[str]:
    """The matched points of ``inner`` (both models must have them), none for the other methods."""
    if config.method != "inner":
        return []
    points = matched_points(student, config.points)
    missing = [p for p in points if p not in dict(teacher.named_modules())]
    if missing:
        raise ValueError(f"the teacher has no modules {missing}; is it the student's unpruned parent?")
    return points
