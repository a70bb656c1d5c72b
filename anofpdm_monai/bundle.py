"""Where the bundles' configs are, and running a workflow from Python, so that configs hold configuration only.

Each workflow is one shared config (``bundles/common/configs/<workflow>.json``) merged with the dataset's file
(``bundles/<bundle>/configs/dataset.json``, what that dataset changes) by MONAI's list-of-configs syntax::

    python -m monai.bundle run --config_file "['bundles/anofpdm_brats21/configs/dataset.json', \\
        'bundles/common/configs/train.json']"

The dataset file comes first: its folder is the bundle's config root (``metadata.json``, ``logging.conf``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["WORKFLOWS", "bundle_root", "repository_root", "config_files", "run_workflow"]

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


class _ConfigRootNotice(logging.Filter):
    """Drops exactly MONAI's "Not all config files are in <root>. If logging_file and meta_file are not specified,
    <root> will be used as the default config root directory." for the dataset folder ``root``.

    ``ConfigWorkflow`` logs it whenever the config files are in different folders, which the layout above always
    makes (dataset file + shared workflow files), before it reads anything. It is purely cosmetic: the root it
    names is the intended one, and :func:`run_workflow` passes ``metadata.json`` and ``logging.conf`` explicitly.
    """

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.prefix = f"Not all config files are in {root}."

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def run_workflow(bundle: str, *workflows: str, **overrides: Any) -> None:
    """``python -m monai.bundle run --config_file <config_files(bundle, *workflows)> --key value ...`` in this
    process.

    The overrides are checked first (:func:`anofpdm_monai.apps.options.check`): a key the config files do not define
    or a value of the wrong type is refused in one line before any work; ``help=True`` prints the workflow's options
    (:func:`~anofpdm_monai.apps.options.help_text`) and runs nothing."""
    from monai.bundle import run

    from .apps import options

    files = config_files(bundle, *workflows)
    if options.wants_help(overrides):
        print(options.help_text(files))
        return
    options.check(files, overrides)
    configs = Path(files[0]).parent
    notice = _ConfigRootNotice(configs)
    monai_logger = logging.getLogger("monai.bundle.workflows")  # ConfigWorkflow's logger
    monai_logger.addFilter(notice)
    try:
        run(
            config_file=files,
            meta_file=str(configs / "metadata.json"),
            logging_file=str(configs / "logging.conf"),
            **overrides,
        )
    finally:
        monai_logger.removeFilter(notice)
