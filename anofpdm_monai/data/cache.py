"""Slice cache: every case is preprocessed once into memory-mappable arrays plus a slice table.

Decoding gzipped NIfTI volumes per training sample would starve the network, so :class:`SliceCache` stores, per
case, ``image.npy`` (N, C, S, S) float16, ``label.npy`` and ``brain.npy`` (N, S, S) uint8 and ``slices.csv``.
The cache folder is keyed by a digest of the preprocessing parameters, and each case records the size and
modification time of its source files: a case is rebuilt only when its parameters or its files change.
:class:`SliceDataset` serves random slices from the cache (memory-mapped, so worker processes share pages).

Cases are preprocessed by a pool of threads (``num_workers``) and, under ``torchrun``, shared out among the ranks,
each building its own cases, so that every case is built once. At most ``max_open_cases`` cases keep their memory
maps (one file descriptor each) open, so a dataset of thousands of volumes stays within the open-file limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..distributed import gather_objects, rank_and_world
from ..io import default_mode, first_line
from .datalist import load_datalist
from .preprocessing import SLICE_TABLE_COLUMNS, SliceArrays, VolumePreprocessor
from .transforms import CaseError

__all__ = ["SliceCache", "SliceDataset", "CacheBuildError", "default_num_workers"]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: in-plane resampling to square pixels (IsotropicInPlaned)
#: cases whose memory maps stay open at once (3 file descriptors each), per SliceCache object and process
DEFAULT_MAX_OPEN_CASES = 32
_ARRAY_NAMES = ("image", "label", "brain")


class CacheBuildError(RuntimeError):
    """Some cases could not be cached; ``failures`` maps case id to the one-line reason."""

    def __init__(self, failures: Mapping[str, str]) -> None:
        self.failures = dict(failures)
        detail = "; ".join(f"{k}: {v}" for k, v in list(self.failures.items())[:5])
        more = f" (and {len(self.failures) - 5} more)" if len(self.failures) > 5 else ""
        super().__init__(f"{len(self.failures)} case(s) could not be preprocessed: {detail}{more}")


def _entry_files(entry: Mapping[str, Any]) -> list[str]:
    image = entry["image"]
    files = [image] if isinstance(image, (str, os.PathLike)) else list(image)
    files += [entry[k] for k in ("label", "brain_mask") if entry.get(k)]
    return [str(f) for f in files]


def _fingerprint(entry: Mapping[str, Any]) -> list[list[Any]]:
    out = []
    for f in _entry_files(entry):
        try:
            st = os.stat(f)
            out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([os.path.abspath(f), -1, -1])
    return out


def default_num_workers() -> int:
    """Threads that preprocess cases at once: this process's share of its CPUs (divided among the local ranks of
    ``torchrun``), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, cpus // local_ranks))


def _safe_case_dir_name(case_id: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case_id)
    if safe != case_id or not safe:
        safe = f"{safe}_{hashlib.sha1(case_id.encode()).hexdigest()[:8]}"
    return safe


class SliceCache:
    """Preprocessed axial slices of a set of cases, on disk.

    Args:
        cache_dir: root folder of caches; this cache lives in ``cache_dir/<digest of the preprocessing>``.
        preprocessor: the preprocessing (or its parameter dict).
        max_open_cases: cases whose memory maps :meth:`arrays` keeps open (least recently used ones are closed).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        preprocessor: VolumePreprocessor | Mapping[str, Any],
        max_open_cases: int = DEFAULT_MAX_OPEN_CASES,
    ) -> None:
        if not isinstance(preprocessor, VolumePreprocessor):
            preprocessor = VolumePreprocessor.from_dict(preprocessor)
        if int(max_open_cases) < 1:
            raise ValueError(f"max_open_cases must be >= 1, got {max_open_cases}")
        self.preprocessor = preprocessor
        params = json.dumps({"format": CACHE_FORMAT_VERSION, **preprocessor.to_dict()}, sort_keys=True)
        self.digest = hashlib.sha1(params.encode()).hexdigest()[:12]
        self.root = Path(cache_dir) / self.digest
        self.max_open_cases = int(max_open_cases)
        self._arrays: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ building
    def case_dir(self, case_id: str) -> Path:
        return self.root / "cases" / _safe_case_dir_name(case_id)

    def is_current(self, entry: Mapping[str, Any]) -> bool:
        """Whether ``entry`` is cached with the same preprocessing and unchanged source files."""
        meta_file = self.case_dir(str(entry["id"])) / "meta.json"
        try:  # OSError too: an id too long for the filesystem is simply not cached
            if not meta_file.is_file():
                return False
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            return False
        return meta.get("fingerprint") == _fingerprint(entry) and meta.get("id") == str(entry["id"])

    def write_case(
        self, entry: Mapping[str, Any], arrays: SliceArrays, fingerprint: list[list[Any]] | None = None
    ) -> None:
        """Store one case atomically: written in a temporary folder, then renamed into place.

        Args:
            entry: the datalist entry the arrays were made from.
            arrays: its preprocessed slices.
            fingerprint: the source files' fingerprint taken before preprocessing (default: taken now); a file
                changed while the case was being preprocessed then leaves the case out of date, to be rebuilt.
        """
        case_id = str(entry["id"])
        target = self.case_dir(case_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes 0700: a shared cache must stay readable
        try:
            np.save(tmp / "image.npy", arrays.image.astype(np.float16))
            np.save(tmp / "label.npy", arrays.label.astype(np.uint8))
            np.save(tmp / "brain.npy", arrays.brain.astype(np.uint8))
            arrays.table.to_csv(tmp / "slices.csv", index=False)
            meta = {
                "id": case_id,
                "fingerprint": _fingerprint(entry) if fingerprint is None else fingerprint,
                "has_label": arrays.has_label,
                "num_slices": len(arrays.table),
                "preprocessing": self.preprocessor.to_dict(),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            old = None
            if target.exists():
                if self.is_current(entry):  # written meanwhile by another process (e.g. another DDP rank): keep it
                    shutil.rmtree(tmp, ignore_errors=True)
                    self._forget(case_id)
                    return
                old = target.with_name(f".{target.name}.old.{os.getpid()}")
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                # another process renamed its own (identical) version into place between our check and our rename
                if not self.is_current(entry):
                    if old is not None and not target.exists():
                        os.replace(old, target)  # put the previous version back
                        old = None
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._forget(case_id)

    def build(
        self,
        entries: Sequence[Mapping[str, Any]],
        progress: bool = True,
        on_error: str = "raise",
        description: str = "caching slices",
        num_workers: int | None = None,
        shared: bool | None = None,
    ) -> pd.DataFrame:
        """Make sure every entry is cached (reusing current cases) and return their slice table.

        A failing case never stops the others: all cases are attempted, the good ones are cached, and the failures
        are then raised together as :class:`CacheBuildError` (``on_error="raise"``) or logged and left out
        (``on_error="skip"``).

        Args:
            entries: datalist entries with absolute paths (``id``, ``image``, optional ``label``/``brain_mask``).
            progress: show a progress bar.
            on_error: ``"raise"`` or ``"skip"``.
            description: progress bar text.
            num_workers: threads preprocessing cases at once (None: :func:`default_num_workers`; 0 or 1: one case
                at a time in this thread). The cached arrays do not depend on it.
            shared: under ``torchrun``, each rank builds only its share of the cases (r, r + N, ...) and then waits
                for the others' (a collective within ``dist_timeout``: every rank must call ``build`` with the same
                entries, and the cache folder must be on storage every rank sees); every rank then raises (or
                skips) the failures of all ranks. Default: whenever a process group of several ranks exists.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        ids = [str(e["id"]) for e in entries]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"duplicate case ids in the datalist: {dup[:5]}")
        rank, world = rank_and_world()
        share = world > 1 and (shared is None or bool(shared))
        mine = list(entries)[rank::world] if share else list(entries)
        todo = [e for e in mine if not self.is_current(e)]
        failures = self._build_cases(todo, num_workers, progress and (rank == 0 or not share), description)
        if share:
            merged: dict[str, str] = {}
            for part in gather_objects(failures):  # also the wait for the other ranks' shares
                merged.update(part)
            failures = {i: merged[i] for i in ids if i in merged}
            unseen = [str(e["id"]) for e in entries if str(e["id"]) not in failures and not self.is_current(e)]
            if unseen:
                raise RuntimeError(
                    f"{len(unseen)} case(s) built by other ranks are not in the slice cache {self.root} here (e.g. "
                    f"{unseen[0]}): cache_dir must be on storage every rank sees"
                )
        if failures and on_error == "raise":
            raise CacheBuildError(failures)
        good = [i for i in ids if i not in failures]
        return self.table(good)

    def _build_case(self, entry: Mapping[str, Any], preprocessor: VolumePreprocessor) -> str | None:
        """Preprocess and store one case; the one-line reason when it fails, else None."""
        try:
            fingerprint = _fingerprint(entry)
            data = preprocessor(entry)
            self.write_case(entry, preprocessor.slices(data), fingerprint=fingerprint)
        except (CaseError, ValueError, OSError, RuntimeError) as exc:
            reason = first_line(exc)
            logger.error("case %s failed: %s", entry["id"], reason)
            return reason
        return None

    def _build_cases(
        self, todo: Sequence[Mapping[str, Any]], num_workers: int | None, progress: bool, description: str
    ) -> dict[str, str]:
        """Build ``todo`` with a pool of threads (preprocessing is mostly NumPy, torch and zlib, which release the
        GIL; threads start at once and share nothing on disk: each case is written in its own temporary folder and
        renamed into place). The failures, in the order of ``todo``."""
        workers = default_num_workers() if num_workers is None else int(num_workers)
        workers = max(1, min(workers, len(todo)))
        failures: dict[str, str] = {}
        bar = tqdm(total=len(todo), desc=description, unit="case", disable=not progress or not todo)
        try:
            if workers == 1:
                for entry in todo:
                    reason = self._build_case(entry, self.preprocessor)
                    if reason is not None:
                        failures[str(entry["id"])] = reason
                    bar.update()
            else:
                local = threading.local()

                def build_one(entry: Mapping[str, Any]) -> str | None:
                    if not hasattr(local, "preprocessor"):  # one per thread: MONAI transforms keep per-call state
                        local.preprocessor = dataclasses.replace(self.preprocessor)
                    return self._build_case(entry, local.preprocessor)

                pool = ThreadPoolExecutor(workers, thread_name_prefix="slice-cache")
                try:
                    futures = {pool.submit(build_one, e): str(e["id"]) for e in todo}
                    for future in as_completed(futures):
                        reason = future.result()
                        if reason is not None:
                            failures[futures[future]] = reason
                        bar.update()
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
        finally:
            bar.close()
        return {str(e["id"]): failures[str(e["id"])] for e in todo if str(e["id"]) in failures}

    # ------------------------------------------------------------------ reading
    def table(self, case_ids: Sequence[str]) -> pd.DataFrame:
        """The slice table of the given (cached) cases, in the given order."""
        frames = []
        for case_id in case_ids:
            path = self.case_dir(case_id) / "slices.csv"
            if not path.is_file():
                raise KeyError(f"case {case_id} is not in the slice cache {self.root}")
            frames.append(pd.read_csv(path, dtype={"case_id": str}))
        if not frames:
            return pd.DataFrame(columns=list(SLICE_TABLE_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    def arrays(self, case_id: str) -> dict[str, np.ndarray]:
        """Memory-mapped arrays ``image`` (N, C, S, S) float16, ``label`` and ``brain`` (N, S, S) uint8.

        The maps of the ``max_open_cases`` most recently used cases stay open; an older case's are dropped (their
        file descriptors close once no array taken from them is left) and reopened when used again."""
        with self._lock:
            arrays = self._arrays.get(case_id)
            if arrays is not None:
                self._arrays.move_to_end(case_id)
                return arrays
        folder = self.case_dir(case_id)
        arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in _ARRAY_NAMES}
        with self._lock:
            self._arrays[case_id] = arrays
            self._arrays.move_to_end(case_id)
            while len(self._arrays) > self.max_open_cases:
                self._arrays.popitem(last=False)
        return arrays

    def _forget(self, case_id: str) -> None:
        with self._lock:
            self._arrays.pop(case_id, None)

    def __getstate__(self) -> dict[str, Any]:  # memory maps are reopened in each worker process
        state = dict(self.__dict__)
        state["_arrays"] = OrderedDict()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("max_open_cases", DEFAULT_MAX_OPEN_CASES)
        self._lock = threading.Lock()


class SliceDataset(Dataset):
    """Random access to cached slices, as MONAI-style dictionaries.

    Each item: ``image`` (C, S, S) float32 in [-1, 1], ``label`` (1, S, S) float32 pixel mask, ``brain``
    (1, S, S) float32, ``class_label`` int64 (0 healthy, 1 unhealthy), ``case_id`` str, ``slice_index`` int
    (RAS axial index) and ``source_index`` int (index in the input file).

    Args:
        cache: the slice cache.
        table: the slices to serve (rows of :meth:`SliceCache.table`).
        transform: optional MONAI dictionary transform applied to each item (e.g. augmentation).
    """

    def __init__(self, cache: SliceCache, table: pd.DataFrame, transform: Callable | None = None) -> None:
        self.cache = cache
        self.table = table.reset_index(drop=True)
        self.transform = transform
        self._case = self.table["case_id"].astype(str).to_numpy()
        self._row = self.table["row"].to_numpy(dtype=np.int64)
        self._label = self.table["label"].to_numpy(dtype=np.int64)
        self._slice = self.table["slice_index"].to_numpy(dtype=np.int64)
        self._source = self.table["source_index"].to_numpy(dtype=np.int64)

    @classmethod
    def from_datalist(
        cls,
        datalist: str | os.PathLike | Mapping[str, Any],
        dataset_dir: str | os.PathLike | None,
        split: str | Sequence[str],
        cache_dir: str | os.PathLike,
        preprocessing: VolumePreprocessor | Mapping[str, Any],
        transform: Callable | None = None,
        progress: bool = True,
        on_error: str = "raise",
        require_labels: bool = False,
        num_workers: int | None = None,
    ) -> SliceDataset:
        """Build (or reuse) the cache for a datalist split and serve its slices.

        Args:
            datalist: datalist JSON path or loaded dict (paths relative to ``dataset_dir``).
            dataset_dir: root the datalist paths are relative to.
            split: ``"training"``, ``"validation"``, ``"test"`` or several.
            cache_dir: root folder of slice caches.
            preprocessing: :class:`VolumePreprocessor` or its parameters; its modalities must match the datalist's.
            transform: optional dictionary transform per item.
            progress: progress bar while caching.
            on_error: what to do with cases that fail preprocessing (see :meth:`SliceCache.build`).
            require_labels: raise if a case has no label (training needs slice labels).
            num_workers: threads preprocessing cases into the cache (see :meth:`SliceCache.build`; under ``torchrun``
                the ranks share the cases out).
        """
        splits = [split] if isinstance(split, str) else list(split)
        dl = load_datalist(datalist, dataset_dir=dataset_dir, splits=splits)
        cache = SliceCache(cache_dir, preprocessing)
        cache.preprocessor.check_modalities(dl["modalities"], source=f"datalist {datalist!s:.200}")
        entries = [e for s in splits for e in dl.get(s, [])]
        if not entries:
            raise ValueError(f"datalist split(s) {splits} list no cases")
        if require_labels:
            missing = [e["id"] for e in entries if not e.get("label")]
            if missing:
                raise ValueError(f"cases without a label in split(s) {splits}: {missing[:5]} (slice labels needed)")
        table = cache.build(
            entries,
            progress=progress,
            on_error=on_error,
            description=f"caching {'+'.join(splits)}",
            num_workers=num_workers,
        )
        return cls(cache, table, transform=transform)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self._case[index]
        row = int(self._row[index])
        arrays = self.cache.arrays(case)
        item = {
            "image": torch.from_numpy(np.asarray(arrays["image"][row], dtype=np.float32)),
            "label": torch.from_numpy(np.asarray(arrays["label"][row], dtype=np.float32))[None],
            "brain": torch.from_numpy(np.asarray(arrays["brain"][row], dtype=np.float32))[None],
            "class_label": torch.tensor(max(int(self._label[index]), 0), dtype=torch.long),
            "case_id": case,
            "slice_index": int(self._slice[index]),
            "source_index": int(self._source[index]),
        }
        return self.transform(item) if self.transform is not None else item

    @property
    def slice_labels(self) -> np.ndarray:
        """Slice labels (0 healthy, 1 unhealthy, -1 unknown) in dataset order."""
        return self._label.copy()
