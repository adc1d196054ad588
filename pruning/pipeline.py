"""The pipeline, one method per stage: importance -> solve -> prune -> finetune -> validate.

Each stage reads what it needs from the run directory when an earlier stage ran in another invocation, and
writes its results there atomically, so any stage can run alone (``stages=[solve]``) and a rerun of the
same command resumes. Importance scores are cached across runs (``paths.cache_dir``), keyed by everything
they depend on, so a new budget reruns only the solve and later stages.

All checks that can fail on user input run in :meth:`Run.preflight`, before any expensive work.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Any

import torch
from distill.loss import DistillLoss, loss_from_config
from distill.train import TrainConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import artifacts
from ._registry import import_plugins
from ._io import short_hash
from .budget import (Budget, check_feasible, cost_constraint, is_time, latency_constraint, params_constraint,
                     parse_latency, resolve_budget)
from .cost import COSTS, CostModel, create_cost
from .data import ImageListDataset, eval_loader, eval_transform, image_dataset, random_indices
from .distributed import barrier, default_device, describe, is_main, main_first, world_size
from .errors import UserInputError
from .graph import build_channel_graph
from .importance import Importance, ScoresFileError, importance_from_config, load_scores, save_scores
from .models import check_model_name, check_weights, load_parent
from .paper import PAPER_CONFIGS, paper_widths
from .plots import plot_kept_fractions, plot_learning_curve
from .pools import TrainingPool, check_balance, readable_images, sampling_weights, training_pool
from .prune import prune_model
from .recalibrate import recalibrate_bn
from .search import kept_fraction_by_stage, knapsack_problem, removable_groups, solve_to_measured
from .solve import Constraint, Solution, check_solver, solve

log = logging.getLogger("pruning")

STAGES = ("importance", "solve", "prune", "finetune", "validate")


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


class PipelineError(UserInputError):
    """Bad input found before expensive work; the message names the value and the fix."""


class Run:
    """One run of the pipeline in ``run_dir`` with the composed Hydra config ``cfg``."""

    def __init__(self, cfg: DictConfig, run_dir: str, logger: Any) -> None:
        self.cfg, self.run_dir, self.logger = cfg, run_dir, logger
        self.stages = list(cfg.stages)
        self.parent: nn.Module | None = None
        self.student: nn.Module | None = None
        self.scores = self.solution = None
        self.unreadable_val: list[str] = []  # validation images dropped because they cannot be decoded
        # the student's kept channels per group, and the protection its graph was built with
        self.keep: dict[str, list[int]] | None = None
        self.protected: tuple[str, ...] | None = None
        self.bn_recalibrated: int | None = None  # images the student's BN statistics were re-estimated on

    # ------------------------------------------------------------------------------------------ checks
    def preflight(self) -> None:
        """Every user-input check, in seconds: plugins, stages, names, weights, budget, data."""
        import_plugins(self.cfg.get("plugins"))  # what they register is selected by name below
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise PipelineError(f"unknown stages {unknown}; stages is a list drawn from {list(STAGES)}")
        check_model_name(self.cfg.model.name)
        check_solver(self.cfg.solver.name, **self._solver_options())  # unknown names and options fail here
        self.criterion: Importance = importance_from_config(self.cfg.importance)
        self.loss: DistillLoss = loss_from_config(self.cfg.distill)
        self.train_cfg = TrainConfig(**OmegaConf.to_container(self.cfg.trainer, resolve=True))
        self.train_cfg.check()
        check_weights(self.cfg.model.name, self.cfg.model.pretrained, self.cfg.model.checkpoint)
        self._check_budget_specs()
        self._load_parent()
        self._check_budget()
        self.scores = self._cached_scores()  # a corrupt cache is reported here and recomputed by the importance stage
        if self._needs_data():
            self._check_data()
        self._build_constraints()  # last: a latency budget measures its table (once, then cached)

    def _needs(self, stage: str) -> bool:
        return stage in self.stages

    def _needs_data(self) -> bool:
        needs_scores = self._needs("importance") and self.criterion.needs_data and self.scores is None
        recalibrate = self._needs("prune") and self.cfg.bn_recalibration.num_images > 0
        return needs_scores or recalibrate or self._needs("finetune") or self._needs("validate")

    def _load_parent(self) -> None:
        m = self.cfg.model
        self.parent = load_parent(m.name, m.pretrained, m.checkpoint).to(default_device()).eval()
        protected = None if m.protected is None else list(m.protected)
        self.graph = build_channel_graph(self.parent, m.img_size, protected)
        self.cost = CostModel(self.graph, self.parent)

    def _check_budget_specs(self) -> None:
        """Malformed budgets and latency settings fail here, before the parent is even loaded."""
        b = self.cfg.budget
        if b.target is None and b.latency is None and b.params is None and not b.limits:
            raise PipelineError("no budget: set budget.target (MACs), budget.latency, budget.params or "
                                "+budget.limits.NAME (any combination)")
        for name in b.limits or {}:
            COSTS.get(name)  # an unknown cost fails here, listing the registered ones
        if b.latency is not None:
            from .latency import check_settings

            parse_latency(b.latency, 1.0)
            lat = self.cfg.latency
            check_settings(batch=b.latency_batch, threads=lat.threads, device=lat.device, backend=lat.backend)

    def _check_budget(self) -> None:
        """MACs and params budgets against the parent (latency ones need the measured table: later)."""
        b, s = self.cfg.budget, self.cfg.solver
        self.removable = removable_groups(self.parent, self.graph) if s.allow_block_removal else ()
        self.budget: Budget | None = None if b.target is None else resolve_budget(b.target, self.cost.macs())
        self.constraints: list[Constraint] = []
        if self.budget is not None:
            self.constraints.append(Constraint(self.cost.macs_cost, self.budget.macs, self.budget.spec))
        if b.params is not None:
            self.constraints.append(params_constraint(b.params, self.cost.params_cost))
        for name, spec in (b.limits or {}).items():  # any registered cost (pruning.cost.register_cost)
            self.constraints.append(cost_constraint(spec, create_cost(name, self.graph, self.parent)))
        check_feasible(self.constraints, self.graph.prunable_groups(), b.round_to, b.min_keep_fraction, self.removable)

    def _build_constraints(self) -> None:
        """Add the latency budget, measuring this device's latency table on first use."""
        b = self.cfg.budget
        self.latency_table = None
        if b.latency is None:
            return
        self.latency_table = self._latency_table()
        limit = latency_constraint(b.latency, self.latency_table.cost(self.graph), self.latency_table.parent_ms)
        self.constraints.append(limit)  # widths then keep the table's channel multiple (solve.width_multiple)
        check_feasible(self.constraints, self.graph.prunable_groups(), b.round_to, b.min_keep_fraction, self.removable)

    def _latency_table(self):
        """The parent's latency table for this device and settings (``python -m pruning.profile`` builds the same)."""
        from .latency import load_or_profile

        lat, b = self.cfg.latency, self.cfg.budget
        settings = dict(batch=b.latency_batch, threads=lat.threads, device=lat.device, backend=lat.backend)
        cache = os.path.join(self.cfg.paths.cache_dir, "latency")
        parent = self.parent.to("cpu") if lat.device == "cpu" else self.parent
        table = main_first(lambda progress: load_or_profile(parent, self.graph, self.cfg.model.name, cache,
                                                            progress=progress, **settings))
        self.parent.to(default_device())
        return table

    def _check_data(self) -> None:
        d = self.cfg.data
        if d.root is None and not d.train_roots:
            raise PipelineError(
                "no data: data.root and data.train_roots are not set. Give data.root=/path/to/imagenet (class "
                "folders named by synset under train/ and val/, or a folder with labels.csv), set the IMAGENET_ROOT "
                "environment variable, or give data.train_roots=[folder,...] and data.val_root=folder"
            )
        check_balance(d.balance)  # before the pool is scanned
        self.pool, self.val_set = self._datasets()
        self.train_set = self.pool.dataset
        self._resolve_ce_weight()
        self._check_batch_size()
        self.data_summary = summary = self._data_summary()
        self._report("data", summary)
        if is_main():
            log.info("training pool: %d images from %d folders (%d labelled, %d classes), %d copies of validation "
                     "images excluded; validation: %d images, %d classes", summary["pool"]["images"],
                     len(self.pool.roots), summary["pool"]["labelled"], summary["pool"]["classes"],
                     summary["pool"]["excluded_val_copies"], summary["val"]["images"], summary["val"]["classes"])
            self._warn_unreadable()

    def _warn_unreadable(self) -> None:
        """One warning per image set naming how many images could not be decoded, and the first of them."""
        for what, paths in (("training pool", self.pool.unreadable), ("validation set", self.unreadable_val)):
            if paths:
                log.warning("%d images of the %s cannot be decoded and are left out, e.g. %s (report.json data "
                            "section lists up to 20); remove or replace them", len(paths), what, paths[:3])

    def _check_batch_size(self) -> None:
        """Fine-tuning needs one full batch per process: fail here, not after the prune stage."""
        images, batch, world = len(self.train_set), self.train_cfg.batch_size, world_size()
        if not self._needs("finetune") or images // world >= batch:
            return
        per = f" on each of {world} processes" if world > 1 else ""
        fix = (f"lower trainer.batch_size to at most {images // world}" if images >= world else "add images")
        raise PipelineError(
            f"the training pool has {images} images, fewer than one batch of trainer.batch_size={batch}{per}, so "
            f"fine-tuning could not take a single step; {fix}, or add images (data.root / data.train_roots)")

    def _resolve_ce_weight(self) -> None:
        """``distill.ce_weight: null`` becomes 1 on an ImageNet-like pool, else 0 (teacher only)."""
        labels = self.pool.labels()
        self.loss.fit_to_labels(labels)
        if self.loss.label_weight and self._needs("finetune") and not any(label >= 0 for label in labels):
            raise PipelineError(
                f"distill={self.loss.name} weighs cross-entropy {self.loss.label_weight} and needs labelled training "
                "images, but every image of the pool is labelled -1; use distill=inner or distill=kd with "
                "distill.ce_weight=0, or add labelled folders to data.train_roots")

    # -------------------------------------------------------------------------------------------- data
    def _datasets(self) -> tuple[TrainingPool, ImageListDataset]:
        """The training pool (less every copy of a validation image) and the validation set."""
        d = self.cfg.data
        roots = list(d.train_roots) if d.train_roots else [self._train_dir()]
        val, cache = self._val_dir(), self.cfg.paths.cache_dir
        val_set = image_dataset(val) if val is not None else None
        if val_set is not None:  # undecodable images are dropped here, before any work, and counted in the report
            val_set, self.unreadable_val = main_first(lambda progress: readable_images(val_set, cache, progress))
        pool = main_first(lambda progress: training_pool(roots, val_set, cache, progress, scan=True))
        if val_set is None:
            pool, val_set = _hold_out(pool, d.holdout_fraction, self.cfg.seed)
        return pool, val_set

    def _train_dir(self) -> str:
        split = os.path.join(self.cfg.data.root, self.cfg.data.train_split)
        return split if os.path.isdir(split) else self.cfg.data.root

    def _val_dir(self) -> str | None:
        """``data.val_root``, else ``data.root``'s val split; None: hold out part of the pool."""
        d = self.cfg.data
        if d.val_root:
            return d.val_root
        split = os.path.join(d.root, d.val_split) if d.root else None
        return split if split and os.path.isdir(split) and split != self._train_dir() else None

    def _data_summary(self) -> dict:
        val_labels = {label for _, label in self.val_set.samples}
        return {"pool": self.pool.summary(), "balance": self.cfg.data.balance,
                "val": {"root": self._val_dir() or "held out of the pool", "images": len(self.val_set),
                        "classes": len(val_labels), "unreadable_images": len(self.unreadable_val),
                        "unreadable": self.unreadable_val[:20]},
                "ce_weight": self.loss.label_weight}

    # ---------------------------------------------------------------------------------------- the stages
    def run(self) -> dict:
        """Run the selected stages in order; returns the report."""
        for stage in STAGES:
            if self._needs(stage):
                t = time.time()
                getattr(self, f"stage_{stage}")()
                self._report("timings", {stage: round(time.time() - t, 3)})
        self._report("run", {"stages": self.stages, "distributed": describe(),
                             "config": OmegaConf.to_container(self.cfg, resolve=True)})
        return artifacts.read_json(os.path.join(self.run_dir, artifacts.REPORT)) if is_main() else {}

    def stage_importance(self) -> None:
        """Per-channel scores for every prunable group; loaded from the cache when computed before."""
        path = self._scores_path()
        if self.scores is None:  # preflight found no usable cached scores
            batches = self._importance_batches() if self.criterion.needs_data else None
            self.scores = self.criterion(self.parent, self.graph, batches)
            if is_main():
                save_scores(path, self.scores, {"key": self._scores_key(), "criterion": self.cfg.importance.name})
            barrier()
        settings = OmegaConf.to_container(self.cfg.importance, resolve=True)
        self._report("importance", {"criterion": settings.pop("name"), "scores": path, **settings})

    def stage_solve(self) -> None:
        """Kept widths and channels under every budget (the knapsack)."""
        scores = self._load_scores()
        b, s = self.cfg.budget, self.cfg.solver
        problem = knapsack_problem(self.graph, scores, self.constraints, b.round_to, b.min_keep_fraction, self.removable)
        if self.latency_table is not None and self.cfg.latency.verify_iterations > 0:
            # measurements differ run to run: a rerun keeps the solution it measured, so a resumed run stays whole
            self.solution = self._reusable_solution(problem) or (self._solve_measured(problem) if is_main() else None)
            barrier()  # one rank measures; the others read its solution
            self.solution = self.solution or self._load_solution()
        else:
            self.solution = solve(problem, s.name, **self._solver_options())
            if is_main():
                artifacts.write_json(os.path.join(self.run_dir, artifacts.SOLUTION), self.solution.to_dict())
        self._report("budget", self._budget_summary())
        self._report("solve", {k: v for k, v in asdict(self.solution).items() if k not in ("keep", "widths")}
                     | {"round_to_asked": b.round_to, "min_keep_fraction": b.min_keep_fraction,
                        "allow_block_removal": s.allow_block_removal, "removable_blocks": len(self.removable)})

    def _solver_options(self) -> dict[str, Any]:
        """The solver's arguments: every key of its YAML but ``name`` and ``allow_block_removal`` (the problem's)."""
        options = OmegaConf.to_container(self.cfg.solver, resolve=True)
        return {k: v for k, v in options.items() if k not in ("name", "allow_block_removal")}

    def _solve_measured(self, problem) -> Solution:
        """The knapsack, re-solved while the chosen model measures over the latency budget on this device."""
        s = self.cfg.solver
        options = self._solver_options()
        solution, history = solve_to_measured(problem, self._measured_latency, self._allowed_latency(), solver=s.name,
                                              time_limit=options.pop("time_limit"), gap_tol=options.pop("gap_tol"),
                                              iterations=self.cfg.latency.verify_iterations, solver_options=options)
        artifacts.write_json(os.path.join(self.run_dir, artifacts.SOLUTION),
                             solution.to_dict() | {"problem_key": self._problem_key(problem)})
        self._report("latency_verification", {"rounds": self.cfg.latency.rounds, "steps": history,
                                              "unit": "ms" if is_time(self.cfg.budget.latency) else "ratio to parent"})
        return solution

    def _problem_key(self, problem) -> str:
        limits = [(c.name, c.spec, c.limit) for c in problem.constraints]
        # round_to and min_keep_fraction were solver fields once: hashed with them still, so the key stays the same
        # and a run whose measured solution was saved then still finds it
        b = self.cfg.budget
        solver = OmegaConf.to_container(self.cfg.solver) | {"round_to": b.round_to, "min_keep_fraction": b.min_keep_fraction}
        return short_hash([limits, problem.round_to, problem.min_keep_fraction, problem.removable, solver,
                           self._scores_key(), self.latency_table.meta, OmegaConf.to_container(self.cfg.latency)])

    def _reusable_solution(self, problem) -> Solution | None:
        """The measured solution an earlier run of this exact problem left in the run directory, if any."""
        path = os.path.join(self.run_dir, artifacts.SOLUTION)
        if not os.path.isfile(path):
            return None
        return self._read_solution(self._problem_key(problem))

    def _allowed_latency(self) -> float:
        """The latency budget in the unit :meth:`_measured_latency` measures: ms, or a ratio to the parent."""
        spec = self.cfg.budget.latency
        return parse_latency(spec, 1.0)  # a time in ms, or the fraction itself (of a parent of 1)

    def _measured_latency(self, solution: Solution) -> float:
        """The pruned model's latency measured against the parent's, interleaved: ms, or a ratio to the parent."""
        ms = self._measure_against_parent(prune_model(self.parent, self.graph, solution.keep))
        return ms["pruned"] if is_time(self.cfg.budget.latency) else ms["pruned"] / ms["parent"]

    def _measure_against_parent(self, pruned: nn.Module) -> dict[str, float]:
        """ms per forward pass of the parent and ``pruned`` on the latency device, in interleaved rounds."""
        from .latency import measure_latency

        lat = self.cfg.latency
        models = {"parent": self.parent.to(lat.device), "pruned": pruned.to(lat.device)}
        ms = measure_latency(models, self.cfg.model.img_size, batch=self.cfg.budget.latency_batch,
                             threads=lat.threads, device=lat.device, backend=lat.backend, rounds=lat.rounds)
        for m in models.values():
            m.to(default_device())
        return ms

    def _budget_summary(self) -> dict:
        summary = {"name": self.cfg.budget.name, "constraints": [
            {"cost": c.name, "spec": c.spec, "limit": c.limit, "unit": c.cost.unit, "parent": c.cost(),
             "fraction_of_parent": c.limit / c.cost()} for c in self.constraints]}
        if self.budget is not None:
            summary |= {"spec": self.budget.spec, "target_macs": self.budget.macs, "fraction_of_parent": self.budget.fraction}
        return summary

    def stage_prune(self) -> None:
        """The physically smaller model, saved in timm format and as this framework's checkpoint."""
        solution = self.solution or self._load_solution()
        self.student = prune_model(self.parent, self.graph, solution.keep).eval()
        self.keep, self.protected = solution.keep, self.graph.protected_patterns
        self.bn_recalibrated = self._recalibrate() if self.cfg.bn_recalibration.num_images > 0 else 0
        widths = {**self.graph.full_widths(), **solution.widths}
        if is_main():
            files, skipped = artifacts.save_pruned(self.student, self.run_dir, self.cfg.model.name,
                                                   self.cfg.model.img_size, self.keep, "pruned", self.protected,
                                                   self.bn_recalibrated)
            files.append(self._plot_widths(widths))
            self.logger.log_files(files)
            self._report("artifacts", {"files": [os.path.basename(f) for f in files], "timm_spec_skipped": skipped})
        self._report("model", self._model_summary(widths))
        if self.latency_table is not None:
            self._report("latency", self._latency_summary(widths))

    def _latency_summary(self, widths: dict[str, int]) -> dict:
        """Predicted (the table) and measured (interleaved with the parent) latency, parent and pruned."""
        lat, b, cost = self.cfg.latency, self.cfg.budget, self.latency_table.cost(self.graph)
        measured = self._measure_against_parent(self.student)
        return {"batch": b.latency_batch, "threads": lat.threads or torch.get_num_threads(), "device": lat.device,
                "backend": lat.backend, "rounds": lat.rounds, "unit": "ms",
                "predicted_parent": cost(), "predicted_pruned": cost(widths),
                "measured_parent": measured["parent"], "measured_pruned": measured["pruned"],
                "measured_ratio": measured["pruned"] / measured["parent"],
                "table": {k: v for k, v in self.latency_table.meta.items() if k != "groups"} | {
                    "path": getattr(self.latency_table, "path", None), "align": self.latency_table.align}}

    def stage_finetune(self) -> None:
        """Inner-distillation fine-tuning under the frozen parent; resumes from its last checkpoint."""
        from distill import finetune

        student = self.student or self._load_student()
        if self.bn_recalibrated is None and self.cfg.bn_recalibration.num_images > 0:
            # pruned elsewhere (another tool, save_pruned without the prune stage): its BN statistics are the
            # parent's, and inner distillation fits its projections to eval-mode features, so recalibrate first
            log.info("%s was saved without BN recalibration: recalibrating it as the prune stage does",
                     artifacts.CHECKPOINT)
            self.student = student
            self.bn_recalibrated = self._recalibrate()
        teacher = self.parent if self.loss.needs_teacher else None
        out = os.path.join(self.run_dir, "finetune")
        train_set = ImageListDataset(self.train_set.samples)  # no transform: the trainer uses timm's training one
        weights = sampling_weights(self.pool, self.cfg.data.balance)
        val_set = self._eval_set(self.val_set) if self.train_cfg.val_every_steps else None
        result = finetune(student, teacher, train_set, self.loss, self.train_cfg, out, logger=self.logger,
                          progress=is_main(), val_set=val_set, sample_weights=weights)
        self.student = result.student.eval()
        if is_main():
            artifacts.save_pruned(self.student, self.run_dir, self.cfg.model.name, self.cfg.model.img_size,
                                  self.keep, "finetuned", self.protected, self.bn_recalibrated)  # as after pruning
        curve = [[h["step"], h["val/top1"]] for h in result.history if "val/top1" in h]
        self._report("finetune", {"steps": result.steps, "method": self.loss.name,
                                  "resumed_from": result.resumed_from, "val_curve": curve,
                                  "last": result.history[-1] if result.history else None})

    def stage_validate(self) -> None:
        """Top-1/top-5 and images/s of the student and (cached) teacher on the validation images."""
        from distill import validate_pair
        from distill.evaluate import validation_warnings

        student = self.student or self._load_student()
        key = short_hash([self.cfg.model.name, self.cfg.model.checkpoint, self.cfg.model.pretrained,
                          self.cfg.model.img_size, [s for s, _ in self.val_set.samples][:3], len(self.val_set)])
        teacher_cache = os.path.join(self.cfg.paths.cache_dir, "teacher")  # shared by every run of a sweep
        metrics = validate_pair(student, self.parent, self._eval_set(self.val_set), teacher_cache, key,
                                batch_size=self.cfg.data.val_batch_size, workers=self.cfg.data.workers)
        val = self.data_summary["val"]
        warnings = validation_warnings(val["classes"], metrics["student"]["top1"], metrics["teacher"]["top1"])
        for w in warnings:
            log.warning(w)
        self._report("validate", metrics | {"dataset": val, "warnings": warnings})
        self.logger.summary({f"val/{k}": v for k, v in _flatten(metrics).items()})
        self._plot_learning_curve(metrics["teacher"]["top1"])

    def _plot_learning_curve(self, teacher_top1: float) -> None:
        """``learning_curve.png`` from the fine-tuning's validations (``trainer.val_every_steps``), if any."""
        path = os.path.join(self.run_dir, artifacts.REPORT)
        if not is_main() or not os.path.isfile(path):
            return
        curve = (artifacts.read_json(path).get("finetune") or {}).get("val_curve")
        if curve:
            title = f"{self.cfg.model.name}@{self.cfg.model.img_size} on {os.path.basename(str(self._val_dir()))}"
            png = os.path.join(self.run_dir, "learning_curve.png")
            self.logger.log_files([plot_learning_curve(curve, teacher_top1, png, title)])

    # ---------------------------------------------------------------------------------------- helpers
    def _scores_key(self) -> str:
        m, imp = self.cfg.model, self.cfg.importance
        d = self.cfg.data  # the folders decide the pool (copies of the validation images are taken out)
        roots = list(d.train_roots) if d.train_roots else None
        data = [d.root, d.train_split, roots, d.val_root, d.holdout_fraction] if self.criterion.needs_data else None
        return short_hash([m.name, m.img_size, m.pretrained, m.checkpoint, m.protected,
                           OmegaConf.to_container(imp, resolve=True), data])

    def _scores_path(self) -> str:
        return os.path.join(self.cfg.paths.cache_dir, "scores", f"{self.cfg.model.name}-{self._scores_key()}.pt")

    def _cached_scores(self):
        """This configuration's cached importance scores; None when there are none or the file is corrupt or
        truncated (a warning says so, and the importance stage recomputes and rewrites them)."""
        path = self._scores_path()
        if not os.path.isfile(path):
            return None
        try:
            return load_scores(path, self.graph, {"key": self._scores_key()})
        except ScoresFileError as e:
            log.warning("%s: the importance stage computes them again", e.problem)
            return None

    def _load_scores(self):
        if self.scores is None:  # preflight looked in the cache
            raise PipelineError("no usable importance scores for this configuration: add the importance stage "
                                f"(stages=[importance,solve,...]); looked for {self._scores_path()}")
        return self.scores

    def _read_solution(self, problem_key: str | None = None) -> Solution | None:
        """solution.json of the run directory; None when it is corrupt or truncated (a warning says so), or, with
        ``problem_key``, when it was solved for another problem."""
        path = os.path.join(self.run_dir, artifacts.SOLUTION)
        try:
            saved = artifacts.read_json(path)
            solution = Solution.from_dict(saved)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s is corrupt or truncated (%s: %s); solving again", path, type(e).__name__, e)
            return None
        return solution if problem_key is None or saved.get("problem_key") == problem_key else None

    def _load_solution(self) -> Solution:
        """The solve stage's result from the run directory, solved again when the file is corrupt."""
        path = os.path.join(self.run_dir, artifacts.SOLUTION)
        if not os.path.isfile(path):
            raise PipelineError(f"no solution in {self.run_dir}: add the solve stage (stages=[importance,solve,prune])")
        solution = self._read_solution()
        if solution is None:
            self.stage_solve()  # rewrites solution.json (the scores come from the cache or the importance stage)
            solution = self.solution
        return solution

    def _load_student(self) -> nn.Module:
        path = os.path.join(self.run_dir, artifacts.CHECKPOINT)
        if not os.path.isfile(path):
            raise PipelineError(f"no pruned model in {self.run_dir}: add the prune stage (stages=[...,prune,...])")
        # any pruned model of this parent fine-tunes: the channels it kept come with it, not from solution.json
        model, meta = artifacts.load_pruned(path, self.parent, self.cfg.model.name)
        self.keep, self.protected = meta["keep"], meta.get("protected")
        # a checkpoint saved by the prune stage records its recalibration; one pruned elsewhere does not (None)
        self.bn_recalibrated = meta.get("bn_recalibrated_images", None if meta["stage"] == "pruned" else 0)
        return model.to(default_device())

    def _importance_batches(self):
        imp = self.cfg.importance
        # a seeded random order: the first num_images are a sample of all classes, not the first classes
        return eval_loader(self._eval_set(self.train_set), imp.batch_size, self.cfg.data.workers, shuffle_seed=self.cfg.seed,
                           shard=True)  # the criteria sum over processes

    def _recalibrate(self) -> int:
        r = self.cfg.bn_recalibration
        batches = eval_loader(self._eval_set(self.train_set), r.batch_size, self.cfg.data.workers,
                              shuffle_seed=self.cfg.seed, shard=True)  # each rank its share; DDP syncs rank 0's
        used = recalibrate_bn(self.student, batches, r.num_images, progress=is_main())
        self._report("bn_recalibration", {"images": used})
        return used

    def _eval_set(self, dataset: ImageListDataset) -> ImageListDataset:
        """``dataset``'s images under the parent's evaluation transform (no augmentation) at the run's size."""
        return ImageListDataset(dataset.samples, eval_transform(self.parent, self.cfg.model.img_size))

    def _model_summary(self, widths: dict[str, int]) -> dict:
        full = self.graph.full_widths()
        summary = {"name": self.cfg.model.name, "img_size": self.cfg.model.img_size,
                   "weights": self.cfg.model.checkpoint or ("timm" if self.cfg.model.pretrained else "random init"),
                   "macs_before": self.cost.macs(), "params_before": self.cost.params(),
                   "macs_after": self.cost.macs(widths), "params_after": self.cost.params(widths),
                   "achieved_over_target": self.cost.macs(widths) / self.budget.macs if self.budget else None,
                   "removed_blocks": [list(b) for b in self.removable if all(widths[g] == 0 for g in b)],
                   "widths_before": full, "widths_after": widths,
                   "kept_fraction_by_stage": kept_fraction_by_stage(self.graph, widths)}
        published = self._published()
        if published is not None:
            name, theirs = published
            summary["published"] = {"model": name, "widths": theirs, "macs": self.cost.macs(theirs),
                                    "params": self.cost.params(theirs)}
        return summary

    def _published(self) -> tuple[str, dict[str, int]] | None:
        """timm's published pruned model of this budget and its widths, when the run prunes its base model at its
        resolution. The budget is ``budget.name`` (``+budget=flops_490M``), else ``budget.target`` when that names a
        paper budget (``budget.target=flops_490M``): both spellings compare with the published model."""
        b = self.cfg.budget
        cfg = PAPER_CONFIGS.get(b.name or "") or (PAPER_CONFIGS.get(b.target) if isinstance(b.target, str) else None)
        if cfg is None or (cfg.base_model, cfg.img_size) != (self.cfg.model.name, self.cfg.model.img_size):
            return None
        return cfg.timm_pruned, paper_widths(cfg.budget, self.graph)

    def _plot_widths(self, widths: dict[str, int]) -> str:
        series = {"ours": widths}
        published = self._published()
        if published is not None:
            name, theirs = published
            series[name] = theirs
        limits = ", ".join(f"{c.name} {c.spec}" for c in self.constraints)
        title = f"{self.cfg.model.name}@{self.cfg.model.img_size}, budget {limits}"
        return plot_kept_fractions(self.graph, series, os.path.join(self.run_dir, "kept_fractions.png"), title)

    def _report(self, section: str, values: dict) -> None:
        if is_main():
            artifacts.update_report(self.run_dir, section, values)


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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out
