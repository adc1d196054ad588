"""``ce``: plain cross-entropy fine-tuning, no teacher (the baseline)."""
from __future__ import annotations

from dataclasses import dataclass

from ..loss import DistillLoss, register_loss


@register_loss("ce")
@dataclass
class CrossEntropy(DistillLoss):
    """Label-smoothed cross-entropy on the labelled images alone (weight 1); the teacher is not run."""
