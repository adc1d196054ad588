"""No lost hours: time-triggered checkpoints (``trainer.checkpoint_minutes``) and resuming a killed run.

The trainer's wall clock (``distill.train._clock``) is replaced by a fake one that the logger advances, so
which updates checkpoint is exact. The end-to-end test drives the Hydra app as a subprocess, SIGKILLs it
right after its first (time-triggered, mid-epoch) checkpoint and runs the same command again.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distill.train as train_module
from test_distill_helpers import IMG, state_equal, tiny_pair, write_images
from distill import TrainConfig, create_loss, finetune
from distill.checkpoint import LAST, load_checkpoint
from pruning import artifacts
from pruning.data import image_dataset

ROOT = Path(__file__).resolve().parents[1]
MINUTES_PER_UPDATE = 4.0  # the fake clock's advance per logged update


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp("images")))  # 24 images: 6 batches of 4 per epoch


class _Clock:
    """A wall clock (seconds) that only moves when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Killed(Exception):
    """The job was cancelled (raised by the logger, mid-epoch, before the next checkpoint)."""


class _Ticker:
    """A logger that advances the clock by MINUTES_PER_UPDATE per update since its last call; it may also die."""

    def __init__(self, clock: _Clock, die_at: int | None = None) -> None:
        self.clock, self.die_at, self.last = clock, die_at, 0

    def log(self, metrics, step):
        if step == self.die_at:
            raise _Killed(f"killed at update {step}")
        self.clock.now += 60 * MINUTES_PER_UPDATE * (step - self.last)
        self.last = step


@pytest.fixture()
def saves(monkeypatch):
    """Every checkpoint written, as (step, epoch, batch); the trainer runs on a fake clock."""
    written: list[tuple[int, int, int]] = []
    real = train_module.save_checkpoint

    def save(path, state):
        written.append((state["step"], state["epoch"], state["batch"]))
        real(path, state)

    clock = _Clock()
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    monkeypatch.setattr(train_module, "_clock", clock)
    return written, clock


def _cfg(**kwargs) -> TrainConfig:
    return TrainConfig(**{**dict(batch_size=4, img_size=IMG, workers=0, lr=0.02, epochs=2, seed=1, log_every=1,
                                 warmup_epochs=0.5), **kwargs})


@pytest.mark.parametrize("minutes,log_every,expected", [
    # 4 min per update, 6 updates per epoch: minute 12 (update 3) saves; the epoch end (update 6, minute 24)
    # saves and restarts the count; minute 36 (update 9) saves; the last update saves as an epoch end
    (10, 1, [(3, 0, 3), (6, 1, 0), (9, 1, 3), (12, 2, 0)]),
    # the clock is read at logged updates only: 8 min at update 2 is too early, 16 at update 4 is due
    (10, 2, [(4, 0, 4), (6, 1, 0), (10, 1, 4), (12, 2, 0)]),
    (None, 1, [(6, 1, 0), (12, 2, 0)]),  # off: epoch ends only
    (1000, 1, [(6, 1, 0), (12, 2, 0)]),  # never due
])
def test_time_triggered_checkpoints(saves, data_root, tmp_path, minutes, log_every, expected):
    written, clock = saves
    _, student = tiny_pair("resnet18")  # plain cross-entropy: which updates save does not depend on the loss
    finetune(student, None, image_dataset(data_root), create_loss("ce"), _cfg(checkpoint_minutes=minutes, log_every=log_every),
             str(tmp_path), logger=_Ticker(clock), progress=False)
    assert written == expected


def test_time_and_step_triggers_combine_without_double_saves(saves, data_root, tmp_path):
    written, clock = saves
    _, student = tiny_pair("resnet18")  # plain cross-entropy: which updates save does not depend on the loss
    finetune(student, None, image_dataset(data_root), create_loss("ce"), _cfg(checkpoint_minutes=10, checkpoint_every_steps=4),
             str(tmp_path), logger=_Ticker(clock), progress=False)
    # update 3 by time (minute 12), 4 by count (which restarts the clock), 6 the epoch end, 8 by count, 11 by time
    # (12 min after update 8), 12 the end; no update is saved twice
    assert [s for s, _, _ in written] == [3, 4, 6, 8, 11, 12]


def test_resume_from_a_time_triggered_checkpoint_is_bit_identical(saves, data_root, tmp_path):
    """Killed at update 6 with the last checkpoint at update 4 (mid-epoch, batch 4 of 6, by time): the resumed
    run replays batches 4.. of epoch 0 and ends with the weights and loss history of an uninterrupted run."""
    written, clock = saves
    cfg = _cfg(checkpoint_minutes=10, log_every=2, ema_decay=0.8)

    def run(out: str, die_at: int | None = None):
        teacher, student = tiny_pair("resnet18", drop_rate=0.2, drop_path_rate=0.1)
        return finetune(student, teacher, image_dataset(data_root), create_loss("inner"), cfg, out,
                        logger=_Ticker(clock, die_at), progress=False)

    straight = run(str(tmp_path / "a"))
    written.clear()
    with pytest.raises(_Killed):
        run(str(tmp_path / "b"), die_at=6)  # logged updates 2 (8 min, not due) and 4 (16 min, due)
    assert written == [(4, 0, 4)]
    ckpt = load_checkpoint(str(tmp_path / "b" / LAST))
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (4, 0, 4) and len(ckpt["history"]) == 2  # updates 2, 4
    resumed = run(str(tmp_path / "b"))
    assert straight.resumed_from is None and resumed.resumed_from == 4 and resumed.steps == straight.steps == 12
    for part in ("student", "ema", "projections"):
        assert state_equal(getattr(straight, part).state_dict(), getattr(resumed, part).state_dict()), part

    def curve(history):
        return [{k: v for k, v in h.items() if k != "train/images_per_s"} for h in history]

    assert curve(resumed.history) == curve(straight.history)  # each logged mean covers the same updates


@pytest.mark.parametrize("value", [0, -1.5, float("nan")])
def test_bad_checkpoint_minutes_is_named(value):
    with pytest.raises(ValueError, match=r"checkpoint_minutes=.*checkpoint_minutes > 0 or None"):
        TrainConfig(checkpoint_minutes=value).check()
    TrainConfig(checkpoint_minutes=None).check()
    TrainConfig(checkpoint_minutes=0.001).check()


# ------------------------------------------------------------------------------------- end to end

def _command(tmp_path: Path, data: str) -> list[str]:
    return [sys.executable, "-m", "pruning.run", "model.name=resnet18", "model.img_size=32", "model.pretrained=false",
            "importance=l1", "budget.target=0.5", "stages=[importance,solve,prune,finetune]", "logger=none",
            f"data.root={data}", "data.workers=0", "trainer.epochs=2", "trainer.batch_size=2", "trainer.log_every=1",
            "trainer.warmup_epochs=0", "trainer.cooldown_epochs=0", "trainer.amp=null", "trainer.channels_last=false",
            "trainer.checkpoint_minutes=0.001",  # 60 ms: the time trigger fires at the first logged updates
            f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "KP_CACHE_DIR": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_cli_killed_mid_epoch_resumes_from_its_checkpoint(tmp_path):
    data = write_images(str(tmp_path / "images"), per_class=20)  # 60 images, 54 after the hold-out: 27 updates per epoch
    cmd, env = _command(tmp_path, data), _env(tmp_path)
    last = tmp_path / "run" / "finetune" / LAST
    with open(tmp_path / "first.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        try:
            while not last.exists():
                assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before any checkpoint: " \
                                            f"{(tmp_path / 'first.log').read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no final save
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    k, epoch, batch, per_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch"], 27
    # written by time mid-epoch (not at an epoch end, and checkpoint_every_steps is off), before the run ended
    assert 0 < batch < per_epoch and k == epoch * per_epoch + batch < 2 * per_epoch, (epoch, batch, k)
    report_path = tmp_path / "run" / artifacts.REPORT
    assert not report_path.exists() or "finetune" not in artifacts.read_json(str(report_path))

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    resuming = f"resuming {last} at update {k} of {2 * per_epoch} (epoch {epoch}, batch {batch} of {per_epoch})"
    assert resuming in again.stdout + again.stderr  # logged by the trainer (Hydra's console log and run.log)
    report = artifacts.read_json(str(report_path))["finetune"]
    assert report["steps"] == 2 * per_epoch
    assert report["resumed_from"] == k  # not from step 0
    # the history up to update k is the killed run's own (its measured images/s included): it was not redone
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["step"] == 2 * per_epoch and final["history"][:len(ckpt["history"])] == ckpt["history"]
    assert [h["step"] for h in final["history"]] == list(range(1, 2 * per_epoch + 1))
