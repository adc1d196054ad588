"""The pipeline: :func:`preflight` checks every input and builds the :class:`~pruning.stages.RunContext` once;
:func:`run_stages` runs the selected stages (:mod:`pruning.stages`: importance -> solve -> prune -> finetune ->
validate) on it, in order::

    ctx = preflight(cfg, run_dir, logger)   # seconds: every check that can fail on user input
    report = run_stages(ctx)                # the expensive work

Each stage takes the result of the stage before it in this process, or reads it from the run directory when
that stage ran in another invocation, and writes its own result there atomically; so any stage can run alone
(``stages=[solve]``) and a rerun of the same command resumes. Importance scores are cached across runs
(``paths.cache_dir``), keyed by everything they depend on, so a new budget reruns only the solve and later stages.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import Any

from distill.loss import loss_from_config
from distill.train import TrainConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import artifacts
from ._registry import import_plugins
from .budget import (Budget, check_feasible, cost_constraint, latency_constraint, params_constraint, parse_latency,
                     resolve_budget)
from .cost import COSTS, CostModel, create_cost
from .data import ImageListDataset, image_dataset, random_indices
from .distributed import default_device, describe, is_main, main_decides, main_first, world_size
from .errors import PipelineError
from .graph import ChannelGraph, build_channel_graph
from .importance import importance_from_config
from .models import check_model_name, check_weights, load_parent, weights_fingerprint
from .pools import TrainingPool, check_balance, readable_images, training_pool
from .search import removable_groups
from .solve import Constraint, check_solver
from .stages import (STAGES, RunContext, RunData, cached_scores, load_pruned_model, load_solution, read_cached_scores,
                     report, solver_options, stage_finetune, stage_importance, stage_prune, stage_solve, stage_validate)

__all__ = ["STAGES", "PipelineError", "RunContext", "budget_dir", "preflight", "run_stages"]

log = logging.getLogger("pruning")


def budget_dir(target: Any, latency: Any = None, batch: Any = 1, params: Any = None, limits: Any = None) -> str:
    """The run directory's budget part: ``0.5``, ``0.5-lat0.6b1``, ``none-lat8ms-b32``, ``0.5-params3M``, and
    ``-NAME<limit>`` for every ``budget.limits`` entry (``0.5-channels0.6``)."""
    parts = [str(target).lower() if target is not None else "none"]
    if latency is not None:
        parts.append(f"lat{latency}b{batch}")
    if params is not None:
        parts.append(f"params{params}")
    parts += [f"{name}{spec}" for name, spec in (limits or {}).items()]
    return "-".join(parts)


OmegaConf.register_new_resolver("budget_dir", budget_dir, replace=True)


# ------------------------------------------------------------------------------------------------- the driver
def run_stages(ctx: RunContext) -> dict:
    """Run the selected stages in pipeline order, each on the result of the one before it, or, when that one
    did not run in this process, on what an earlier run left in the run directory.

    Returns:
        The report (report.json) on rank 0; an empty dict on the other ranks.
    """
    scores = solution = pruned = None
    for stage in (s for s in STAGES if s in ctx.stages):
        start = time.time()
        if stage == "importance":
            scores = stage_importance(ctx)
        elif stage == "solve":
            solution = stage_solve(ctx, scores if scores is not None else cached_scores(ctx))
        elif stage == "prune":
            pruned = stage_prune(ctx, solution if solution is not None else load_solution(ctx, scores))
        elif stage == "finetune":
            pruned = stage_finetune(ctx, pruned if pruned is not None else load_pruned_model(ctx))
        else:
            stage_validate(ctx, (pruned if pruned is not None else load_pruned_model(ctx)).model)
        report(ctx, "timings", {stage: round(time.time() - start, 3)})
    report(ctx, "run", {"stages": list(ctx.stages), "distributed": describe(),
                        "config": OmegaConf.to_container(ctx.cfg, resolve=True)})
    return artifacts.read_json(os.path.join(ctx.run_dir, artifacts.REPORT)) if is_main() else {}


# -------------------------------------------------------------------------------------------------- preflight
def preflight(cfg: DictConfig, run_dir: str, logger: Any) -> RunContext:
    """Every user-input check, in seconds, before any expensive work; then what every stage reads.

    In order: plugins, stages, names, weights, budget, the parent and its budget, cached scores, the data
    (when a selected stage reads images) and last the latency budget (which measures its table once, then
    reads it from the cache).

    Args:
        cfg: the composed Hydra config (``conf/config.yaml``).
        run_dir: the run directory.
        logger: the experiment logger (:mod:`pruning.loggers`).

    Raises:
        UserInputError: bad input, with a message naming the value and the fix.
    """
    import_plugins(cfg.get("plugins"))  # what they register is selected by name below
    stages = _check_stages(cfg)
    check_model_name(cfg.model.name)
    check_solver(cfg.solver.name, **solver_options(cfg))  # unknown names and options fail here
    criterion, loss = importance_from_config(cfg.importance), loss_from_config(cfg.distill)
    train_cfg = _train_config(cfg)
    check_weights(cfg.model.name, cfg.model.pretrained, cfg.model.checkpoint)
    _check_budget_specs(cfg)
    parent, graph = _load_parent(cfg)
    cost = CostModel(graph, parent)
    removable = removable_groups(parent, graph) if cfg.solver.allow_block_removal else ()
    budget = None if cfg.budget.target is None else resolve_budget(cfg.budget.target, cost.macs())
    constraints = _constraints(cfg, budget, parent, graph, cost, removable)
    ctx = RunContext(cfg, run_dir, logger, stages, criterion, loss, train_cfg, parent, graph, cost, budget,
                     constraints, removable, weights=weights_fingerprint(parent))
    # a corrupt cache is said here and recomputed later; rank 0 decides, so every rank takes the same stages
    ctx = replace(ctx, cached_scores=main_decides(lambda: read_cached_scores(ctx)))
    if _needs_data(ctx):
        ctx = replace(ctx, data=_check_data(ctx))
    return _with_latency_budget(ctx)  # last: a latency budget measures its table (once, then cached)


def _check_stages(cfg: DictConfig) -> tuple[str, ...]:
    stages = tuple(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stages {unknown}; stages is a list drawn from {list(STAGES)}")
    return stages


def _train_config(cfg: DictConfig) -> TrainConfig:
    train_cfg = TrainConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    train_cfg.check()
    return train_cfg


def _needs_data(ctx: RunContext) -> bool:
    """Whether a selected stage reads images: scoring with a data-driven criterion, recalibration, fine-tuning
    or validation."""
    needs_scores = "importance" in ctx.stages and ctx.criterion.needs_data and ctx.cached_scores is None
    recalibrate = "prune" in ctx.stages and ctx.cfg.bn_recalibration.num_images > 0
    return needs_scores or recalibrate or "finetune" in ctx.stages or "validate" in ctx.stages


def _load_parent(cfg: DictConfig) -> tuple[nn.Module, ChannelGraph]:
    """The unpruned model (on the run's device, eval mode) and its channel graph at the run's input size."""
    m = cfg.model
    parent = load_parent(m.name, m.pretrained, m.checkpoint, cfg.seed).to(default_device()).eval()
    protected = None if m.protected is None else list(m.protected)
    return parent, build_channel_graph(parent, m.img_size, protected)


# ----------------------------------------------------------------------------------------------------- budget
def _check_budget_specs(cfg: DictConfig) -> None:
    """Malformed budgets and latency settings fail here, before the parent is even loaded."""
    b = cfg.budget
    if b.target is None and b.latency is None and b.params is None and not b.limits:
        raise PipelineError("no budget: set budget.target (MACs), budget.latency, budget.params or "
                            "+budget.limits.NAME (any combination)")
    for name in b.limits or {}:
        COSTS.get(name)  # an unknown cost fails here, listing the registered ones
    if b.latency is not None:
        from .latency import check_settings

        parse_latency(b.latency, 1.0)
        lat = cfg.latency
        check_settings(batch=b.latency_batch, threads=lat.threads, device=lat.device, backend=lat.backend)


def _constraints(cfg: DictConfig, budget: Budget | None, parent: nn.Module, graph: ChannelGraph, cost: CostModel,
                 removable: tuple) -> tuple[Constraint, ...]:
    """The MACs, params and ``budget.limits`` limits, checked against the parent (latency ones need the
    measured table: :func:`_with_latency_budget`)."""
    b = cfg.budget
    constraints = []
    if budget is not None:
        constraints.append(Constraint(cost.macs_cost, budget.macs, budget.spec))
    if b.params is not None:
        constraints.append(params_constraint(b.params, cost.params_cost))
    for name, spec in (b.limits or {}).items():  # any registered cost (pruning.cost.register_cost)
        constraints.append(cost_constraint(spec, create_cost(name, graph, parent)))
    check_feasible(constraints, graph.prunable_groups(), b.round_to, b.min_keep_fraction, removable)
    return tuple(constraints)


def _with_latency_budget(ctx: RunContext) -> RunContext:
    """``ctx`` with the latency budget added, measuring this device's latency table on first use."""
    b = ctx.cfg.budget
    if b.latency is None:
        return ctx
    table = _latency_table(ctx)
    limit = latency_constraint(b.latency, table.cost(ctx.graph), table.parent_ms)
    constraints = (*ctx.constraints, limit)  # widths then keep the table's channel multiple (solve.width_multiple)
    check_feasible(constraints, ctx.graph.prunable_groups(), b.round_to, b.min_keep_fraction, ctx.removable)
    return replace(ctx, latency_table=table, constraints=constraints)


def _latency_table(ctx: RunContext):
    """The parent's latency table for this device and settings (``python -m pruning.profile`` builds the same)."""
    from .latency import load_or_profile

    lat, b, parent = ctx.cfg.latency, ctx.cfg.budget, ctx.parent
    settings = dict(batch=b.latency_batch, threads=lat.threads, device=lat.device, backend=lat.backend)
    cache = os.path.join(ctx.cfg.paths.cache_dir, "latency")
    on_device = parent.to("cpu") if lat.device == "cpu" else parent
    table = main_first(lambda progress: load_or_profile(on_device, ctx.graph, ctx.cfg.model.name, cache,
                                                        progress=progress, **settings))
    parent.to(default_device())
    return table


# ------------------------------------------------------------------------------------------------------- data
def _check_data(ctx: RunContext) -> RunData:
    """The training pool and validation set, checked: folders, balance, label weight, one batch per process."""
    d = ctx.cfg.data
    if d.root is None and not d.train_roots:
        raise PipelineError(
            "no data: data.root and data.train_roots are not set. Give data.root=/path/to/imagenet (class "
            "folders named by synset under train/ and val/, or a folder with labels.csv), set the IMAGENET_ROOT "
            "environment variable, or give data.train_roots=[folder,...] and data.val_root=folder"
        )
    check_balance(d.balance)  # before the pool is scanned
    pool, val_set, unreadable_val = _datasets(ctx.cfg)
    _resolve_ce_weight(ctx, pool)
    _check_batch_size(ctx, len(pool.dataset))
    summary = _data_summary(ctx, pool, val_set, unreadable_val)
    report(ctx, "data", summary)
    if is_main():
        _log_data(summary, len(pool.roots))
    return RunData(pool, val_set, _val_dir(ctx.cfg), summary)


def _log_data(summary: dict, folders: int) -> None:
    """What the run trains and validates on, and one warning per image set with images that cannot be decoded."""
    pool, val = summary["pool"], summary["val"]
    log.info("training pool: %d images from %d folders (%d labelled, %d classes), %d copies of validation "
             "images excluded; validation: %d images, %d classes", pool["images"], folders, pool["labelled"],
             pool["classes"], pool["excluded_val_copies"], val["images"], val["classes"])
    for what, images in (("training pool", pool), ("validation set", val)):
        if images["unreadable_images"]:
            log.warning("%d images of the %s cannot be decoded and are left out, e.g. %s (report.json data section "
                        "lists up to 20); remove or replace them", images["unreadable_images"], what,
                        images["unreadable"][:3])


def _check_batch_size(ctx: RunContext, images: int) -> None:
    """Fine-tuning needs one full batch per process: fail here, not after the prune stage."""
    batch, world = ctx.train_cfg.batch_size, world_size()
    if "finetune" not in ctx.stages or images // world >= batch:
        return
    per = f" on each of {world} processes" if world > 1 else ""
    fix = (f"lower trainer.batch_size to at most {images // world}" if images >= world else "add images")
    raise PipelineError(
        f"the training pool has {images} images, fewer than one batch of trainer.batch_size={batch}{per}, so "
        f"fine-tuning could not take a single step; {fix}, or add images (data.root / data.train_roots)")


def _resolve_ce_weight(ctx: RunContext, pool: TrainingPool) -> None:
    """``distill.ce_weight: null`` becomes 1 on an ImageNet-like pool, else 0 (teacher only)."""
    labels, loss = pool.labels(), ctx.loss
    loss.fit_to_labels(labels)
    if loss.label_weight and "finetune" in ctx.stages and not any(label >= 0 for label in labels):
        raise PipelineError(
            f"distill={loss.name} weighs cross-entropy {loss.label_weight} and needs labelled training "
            "images, but every image of the pool is labelled -1; use distill=inner or distill=kd with "
            "distill.ce_weight=0, or add labelled folders to data.train_roots")


def _datasets(cfg: DictConfig) -> tuple[TrainingPool, ImageListDataset, list[str]]:
    """The training pool (less every copy of a validation image), the validation set, and the validation images
    dropped because they cannot be decoded."""
    d = cfg.data
    roots = list(d.train_roots) if d.train_roots else [_train_dir(cfg)]
    val, cache = _val_dir(cfg), cfg.paths.cache_dir
    full_val = image_dataset(val) if val is not None else None
    val_set, unreadable = full_val, []
    if full_val is not None:  # undecodable images are dropped here, before any work, and counted in the report
        val_set, unreadable = main_first(lambda progress: readable_images(full_val, cache, progress))
    # copies are looked for among every val image: the thumbnails just cached (an unreadable one matches nothing)
    pool = main_first(lambda progress: training_pool(roots, full_val, cache, progress, scan=True))
    if val_set is None:
        pool, val_set = _hold_out(pool, d.holdout_fraction, cfg.seed)
    return pool, val_set, unreadable


def _train_dir(cfg: DictConfig) -> str:
    split = os.path.join(cfg.data.root, cfg.data.train_split)
    return split if os.path.isdir(split) else cfg.data.root


def _val_dir(cfg: DictConfig) -> str | None:
    """``data.val_root``, else ``data.root``'s val split; None: hold out part of the pool."""
    d = cfg.data
    if d.val_root:
        return d.val_root
    split = os.path.join(d.root, d.val_split) if d.root else None
    return split if split and os.path.isdir(split) and split != _train_dir(cfg) else None


def _data_summary(ctx: RunContext, pool: TrainingPool, val_set: ImageListDataset, unreadable_val: list[str]) -> dict:
    val_labels = {label for _, label in val_set.samples}
    return {"pool": pool.summary(), "balance": ctx.cfg.data.balance,
            "val": {"root": _val_dir(ctx.cfg) or "held out of the pool", "images": len(val_set),
                    "classes": len(val_labels), "unreadable_images": len(unreadable_val),
                    "unreadable": unreadable_val[:20]},
            "ce_weight": ctx.loss.label_weight}


def _hold_out(pool: TrainingPool, fraction: float, seed: int) -> tuple[TrainingPool, ImageListDataset]:
    """Split off a deterministic ``fraction`` of the labelled images for validation only."""
    if not 0 < fraction < 1:
        raise PipelineError(f"data.holdout_fraction={fraction} must be in (0, 1) when there is no validation folder")
    labelled = [i for i, label in enumerate(pool.labels()) if label >= 0]
    if not labelled:
        raise PipelineError("no validation folder and no labelled image to hold out of the pool (all are labelled -1); "
                            "give data.val_root=/path/to/labelled/images")
    val = {labelled[i] for i in random_indices(len(labelled), max(1, int(len(labelled) * fraction)), seed)}
    train = [i for i in range(len(pool.sources)) if i not in val]
    samples = pool.dataset.samples
    kept = TrainingPool(ImageListDataset([samples[i] for i in train]), [pool.sources[i] for i in train], pool.roots,
                        pool.excluded, pool.unreadable)
    return kept, ImageListDataset([samples[i] for i in sorted(val)])
