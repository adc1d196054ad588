"""Two processes under torchrun (gloo, CPU): the same entry as one process, identical weights on both ranks,
exact metrics from sharded evaluation, and only rank 0 writing checkpoints and logs.

This file is also the worker script torchrun starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_end_identical(tmp_path):
    from test_distill_helpers import state_equal, write_images
    from distill.checkpoint import LAST, load_checkpoint

    data = write_images(str(tmp_path / "images"), per_class=6)  # 18 images: 9 per rank, 2 batches of 4 each
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(tmp_path), data]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == 4  # 2 epochs x 2 batches per rank
    for part in ("student", "projections"):
        assert state_equal(r0[part], r1[part]), part
    assert load_checkpoint(str(tmp_path / "run" / LAST))["config"]["run"]["world_size"] == 2
    assert (tmp_path / "log0.jsonl").exists() and not (tmp_path / "log1.jsonl").exists()
    # 7 samples over 2 ranks (4 + 3): none repeated or dropped, the known answer exactly
    assert r0["metrics"] == r1["metrics"] and r0["metrics"]["images"] == 7
    assert r0["metrics"]["top1"] == pytest.approx(100 * 3 / 7) and r0["metrics"]["top5"] == pytest.approx(100 * 5 / 7)


def _known_answer_set():
    """7 score vectors whose true class ranks 0, 0, 0, 1, 4, 5, 9: top-1 3/7, top-5 5/7."""
    from torch.utils.data import TensorDataset

    labels, ranks = torch.arange(7), [0, 0, 0, 1, 4, 5, 9]
    scores = torch.zeros(7, 10)
    for i, r in enumerate(ranks):
        order = [c for c in range(10) if c != i]
        order.insert(r, i)
        scores[i, order] = torch.linspace(1, 0, 10)
    return TensorDataset(scores, labels)


def main(out: str, data: str) -> None:
    torch.set_num_threads(1)
    from test_distill_helpers import tiny_pair
    from distill import TrainConfig, create_loss, evaluate, finetune, init_distributed
    from pruning import distributed as D
    from pruning.data import image_dataset

    assert init_distributed() and D.world_size() == 2
    rank = D.rank()

    class FileLogger:
        def log(self, metrics, step):
            with open(os.path.join(out, f"log{rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    teacher, student = tiny_pair("resnet18", seed=0)
    train = TrainConfig(epochs=2, batch_size=4, img_size=32, workers=0, lr=0.05, log_every=1, seed=1)
    result = finetune(student, teacher, image_dataset(data), create_loss("inner"), train, os.path.join(out, "run"),
                      logger=FileLogger(), progress=False)
    metrics = evaluate(torch.nn.Identity(), _known_answer_set(), batch_size=2, workers=0, progress=False)
    torch.save({"student": result.student.state_dict(), "projections": result.projections.state_dict(), "steps": result.steps,
                "world": D.world_size(), "metrics": metrics}, os.path.join(out, f"rank{rank}.pth"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1], sys.argv[2])
