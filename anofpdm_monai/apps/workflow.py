"""Run a bundle shipped in this repository from Python: the options checked first, MONAI's cosmetic config-root
notice dropped (the demo and the tests run the bundles this way)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..bundle import config_files
from . import options

__all__ = ["run_workflow"]


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
