"""The Hydra app: ``python -m pruning.run [+budget=flops_490M] [+experiment=...] [overrides]``.

Stages and their files are in :mod:`pruning.pipeline`; configs in ``conf/``. The run directory is
``hydra.run.dir`` (deterministic, so a rerun resumes); under torchrun every rank runs this entry point.
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .distributed import init_distributed, is_main
from .loggers import NullLogger
from .pipeline import Run

log = logging.getLogger("pruning")

# errors caused by input: printed as one paragraph, exit code 2 (no traceback)
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ImportError)


def _run(cfg: DictConfig) -> dict:
    init_distributed()
    run_dir = HydraConfig.get().runtime.output_dir
    logger = instantiate(cfg.logger) if is_main() else NullLogger()
    run = Run(cfg, run_dir, logger)
    run.preflight()
    logger.start(run_dir, OmegaConf.to_container(cfg, resolve=True), name=run_dir)
    try:
        report = run.run()
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
    """Run the pipeline; input errors end with a one-paragraph message and exit code 2."""
    try:
        _run(cfg)
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
