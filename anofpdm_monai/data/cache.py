"""Slice cache: every case is preprocessed once into memory-mappable arrays plus a slice table.

Decoding gzipped NIfTI volumes per training sample would starve the network, so :class:`SliceCache` stores, per
case, ``image.npy`` (N, C, S, S) float16, ``label.npy`` and ``brain.npy`` (N, S, S) uint8 and ``slices.csv``.
The cache folder is keyed by a digest of the preprocessing parameters, and each case records the size and
modification time of its source files: a case is rebuilt only when its parameters or its files change.
:class:`SliceDataset` serves random slices from the cache (memory-mapped, so worker processes share pages).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..io import default_mode, first_line
from .datalist import load_datalist
from .preprocessing import SLICE_TABLE_COLUMNS, SliceArrays, VolumePreprocessor
from .transforms import CaseError

__all__ = ["SliceCache", "SliceDataset", "CacheBuildError"]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


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
    """

    def __init__(self, cache_dir: str | os.PathLike, preprocessor: VolumePreprocessor | Mapping[str, Any]) -> None:
        if not isinstance(preprocessor, VolumePreprocessor):
            preprocessor = VolumePreprocessor.from_dict(preprocessor)
        self.preprocessor = preprocessor
        params = json.dumps({"format": CACHE_FORMAT_VERSION, **preprocessor.to_dict()}, sort_keys=True)
        self.digest = hashlib.sha1(params.encode()).hexdigest()[:12]
        self.root = Path(cache_dir) / self.digest
        self._arrays: dict[str, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------ building
    def case_dir(self, case_id: str) -> Path:
        return self.root / "cases" / _safe_case_dir_name(case_id)

    def is_current(self, entry: Mapping[str, Any]) -> bool:
        """Whether ``entry`` is cached with the same preprocessing and unchanged source files."""
        meta_file = self.case_dir(str(entry["id"])) / "meta.json"
        if not meta_file.is_file():
            return False
        try:
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
                    self._arrays.pop(case_id, None)
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
        self._arrays.pop(case_id, None)

    def build(
        self,
        entries: Sequence[Mapping[str, Any]],
        progress: bool = True,
        on_error: str = "raise",
        description: str = "caching slices",
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
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        ids = [str(e["id"]) for e in entries]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"duplicate case ids in the datalist: {dup[:5]}")
        failures: dict[str, str] = {}
        todo = [e for e in entries if not self.is_current(e)]
        if todo:
            bar = tqdm(todo, desc=description, unit="case", disable=not progress)
            for entry in bar:
                try:
                    fingerprint = _fingerprint(entry)
                    data = self.preprocessor(entry)
                    self.write_case(entry, self.preprocessor.slices(data), fingerprint=fingerprint)
                except (CaseError, ValueError, OSError, RuntimeError) as exc:
                    failures[str(entry["id"])] = first_line(exc)
                    logger.error("case %s failed: %s", entry["id"], failures[str(entry["id"])])
        if failures and on_error == "raise":
            raise CacheBuildError(failures)
        good = [i for i in ids if i not in failures]
        return self.table(good)

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
        """Memory-mapped arrays ``image`` (N, C, S, S) float16, ``label`` and ``brain`` (N, S, S) uint8."""
        if case_id not in self._arrays:
            folder = self.case_dir(case_id)
            self._arrays[case_id] = {
                k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in ("image", "label", "brain")
            }
        return self._arrays[case_id]

    def __getstate__(self) -> dict[str, Any]:  # memory maps are reopened in each worker process
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state


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
        table = cache.build(entries, progress=progress, on_error=on_error, description=f"caching {'+'.join(splits)}")
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
