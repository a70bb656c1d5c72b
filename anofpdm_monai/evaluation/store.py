"""Per-case result store of the evaluation: one ``.npz`` per method, seed and case under
``<output_dir>/cases/<method>/seed<k>/<case>.npz``, each with the settings it was made with, so that a rerun reuses
exactly the results made with the same settings and recomputes the rest."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..inferers.noise import NOISE_SCHEME
from ..io import save_npz

__all__ = ["ResultStore", "fingerprint"]


def fingerprint(settings: Mapping[str, Any]) -> str:
    """Canonical JSON of the settings a stored result was made with, and of the forward-noise scheme (compared on
    reuse: results drawn with another noise derivation are recomputed)."""
    return json.dumps({**settings, "noise_scheme": NOISE_SCHEME}, sort_keys=True, default=str)


class ResultStore:
    """The per-case results of one evaluation folder."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)

    def path(self, method: str, seed: int, case: str) -> Path:
        return self.output_dir / "cases" / method / f"seed{seed}" / f"{case}.npz"

    def matches(self, method: str, seed: int, case: str, settings: str, num_slices: int) -> bool:
        """Whether a stored result exists that was made with ``settings`` for ``num_slices`` slices."""
        path = self.path(method, seed, case)
        if not path.is_file():
            return False
        try:
            with np.load(path) as stored:
                return (
                    "settings" in stored.files
                    and str(stored["settings"]) == settings
                    and len(stored["pred_label"]) == num_slices
                )
        except (OSError, ValueError, KeyError):
            return False

    def save(self, method: str, seed: int, case: str, settings: str, **arrays: np.ndarray) -> None:
        save_npz(self.path(method, seed, case), settings=np.asarray(settings), **arrays)

    def load(self, method: str, seed: int, cases: list[str]) -> dict[str, np.ndarray]:
        """The results of ``cases`` concatenated in that order (without the per-file ``settings``/``timesteps``).

        One file is open at a time (a store of thousands of cases would exhaust the open-file limit otherwise): the
        shapes are read from the files' headers first, then each file's arrays are copied into their place, so the
        memory needed is the result plus one case."""
        if not cases:
            raise ValueError("no cases to load")
        layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        lengths = []
        for case in cases:
            with np.load(self.path(method, seed, case)) as stored:
                heads = {k: _header(stored, k) for k in stored.files if k not in ("timesteps", "settings")}
            if not layout:
                layout = {k: (shape[1:], dtype) for k, (shape, dtype) in heads.items()}
            elif heads.keys() != layout.keys():
                raise ValueError(f"{self.path(method, seed, case)} holds {sorted(heads)}, the first {sorted(layout)}")
            counts = {shape[0] for shape, _ in heads.values()}
            if len(counts) != 1:
                raise ValueError(f"{self.path(method, seed, case)}: arrays of different lengths {sorted(counts)}")
            lengths.append(counts.pop())
        total, out = int(sum(lengths)), {}
        for k, (tail, dtype) in layout.items():
            out[k] = np.empty((total, *tail), dtype=dtype)
        start = 0
        for case, n in zip(cases, lengths):
            with np.load(self.path(method, seed, case)) as stored:
                for k in layout:
                    out[k][start : start + n] = stored[k]
            start += n
        return out

    def timesteps(self, method: str, seed: int, case: str) -> np.ndarray:
        with np.load(self.path(method, seed, case)) as stored:
            return stored["timesteps"]


def _header(npz: Any, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an open ``.npz``, read from its ``.npy`` header (no data read)."""
    with npz.zip.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:  # a newer header layout: read the array itself
            array = npz[key]
            shape, dtype = array.shape, array.dtype
    return tuple(int(d) for d in shape), np.dtype(dtype)
