"""pruning.distributed: who joins a process group, and collectives that accept a tensor on any device.

NCCL reduces GPU tensors only; the importance stage once handed it CPU counts and failed on the first GPU run
under torchrun ("No backend type associated with device type cpu"). The collectives now move such a tensor to
the collective device and back, in place.
"""
from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from pruning import distributed as D


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def group_of_one(request):
    backend = request.param
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def _reduces_in_place(tensor: torch.Tensor) -> None:
    device = tensor.device
    assert D.all_reduce_sum(tensor) is tensor and tensor.device == device
    assert D.all_reduce_max(tensor) is tensor and tensor.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("group_of_one", ["gloo"], indirect=True)
def test_collectives_keep_the_tensor_and_its_device(group_of_one):
    assert D.describe() == {"processes": 1, "backend": "gloo", "device": str(D.default_device())}
    _reduces_in_place(torch.tensor([1.0, 2.0]))


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs a CUDA GPU with NCCL")
@pytest.mark.parametrize("group_of_one", ["nccl"], indirect=True)
def test_nccl_reduces_cpu_and_gpu_tensors(group_of_one):
    torch.cuda.set_device(0)
    _reduces_in_place(torch.tensor([1.0, 2.0]))  # a CPU tensor: a round trip through the GPU
    _reduces_in_place(torch.tensor([1.0, 2.0], device="cuda"))


def test_only_a_launched_process_joins_a_group(monkeypatch):
    for var in ("WORLD_SIZE", "MASTER_ADDR", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_distributed() is False and not D.is_distributed()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a WORLD_SIZE without a rendezvous address is not a launcher's
    assert D.init_distributed() is False and D.describe()["backend"] is None


def test_slurm_tasks_fill_torchruns_variables_with_a_port_of_their_job(monkeypatch):
    """Under SLURM (submitit, one process per task) rank, world and rendezvous come from the job; two jobs on
    one node rendezvous on different ports (MASTER_PORT, when set, wins)."""
    submitit = pytest.importorskip("submitit")
    task = SimpleNamespace(global_rank=1, num_tasks=2, local_rank=1, hostnames=["node7", "node8"])
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: task)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", env | {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "123456"})
    D._from_slurm()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "23456"}
    os.environ["SLURM_JOB_ID"] = "123457"
    assert D.slurm_master_port() == "23456"  # already set: kept
    del os.environ["MASTER_PORT"]
    assert D.slurm_master_port() == "23457"


def _decide(rank: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, D.main_decides(lambda: f"cache seen by rank {D.rank()}")))
    finally:
        dist.destroy_process_group()


def test_rank_zero_decides_what_a_shared_cache_holds():
    """A cache another run writes while this one starts may be seen by one rank and not by the other; each rank
    must still take the same branch (a rank that skipped a stage would wait forever in another collective)."""
    ctx = torch.multiprocessing.get_context("spawn")
    out, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=_decide, args=(rank, port, out)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(out.get() for _ in procs) == [(0, "cache seen by rank 0"), (1, "cache seen by rank 0")]
