"""Channel importance: ``criterion(model, graph, batches) -> {group name: per-channel scores}``.

Every criterion scores the channels of each prunable group; a group's score sums over the layers that
produce its channels (dense and depthwise convs, linears), so tied channels add their scores as in the
paper. A new criterion is one subclass of :class:`Importance` registered with :func:`register_importance`
(README, Extending), selected in configs by that name (``importance.name``).

Criteria:

* ``taylor_weight`` (the authors' code): eval mode, gradient of the mean cross-entropy over N images,
  then ``sum over the filter of |W * dL/dW|``. No per-layer normalisation.
* ``taylor_activation`` (Molchanov et al., 2017): ``|mean over space of a * dL/da|`` per image and feature
  map, averaged over images, on the outputs of the producing layers.
* ``l1`` (weight magnitude), ``bn_scale`` (|gamma| of the group's batch norms), ``random``.

Under torch.distributed, data-driven criteria all-reduce their sums, so every rank holds identical scores
equal to a single process's on the union of the shards.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from ._io import TorchFileError, atomic_torch_save, read_torch_file
from ._registry import Registry
from .data import take_images
from .errors import UserInputError
from .graph import ChannelGraph
from .layers import find_rule

Scores = dict[str, torch.Tensor]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

IMPORTANCES: Registry[type["Importance"]] = Registry(
    "importance criterion", "importance=NAME; add one with pruning.importance.register_importance")


def register_importance(name: str) -> Callable[[type["Importance"]], type["Importance"]]:
    """Class decorator: make a criterion available as ``name`` (its ``name`` attribute is set to it)."""
    return IMPORTANCES.register(name)


def create_importance(name: str, **kwargs: Any) -> "Importance":
    """The criterion registered as ``name`` built with ``kwargs``, with a clear error listing the known names."""
    return IMPORTANCES.create(name, **kwargs)


def importance_from_config(cfg: Mapping[str, Any]) -> "Importance":
    """The criterion an ``importance/`` config selects: ``name`` picks it, ``batch_size`` is the image loader's,
    ``num_images`` goes to criteria that read images (``needs_data``), every other key is the criterion's own
    argument (``random``'s ``seed``)."""
    needs_data = IMPORTANCES.get(cfg["name"]).needs_data
    return IMPORTANCES.from_config(cfg, exclude=("batch_size",) if needs_data else ("batch_size", "num_images"))


def scored_layers(graph: ChannelGraph, model: nn.Module) -> list[tuple[str, str, int]]:
    """``(group, module, offset)`` for every layer that produces a prunable group's channels and has a filter
    bank; ``offset`` is where the group's channels start among the layer's outputs (see :func:`group_slice`)."""
    modules = dict(model.named_modules())
    pairs = []
    for group in graph.prunable_groups():
        for m in group.members:
            weight = getattr(modules[m.module], "weight", None)
            if m.role in ("out", "channel") and isinstance(weight, torch.Tensor) and weight.dim() >= 2:
                pairs.append((group.name, m.module, m.offset))
    return pairs


def group_slice(per_channel: torch.Tensor, offset: int, width: int) -> torch.Tensor:
    """The values of one group's channels among a layer's per-channel values (first dim): a layer on
    concatenated channels holds several groups, the group's starting at ``offset``."""
    return per_channel[offset:offset + width]


def _sum_per_group(graph: ChannelGraph, pairs, per_layer: Callable[[str], torch.Tensor]) -> Scores:
    scores = {g.name: torch.zeros(g.width, dtype=torch.float64) for g in graph.prunable_groups()}
    for group, module, offset in pairs:
        scores[group] += group_slice(per_layer(module), offset, len(scores[group])).detach().double().cpu()
    return scores


class Importance:
    """Base criterion: ``criterion(model, graph, batches) -> {group name: scores}``, one score >= 0 per channel.

    A new one subclasses this and registers with ``@register_importance("name")``; its constructor's arguments
    are the keys of its ``conf/importance/NAME.yaml``. ``needs_data`` criteria consume ``(images, labels)``
    batches and take ``num_images``.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False

    def __call__(self, model: nn.Module, graph: ChannelGraph, batches: Batches | None = None) -> Scores:
        raise NotImplementedError


@register_importance("l1")
class L1Importance(Importance):
    """Sum of |W| over each output filter of the producing layers."""

    def __call__(self, model, graph, batches=None) -> Scores:
        modules = dict(model.named_modules())
        return _sum_per_group(graph, scored_layers(graph, model), lambda n: modules[n].weight.abs().flatten(1).sum(1))


@register_importance("bn_scale")
class BNScaleImportance(Importance):
    """|gamma| of the group's batch norms; a group with no batch norm (SE reduce) gets the model's mean |gamma|."""

    def __call__(self, model, graph, batches=None) -> Scores:
        modules = dict(model.named_modules())
        scores, without_bn, gammas = {}, [], []
        for group in graph.prunable_groups():
            bns = [m for m in group.members if isinstance(modules[m.module], nn.modules.batchnorm._BatchNorm)]
            if not bns:
                without_bn.append(group)
                continue
            scores[group.name] = sum(group_slice(modules[m.module].weight.detach().abs().double(), m.offset, group.width)
                                     for m in bns)
            gammas.append(scores[group.name])
        neutral = torch.cat(gammas).mean() if gammas else torch.tensor(1.0, dtype=torch.float64)
        scores.update({g.name: torch.full((g.width,), float(neutral), dtype=torch.float64) for g in without_bn})
        return {g.name: scores[g.name] for g in graph.prunable_groups()}


@register_importance("random")
class RandomImportance(Importance):
    """Uniform random scores from a seeded generator (same seed, same scores)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, model, graph, batches=None) -> Scores:
        gen = torch.Generator().manual_seed(self.seed)
        return {g.name: torch.rand(g.width, generator=gen, dtype=torch.float64) for g in graph.prunable_groups()}


class _DataImportance(Importance):
    """Shared loop of the gradient criteria: eval mode, cross-entropy, a progress bar, all-reduce."""

    needs_data = True

    def __init__(self, num_images: int = 1024, progress: bool = True) -> None:
        self.num_images = num_images
        self.progress = progress

    def _batches(self, batches: Batches | None):
        if batches is None:
            raise UserInputError(f"importance criterion {self.name!r} needs images; give a data loader (data.root)")
        limit = -(-self.num_images // D.world_size())  # this rank's share
        return take_images(batches, limit, f"importance ({self.name})", self.progress and D.is_main())

    def __call__(self, model, graph, batches=None) -> Scores:
        was_training = model.training
        model.eval()  # no augmentation and no BN statistic updates, as in the authors' code
        try:
            with torch.enable_grad():
                return self._estimate(model, graph, self._batches(batches))
        finally:
            model.train(was_training)

    def _estimate(self, model, graph, batches) -> Scores:
        raise NotImplementedError


def _cross_entropy_sum(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed CE; an image labelled -1 (no ImageNet class) is scored against the model's own top class."""
    device = next(model.parameters()).device
    logits = model(images.to(device, non_blocking=True))
    labels = labels.to(device)
    labels = torch.where(labels < 0, logits.detach().argmax(1), labels)
    return F.cross_entropy(logits.float(), labels, reduction="sum")


@register_importance("taylor_weight")
class TaylorWeightImportance(_DataImportance):
    """The authors' criterion: ``sum over the filter of |W * dL/dW|``, L the mean CE over all images."""

    def _estimate(self, model, graph, batches) -> Scores:
        pairs = scored_layers(graph, model)
        modules = dict(model.named_modules())
        names = list(dict.fromkeys(n for _, n, _ in pairs))
        weights = [modules[n].weight for n in names]
        grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        count = torch.zeros((), dtype=torch.float64)
        for images, labels in batches:
            loss = _cross_entropy_sum(model, images, labels)
            for acc, g in zip(grads, torch.autograd.grad(loss, weights, allow_unused=True)):
                if g is not None:
                    acc += g.float()
            count += len(images)
        D.all_reduce_sum_(grads + [count])
        by_name = {n: (w.detach().float() * g / count.float()).abs().flatten(1).sum(1) for n, w, g in zip(names, weights, grads)}
        return _sum_per_group(graph, pairs, by_name.__getitem__)


@register_importance("taylor_activation")
class TaylorActivationImportance(_DataImportance):
    """Molchanov et al.: ``|mean over space of a * dL/da|`` per image and channel, averaged over images."""

    def _estimate(self, model, graph, batches) -> Scores:
        pairs = scored_layers(graph, model)
        modules = dict(model.named_modules())
        names = list(dict.fromkeys(n for _, n, _ in pairs))
        sums = {n: torch.zeros(modules[n].weight.shape[0], dtype=torch.float64) for n in names}
        last = {n for n in names if find_rule(modules[n]).channel_dim(modules[n]) == -1}  # Linear: channels last
        outputs: dict[str, torch.Tensor] = {}
        handles = [modules[n].register_forward_hook(self._capture(outputs, n)) for n in names]
        count = torch.zeros((), dtype=torch.float64)
        try:
            for images, labels in batches:
                outputs.clear()
                loss = _cross_entropy_sum(model, images, labels)
                self._accumulate(sums, outputs, loss, last)
                count += len(images)
        finally:
            for h in handles:
                h.remove()
        D.all_reduce_sum_(list(sums.values()) + [count])
        return _sum_per_group(graph, pairs, lambda n: sums[n] / count)

    @staticmethod
    def _capture(outputs: dict[str, torch.Tensor], name: str) -> Callable:
        def hook(module, inputs, output):
            outputs[name] = output

        return hook

    @staticmethod
    def _accumulate(sums: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], loss: torch.Tensor,
                    last: set[str]) -> None:
        names = [n for n, o in outputs.items() if o.requires_grad]
        # autograd.grad, not backward: parameters' .grad stay untouched
        grads = torch.autograd.grad(loss, [outputs[n] for n in names])
        for n, g in zip(names, grads):
            prod = outputs[n].detach() * g
            prod = prod.movedim(-1, 1) if n in last else prod
            prod = prod.flatten(2).mean(2) if prod.dim() > 2 else prod
            sums[n] += prod.abs().sum(0).double().cpu()


# --------------------------------------------------------------------------------------- persistence


def save_scores(path: str, scores: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write scores and what produced them (criterion, model, input size, images) atomically."""
    atomic_torch_save({"scores": {k: v.cpu() for k, v in scores.items()}, "meta": dict(meta)}, path)


class ScoresFileError(UserInputError):
    """A scores file that cannot be used; ``problem`` says why, the message adds the fix (delete it)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; delete the file to recompute the scores")
        self.problem = problem


def load_scores(path: str, graph: ChannelGraph, expected_meta: Mapping[str, Any] | None = None) -> Scores:
    """Read scores saved by :func:`save_scores`, checking they fit ``graph`` and ``expected_meta``.

    Raises:
        ScoresFileError: the file is unreadable, truncated or not a scores file, was computed with other settings
            than ``expected_meta``, does not fit ``graph``'s prunable groups, or holds non-finite or negative
            scores. The message names the file; deleting it recomputes the scores.
    """
    try:
        obj = read_torch_file(path, "scores file", "delete it to recompute the scores")
        meta, scores = obj["meta"], obj["scores"]
        found = {k: len(v) for k, v in scores.items()}
    except Exception as e:  # truncated zip, not a torch file, or another structure: all mean "not usable"
        reason = e.reason if isinstance(e, TorchFileError) else f"{type(e).__name__}: {e}"
        raise ScoresFileError(f"scores file {path!r} is corrupt or truncated ({reason})") from e
    for key, value in (expected_meta or {}).items():
        if meta.get(key) != value:
            raise ScoresFileError(f"scores in {path!r} were computed with {key}={meta.get(key)!r}, not {value!r}")
    widths = {g.name: g.width for g in graph.prunable_groups()}
    if found != widths:
        raise ScoresFileError(f"scores in {path!r} do not match the model's prunable groups")
    bad = next((k for k, v in scores.items() if not (torch.isfinite(v).all() and (v >= 0).all())), None)
    if bad is not None:
        raise ScoresFileError(f"scores in {path!r} are not finite and >= 0, first in group {bad!r}")
    return scores
