"""What calibration, inference and evaluation need to run under ``torchrun`` (any number of processes and nodes,
nccl on GPU, gloo on CPU): the rank, shards of cases and of slice batches, and gathering small results.

Every helper also works without an initialised process group (one process: rank 0 of 1), so the same code runs
with and without ``torchrun``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["rank_and_world", "is_distributed", "barrier", "gather_objects", "shard_cases", "ShardedBatchSampler"]

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_cases(items: Sequence[T], rank: int | None = None, world: int | None = None) -> list[T]:
    """This rank's cases: rank r gets items r, r + W, r + 2W, ... (the order of MONAI's ``partition_dataset``
    without shuffling or padding, written out because that function refuses fewer items than ranks), so every case
    belongs to exactly one rank, shards differ in length by at most one, and a rank may get none."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    return list(items)[rank::world]


class ShardedBatchSampler(Sampler[list[int]]):
    """Batch sampler that cuts ``0..num_items-1`` into the consecutive batches of ``batch_size`` one process would
    make, and gives this rank every ``world``-th of them (batch ``k * world + rank`` is this rank's ``k``-th).

    Each batch holds the same slices as in a single-process run, so per-batch computations (e.g. the forward
    noise of a batch) and their results are identical; :func:`interleave` restores the single-process order.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int | None = None, world: int | None = None) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rank is None or world is None:
            rank, world = rank_and_world()
        self.num_items, self.batch_size, self.rank, self.world = int(num_items), int(batch_size), rank, world
        starts = range(0, self.num_items, self.batch_size)
        self.batches = [list(range(s, min(s + self.batch_size, self.num_items))) for s in starts][rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @staticmethod
    def interleave(per_rank: Sequence[Sequence[T]]) -> list[T]:
        """Per-rank lists of per-batch results (in each rank's order) -> the single-process batch order."""
        out: list[T] = []
        longest = max((len(p) for p in per_rank), default=0)
        for k in range(longest):
            for part in per_rank:
                if k < len(part):
                    out.append(part[k])
        return out
