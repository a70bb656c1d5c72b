"""What calibration, inference and evaluation need to run under ``torchrun`` (any number of processes and nodes,
nccl on GPU, gloo on CPU): the rank, shards of cases and of slice batches, and gathering small results.

Every helper also works without an initialised process group (one process: rank 0 of 1), so the same code runs
with and without ``torchrun``.

Waiting: every collective (and the rendezvous of :func:`init_process_group`) gives up after ``dist_timeout``
seconds (:func:`init_process_group`; torch's own default is 10 minutes for nccl). Work that one rank does alone for
longer (tuning in the evaluation) is waited for by :func:`run_on_rank0`, outside any collective; cases of uneven
cost are dealt out on demand by :func:`claim`, so that no rank waits at the next collective for long.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .io import first_line

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "init_process_group",
    "timeout_seconds",
    "rank_and_world",
    "is_distributed",
    "barrier",
    "gather_objects",
    "shard_cases",
    "claim",
    "run_on_rank0",
    "handlers_for_rank",
    "ShardedBatchSampler",
]

logger = logging.getLogger(__name__)

#: seconds a rank waits for the others (collectives, the rendezvous, rank 0's solo work) unless told otherwise
DEFAULT_TIMEOUT_S = 1800

_timeout_s: float | None = None  # what init_process_group was given in this process
_calls: dict[str, int] = {}  # per-name call counts: the store keys of run_on_rank0 / claim, equal on every rank

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``env://``): nccl when CUDA is available, else gloo; the
    rendezvous and every collective give up after ``timeout_s`` seconds (the bundles' ``dist_timeout``).

    Returns False, changing nothing, when a process group exists already."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < 10**9:
        raise ValueError(f"dist_timeout must be a number of seconds > 0, got {timeout_s!r}")
    if is_distributed():
        return False
    global _timeout_s
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=float(timeout_s)))
    _timeout_s = float(timeout_s)
    return True


def timeout_seconds() -> float:
    """The ``dist_timeout`` this process joined its group with (torch's default for a group made elsewhere)."""
    if _timeout_s is not None:
        return _timeout_s
    if is_distributed():
        try:
            return dist.distributed_c10d._get_default_timeout(dist.get_backend()).total_seconds()
        except (AttributeError, RuntimeError, ValueError):
            pass
    return float(DEFAULT_TIMEOUT_S)


def _store() -> dist.Store:
    """The key-value store of the default process group (shared by every rank)."""
    return dist.distributed_c10d._get_default_store()


def _key(name: str) -> str:
    """A store key unique to this call: every rank makes the same calls in the same order, so they agree on it."""
    count = _calls.get(name, 0)
    _calls[name] = count + 1
    return f"anofpdm/{name}/{count}"


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


def claim(items: Iterable[T], name: str) -> Iterator[T]:
    """This rank's share of ``items``, dealt out on demand: a rank takes the next unclaimed item when it is ready for
    one (an atomic counter in the process group's store), so each item goes to exactly one rank and the ranks finish
    within about one item of each other however uneven the items' costs (cases already done by an earlier run cost
    nothing). All items, in order, in one process.

    Every rank must call it with the same items, in the same order relative to its other ``claim`` calls."""
    items = list(items)
    if not is_distributed():
        return iter(items)
    store, key = _store(), _key(f"claim/{name}")

    def next_items() -> Iterator[T]:
        while (i := int(store.add(key, 1)) - 1) < len(items):
            yield items[i]

    return next_items()


class _Heartbeat:
    """A counter in the store that a daemon thread increments every ``interval`` seconds while the block runs."""

    def __init__(self, store: dist.Store, key: str, interval: float) -> None:
        try:
            self.store = store.clone()  # a connection of its own
        except (AttributeError, NotImplementedError, RuntimeError):
            self.store = store  # TCPStore calls are serialised: sharing the client is safe
        self.key, self.interval = key, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="anofpdm-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.add(self.key, 1)
            except Exception:  # noqa: BLE001 (the store is gone: the waiting ranks then see no more beats)
                return

    def __enter__(self) -> _Heartbeat:
        self.store.add(self.key, 1)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_on_rank0(fn: Callable[[], T], name: str, timeout_s: float | None = None, poll_s: float = 0.5) -> T | None:
    """``fn()`` on rank 0 while the other ranks wait outside any collective; its result on rank 0, None elsewhere
    (``fn()`` in one process).

    A ``barrier`` would be aborted after ``dist_timeout`` however legitimately busy rank 0 is (tuning on a large
    validation split takes hours). Instead the other ranks poll the process group's store, where rank 0 beats a
    heartbeat while ``fn`` runs: they give up (``TimeoutError``) after ``timeout_s`` (default
    :func:`timeout_seconds`) without a beat, i.e. when rank 0's process is gone or frozen, not because ``fn`` is long.
    An exception in ``fn`` is re-raised on rank 0 and ends the others' wait at once (``RuntimeError`` naming it).

    Every rank must call it, in the same order relative to its other ``run_on_rank0`` calls."""
    if not is_distributed():
        return fn()
    limit = float(timeout_s if timeout_s is not None else timeout_seconds())
    store, key = _store(), _key(f"rank0/{name}")
    if dist.get_rank() == 0:
        try:
            with _Heartbeat(store, f"{key}/beat", interval=min(10.0, max(limit / 5, 0.01))):
                out = fn()
        except BaseException as exc:
            store.set(key, f"failed: {first_line(exc)}")
            raise
        store.set(key, "ok")
        return out
    logger.info("rank %d waits for rank 0 to finish %s", dist.get_rank(), name)
    beats, seen = -1, time.monotonic()
    while not store.check([key]):
        now, count = time.monotonic(), int(store.add(f"{key}/beat", 0))
        if count != beats:
            beats, seen = count, now
        elif now - seen > limit:
            raise TimeoutError(
                f"rank {dist.get_rank()}: no sign of life from rank 0 for {limit:g} s while it runs {name} "
                "(dist_timeout)"
            )
        time.sleep(poll_s)
    status = store.get(key).decode()
    if status != "ok":
        raise RuntimeError(f"{name} failed on rank 0: {status.removeprefix('failed: ')}")
    return None


def handlers_for_rank(handlers: Iterable[Any], rank0_only: Iterable[str], rank: int | None = None) -> list[Any]:
    """The handlers this rank attaches: all on rank 0; on the other ranks those whose class is not named in
    ``rank0_only`` (class names such as ``"StatsHandler"``, or dotted paths ending in one).

    Chosen by name, not by position, so a handler added to the list stays on every rank (a rank-0-only one is named
    here too)."""
    if isinstance(rank0_only, str):
        raise TypeError(f"rank0_only must be a list of class names, got the string {rank0_only!r}")
    names = {str(n).rsplit(".", 1)[-1] for n in rank0_only}
    handlers = list(handlers)
    if rank is None:
        rank = rank_and_world()[0]
    return handlers if rank == 0 else [h for h in handlers if type(h).__name__ not in names]


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
