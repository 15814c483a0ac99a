"""Thin helpers around ``torch.distributed`` for multi-GPU / multi-node training with ``torchrun``.

``torchrun --nproc_per_node=8 -m cld_fast.cli train ...`` (or ``torchrun ... $(which cld-fast) train``)
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` reads them and initialises the default process group (NCCL on CUDA, gloo on
CPU). Without those variables everything here degrades to a single process: rank 0 of 1, barriers
and reductions are no-ops.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = [
    "init_from_env", "is_initialized", "rank", "world_size", "local_rank", "is_main", "barrier",
    "all_reduce_sum", "all_reduce_max", "all_gather_object", "broadcast_object", "destroy", "device_for_rank",
]


def is_initialized() -> bool:
    """Whether a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Rank on this node (``LOCAL_RANK`` set by torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the process that writes checkpoints, logs and plots (global rank 0)."""
    return rank() == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_for_rank(requested: Optional[str] = None) -> torch.device:
    """The device this process trains on: ``requested`` if given (``cuda`` means this rank's local GPU),
    else this rank's local GPU when CUDA is available, else the CPU."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda was requested but torch sees no CUDA device")
            return torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(device: Optional[torch.device] = None, backend: Optional[str] = None,
                  timeout_minutes: float = 30.0) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    Does nothing (and returns False) when ``WORLD_SIZE`` is unset or 1, or when a group is already
    up. The backend is ``backend``, else NCCL for a CUDA ``device`` and gloo otherwise. On CUDA the
    current device is set to this rank's GPU first. Returns True when it created a group.
    """
    if is_initialized() or env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = torch.device(device) if device is not None else device_for_rank()
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = dict(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if device.type == "cuda" and backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return True


def destroy() -> None:
    """Tear down the default process group if one is up."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place sum over ranks; returns ``t`` (unchanged in a single process)."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In place max over ranks; returns ``t``."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
