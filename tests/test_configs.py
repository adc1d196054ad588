"""Every option of every config group composes, and everything it selects by registered name builds
(lightning-hydra-template's test_configs): a typo in a YAML file fails here, not an hour into a run."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from distill import TrainConfig, create_loss, loss_from_config
from pruning.importance import IMPORTANCES, importance_from_config
from pruning.loggers import LOGGERS
from pruning.models import check_model_name
from pruning.solve import SOLVERS, check_solver

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
    solver = OmegaConf.to_container(cfg.solver)
    check_solver(solver.pop("name"), **{k: v for k, v in solver.items() if k != "allow_block_removal"})
    criterion = importance_from_config(cfg.importance)
    assert criterion.name == cfg.importance.name
    loss_from_config(cfg.distill).check()
    TrainConfig(**OmegaConf.to_container(cfg.trainer)).check()
    logger = LOGGERS.from_config(cfg.logger)
    assert hasattr(logger, "log") and hasattr(logger, "summary")


@pytest.mark.parametrize("group,registry", [("solver", SOLVERS), ("importance", IMPORTANCES), ("logger", LOGGERS)])
def test_every_registered_name_has_a_yaml_named_after_it(group, registry):
    """A YAML's ``name`` is the registered name and its file name: nothing is said twice without a check."""
    assert set(_options(group)) == set(registry)
    for option in _options(group):
        assert OmegaConf.load(CONF / group / f"{option}.yaml").name == option


def test_every_distill_yaml_names_its_loss():
    from distill.loss import LOSSES

    assert set(_options("distill")) == set(LOSSES)
    assert all(OmegaConf.load(CONF / "distill" / f"{o}.yaml").name == o for o in _options("distill"))


def test_no_config_names_a_class():
    """One mechanism: configs select by registered name, never by an import path (``_target_``)."""
    assert not [p.name for p in CONF.rglob("*.yaml") if "_target_" in p.read_text()]


def test_width_constraints_are_said_once():
    """round_to and min_keep_fraction constrain the problem, whichever solver: budget.*, in no solver's YAML."""
    for option in _options("solver"):
        solver = _compose(f"solver={option}").solver
        assert "round_to" not in solver and "min_keep_fraction" not in solver, option
    budget = _compose().budget
    assert (budget.round_to, budget.min_keep_fraction) == (1, 0.0)


@pytest.mark.parametrize("option", _options("distill"))
def test_distill_options_build_their_losses_defaults(option):
    """Each distill YAML gives its loss the values it always had, and holds only the fields that loss reads."""
    assert loss_from_config(_compose(f"distill={option}").distill) == create_loss(option)


def test_a_typo_in_an_option_is_caught():
    """Guards the tests above: a misspelt field fails to build, naming it and the fields the loss takes."""
    cfg = _compose("distill=inner")
    with open_dict(cfg):
        cfg.distill.gama = 1.0  # not a field of the inner loss
    with pytest.raises(ValueError, match="gama.*gamma"):
        loss_from_config(cfg.distill)

