"""The fine-tuning losses, one module each: ``ce``, ``kd`` and ``inner``.

Each registers one :class:`distill.loss.DistillLoss` with :func:`distill.loss.register_loss`. The registry
imports every module of this package on its first lookup, so a new loss is one more file here (or in a
``plugins`` module) and one YAML in ``conf/distill/`` (README, Extending).
"""
