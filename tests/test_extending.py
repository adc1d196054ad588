"""Every extension point takes one registration and, where a config selects it, one YAML (README, Extending).

Each test registers a new criterion, solver, cost, distillation loss, layer rule, split rule or protected-layer default, as
the README shows, checks it is used end to end through the public API, and unregisters it again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from _utils import masked_reference, random_keep
from pruning import artifacts, build_channel_graph, create_model, prune_model
from pruning.errors import UserInputError
from pruning.loggers import NullLogger
from pruning.pipeline import preflight, run_stages

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SEARCH = ["model.name=resnet18", "model.img_size=32", "model.pretrained=false", "logger=none", "budget.target=0.5",
          "stages=[importance,solve]"]


@pytest.fixture()
def undo():
    """``undo(fn)``: call ``fn`` after the test (unregistering what it registered), whatever the outcome."""
    calls = []
    yield calls.append
    for fn in reversed(calls):
        fn()


def _yaml(folder: Path, group: str, name: str, text: str) -> str:
    """Write ``conf/<group>/<name>.yaml`` into ``folder`` (another config dir on Hydra's search path)."""
    (folder / group).mkdir(parents=True, exist_ok=True)
    (folder / group / f"{name}.yaml").write_text(text)
    return f"hydra.searchpath=[file://{folder}]"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _run(tmp_path, *overrides: str) -> dict:
    cfg = _compose(*SEARCH, f"paths.cache_dir={tmp_path}/cache", *overrides)
    return run_stages(preflight(cfg, str(tmp_path / "run"), NullLogger()))


def test_a_new_criterion_decides_the_kept_channels(tmp_path, undo):
    from pruning.importance import IMPORTANCES, Importance, register_importance

    @register_importance("first_channels")
    class FirstChannels(Importance):
        """Channel i of a group of width w scores w - i: the first channels matter most."""

        def __call__(self, model, graph, batches=None):
            return {g.name: torch.arange(g.width, 0, -1, dtype=torch.float64) for g in graph.prunable_groups()}

    undo(lambda: IMPORTANCES.unregister("first_channels"))
    search_path = _yaml(tmp_path / "conf", "importance", "first_channels", "name: first_channels\nnum_images: 0\n"
                        "batch_size: 64\n")
    report = _run(tmp_path, search_path, "importance=first_channels")
    assert FirstChannels.name == "first_channels" and report["importance"]["criterion"] == "first_channels"
    keep = artifacts.read_json(str(tmp_path / "run" / artifacts.SOLUTION))["keep"]
    assert keep and all(k == list(range(len(k))) for k in keep.values())  # every group keeps its first channels
    assert any(len(k) < 64 for k in keep.values())


PLUGIN = '''
import torch
from pruning.importance import Importance, register_importance


@register_importance("last_channels")
class LastChannels(Importance):
    def __call__(self, model, graph, batches=None):
        return {g.name: torch.arange(g.width, dtype=torch.float64) for g in graph.prunable_groups()}
'''


def test_the_app_imports_a_plugin_file_and_selects_what_it_registers(tmp_path):
    """From the command line: one .py file (``plugins=[...]``) and one YAML (any config dir on the search path)."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "my_criteria.py").write_text(PLUGIN)
    search_path = _yaml(tmp_path / "conf", "importance", "last_channels", "name: last_channels\nnum_images: 0\n"
                        "batch_size: 64\n")
    def app(plugin: str):
        cmd = [sys.executable, "-m", "pruning.run", *SEARCH, f"plugins=[{plugin}]", search_path,
               "importance=last_channels", f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
        env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
        return subprocess.run(cmd, cwd=Path(CONF).parent, env=env, capture_output=True, text=True, timeout=300)

    proc = app(str(tmp_path / "my_criteria.py"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    keep = json.loads((tmp_path / "run" / artifacts.SOLUTION).read_text())["keep"]
    widths = build_channel_graph(create_model("resnet18"), 32).full_widths()
    assert keep and all(k == list(range(widths[g] - len(k), widths[g])) for g, k in keep.items())  # the last ones
    bad = app("no_such_module")
    assert bad.returncode == 2 and "plugins: cannot import 'no_such_module'" in bad.stderr


def test_a_new_solver_is_called_by_its_config_name_with_its_own_options(tmp_path, undo):
    from pruning.solve import SOLVERS, register_solver

    calls = []

    @register_solver("lowest")
    def solve_lowest(inst, time_limit, gap_tol, note="none"):
        """Every group at its smallest allowed width (always within the limits); no bound."""
        calls.append(note)
        return dict(zip(inst.names, inst.widths(inst.first_nonzero()))), float("nan")

    undo(lambda: SOLVERS.unregister("lowest"))
    search_path = _yaml(tmp_path / "conf", "solver", "lowest", "name: lowest\ntime_limit: 60\ngap_tol: 1.0e-6\n"
                        "allow_block_removal: false\nnote: from the yaml\n")
    report = _run(tmp_path, search_path, "importance=l1", "solver=lowest")
    assert calls == ["from the yaml"] and report["solve"]["solver"] == "lowest"
    assert report["solve"]["costs"]["macs"] < 0.5 * report["budget"]["constraints"][0]["parent"]
    with pytest.raises(UserInputError, match=r"solver 'lowest' cannot take \['notes'\].*'note'"):
        _run(tmp_path, search_path, "importance=l1", "solver=lowest", "+solver.notes=typo")


def test_a_new_cost_is_limited_by_the_budget(tmp_path, undo, model_cache):
    from pruning.budget import cost_constraint
    from pruning.cost import COSTS, Cost, Linear, create_cost, register_cost
    from pruning.importance import create_importance
    from pruning.search import search

    @register_cost("channels")
    def channel_count(graph, model=None):
        """Kept channels summed over the prunable groups."""
        return Cost("channels", "channels", [Linear((g.name,), 1, g.name) for g in graph.prunable_groups()],
                    graph.full_widths(), integral=True)

    undo(lambda: COSTS.unregister("channels"))
    report = _run(tmp_path, "importance=l1", "budget.target=null", "+budget.limits.channels=0.4")
    (limit,) = report["budget"]["constraints"]
    assert (limit["cost"], limit["limit"]) == ("channels", int(0.4 * limit["parent"]))
    assert report["solve"]["costs"]["channels"] <= limit["limit"] and report["solve"]["binding"] == ["channels"]

    # the same cost from Python, next to a MACs budget
    model = model_cache("resnet18")
    graph = build_channel_graph(model, 32)
    channels = cost_constraint("0.5", create_cost("channels", graph, model))
    result = search(model, graph, create_importance("l1")(model, graph), 0.9, constraints=[channels])
    assert sum(result.solution.widths.values()) <= channels.limit < sum(g.width for g in graph.prunable_groups())


def test_a_new_loss_trains_from_its_yaml(tmp_path, undo):
    from test_distill_helpers import IMG, tiny_pair, write_images

    from distill import TrainConfig, loss_from_config, register_loss
    from distill.loss import LOSSES, TeacherLoss
    from distill.train import Trainer
    from pruning.data import image_dataset

    @register_loss("logit_mse")
    @dataclass
    class LogitMSE(TeacherLoss):
        """``ce_weight * CE + weight * mean((s - t)^2)`` on the logits."""

        weight: float = 1.0

        def terms(self, logits, labels, student_feats, teacher_feats, teacher_logits):
            return {"logit_mse": self.weight * F.mse_loss(logits.float(), teacher_logits.float())}

    undo(lambda: LOSSES.unregister("logit_mse"))
    search_path = _yaml(tmp_path / "conf", "distill", "logit_mse", "name: logit_mse\nweight: 2.0\n"
                        "label_smoothing: 0.1\nce_weight: 0.0\n")
    loss = loss_from_config(_compose(search_path, "distill=logit_mse").distill)
    assert loss == LogitMSE(weight=2.0, ce_weight=0.0) and loss.needs_teacher and loss.points_for(None, None) == []
    teacher, student = tiny_pair("resnet18")
    train = TrainConfig(batch_size=4, img_size=IMG, workers=0, lr=0.01, log_every=1)
    trainer = Trainer(student, teacher, image_dataset(write_images(str(tmp_path / "images"))), loss, train,
                      str(tmp_path / "finetune"), progress=False)
    images, labels = next(iter(trainer._loader()))
    terms = trainer.train_step(images, labels)
    assert set(terms) == {"loss", "ce", "logit_mse"} and torch.equal(terms["loss"], terms["logit_mse"])
    assert trainer._config()["distill"] == {"method": "logit_mse", "label_smoothing": 0.1, "ce_weight": 0.0,
                                            "weight": 2.0}


class Scale(nn.Module):
    """A learned per-channel scale: a layer type the framework does not know."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.scale, self.act = nn.Conv2d(3, 8, 3, padding=1), Scale(8), nn.ReLU()
        self.body, self.head = nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.body(self.act(self.scale(self.stem(x))))))


def test_a_new_layer_rule_prunes_a_custom_layer_exactly(undo):
    from pruning.cost import CostModel
    from pruning.layers import LAYER_RULES, LayerCost, LayerRule, register_rule

    torch.manual_seed(0)
    model = ScaleNet().eval()
    unknown = build_channel_graph(model, 16, protected=[]).groups["stem"]  # kept whole, never pruned wrongly
    assert not unknown.prunable and "'scale.weight'" in unknown.reason and "layer rule" in unknown.reason

    @register_rule(Scale)
    class ScaleRule(LayerRule):  # channelwise (the default): channel i of the output reads channel i
        def cost(self, module, output_shape):
            return LayerCost(params_per_out=1)

        def prune_out(self, module, idx):
            module.weight = nn.Parameter(module.weight.data[idx].clone())

    undo(lambda: LAYER_RULES.unregister(Scale))
    graph = build_channel_graph(model, 16, protected=[])
    assert "scale" in [m.module for m in graph.groups["stem"].members]
    keep = random_keep(graph, seed=1)
    pruned = prune_model(model, graph, keep)
    assert pruned.scale.weight.shape == (len(keep["stem"]),)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(pruned(x), masked_reference(model, graph, keep)(x), atol=1e-5)
    widths = {g: len(k) for g, k in keep.items()}
    assert CostModel(graph, model).params(widths) == sum(p.numel() for p in pruned.parameters())


class HalfBlock(nn.Module):
    """Convolves half its channels and passes the other half on, cutting at a size it holds (like CSP)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half, self.conv = channels // 2, nn.Conv2d(channels // 2, channels // 2, 3, padding=1)

    def forward(self, x):
        a, b = x.split(self.half, dim=1)
        return torch.cat([self.conv(a), b], dim=1)


class HalfNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 8, 3, padding=1), HalfBlock(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_a_new_split_rule_resizes_a_module_that_cuts_its_channels(undo):
    from pruning.layers import UnsupportedLayerError
    from pruning.splits import SPLIT_RULES, SplitRule, register_split_rule

    torch.manual_seed(0)
    model = HalfNet().eval()
    with pytest.raises(UnsupportedLayerError, match="module 'block' .*register_split_rule"):
        build_channel_graph(model, 16, protected=[])  # the sizes it holds would go stale: refused

    @register_split_rule(HalfBlock)
    class HalfSplit(SplitRule):
        def resize(self, module, cuts):  # cuts[0]: the pruned widths of the parts of its one split
            module.half = cuts[0][0]

    undo(lambda: SPLIT_RULES.unregister(HalfBlock))
    graph = build_channel_graph(model, 16, protected=[])
    keep = random_keep(graph, seed=1)
    assert len(keep["stem"]) < 4  # both halves keep the same channels (split(int) needs equal halves)
    pruned = prune_model(model, graph, keep)
    assert pruned.block.half == len(keep["stem"])
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(pruned(x), masked_reference(model, graph, keep)(x), atol=1e-5)


class PlainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.body, self.head = nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.body(self.act(self.stem(x)))))


def test_a_new_protected_default_is_used(undo):
    from pruning.protect import PROTECTED, register_protected

    assert build_channel_graph(PlainNet(), 16).protected_patterns == ()  # no family default, no timm config
    register_protected(PlainNet, ["stem"])
    undo(lambda: PROTECTED.unregister(PlainNet))
    graph = build_channel_graph(PlainNet(), 16)
    assert graph.protected_patterns == ("stem",) and not graph.groups["stem"].prunable
    assert graph.groups["body"].prunable
    assert build_channel_graph(PlainNet(), 16, protected=[]).groups["stem"].prunable  # model.protected overrides


def test_a_new_logger_is_selected_by_name(tmp_path, undo):
    from pruning.loggers import LOGGERS, register_logger

    @register_logger("memory")
    class MemoryLogger(NullLogger):
        def __init__(self, keep: int = 10) -> None:
            self.keep, self.logged = keep, []

        def log(self, metrics, step=None):
            self.logged = (self.logged + [(step, dict(metrics))])[-self.keep:]

    undo(lambda: LOGGERS.unregister("memory"))
    search_path = _yaml(tmp_path / "conf", "logger", "memory", "name: memory\nkeep: 3\n")
    logger = LOGGERS.from_config(_compose(search_path, "logger=memory").logger)
    assert isinstance(logger, MemoryLogger) and logger.keep == 3


def test_registries_refuse_clashes_and_name_what_they_know(undo):
    from pruning.importance import IMPORTANCES, L1Importance, create_importance, register_importance
    from pruning.solve import SOLVERS, solve

    with pytest.raises(ValueError, match="'l1' is already registered.*L1Importance"):
        register_importance("l1")(type("Other", (L1Importance,), {}))
    assert IMPORTANCES["l1"] is L1Importance
    with pytest.raises(UserInputError, match=r"unknown solver 'simplex'; choose one of \[.*'exact'.*\].*register_solver"):
        solve(None, "simplex")
    with pytest.raises(UserInputError, match=r"criterion 'random' cannot take \['sead'\].*'seed'"):
        create_importance("random", sead=1)
    assert "exact" in SOLVERS and "greedy" in SOLVERS.names()
