"""A run killed mid-epoch and resumed ends bit-for-bit where an uninterrupted run ends.

The runs are real subprocesses (this file is also their script): one goes straight through; another is
killed with ``os._exit(1)`` right after update 9 (the last checkpoint is at update 8, mid-epoch 2), then
started again on the same folder. Dropout and drop-path are on, so the random state must be restored too.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _run(out: str, data: str, die_after: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, __file__, "--out", out, "--data", data]
    if die_after is not None:
        cmd += ["--die-after", str(die_after)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    from test_distill_helpers import state_equal, write_images
    from distill.checkpoint import LAST, load_checkpoint

    data = write_images(str(tmp_path / "images"))
    straight = _run(str(tmp_path / "a"), data)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run(str(tmp_path / "b"), data, die_after=9)
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert not (tmp_path / "b" / "final.pth").exists()
    ckpt = load_checkpoint(str(tmp_path / "b" / LAST))
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (8, 1, 2)
    resumed = _run(str(tmp_path / "b"), data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "final.pth", weights_only=True) for d in "ab")
    assert a["resumed_from"] is None and b["resumed_from"] == 8 and a["steps"] == b["steps"] == 12
    for part in ("student", "ema", "projections"):
        assert state_equal(a[part], b[part]), part
    assert a["losses"] == b["losses"]  # the loss curve over the whole run, resumed part included


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--die-after", type=int)
    args = ap.parse_args()
    torch.set_num_threads(1)  # same kernels, same summation order, in every run

    from test_distill_helpers import tiny_pair
    from distill import TrainConfig, create_loss, finetune
    from pruning.data import image_dataset

    class DieAfter:
        def log(self, metrics, step):
            if step == args.die_after:
                os._exit(1)  # no cleanup, no final save: as abrupt as a kill

    teacher, student = tiny_pair("resnet18", drop_rate=0.2, drop_path_rate=0.1)
    train = TrainConfig(epochs=2, batch_size=4, img_size=32, workers=0, lr=0.02, warmup_epochs=0.5, log_every=1,
                        checkpoint_every_steps=4, ema_decay=0.8, seed=3)
    result = finetune(student, teacher, image_dataset(args.data), create_loss("inner"), train, args.out, logger=DieAfter(), progress=False)
    torch.save({"student": result.student.state_dict(), "ema": result.ema.state_dict(), "projections": result.projections.state_dict(),
                "steps": result.steps, "resumed_from": result.resumed_from,
                "losses": [h["train/loss"] for h in result.history if "train/loss" in h]}, os.path.join(args.out, "final.pth"))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
