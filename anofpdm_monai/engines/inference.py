"""MONAI engine pieces of volume inference: a case dataset that turns a failing case into a failure record, the
prepare-batch that hands the brain mask to the volume inferer, an evaluator that reports a failing case and goes
on, and the handler that writes the run's summary.

``inference.json`` is a ``CaseEvaluator`` over a ``CaseDataset`` with an
:class:`~anofpdm_monai.inferers.AnoFPDMVolumeInferer` and a ``postprocessing`` Compose ending in
:class:`~anofpdm_monai.data.writers.SaveCaseOutputsd`; :class:`~anofpdm_monai.apps.inference.VolumeInferer` builds
the same pieces in Python.

Outputs are one unit per case (:mod:`anofpdm_monai.data.writers`): the case dataset records the digests of a case's
input files before loading them (``input_record``, stored in the case's provenance), and the summary handler writes
``inference_summary.json`` while the run still holds the output folder's lock (:class:`~anofpdm_monai.io.OutputLock`),
then releases it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import Dataset
from monai.engines import SupervisedEvaluator

from ..data.preprocessing import source_axial_index, unwrap_transform_error
from ..data.writers import input_record
from ..distributed import gather_objects, rank_and_world
from ..io import first_line, release_output_lock, write_json
from .handlers import ResumeLogFilter

__all__ = ["CaseDataset", "VolumePrepareBatch", "CaseEvaluator", "InferenceSummary", "InferenceFailures"]

logger = logging.getLogger(__name__)

_INPUT_KEYS = ("id", "image", "label", "brain_mask")


class InferenceFailures(RuntimeError):
    """Raised at the end of a run in which some cases failed (the others were written)."""


def _first_file(files: Any) -> str:
    return str(files if isinstance(files, (str, os.PathLike)) else files[0])


class CaseDataset(Dataset):
    """MONAI ``Dataset`` of whole cases (datalist entries with absolute paths) through the volume preprocessing.

    Each item is the preprocessed dict plus ``reference_file`` (the first image file, whose grid the outputs take),
    ``input_record`` (JSON text of :func:`~anofpdm_monai.data.writers.input_record`: path, size, mtime_ns and sha256
    of each input file, taken before it is loaded), ``source_index`` (RAS axial index -> input file index) and, with
    a usable label, ``slice_label`` (D,); a label that cannot be used is dropped with a warning (inference does not
    need it). A case that cannot be preprocessed becomes ``{"id": ..., "error": "<one line naming the case and
    file>"}`` instead of stopping the run.
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], transform: Callable | None = None) -> None:
        super().__init__(data=list(data), transform=transform)

    def _preprocess(self, case: str, data: dict[str, Any]) -> dict[str, Any]:
        """The preprocessed case; inference does not need the label, so a label that cannot be used (missing,
        unreadable, on another grid) is dropped with a warning instead of failing the case."""
        if self.transform is None:
            return dict(data)
        try:
            return dict(self.transform(data))
        except Exception as exc:
            if "label" not in data:
                raise
            without = {k: v for k, v in data.items() if k != "label"}
            out = dict(self.transform(without))  # fails again, with the image's own error, when the image is bad
            reason = first_line(unwrap_transform_error(exc, case))
            logger.warning("case %s: label not used (inference does not need it): %s", case, reason)
            return out

    def _transform(self, index: int) -> dict[str, Any]:
        entry = self.data[index]
        case = str(entry.get("id", f"<case {index}>"))
        if entry.get("error"):  # found unusable before loading (e.g. by the input folder discovery)
            return {"id": case, "error": str(entry["error"])}
        try:
            data = {k: v for k, v in entry.items() if k in _INPUT_KEYS and v is not None}
            record = json.dumps(input_record(data))  # before loading: a file replaced meanwhile leaves the case stale
            out = self._preprocess(case, data)
            out.pop("brain_mask", None)
            out["reference_file"] = _first_file(entry["image"])
            out["input_record"] = record
            _, out["source_index"] = source_axial_index(out["image"])
            if out.get("label") is not None:
                lesion = torch.as_tensor(out["label"])[0] > 0.5  # (S, S, D)
                out["slice_label"] = lesion.any(dim=0).any(dim=0).numpy().astype(np.int64)
            return out
        except Exception as exc:  # one bad case must not stop the others
            return {"id": case, "error": first_line(unwrap_transform_error(exc, case))}


class VolumePrepareBatch:
    """MONAI prepare-batch of the case evaluator: the image to the device, no target, and the brain mask and the
    case id as the volume inferer's ``brain`` and ``case_id`` keywords (the id keys each slice's forward noise)."""

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: torch.device | str | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, tuple, dict[str, Any]]:
        # .to keeps the MetaTensor and its applied operations, which Invertd needs after decollation
        image = batchdata["image"].to(device=device, non_blocking=non_blocking)
        extra = {"brain": batchdata["brain"]}
        if "id" in batchdata:
            extra["case_id"] = batchdata["id"]
        return image, None, (), extra


class CaseEvaluator(SupervisedEvaluator):
    """MONAI ``SupervisedEvaluator`` over whole cases (batch size 1) that reports a failing case and goes on.

    A case whose loading, inference, post-processing or writing fails is recorded in :attr:`failed` (case -> one
    line) and the run continues; finished cases are in :attr:`done`. Every other argument is
    ``SupervisedEvaluator``'s.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        self.add_event_handler(Events.STARTED, self._reset)
        ResumeLogFilter().attach(self)  # MONAI's Evaluator.run makes ignite log every run as "resuming"

    def _reset(self, engine: Engine) -> None:
        self.done, self.failed = [], {}

    def run(self) -> None:  # type: ignore[override]
        """Run over every case; with no case at all (e.g. all finished), only the completion handlers run."""
        if len(self.data_loader) == 0:  # ignite refuses an empty epoch
            self._reset(self)
            self._fire_event(Events.COMPLETED)
            return
        super().run()

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> Any:
        ids = batchdata.get("id", ["<case>"])
        case = str(ids[0] if isinstance(ids, (list, tuple)) else ids)
        errors = batchdata.get("error")
        if errors:
            reason = str(errors[0] if isinstance(errors, (list, tuple)) else errors)
        else:
            try:
                output = super()._iteration(engine, batchdata)
                self.done.append(case)
                logger.info("case %s done", case)
                return output
            except Exception as exc:  # one bad case must not lose the others
                reason = first_line(unwrap_transform_error(exc, case, stage="inference"))
        self.failed[case] = reason
        logger.error("case %s failed: %s", case, reason)
        engine.state.output = [{"id": case, "error": reason}]
        return engine.state.output


class InferenceSummary:
    """Handler of the case evaluator: when it completes, write ``<output_dir>/inference_summary.json`` (done, skipped,
    failed with reasons, seconds), log one line, and raise :class:`InferenceFailures` when a case failed.

    Under ``torchrun`` the cases done and failed on every rank are gathered; rank 0 writes the summary of all of
    them, and every rank raises when any case failed.

    Args:
        output_dir: the output folder.
        skipped: ids of finished cases that were not run again.
        raise_on_failure: raise after writing the summary when a case failed.
        release_lock: release the output folder's lock once the summary is written (the bundle, whose ``pending``
            took it: :func:`~anofpdm_monai.apps.inference.pending_cases`); a process that never held it has none to
            release.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        skipped: Sequence[str] = (),
        raise_on_failure: bool = True,
        release_lock: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.skipped = [str(s) for s in skipped]
        self.raise_on_failure = raise_on_failure
        self.release_lock = release_lock
        self.summary: dict[str, Any] = {}
        self._start = time.time()

    def attach(self, engine: CaseEvaluator) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _started(self, engine: Engine) -> None:
        self._start = time.time()

    def completed(self, engine: CaseEvaluator) -> dict[str, Any]:
        done, failed = [], {}
        for rank_done, rank_failed in gather_objects((list(engine.done), dict(engine.failed))):  # every rank's
            done += rank_done
            failed.update(rank_failed)
        self.summary = {
            "output_dir": str(self.output_dir),
            "done": done,
            "skipped": self.skipped,
            "failed": failed,
            "seconds": round(time.time() - self._start, 1),
        }
        if rank_and_world()[0] != 0:  # rank 0 writes and reports for all; every rank raises below
            return self._raise_on_failure(done, failed)
        try:
            write_json(self.output_dir / "inference_summary.json", self.summary)
        finally:
            if self.release_lock:
                release_output_lock(self.output_dir)
        logger.info(
            "inference: %d done, %d skipped (already finished), %d failed; outputs in %s",
            len(done),
            len(self.skipped),
            len(failed),
            self.output_dir,
        )
        return self._raise_on_failure(done, failed)

    def _raise_on_failure(self, done: list[str], failed: dict[str, str]) -> dict[str, Any]:
        if failed and self.raise_on_failure:
            total = len(done) + len(failed)
            detail = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:5])
            raise InferenceFailures(f"{len(failed)} of {total} case(s) failed: {detail}")
        return self.summary
