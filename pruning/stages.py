"""The pipeline's stages, one function each: importance -> solve -> prune -> finetune -> validate.

Every stage reads the :class:`RunContext` that :func:`pruning.pipeline.preflight` built once (the config, the
run directory, the parent, its channel graph, the budget, the data) and the result of the stage before it,
and returns its own result; it writes that result to the run directory atomically::

    stage_importance(ctx)               -> scores        cache: paths.cache_dir/scores/<model>-<key>.pt
    stage_solve(ctx, scores)            -> Solution      solution.json
    stage_prune(ctx, solution)          -> PrunedModel   pruned_checkpoint.pth, pruned_spec.txt + pruned.pth, .onnx
    stage_finetune(ctx, pruned)         -> PrunedModel   finetune/last.pth, then the same files, fine-tuned
    stage_validate(ctx, pruned.model)   -> metrics       report.json's validate section

When the stage before ran in another invocation, :func:`pruning.pipeline.run_stages` reads its result from
the run directory instead (:func:`cached_scores`, :func:`load_solution`, :func:`load_pruned_model`): that is how
``stages=[validate]`` alone, ``stages=[finetune,validate]`` on a model pruned elsewhere, and a rerun of the same
command (which resumes) work. Every stage adds its section to ``report.json``. No stage changes the context
or its datasets: transforms are bound when a loader is built, on a view of the images.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from distill.loss import DistillLoss
from distill.train import TrainConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from . import artifacts, search
from ._io import short_hash
from .budget import Budget, is_time, parse_latency
from .cost import CostModel
from .data import ImageListDataset, eval_loader, eval_transform
from .distributed import barrier, default_device, is_main
from .errors import PipelineError
from .graph import ChannelGraph
from .importance import Importance, Scores, ScoresFileError, load_scores, save_scores
from .paper import PAPER_CONFIGS, paper_widths
from .plots import plot_kept_fractions, plot_learning_curve
from .pools import TrainingPool, sampling_weights
from .prune import prune_model
from .recalibrate import recalibrate_bn
from .solve import GAP_TOL, TIME_LIMIT, Constraint, Solution

if TYPE_CHECKING:  # the latency package imports profiling tools: only runs with a latency budget load it
    from .latency import LatencyTable

log = logging.getLogger("pruning")

STAGES = ("importance", "solve", "prune", "finetune", "validate")


@dataclass(frozen=True)
class RunData:
    """The run's images, as preflight found and checked them; never changed by a stage (no transform bound).

    Attributes:
        pool: the training pool (importance, BN recalibration, fine-tuning), less every copy of a validation image.
        val_set: the validation images (``data.val_root``, ``data.root``'s val split, or held out of the pool).
        val_root: the validation folder; None when the images are held out of the pool.
        summary: report.json's ``data`` section (folders, images, classes, excluded copies, unreadable images).
    """

    pool: TrainingPool
    val_set: ImageListDataset
    val_root: str | None
    summary: dict


@dataclass(frozen=True)
class RunContext:
    """What every stage reads, built once by :func:`pruning.pipeline.preflight` after every input check.

    Attributes:
        cfg: the composed Hydra config.
        run_dir: the run directory (every stage's files, report.json).
        logger: the experiment logger (:mod:`pruning.loggers`).
        stages: the stages asked for, as given (they run in :data:`STAGES` order).
        criterion: the importance criterion; loss: the distillation loss (its label weight fitted to the pool);
        train_cfg: the fine-tuning settings.
        parent: the unpruned model (on the run's device, eval mode); graph: its channel groups at the run's size;
        cost: MACs and params of any widths.
        budget: the MACs budget (None without ``budget.target``); constraints: every limit the knapsack meets
            (MACs, params, ``budget.limits``, latency), in that order; removable: inner groups of the blocks that
            may be removed whole.
        latency_table: this device's latency table with a latency budget, else None.
        weights: a fingerprint of the parent's weights (:func:`pruning.models.weights_fingerprint`), part of the
            keys of the score and teacher caches.
        cached_scores: the importance scores an earlier run cached for this configuration, None if none (or corrupt).
        data: the images; None when no selected stage reads any.
    """

    cfg: DictConfig
    run_dir: str
    logger: Any
    stages: tuple[str, ...]
    criterion: Importance
    loss: DistillLoss
    train_cfg: TrainConfig
    parent: nn.Module
    graph: ChannelGraph
    cost: CostModel
    budget: Budget | None
    constraints: tuple[Constraint, ...]
    removable: tuple[tuple[str, ...], ...]
    weights: str = ""
    latency_table: LatencyTable | None = None
    cached_scores: Scores | None = None
    data: RunData | None = None


@dataclass(frozen=True)
class PrunedModel:
    """A pruned student and what its checkpoint records.

    Attributes:
        model: the physically smaller network.
        keep: the parent's channels it kept, per group.
        protected: the protected-layer patterns its graph was built with (None: the model's defaults).
        bn_recalibrated: images its BN statistics were re-estimated on after pruning; None for a model pruned
            elsewhere (``save_pruned`` alone), which fine-tuning recalibrates first.
    """

    model: nn.Module
    keep: dict[str, list[int]]
    protected: tuple[str, ...] | list[str] | None
    bn_recalibrated: int | None


def report(ctx: RunContext, section: str, values: dict) -> None:
    """Merge ``values`` into ``section`` of the run's report.json (rank 0 writes)."""
    if is_main():
        artifacts.update_report(ctx.run_dir, section, values)


# ------------------------------------------------------------------------------------------------ importance
def stage_importance(ctx: RunContext) -> Scores:
    """Per-channel scores of every prunable group: the cached ones when preflight found them, else computed
    (on the pool's images for data-driven criteria) and cached for every later run of this configuration."""
    scores = ctx.cached_scores
    if scores is None:
        batches = _pool_batches(ctx, ctx.cfg.importance.batch_size) if ctx.criterion.needs_data else None
        scores = ctx.criterion(ctx.parent, ctx.graph, batches)  # the criteria sum over processes
        if is_main():
            save_scores(scores_path(ctx), scores, {"key": scores_key(ctx), "criterion": ctx.cfg.importance.name})
        barrier()
    settings = OmegaConf.to_container(ctx.cfg.importance, resolve=True)
    report(ctx, "importance", {"criterion": settings.pop("name"), "scores": scores_path(ctx), **settings})
    return scores


def scores_key(ctx: RunContext) -> str:
    """What the scores depend on: the model, its weights (their fingerprint, not the config that loaded them) and
    size, the criterion and, if it reads data, the pool."""
    m, imp, d = ctx.cfg.model, ctx.cfg.importance, ctx.cfg.data
    roots = list(d.train_roots) if d.train_roots else None  # the folders decide the pool (less the val copies)
    data = [d.root, d.train_split, roots, d.val_root, d.holdout_fraction] if ctx.criterion.needs_data else None
    return short_hash([m.name, m.img_size, ctx.weights, m.protected, OmegaConf.to_container(imp, resolve=True), data])


def scores_path(ctx: RunContext) -> str:
    """The score cache's file for this configuration."""
    return os.path.join(ctx.cfg.paths.cache_dir, "scores", f"{ctx.cfg.model.name}-{scores_key(ctx)}.pt")


def read_cached_scores(ctx: RunContext) -> Scores | None:
    """This configuration's cached scores; None when there are none or the file is corrupt or truncated (a
    warning says so, and the importance stage recomputes and rewrites them). Preflight reads them once."""
    path = scores_path(ctx)
    if not os.path.isfile(path):
        return None
    try:
        return load_scores(path, ctx.graph, {"key": scores_key(ctx)})
    except ScoresFileError as e:
        log.warning("%s: the importance stage computes them again", e.problem)
        return None


def cached_scores(ctx: RunContext) -> Scores:
    """The scores an earlier run cached (the solve stage's input when the importance stage does not run)."""
    if ctx.cached_scores is None:
        raise PipelineError("no usable importance scores for this configuration: add the importance stage "
                            f"(stages=[importance,solve,...]); looked for {scores_path(ctx)}")
    return ctx.cached_scores


# ----------------------------------------------------------------------------------------------------- solve
def stage_solve(ctx: RunContext, scores: Scores) -> Solution:
    """Kept widths and channels under every budget (the knapsack, :func:`pruning.search.choose_channels`);
    writes solution.json. A latency budget checked by measurement keeps the solution an earlier run of this
    very problem measured, so a resumed run keeps its architecture."""
    if ctx.latency_table is not None and ctx.cfg.latency.verify_iterations > 0:
        solution = _measured_solution(ctx, scores)
    else:
        solution = _choose_channels(ctx, scores)[0]
        if is_main():
            artifacts.write_json(_solution_path(ctx), solution.to_dict())
    b, s = ctx.cfg.budget, ctx.cfg.solver
    report(ctx, "budget", _budget_summary(ctx))
    report(ctx, "solve", {k: v for k, v in asdict(solution).items() if k not in ("keep", "widths")}
           | {"round_to_asked": b.round_to, "min_keep_fraction": b.min_keep_fraction,
              "allow_block_removal": s.allow_block_removal, "removable_blocks": len(ctx.removable)})
    return solution


def solver_options(cfg: DictConfig) -> dict[str, Any]:
    """The solver's arguments: every key of its YAML but ``name`` and ``allow_block_removal`` (the problem's)."""
    options = OmegaConf.to_container(cfg.solver, resolve=True)
    return {k: v for k, v in options.items() if k not in ("name", "allow_block_removal")}


def _choose_channels(ctx: RunContext, scores: Scores,
                     measured: search.MeasuredLimit | None = None) -> tuple[Solution, list[dict]]:
    """The search of :func:`pruning.search.search` on the run's problem, without building the model."""
    b, options = ctx.cfg.budget, solver_options(ctx.cfg)
    time_limit, gap_tol = options.pop("time_limit", TIME_LIMIT), options.pop("gap_tol", GAP_TOL)
    return search.choose_channels(ctx.graph, scores, ctx.constraints, ctx.cfg.solver.name, b.round_to,
                                  b.min_keep_fraction, ctx.removable, time_limit, gap_tol, options, measured)


def _measured_solution(ctx: RunContext, scores: Scores) -> Solution:
    """The knapsack re-solved while the chosen model measures over the latency budget; rank 0 measures and
    writes solution.json with the problem's key, the other ranks read it."""
    key = _problem_key(ctx)
    solution = _read_solution(ctx, key) if os.path.isfile(_solution_path(ctx)) else None
    if solution is None and is_main():
        lat = ctx.cfg.latency
        allowed = parse_latency(ctx.cfg.budget.latency, 1.0)  # a time in ms, or the fraction itself (parent: 1)
        measured = search.MeasuredLimit(partial(_measured_latency, ctx), allowed, iterations=lat.verify_iterations)
        solution, history = _choose_channels(ctx, scores, measured)
        artifacts.write_json(_solution_path(ctx), solution.to_dict() | {"problem_key": key})
        report(ctx, "latency_verification", {"rounds": lat.rounds, "steps": history,
                                             "unit": "ms" if is_time(ctx.cfg.budget.latency) else "ratio to parent"})
    barrier()  # one rank measures; the others read its solution
    return solution or load_solution(ctx, scores)


def _problem_key(ctx: RunContext) -> str:
    """What a measured solution depends on: the limits, widths rules, solver, scores, table and latency settings."""
    b = ctx.cfg.budget
    limits = [(c.name, c.spec, c.limit) for c in ctx.constraints]
    # round_to and min_keep_fraction were solver fields once: hashed with them still, so the key stays the same
    # and a run whose measured solution was saved then still finds it
    solver = OmegaConf.to_container(ctx.cfg.solver) | {"round_to": b.round_to, "min_keep_fraction": b.min_keep_fraction}
    return short_hash([limits, b.round_to, b.min_keep_fraction, ctx.removable, solver, scores_key(ctx),
                       ctx.latency_table.meta, OmegaConf.to_container(ctx.cfg.latency)])


def _measured_latency(ctx: RunContext, solution: Solution) -> float:
    """The pruned model's latency measured against the parent's, interleaved: ms, or a ratio to the parent."""
    ms = measure_against_parent(ctx, prune_model(ctx.parent, ctx.graph, solution.keep))
    return ms["pruned"] if is_time(ctx.cfg.budget.latency) else ms["pruned"] / ms["parent"]


def measure_against_parent(ctx: RunContext, pruned: nn.Module) -> dict[str, float]:
    """ms per forward pass of the parent and ``pruned`` on the latency device, in interleaved rounds."""
    from .latency import measure_latency

    lat = ctx.cfg.latency
    models = {"parent": ctx.parent.to(lat.device), "pruned": pruned.to(lat.device)}
    ms = measure_latency(models, ctx.cfg.model.img_size, batch=ctx.cfg.budget.latency_batch,
                         threads=lat.threads, device=lat.device, backend=lat.backend, rounds=lat.rounds)
    for m in models.values():
        m.to(default_device())
    return ms


def _budget_summary(ctx: RunContext) -> dict:
    summary = {"name": ctx.cfg.budget.name, "constraints": [
        {"cost": c.name, "spec": c.spec, "limit": c.limit, "unit": c.cost.unit, "parent": c.cost(),
         "fraction_of_parent": c.limit / c.cost()} for c in ctx.constraints]}
    if ctx.budget is not None:
        summary |= {"spec": ctx.budget.spec, "target_macs": ctx.budget.macs, "fraction_of_parent": ctx.budget.fraction}
    return summary


def _solution_path(ctx: RunContext) -> str:
    return os.path.join(ctx.run_dir, artifacts.SOLUTION)


def _read_solution(ctx: RunContext, problem_key: str | None = None) -> Solution | None:
    """solution.json of the run directory; None when it is corrupt or truncated (a warning says so), or, with
    ``problem_key``, when it was solved for another problem."""
    path = _solution_path(ctx)
    try:
        saved = artifacts.read_json(path)
        solution = Solution.from_dict(saved)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s is corrupt or truncated (%s: %s); solving again", path, type(e).__name__, e)
        return None
    return solution if problem_key is None or saved.get("problem_key") == problem_key else None


def load_solution(ctx: RunContext, scores: Scores | None = None) -> Solution:
    """The solve stage's result from the run directory (the prune stage's input when the solve stage does not
    run); solved again, on ``scores`` or else the cached ones, when the file is corrupt."""
    if not os.path.isfile(_solution_path(ctx)):
        raise PipelineError(f"no solution in {ctx.run_dir}: add the solve stage (stages=[importance,solve,prune])")
    solution = _read_solution(ctx)
    if solution is None:  # rewrites solution.json
        solution = stage_solve(ctx, scores if scores is not None else cached_scores(ctx))
    return solution


# ----------------------------------------------------------------------------------------------------- prune
def stage_prune(ctx: RunContext, solution: Solution) -> PrunedModel:
    """The physically smaller model, its BN statistics re-estimated (``bn_recalibration.num_images``), saved in
    timm format and as this framework's checkpoint (pruned_checkpoint.pth, pruned.onnx, kept_fractions.png)."""
    model = prune_model(ctx.parent, ctx.graph, solution.keep).eval()
    images = recalibrate(ctx, model) if ctx.cfg.bn_recalibration.num_images > 0 else 0
    pruned = PrunedModel(model, solution.keep, ctx.graph.protected_patterns, images)
    widths = {**ctx.graph.full_widths(), **solution.widths}
    if is_main():
        files, skipped = _save(ctx, pruned, "pruned")
        files.append(_plot_widths(ctx, widths))
        ctx.logger.log_files(files)
        report(ctx, "artifacts", {"files": [os.path.basename(f) for f in files], "timm_spec_skipped": skipped})
    report(ctx, "model", _model_summary(ctx, widths))
    if ctx.latency_table is not None:
        report(ctx, "latency", _latency_summary(ctx, model, widths))
    return pruned


def recalibrate(ctx: RunContext, model: nn.Module) -> int:
    """Re-estimate ``model``'s BN statistics on ``bn_recalibration.num_images`` pool images; the images used."""
    r = ctx.cfg.bn_recalibration
    batches = _pool_batches(ctx, r.batch_size)  # each rank its share; DDP syncs rank 0's
    used = recalibrate_bn(model, batches, r.num_images, progress=is_main())
    report(ctx, "bn_recalibration", {"images": used})
    return used


def _save(ctx: RunContext, pruned: PrunedModel, stage: str) -> tuple[list[str], str | None]:
    """The model's files in the run directory (:func:`pruning.artifacts.save_pruned`), as ``stage``."""
    return artifacts.save_pruned(pruned.model, ctx.run_dir, ctx.cfg.model.name, ctx.cfg.model.img_size, pruned.keep,
                                 stage, pruned.protected, pruned.bn_recalibrated)


def _model_summary(ctx: RunContext, widths: dict[str, int]) -> dict:
    cost, m = ctx.cost, ctx.cfg.model
    summary = {"name": m.name, "img_size": m.img_size,
               "weights": m.checkpoint or ("timm" if m.pretrained else "random init"),
               "macs_before": cost.macs(), "params_before": cost.params(),
               "macs_after": cost.macs(widths), "params_after": cost.params(widths),
               "achieved_over_target": cost.macs(widths) / ctx.budget.macs if ctx.budget else None,
               "removed_blocks": [list(b) for b in ctx.removable if all(widths[g] == 0 for g in b)],
               "widths_before": ctx.graph.full_widths(), "widths_after": widths,
               "kept_fraction_by_stage": search.kept_fraction_by_stage(ctx.graph, widths)}
    published = _published(ctx)
    if published is not None:
        name, theirs = published
        summary["published"] = {"model": name, "widths": theirs, "macs": cost.macs(theirs),
                                "params": cost.params(theirs)}
    return summary


def _published(ctx: RunContext) -> tuple[str, dict[str, int]] | None:
    """timm's published pruned model of this budget and its widths, when the run prunes its base model at its
    resolution. The budget is ``budget.name`` (``+budget=flops_490M``), else ``budget.target`` when that names a
    paper budget (``budget.target=flops_490M``): both spellings compare with the published model."""
    b, m = ctx.cfg.budget, ctx.cfg.model
    cfg = PAPER_CONFIGS.get(b.name or "") or (PAPER_CONFIGS.get(b.target) if isinstance(b.target, str) else None)
    if cfg is None or (cfg.base_model, cfg.img_size) != (m.name, m.img_size):
        return None
    return cfg.timm_pruned, paper_widths(cfg.budget, ctx.graph)


def _plot_widths(ctx: RunContext, widths: dict[str, int]) -> str:
    series = {"ours": widths}
    published = _published(ctx)
    if published is not None:
        name, theirs = published
        series[name] = theirs
    limits = ", ".join(f"{c.name} {c.spec}" for c in ctx.constraints)
    title = f"{ctx.cfg.model.name}@{ctx.cfg.model.img_size}, budget {limits}"
    return plot_kept_fractions(ctx.graph, series, os.path.join(ctx.run_dir, "kept_fractions.png"), title)


def _latency_summary(ctx: RunContext, model: nn.Module, widths: dict[str, int]) -> dict:
    """Predicted (the table) and measured (interleaved with the parent) latency, parent and pruned."""
    lat, b, table = ctx.cfg.latency, ctx.cfg.budget, ctx.latency_table
    cost, measured = table.cost(ctx.graph), measure_against_parent(ctx, model)
    return {"batch": b.latency_batch, "threads": lat.threads or torch.get_num_threads(), "device": lat.device,
            "backend": lat.backend, "rounds": lat.rounds, "unit": "ms",
            "predicted_parent": cost(), "predicted_pruned": cost(widths),
            "measured_parent": measured["parent"], "measured_pruned": measured["pruned"],
            "measured_ratio": measured["pruned"] / measured["parent"],
            "table": {k: v for k, v in table.meta.items() if k != "groups"} | {
                "path": getattr(table, "path", None), "align": table.align}}


def load_pruned_model(ctx: RunContext) -> PrunedModel:
    """The pruned (or fine-tuned) model of the run directory's checkpoint (the input of fine-tuning and validation
    when the prune stage does not run). Any pruned model of this parent loads: its kept channels come with it."""
    path = os.path.join(ctx.run_dir, artifacts.CHECKPOINT)
    if not os.path.isfile(path):
        raise PipelineError(f"no pruned model in {ctx.run_dir}: add the prune stage (stages=[...,prune,...])")
    model, meta = artifacts.load_pruned(path, ctx.parent, ctx.cfg.model.name)
    # a checkpoint saved by the prune stage records its recalibration; one pruned elsewhere does not (None)
    images = meta.get("bn_recalibrated_images", None if meta["stage"] == "pruned" else 0)
    return PrunedModel(model.to(default_device()), meta["keep"], meta.get("protected"), images)


# -------------------------------------------------------------------------------------------------- finetune
def stage_finetune(ctx: RunContext, pruned: PrunedModel) -> PrunedModel:
    """Inner-distillation fine-tuning under the frozen parent (finetune/, resumed from its last checkpoint); the
    fine-tuned model replaces the pruned one's files."""
    from distill import finetune

    pruned = _recalibrated(ctx, pruned)
    pool = ctx.data.pool  # no transform: the trainer binds timm's training one to its own view
    result = finetune(pruned.model, ctx.parent if ctx.loss.needs_teacher else None, pool.dataset, ctx.loss,
                      ctx.train_cfg, os.path.join(ctx.run_dir, "finetune"), logger=ctx.logger, progress=is_main(),
                      val_set=_eval_view(ctx, ctx.data.val_set) if ctx.train_cfg.val_every_steps else None,
                      sample_weights=sampling_weights(pool, ctx.cfg.data.balance))
    tuned = replace(pruned, model=result.student.eval())
    if is_main():
        _save(ctx, tuned, "finetuned")  # as after pruning
    curve = [[h["step"], h["val/top1"]] for h in result.history if "val/top1" in h]
    report(ctx, "finetune", {"steps": result.steps, "method": ctx.loss.name, "resumed_from": result.resumed_from,
                             "val_curve": curve, "last": result.history[-1] if result.history else None})
    return tuned


def _recalibrated(ctx: RunContext, pruned: PrunedModel) -> PrunedModel:
    """``pruned``, its BN statistics re-estimated first when it was pruned elsewhere (another tool, ``save_pruned``
    without the prune stage): they are the parent's, and inner distillation fits its projections to eval-mode
    features."""
    if pruned.bn_recalibrated is not None or ctx.cfg.bn_recalibration.num_images <= 0:
        return pruned
    log.info("%s was saved without BN recalibration: recalibrating it as the prune stage does", artifacts.CHECKPOINT)
    return replace(pruned, bn_recalibrated=recalibrate(ctx, pruned.model))


# -------------------------------------------------------------------------------------------------- validate
def stage_validate(ctx: RunContext, model: nn.Module) -> dict:
    """Top-1/top-5 and images/s of ``model`` and of the parent (cached across runs) on the validation images."""
    from distill import validate_pair
    from distill.evaluate import validation_warnings

    m, val_set = ctx.cfg.model, ctx.data.val_set
    key = short_hash([m.name, ctx.weights, m.img_size, [s for s, _ in val_set.samples][:3], len(val_set)])
    teacher_cache = os.path.join(ctx.cfg.paths.cache_dir, "teacher")  # shared by every run of a sweep
    metrics = validate_pair(model, ctx.parent, _eval_view(ctx, val_set), teacher_cache, key,
                            batch_size=ctx.cfg.data.val_batch_size, workers=ctx.cfg.data.workers)
    val = ctx.data.summary["val"]
    warnings = validation_warnings(val["classes"], metrics["student"]["top1"], metrics["teacher"]["top1"])
    for w in warnings:
        log.warning(w)
    report(ctx, "validate", metrics | {"dataset": val, "warnings": warnings})
    ctx.logger.summary({f"val/{k}": v for k, v in _flatten(metrics).items()})
    _plot_learning_curve(ctx, metrics["teacher"]["top1"])
    return metrics


def _plot_learning_curve(ctx: RunContext, teacher_top1: float) -> None:
    """``learning_curve.png`` from the fine-tuning's validations (``trainer.val_every_steps``), if any."""
    path = os.path.join(ctx.run_dir, artifacts.REPORT)
    if not is_main() or not os.path.isfile(path):
        return
    curve = (artifacts.read_json(path).get("finetune") or {}).get("val_curve")
    if curve:
        title = f"{ctx.cfg.model.name}@{ctx.cfg.model.img_size} on {os.path.basename(str(ctx.data.val_root))}"
        png = os.path.join(ctx.run_dir, "learning_curve.png")
        ctx.logger.log_files([plot_learning_curve(curve, teacher_top1, png, title)])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------------------ data
def _eval_view(ctx: RunContext, dataset: ImageListDataset) -> ImageListDataset:
    """``dataset``'s images under the parent's evaluation transform (no augmentation) at the run's size: a new
    view, ``dataset`` itself unchanged."""
    return dataset.with_transform(eval_transform(ctx.parent, ctx.cfg.model.img_size))


def _pool_batches(ctx: RunContext, batch_size: int) -> DataLoader:
    """This rank's share of the pool under the evaluation transform, in a seeded random order: the first
    images are a sample of all classes, not the first classes (importance, BN recalibration)."""
    return eval_loader(_eval_view(ctx, ctx.data.pool.dataset), batch_size, ctx.cfg.data.workers,
                       shuffle_seed=ctx.cfg.seed, shard=True)
