"""The process group of one role's ranks (the learner, or the separate reference policy): joining it, the float
all-reduce the ranks use to agree on token counts, micro-batch counts and metrics, and leaving it.

Each rank is one Ray actor (one process), so a role's group is the default ``torch.distributed`` group of its
processes: gloo on CPU, NCCL on GPU (with a gloo side group for CPU-offloaded shards).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_process_group(learner_backend: str, rank: int, world_size: int, device: torch.device, master_addr: str,
                       master_port: int, cpu_offload: bool = False) -> None:
    """Join the group (rank 0 hosts the TCP rendezvous at ``master_addr:master_port``); a no-op when this process
    has joined already.

    Args:
        learner_backend: ``learner.backend``; under ``deepspeed`` this sets ``LOCAL_RANK`` (DeepSpeed reads the
            device index from it; under Ray each actor sees its one GPU as device 0) and, on CPU,
            ``DS_ACCELERATOR=cpu``, unless they are set already.
        device: the rank's device; ``cuda`` picks NCCL, ``cpu`` gloo.
        cpu_offload: on ``cuda``, add gloo for CPU tensors (offloaded shards are reduced on CPU: gradient norm).
    """
    if learner_backend == "deepspeed":
        os.environ.setdefault("LOCAL_RANK", "0" if device.type == "cuda" else str(rank))
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and cpu_offload:
        backend = "cuda:nccl,cpu:gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size)


def all_reduce(values: list[float], world_size: int, device: torch.device,
               op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """``values`` reduced elementwise over the group's ranks (float64); returned unchanged at world size 1."""
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def leave() -> None:
    """Destroy this process's group (DeepSpeed runs abort at exit ~1 in 5 times without it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def empty_cache(device: torch.device) -> None:
    """Return the allocator's cached blocks to the device at a phase boundary (CUDA ``empty_cache``), so that a
    colocated engine can use them; nothing to do on CPU, whose allocator returns freed memory itself."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
