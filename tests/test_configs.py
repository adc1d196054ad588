"""Every option of every config group composes, and everything it builds with ``_target_`` instantiates
(lightning-hydra-template's test_configs): a typo in a YAML file fails here, not an hour into a run."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from pruning.models import check_model_name
from pruning.solve import SOLVERS

CONF = Path(__file__).resolve().parents[1] / "conf"
# groups chosen with "group=option"; budget and experiment are added with "+group=option"
GROUPS = ["model", "importance", "solver", "distill", "data", "trainer", "logger"]
ADDED = ["budget", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["data.root=/data", *overrides])


def test_every_group_has_options():
    assert all(_options(g) for g in GROUPS + ADDED)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_instantiates(group, option, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = _compose(f"{group}={option}")
    OmegaConf.resolve(cfg)  # every interpolation resolves
    _check_built(cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in ADDED for o in _options(g)])
def test_every_added_option_composes_and_instantiates(group, option, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = _compose(f"+{group}={option}")
    OmegaConf.resolve(cfg)
    _check_built(cfg)


def _check_built(cfg) -> None:
    """What the pipeline builds from the config: its checks pass on every shipped option."""
    check_model_name(cfg.model.name)
    assert cfg.solver.name in SOLVERS, cfg.solver.name
    criterion = instantiate(cfg.importance.criterion)
    assert criterion.name == cfg.importance.name
    instantiate(cfg.distill).check()
    instantiate(cfg.trainer).check()
    logger = instantiate(cfg.logger)
    assert hasattr(logger, "log") and hasattr(logger, "summary")


def test_every_registered_solver_has_a_yaml():
    assert set(_options("solver")) == set(SOLVERS)


def test_width_constraints_are_said_once():
    """round_to and min_keep_fraction constrain the problem, whichever solver: budget.*, in no solver's YAML."""
    for option in _options("solver"):
        solver = _compose(f"solver={option}").solver
        assert "round_to" not in solver and "min_keep_fraction" not in solver, option
    budget = _compose().budget
    assert (budget.round_to, budget.min_keep_fraction) == (1, 0.0)


@pytest.mark.parametrize("option", _options("distill"))
def test_distill_options_build_their_methods_defaults(option):
    """Each distill YAML gives its method the values it always had; the fields it leaves out (unread by it) default."""
    from distill import DistillConfig

    assert instantiate(_compose(f"distill={option}").distill) == DistillConfig(method=option)


def test_a_typo_in_an_option_is_caught():
    """Guards the tests above: a misspelt field fails to instantiate."""
    cfg = _compose("distill=inner")
    with open_dict(cfg):
        cfg.distill.gama = 1.0  # not a DistillConfig field
    with pytest.raises(Exception, match="gama"):
        instantiate(cfg.distill)

