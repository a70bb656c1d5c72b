"""Per-case result store of the evaluation: one ``.npz`` per method, seed and case under
``<output_dir>/cases/<method>/seed<k>/<case>.npz``, each with the settings it was made with, so that a rerun reuses
exactly the results made with the same settings and recomputes the rest."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io import save_npz

__all__ = ["ResultStore", "fingerprint"]


def fingerprint(settings: Mapping[str, Any]) -> str:
    """Canonical JSON of the settings a stored result was made with (compared on reuse)."""
    return json.dumps(settings, sort_keys=True, default=str)


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
        """The results of ``cases`` concatenated in that order (without the per-file ``settings``/``timesteps``)."""
        parts = [np.load(self.path(method, seed, case)) for case in cases]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files if k not in ("timesteps", "settings")}

    def timesteps(self, method: str, seed: int, case: str) -> np.ndarray:
        with np.load(self.path(method, seed, case)) as stored:
            return stored["timesteps"]
