"""Evaluation from Python: a checkpoint, its calibration and a datalist with pixel labels -> the metrics table,
per-slice metrics and figures of AnoFPDM against the baselines (:class:`~anofpdm_monai.evaluation.Evaluator`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine

from ..calibration import Calibration
from ..data import SliceDataset
from ..evaluation import METHODS, Evaluator
from ..io import ensure_writable_dir
from ..networks import check_classifier_fits, load_classifier, load_network

__all__ = ["run_evaluation", "summary_metrics", "EvaluationRun"]


def run_evaluation(
    checkpoint: str | os.PathLike,
    datalist: str | os.PathLike | Mapping[str, Any],
    dataset_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    map_modalities: Sequence[str],
    calibration: str | os.PathLike | None = None,
    val_split: str = "validation",
    test_split: str = "test",
    use_ema: bool = True,
    classifier_checkpoint: str | os.PathLike | None = None,
    **evaluator_kwargs: Any,
) -> dict[str, Any]:
    """Load the checkpoint (its EMA weights, or the raw ones with ``use_ema=False``) and the calibration file when it
    exists, build the validation and test slice datasets through the cache, and run :class:`Evaluator`. Returns the
    summary.

    ``classifier_checkpoint`` (needed by ``ddim_clf``, refused when missing) is the noise-conditioned classifier
    written by ``train_classifier.json``; it must have been trained with this checkpoint's preprocessing and noise
    schedule."""
    needs_classifier = [m for m in evaluator_kwargs.get("methods", ()) if m in METHODS and METHODS[m].needs_classifier]
    if needs_classifier and classifier_checkpoint is None:
        raise ValueError(
            f"method(s) {needs_classifier} need classifier_checkpoint: set it to a classifier.pt written by "
            "train_classifier.json, or leave these methods out"
        )
    ensure_writable_dir(output_dir, "output_dir")  # before any work
    ensure_writable_dir(cache_dir, "cache_dir")
    network, info = load_network(checkpoint, use_ema=use_ema, map_location="cpu")
    if not info.get("preprocessing"):
        raise ValueError(f"checkpoint {checkpoint} records no preprocessing; train with the bundle")
    cal = None
    if calibration is not None and Path(calibration).is_file():
        cal = Calibration.load(calibration)
        cal.check(source=f"calibration {calibration}", checkpoint_digest=info["digest"])
    evaluator_kwargs.setdefault("schedule", info["schedule"])
    progress = evaluator_kwargs.get("progress", True)
    if needs_classifier:
        classifier, clf_info = load_classifier(classifier_checkpoint, map_location="cpu")
        check_classifier_fits(clf_info, info, source=f"classifier {classifier_checkpoint}")
        evaluator_kwargs.update(classifier=classifier, classifier_digest=clf_info["digest"])
    pre = info["preprocessing"]
    val = SliceDataset.from_datalist(
        datalist, dataset_dir, val_split, cache_dir, pre, progress=progress, require_labels=True
    )
    test = SliceDataset.from_datalist(
        datalist, dataset_dir, test_split, cache_dir, pre, progress=progress, require_labels=True
    )
    evaluator = Evaluator(
        network,
        info["digest"],
        pre["modalities"],
        map_modalities,
        val,
        test,
        output_dir,
        calibration=cal,
        **evaluator_kwargs,
    )
    return evaluator.run()


def summary_metrics(summary: Mapping[str, Any] | None) -> dict[str, float]:
    """The metrics of an evaluation summary (``summary.json``) as one flat mapping: ``<method>/<metric>`` (the mean over
    seeds) and ``<method>/<metric>_std``. Empty for None (a rank other than 0 of a distributed evaluation)."""
    out: dict[str, float] = {}
    for method, entry in ((summary or {}).get("methods") or {}).items():
        for name, value in (entry.get("metrics") or {}).items():
            out[f"{method}/{name}"] = float(value["mean"])
            out[f"{method}/{name}_std"] = float(value["std"])
    return out


class EvaluationRun(Engine):
    """An evaluation (``evaluation``: a callable returning the summary, e.g. :func:`run_evaluation` with its
    arguments bound) as a one-iteration ignite engine, so that MONAI's engine handlers attach to it: ``evaluate.json``'s
    ``handlers``, to which ``--tracking`` adds an MLflow handler. When the epoch completes, ``state.metrics`` holds
    :func:`summary_metrics` of the summary and ``state.output`` the summary; :meth:`run` returns it."""

    def __init__(self, evaluation: Callable[[], Mapping[str, Any] | None], val_handlers: Sequence[Any] = ()) -> None:
        super().__init__(self._evaluate)
        self.evaluation = evaluation
        for handler in val_handlers or ():
            handler.attach(self)

    def _evaluate(self, engine: Engine, batch: Any) -> Mapping[str, Any] | None:
        summary = self.evaluation()
        engine.state.metrics = summary_metrics(summary)
        return summary

    def run(self) -> Mapping[str, Any] | None:  # type: ignore[override]  # MONAI's workflows: run() without data
        """Run the evaluation once; its summary (None on a rank other than 0 of a distributed run)."""
        return super().run([None], max_epochs=1).output
