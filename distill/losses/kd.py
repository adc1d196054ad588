"""``kd``: temperature KL on the logits (Hinton et al.) plus ``ce_weight`` * CE."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pruning.errors import UserInputError
from ..loss import TeacherLoss, register_loss


@register_loss("kd")
@dataclass
class LogitKD(TeacherLoss):
    """``ce_weight * CE + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Attributes:
        temperature: softmax temperature ``T``.
        kd_weight: weight of the KL term.
    """

    temperature: float = 4.0
    kd_weight: float = 1.0

    def check(self) -> None:
        super().check()
        if not self.temperature > 0:
            raise UserInputError(f"need temperature > 0, got {self.temperature}")

    def terms(self, logits, labels, student_feats, teacher_feats, teacher_logits) -> dict[str, torch.Tensor]:
        if teacher_logits is None:
            raise ValueError("kd distillation needs the teacher's logits")
        temp = self.temperature
        kl = F.kl_div(F.log_softmax(logits.float() / temp, 1), F.log_softmax(teacher_logits.float() / temp, 1),
                      reduction="batchmean", log_target=True)
        return {"kd": self.kd_weight * temp * temp * kl}
