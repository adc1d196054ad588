"""Fine-tuning a pruned student under its unpruned parent, and validating both.

* :mod:`distill.points`: the matched points (stem, stages, head, pooled features, logits) from the model's
  structure, and the hooks that capture them,
* :mod:`distill.loss`: inner distillation (the authors'), logit KD and plain CE, with the projections,
* :mod:`distill.teacher`: the frozen teacher, batch norm folded and channels-last for speed,
* :mod:`distill.train`: :func:`finetune` (checkpoints, exact resume, EMA, AMP, DDP under torchrun),
* :mod:`distill.evaluate`: :func:`evaluate`, :func:`evaluate_folder` (a model on an image folder) and
  :func:`validate_pair` (teacher metrics cached).
"""
from pruning.distributed import init_distributed
from .evaluate import evaluate, evaluate_folder, validate_pair
from .loss import DistillConfig, distill_loss
from .points import matched_points
from .train import FinetuneResult, NonFiniteLossError, TrainConfig, finetune

__all__ = [
    "DistillConfig", "FinetuneResult", "NonFiniteLossError", "TrainConfig", "distill_loss", "evaluate",
    "evaluate_folder", "finetune", "init_distributed", "matched_points", "validate_pair",
]
