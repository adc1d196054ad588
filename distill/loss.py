"""The fine-tuning losses' interface and what they share: :class:`DistillLoss`, its registry, the projections.

Each loss is one class in :mod:`distill.losses` (``ce``, ``kd``, ``inner``), registered with
:func:`register_loss` and selected by name (``distill.name``; its YAML's other keys are the class's fields):

* ``inner`` (the authors'): ``ce_weight * CE(student, y) + gamma / M * sum_m mean((P_m(f_S^m) - f_T^m)^2)`` over
  the M matched points (:mod:`distill.points`), where ``P_m`` is a learned bias-free 1x1 projection at points
  where the pruned student is narrower than the teacher and the identity elsewhere;
* ``kd``: ``ce_weight * CE + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))``;
* ``ce``: cross-entropy alone, no teacher.

CE uses label smoothing and skips images labelled -1 (no ImageNet class); with ``ce_weight=0`` the student
learns from the teacher only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pruning._registry import Registry
from pruning.distributed import all_reduce_sum
from pruning.errors import UserInputError
from .points import FeatureCapture

LOSSES: Registry[type["DistillLoss"]] = Registry(
    "distillation loss", "distill=NAME; add one with distill.loss.register_loss",
    builtins=("distill.losses",))


def register_loss(name: str) -> Callable[[type["DistillLoss"]], type["DistillLoss"]]:
    """Class decorator: make a :class:`DistillLoss` (a dataclass) available as ``distill=name``."""
    return LOSSES.register(name)


def create_loss(name: str, **kwargs: Any) -> "DistillLoss":
    """The loss registered as ``name`` with these settings (a clear error for unknown names and settings)."""
    return LOSSES.create(name, **kwargs)


def loss_from_config(cfg: Mapping[str, Any]) -> "DistillLoss":
    """The loss a ``distill/`` config selects: ``name`` picks it, every other key is one of its fields."""
    return LOSSES.from_config(cfg)


@dataclass
class DistillLoss:
    """One fine-tuning loss: ``loss(logits, labels, student_feats, teacher_feats, teacher_logits) -> (total, terms)``.

    Every loss computes the labelled cross-entropy ``ce`` (logged even at weight 0) and weighs it by
    :attr:`label_weight`; a subclass adds its terms in :meth:`terms` (in float32). A new loss is a dataclass
    subclass registered with ``@register_loss("name")``: its fields are the keys of ``conf/distill/NAME.yaml``,
    checked in :meth:`check`. Class attributes and hooks say what the trainer must provide:

    * ``needs_teacher``: the frozen teacher runs on every batch (``teacher_logits`` and ``teacher_feats``);
    * :meth:`points_for`: the modules whose outputs are compared (``student_feats``, projected to the
      teacher's widths, and ``teacher_feats``); none by default;
    * :attr:`fit_projections`: start those projections at the least-squares map on one batch.

    Attributes:
        label_smoothing: of the cross-entropy term.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise a :class:`~pruning.errors.UserInputError` naming any bad field and its accepted forms."""
        if not 0 <= self.label_smoothing < 1:
            raise UserInputError(f"need 0 <= label_smoothing < 1, got {self.label_smoothing}")

    @property
    def label_weight(self) -> float:
        """The weight of cross-entropy in the total."""
        return 1.0

    @property
    def fit_projections(self) -> bool:
        """True: each projection starts at the ridge least-squares map from student to teacher on one batch."""
        return False

    def fit_to_labels(self, labels: list[int]) -> None:
        """Choose the settings left to the data (``ce_weight: null``) from the training images' labels (-1: none)."""

    def points_for(self, student: nn.Module, teacher: nn.Module | None) -> list[str]:
        """The modules whose outputs this loss compares (both models must have them); none by default."""
        return []

    def settings(self) -> dict[str, Any]:
        """The fields (for checkpoints: a resumed run must use the same)."""
        return asdict(self)

    def terms(self, logits: torch.Tensor, labels: torch.Tensor, student_feats: list[torch.Tensor],
              teacher_feats: list[torch.Tensor], teacher_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The loss's own terms beside ``ce``, by name (each added to the total with weight 1)."""
        return {}

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        student_feats: list[torch.Tensor] = (),
        teacher_feats: list[torch.Tensor] = (),
        teacher_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and its terms (``ce`` and :meth:`terms`), all computed in float32.

        Args:
            logits: student logits.
            labels: class indices (-1: none).
            student_feats: projected student features at :meth:`points_for`.
            teacher_feats: teacher features at the same points.
            teacher_logits: teacher logits (``needs_teacher``).
        """
        terms = {"ce": labelled_cross_entropy(logits, labels, self.label_smoothing)}  # logged even at weight 0
        terms.update(self.terms(logits, labels, list(student_feats), list(teacher_feats), teacher_logits))
        # 0 * CE, not no CE: every parameter stays in the graph (DDP expects a gradient for each)
        return self.label_weight * terms["ce"] + sum(v for k, v in terms.items() if k != "ce"), terms


@dataclass
class TeacherLoss(DistillLoss):
    """A loss that learns from the teacher next to the labels: cross-entropy weighs ``ce_weight``.

    Attributes:
        ce_weight: weight of the cross-entropy term; 0 = the teacher only (label-free). None: chosen from the
            training labels by :meth:`fit_to_labels` (:func:`default_ce_weight`; the pipeline does this); 1 when
            used directly.
    """

    needs_teacher: ClassVar[bool] = True
    ce_weight: float | None = None

    def check(self) -> None:
        super().check()
        if self.ce_weight is not None and self.ce_weight < 0:
            raise UserInputError(f"distill.ce_weight={self.ce_weight} must be >= 0 (0: learn from the teacher only) or "
                                 "null (chosen from the training labels)")

    @property
    def label_weight(self) -> float:
        return 1.0 if self.ce_weight is None else self.ce_weight

    def fit_to_labels(self, labels: list[int]) -> None:
        if self.ce_weight is None:
            self.ce_weight = default_ce_weight(labels)


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
