"""Experiment tracking of the bundle workflows with MLflow (``--tracking bundles/common/configs/mlflow.json``).

MONAI's ``run --tracking <settings>`` appends an ``MLFlowHandler`` to the engines its settings name (``train#trainer``,
``validate#evaluator``, ``evaluator``) and exports the executed config (``save_execute_config``). Its built-in
``--tracking mlflow`` settings read the trainer's loss from a decollated output (``from_engine(['loss'], first=True)``)
and fail on the bundles' trainers, which run with ``decollate=False`` (their output is one dict); the bundles' own
settings file (``bundles/common/configs/mlflow.json``) attaches :class:`MLFlowTracker` instead. It is MONAI's
``MLFlowHandler`` with three additions:

* the parameters of the run: the workflow's options as run (defaults and overrides) read from the executed config
  (:func:`bundle_params`);
* the executed config and, for the evaluation, its metrics table and summary as artefacts;
* the mean loss of each epoch (``epoch_tag_name``), next to MONAI's loss of each iteration.

MLflow is an optional dependency (``pip install -e ".[tracking]"``); nothing here imports it. docs/tracking.md.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from ..bundle import tracking_settings_file
from .options import _is_option, _monai_syntax

__all__ = ["MLFlowTracker", "bundle_params", "executed_config", "run_name", "settings_file", "sqlite_path"]

#: keys of the tracking settings themselves, not options of the workflow
_SETTINGS_KEYS = ("save_execute_config", "is_not_rank0", "tracking_uri", "experiment_name", "run_name")
# MONAI writes ``save_execute_config`` as ``<output_dir as written> + '/config_<time>.json'``: an expression only when
# output_dir is one; for a plain ``--output_dir /path`` the item is the text ``/path + '/config_<time>.json'``.
_CONFIG_NAME = re.compile(r"(?P<dir>.*) \+ '(?P<name>/config_\d{8}_\d{6}\.json)'")


def settings_file() -> Path:
    """The bundles' MLflow tracking settings, ``bundles/common/configs/mlflow.json``, for MONAI's ``--tracking``."""
    return tracking_settings_file()


def run_name(prefix: str = "run") -> str:
    """A name no other run has: ``<prefix>_<YYYYmmdd_HHMMSS>_<6 hex digits>``. The settings resolve it once per
    workflow, so the trainer's and the validator's handlers log into one run (MONAI's ``run_name: null`` reuses the
    oldest unfinished run of the experiment, such as one a crash left open)."""
    return f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"


def executed_config(value: str | os.PathLike | None) -> str | None:
    """The path of the config file MONAI's tracking exported, from the ``save_execute_config`` item (None when
    exporting is off)."""
    if not value:
        return None
    text = str(value)
    match = _CONFIG_NAME.fullmatch(text)
    return match["dir"] + match["name"] if match else text


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def bundle_params(config_file: str | os.PathLike | None) -> dict[str, str]:
    """The options of the executed config (its top-level values a user sets: numbers, strings, booleans and lists of
    them, as defaulted or overridden) as MLflow parameters. Options whose value is a MONAI expression or reference
    (``device``, ``output_dir``, ... unless given on the command line) are left out: the logged config holds them.
    Empty when there is no file."""
    path = executed_config(config_file)
    if path is None or not Path(path).is_file():
        return {}
    config = json.loads(Path(path).read_text())
    return {
        key: _param_value(value)
        for key, value in config.items()
        if key not in _SETTINGS_KEYS and _is_option(key, value) and not _monai_syntax(value)
    }


def sqlite_path(tracking_uri: str | None) -> Path | None:
    """The database file of a local SQLite tracking URI (``sqlite:////abs/mlruns.db``), else None."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :])


class MLFlowTracker(MLFlowHandler):
    """MONAI's :class:`~monai.handlers.MLFlowHandler` for the bundles' engines.

    Args:
        config_file: the executed config (``@save_execute_config``): its options are logged as parameters
            (:func:`bundle_params`, with ``experiment_param`` over them) and the file as an artefact.
        files: more files (or folders) logged as artefacts when the engine completes, e.g. the evaluation's
            ``summary.json``; a missing one is skipped.
        epoch_tag_name: when given, the mean over the epoch of ``output_transform(engine.state.output)`` (the loss)
            is logged under this name at each epoch's end, with the epoch as its step.
        kwargs: MONAI's ``MLFlowHandler`` arguments. The folder of a local SQLite ``tracking_uri`` is created.
    """

    def __init__(
        self,
        config_file: str | os.PathLike | None = None,
        files: Sequence[str | os.PathLike] = (),
        epoch_tag_name: str | None = None,
        experiment_param: Mapping[str, Any] | None = None,
        artifacts: str | Sequence[str | os.PathLike] | None = None,
        **kwargs: Any,
    ) -> None:
        database = sqlite_path(os.environ.get("MLFLOW_TRACKING_URI") or kwargs.get("tracking_uri"))
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        config_path = executed_config(config_file)
        params = {**bundle_params(config_path), **dict(experiment_param or {})}
        extra = [artifacts] if isinstance(artifacts, (str, os.PathLike)) else list(artifacts or [])
        listed = [str(p) for p in (config_path, *extra, *files) if p]
        super().__init__(experiment_param=params or None, artifacts=listed or None, **kwargs)
        self.epoch_tag_name = epoch_tag_name
        self._loss_sum, self._loss_count = 0.0, 0

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.epoch_tag_name:
            engine.add_event_handler(Events.EPOCH_STARTED, self._reset_epoch_loss)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._add_loss)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch_loss)

    def _reset_epoch_loss(self, engine: Engine) -> None:
        self._loss_sum, self._loss_count = 0.0, 0

    def _add_loss(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        if loss is not None:
            self._loss_sum += float(torch.as_tensor(loss).detach().float().mean())
            self._loss_count += 1

    def _log_epoch_loss(self, engine: Engine) -> None:
        if self._loss_count and self.cur_run is not None:
            mean = self._loss_sum / self._loss_count
            self._log_metrics({str(self.epoch_tag_name): mean}, step=self.global_epoch_transform(engine.state.epoch))
