"""torch.distributed set-up for torchrun and SLURM (submitit): one entry point for 1 or N processes."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _from_slurm() -> None:
    """Fill torchrun's variables from SLURM's when a SLURM job runs one task per process (submitit)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    import submitit  # installed with the [slurm] extra

    env = submitit.JobEnvironment()
    os.environ.update(
        RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.hostnames[0], MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
    )


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun or SLURM; returns ``(rank, world_size)``.

    NCCL on GPUs, gloo on CPU. A single plain process returns ``(0, 1)`` without a process group.
    """
    _from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on rank 0 (and in a single process): the only rank that writes files and logs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    """This process's device: its GPU under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
