"""Metric loggers: wandb (offline by default) or none, registered by name (``logger.name``); a new one is a
:class:`NullLogger` subclass registered with :func:`register_logger`. Anything with ``log(metrics, step)`` works
where a logger is passed directly (:func:`distill.finetune`)."""
from __future__ import annotations

import os
from typing import Any, Mapping

from ._registry import Registry
from .errors import MissingPackageError

LOGGERS: Registry[type] = Registry("logger", "logger=NAME; add one with pruning.loggers.register_logger")


def register_logger(name: str):
    """Class decorator: make a logger available as ``logger=name`` (its YAML's other keys are its arguments)."""
    return LOGGERS.register(name)


def create_logger(name: str, **kwargs: Any) -> "NullLogger":
    """The logger registered as ``name``, built with ``kwargs``."""
    return LOGGERS.create(name, **kwargs)


@register_logger("none")
class NullLogger:
    """Logs nothing (``logger=none``)."""

    def start(self, run_dir: str, config: Mapping[str, Any], name: str) -> None:
        pass

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_files(self, paths: list[str]) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


@register_logger("wandb")
class WandbLogger(NullLogger):
    """wandb run in the run directory; ``mode`` offline by default, ``disabled`` turns it off."""

    def __init__(self, project: str = "knapsack-pruning", mode: str = "offline") -> None:
        self.project, self.mode, self.run = project, mode, None

    def start(self, run_dir: str, config: Mapping[str, Any], name: str) -> None:
        try:
            import wandb
        except ImportError as e:
            raise MissingPackageError(f"logger=wandb needs the wandb package ({e}): pip install wandb, or run with "
                                      "logger=none") from e

        os.makedirs(run_dir, exist_ok=True)
        self.run = wandb.init(project=self.project, mode=self.mode, dir=run_dir, config=dict(config), name=name,
                              reinit="finish_previous")

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_files(self, paths: list[str]) -> None:
        import wandb

        if self.run is None:
            return
        images = {os.path.basename(p): wandb.Image(p) for p in paths if p.endswith(".png")}
        if images:
            self.run.log(images)
        for p in paths:
            if not p.endswith(".png"):
                self.run.save(p, base_path=os.path.dirname(p), policy="now")

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(dict(values))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
