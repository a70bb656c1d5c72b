"""Small helpers that bundle configs call (paths), kept here so configs hold configuration only."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["bundle_root", "repository_root"]


def repository_root() -> Path:
    """The folder holding the ``anofpdm_monai`` package (the repository root for a source checkout)."""
    return Path(__file__).resolve().parent.parent


def bundle_root(name: str) -> str:
    """Default ``bundle_root`` of a bundle shipped in this repository.

    Bundle configs are run from any folder (``python -m monai.bundle run --config_file .../train.json``), so the
    default root is found from the package location: ``<repository>/bundles/<name>`` when it exists, else the
    current folder. Override it with ``--bundle_root``.
    """
    candidate = repository_root() / "bundles" / name
    return str(candidate if candidate.is_dir() else Path(os.getcwd()))
