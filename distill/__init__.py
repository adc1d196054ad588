"""Fine-tuning a pruned student under its unpruned parent, and validating both.

* :mod:`distill.points`: the matched points (stem, stages, head, pooled features, logits) from the model's
  structure, and the hooks that capture them,
* :mod:`distill.loss`: the losses' interface (:class:`DistillLoss`, :func:`register_loss`) and projections,
* :mod:`distill.losses`: one module per loss: inner distillation (the authors'), logit KD, plain CE,
* :mod:`distill.teacher`: the frozen teacher, batch norm folded and channels-last for speed,
* :mod:`distill.train`: :func:`finetune` (checkpoints, exact resume, EMA, AMP, DDP under torchrun),
* :mod:`distill.evaluate`: :func:`evaluate`, :func:`evaluate_folder` (a model on an image folder) and
  :func:`validate_pair` (teacher metrics cached).
"""
from pruning.distributed import init_distributed
from .evaluate import evaluate, evaluate_folder, validate_pair
from .loss import DistillLoss, create_loss, loss_from_config, register_loss
from .points import matched_points
from .train import FinetuneResult, NonFiniteLossError, TrainConfig, finetune

__all__ = [
    "DistillLoss", "FinetuneResult", "NonFiniteLossError", "TrainConfig", "create_loss", "evaluate", "evaluate_folder",
    "finetune", "init_distributed", "loss_from_config", "matched_points", "register_loss", "validate_pair",
]
