"""torch.distributed in one place: set-up under torchrun or SLURM, rank queries, and the collectives.

A single plain process is world size 1, rank 0, without a process group; every collective below is then a
no-op, so the same code runs on a laptop and on N GPUs.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist


def slurm_master_port() -> str:
    """The rendezvous port of this SLURM job: ``MASTER_PORT`` when set, else one derived from the job id
    (20000-29999, below Linux's ephemeral ports), so jobs sharing a node (two sweep jobs on an 8-GPU node)
    do not collide on torch's default 29500."""
    if "MASTER_PORT" in os.environ:
        return os.environ["MASTER_PORT"]
    return str(20000 + int(os.environ.get("SLURM_JOB_ID", "9500")) % 10000)


def _from_slurm() -> None:
    """Fill torchrun's variables from SLURM's when a SLURM job runs one task per process (submitit)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    import submitit  # installed with the [slurm] extra

    env = submitit.JobEnvironment()
    os.environ.update(
        RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.hostnames[0], MASTER_PORT=slurm_master_port(),
    )


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group torchrun or SLURM describes; a no-op for one plain process.

    A launcher's single process (``torchrun --nproc_per_node=1``, which sets ``WORLD_SIZE=1``) joins a group of
    one, so it runs exactly the code of N processes (NCCL, DDP, the collectives) and a one-GPU check proves them.

    Args:
        backend: ``nccl`` on GPU and ``gloo`` on CPU when None.

    Returns:
        Whether this process is now part of a process group (of one or more processes).
    """
    _from_slurm()
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ  # what init_process_group reads
    if is_distributed() or not launched:
        return is_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return True


def is_distributed() -> bool:
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the only rank that writes files and logs."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine, from torchrun's ``LOCAL_RANK``."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def collective_device() -> torch.device:
    """Where tensors for collectives live: the GPU for NCCL, the CPU for gloo."""
    if is_distributed() and dist.get_backend() == "nccl":
        return default_device()
    return torch.device("cpu")


def describe() -> dict[str, Any]:
    """How this run is spread: processes, the collective backend (None without a group) and this rank's device."""
    return {"processes": world_size(), "backend": dist.get_backend() if is_distributed() else None,
            "device": str(default_device())}


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


T = TypeVar("T")


def main_decides(read: Callable[[], T]) -> T:
    """``read()`` on rank 0, its result on every rank: what a shared cache holds must be one answer, or ranks
    that saw it at different moments (a concurrent run writing it) would take different branches and wait
    forever in different collectives."""
    return broadcast_object(read() if is_main() else None)


def main_first(build: Callable[[bool], T]) -> T:
    """``build(progress)`` on rank 0 first, then on the other ranks: rank 0 computes and caches a result (a
    latency table, thumbnails), the others read its cache instead of repeating the work. Only rank 0 shows
    progress."""
    result = build(True) if is_main() else None
    barrier()
    return result if is_main() else build(False)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """All-reduce ``tensor`` in place wherever it lives: NCCL reduces GPU tensors only, so a CPU tensor (a count,
    a sum of scores) makes a round trip through the GPU."""
    if not is_distributed():
        return tensor
    device = collective_device()
    if tensor.device == device:
        dist.all_reduce(tensor, op=op)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op)
    return tensor.copy_(moved)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (returned for chaining), on any device."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each of ``tensors`` over ranks in place."""
    for t in tensors:
        all_reduce_sum(t)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of ``tensor`` over ranks in place, on any device."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
