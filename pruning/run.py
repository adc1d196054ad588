"""The Hydra app: ``python -m pruning.run [+budget=flops_490M] [+experiment=...] [overrides]``.

Checks and the driver are in :mod:`pruning.pipeline`, the stages and their files in :mod:`pruning.stages`; configs in ``conf/``. The run directory is
``hydra.run.dir`` (deterministic, so a rerun resumes); under torchrun every rank runs this entry point.

Exit codes: 0 done; 2 an error about the input (:class:`~pruning.errors.UserInputError`: one paragraph
``error: ...`` naming the value and the fix, no traceback); 1 anything else, a bug or a failure of the machine,
printed with its traceback by Hydra (``HYDRA_FULL_ERROR=1``: the full one, and input errors show theirs too).
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable, TypeVar

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ._registry import import_plugins
from .distributed import init_distributed, is_main
from .errors import UserInputError
from .loggers import LOGGERS, NullLogger
from . import pipeline
from .sweep import run_dirname  # noqa: F401  (registers the resolver that names a sweep's run directories)

log = logging.getLogger("pruning")

T = TypeVar("T")
USER_ERROR_EXIT = 2  # what an input error exits with; other errors propagate (Hydra exits 1)


def exit_on_user_error(body: Callable[[], T]) -> T:
    """Run ``body``; an input error ends the process with a one-paragraph message and exit code 2.

    Only :class:`~pruning.errors.UserInputError` (what the checks raise) is caught: it is printed to stderr as
    ``error: <message>`` without a traceback (with the environment variable ``HYDRA_FULL_ERROR=1`` the traceback
    is printed first, to find the check that fired). Any other exception is a bug or a failure of the machine
    and propagates with its traceback.

    Raises:
        SystemExit: code 2, after printing an input error.
    """
    try:
        return body()
    except UserInputError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def _run(cfg: DictConfig) -> dict:
    init_distributed()
    import_plugins(cfg.get("plugins"))  # the run's own extensions register before anything is built from the config
    run_dir = HydraConfig.get().runtime.output_dir
    logger = LOGGERS.from_config(cfg.logger) if is_main() else NullLogger()
    ctx = pipeline.preflight(cfg, run_dir, logger)
    logger.start(run_dir, OmegaConf.to_container(cfg, resolve=True), name=run_dir)
    try:
        report = pipeline.run_stages(ctx)
    finally:
        logger.finish()
    if is_main():
        _print_summary(report, run_dir)
    return report


def _print_summary(report: dict, run_dir: str) -> None:
    model, val, lat = report.get("model", {}), report.get("validate", {}), report.get("latency", {})
    if model:
        ratio = model.get("achieved_over_target")
        log.info("%s@%s: %s -> %s MACs%s, %s -> %s params", model["name"], model["img_size"],
                 f"{model['macs_before']:,}", f"{model['macs_after']:,}",
                 f" ({ratio:.4f} of target)" if ratio is not None else "",
                 f"{model['params_before']:,}", f"{model['params_after']:,}")
    if lat:
        log.info("latency at batch %s (%s, %s threads): %.2f -> %.2f ms measured (%.3fx), %.2f -> %.2f ms predicted",
                 lat["batch"], lat["backend"], lat["threads"], lat["measured_parent"], lat["measured_pruned"],
                 lat["measured_ratio"], lat["predicted_parent"], lat["predicted_pruned"])
    if val:
        data = val.get("dataset", {})
        log.info("top-1 on %s (%s images, %s classes): student %.2f, teacher %.2f (%.3fx)", data.get("root"),
                 data.get("images"), data.get("classes"), val["student"]["top1"], val["teacher"]["top1"],
                 val["student"]["top1"] / max(val["teacher"]["top1"], 1e-9))
        for warning in val.get("warnings", []):
            log.warning(warning)
    log.info("run directory: %s", run_dir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run the pipeline; input errors end with a one-paragraph message and exit code 2, others with their
    traceback and exit code 1 (see the module doc)."""
    exit_on_user_error(lambda: _run(cfg))


if __name__ == "__main__":
    main()
