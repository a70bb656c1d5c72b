"""Where the bundles' configs are, and running a workflow from Python, so that configs hold configuration only.

Each workflow is one shared config (``bundles/common/configs/<workflow>.json``) merged with the dataset's file
(``bundles/<bundle>/configs/dataset.json``, what that dataset changes) by MONAI's list-of-configs syntax::

    python -m monai.bundle run --config_file "['bundles/anofpdm_brats21/configs/dataset.json', \\
        'bundles/common/configs/train.json']"

The dataset file comes first: its folder is the bundle's config root (``metadata.json``, ``logging.conf``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["WORKFLOWS", "bundle_root", "repository_root", "config_files", "tracking_settings_file"]

#: the shared workflow configs in ``bundles/common/configs``
WORKFLOWS = (
    "train",
    "multi_gpu_train",
    "train_classifier",
    "calibrate",
    "multi_gpu_calibrate",
    "inference",
    "multi_gpu_inference",
    "evaluate",
    "multi_gpu_evaluate",
)


def repository_root() -> Path:
    """The folder holding the ``anofpdm_monai`` package (the repository root for a source checkout)."""
    return Path(__file__).resolve().parent.parent


def bundle_root(name: str) -> str:
    """Default ``bundle_root`` of a bundle shipped in this repository.

    Bundle configs are run from any folder, so the default root is found from the package location:
    ``<repository>/bundles/<name>`` when it exists, else the current folder. Override it with ``--bundle_root``.
    """
    candidate = repository_root() / "bundles" / name
    return str(candidate if candidate.is_dir() else Path(os.getcwd()))


def config_files(bundle: str, *workflows: str) -> list[str]:
    """``[<bundle>/configs/dataset.json, common/configs/<workflow>.json, ...]`` for MONAI's ``--config_file``
    (several workflows merge in order, e.g. ``("train", "multi_gpu_train")``)."""
    root = repository_root() / "bundles"
    files = [root / bundle / "configs" / "dataset.json"]
    for workflow in workflows:
        if workflow not in WORKFLOWS:
            raise ValueError(f"unknown workflow {workflow!r}; choose from {list(WORKFLOWS)}")
        files.append(root / "common" / "configs" / f"{workflow}.json")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle config(s) not found: {missing} (run from a source checkout)")
    return [str(f) for f in files]


def tracking_settings_file() -> Path:
    """The bundles' MLflow tracking settings, ``bundles/common/configs/mlflow.json``, for MONAI's ``--tracking``."""
    return repository_root() / "bundles" / "common" / "configs" / "mlflow.json"
