"""torch.distributed, as the engine uses it: nothing networked of corex's own.

A run started by ``torchrun`` (or ``corex run --nproc N``, which starts torchrun) finds
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment and joins the process group that
torchrun's rendezvous set up: gloo on CPU, nccl on GPU. Rank 0 alone writes the run directory; the
others wait for it at barriers. Without those variables everything here is a no-op, so a
single-process run does exactly what it did before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from corex.errors import CorexError

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> torch.device | None:
    """Join torchrun's process group (once) and return this rank's device; None when not launched.

    ``device`` is the recipe's: ``auto`` takes this rank's GPU (``LOCAL_RANK``) when there is one.
    """
    if not launched():
        return None
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        raise CorexError(f"device: '{device}' was asked for, but this machine has no CUDA device")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    if wants_cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled: only plain values, never files)."""
    if world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def main_first(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0, then (if it succeeded there) on the other ranks.

    A user error on rank 0 reaches every rank as the same message, instead of leaving the others
    waiting at a barrier for a rank that has gone.
    """
    if world_size() == 1:
        return work()
    failure, result = None, None
    if is_main():
        try:
            result = work()
        except CorexError as exc:
            failure = exc
    message = broadcast(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise CorexError(f"(from rank 0) {message}")
    return result if is_main() else work()


__all__ = ["all_sum", "barrier", "broadcast", "gather", "gather_to_main", "is_main", "launched", "main_first", "rank", "setup", "teardown", "world_size"]
