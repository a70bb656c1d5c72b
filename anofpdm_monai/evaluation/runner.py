"""The evaluate workflow: AnoFPDM against the papers' baselines on one checkpoint, with the papers' metrics.

Methods: :data:`~anofpdm_monai.evaluation.methods.METHODS` (AnoFPDM DDIM and DDPM from image labels only, its
ablations, the reconstruction baselines and the intensity floor tuned WITH pixel labels; ``ddim_clf`` needs a
noise-conditioned classifier trained with ``train_classifier.json``).

AnoFPDM variants sharing a forward mode and seed share one forward pass. Every per-case result is kept in a
:class:`~anofpdm_monai.evaluation.store.ResultStore` with the settings it was made with and reused by reruns with
the same settings; tuning results in ``tuning.json``. Outputs: ``metrics.csv`` (per slice, method and seed),
``summary.json``, ``summary.md`` (laid out like the papers' Table 1, mean +- std over seeds) and ``figures/``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..calibration import Calibration, collect_statistics, make_calibration
from ..distributed import barrier, rank_and_world, run_on_rank0
from ..inferers.anofpdm import AnoFPDMInferer
from ..inferers.baselines import (
    DEFAULT_CLASSIFIER_SCALE,
    DEFAULT_CLASSIFIER_SCALES,
    IntensityInferer,
    ReconstructionInferer,
)
from ..inferers.noise import slice_noise_keys
from ..schedule import NoiseSchedule
from ..settings import DEFAULT_GUIDANCE_CANDIDATES, DEFAULT_GUIDANCE_SCALE, DEFAULT_TOLERANCE, AnoFPDMSettings
from .cases import TestCaseRuns
from .methods import ANOFPDM_METHODS, DEFAULT_METHODS, METHODS
from .report import EvaluationReport, ResultMetric
from .store import ResultStore
from .tuning import TUNING_OBJECTIVES, PixelLabelTuning

__all__ = ["Evaluator"]

logger = logging.getLogger(__name__)


class Evaluator(PixelLabelTuning, TestCaseRuns, EvaluationReport):
    """Run the chosen methods on the test split and write the metrics, tables and figures.

    Args:
        network: the trained epsilon network (its checkpoint digest is ``checkpoint_digest``).
        checkpoint_digest: identifies the checkpoint (calibrations are refused for another one).
        modalities: channel names of the model.
        map_modalities: names of the map modalities.
        val_dataset, test_dataset: :class:`~anofpdm_monai.data.SliceDataset` of the validation and test splits.
        output_dir: where results go.
        calibration: the AnoFPDM (DDIM) calibration; None calibrates here (image labels only).
        methods: method keys (see :data:`METHODS`; default :data:`DEFAULT_METHODS`, all but ``ddim_clf``).
        seeds: seeds of the stochastic methods (the others use the first).
        noise_levels: candidate noise levels of the reconstruction baselines (tuned on validation).
        num_steps: sampling steps of the reconstruction baselines (None: every step).
        guidance_scales: candidates of the w sweep when calibrating here.
        settings: the AnoFPDM settings used when calibrating here (default :class:`AnoFPDMSettings()`).
        schedule: the model's noise schedule (from its checkpoint; default: the papers' linear schedule).
        intensity_modality: channel of the intensity floor (default: the first map modality).
        intensity_polarity: ``"bright"`` (lesions hyperintense, e.g. FLAIR) or ``"dark"`` (e.g. T1w stroke).
        median_kernel, min_component_size: the post-processing of every method (default: the calibration's, else
            5 and 40).
        precision: numeric mode of every method's network calls (``"fp32"``, ``"bf16"``, ``"fp16"``); None: the
            calibration's, else the settings'. A calibration made at another precision is refused.
        batch_size, device, progress: execution.
        figure_slices: number of example slices in the overlay figure.
        tuning_objective: what the pixel-label tuning maximises on the validation split, ``"pooled"`` (default),
            ``"unhealthy"`` or ``"mixed"`` (see :func:`tune_threshold`).
        classifier: the noise-conditioned healthy/unhealthy classifier of ``ddim_clf`` (required for that method;
            trained for this checkpoint's slices and noise schedule), ``classifier_digest`` identifying its file.
        classifier_scales: candidates of the classifier-guidance scale s of ``ddim_clf`` (tuned with the noise level).
        extra_metrics: more columns of the summary: name -> :class:`~anofpdm_monai.evaluation.report.ResultMetric`
            (a MONAI metric on the stored results), computed for every method and seed (``evaluate.json``'s
            ``extra_metrics``).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        checkpoint_digest: str,
        modalities: Sequence[str],
        map_modalities: Sequence[str],
        val_dataset: Any,
        test_dataset: Any,
        output_dir: str | os.PathLike,
        calibration: Calibration | None = None,
        methods: Sequence[str] = DEFAULT_METHODS,
        seeds: Sequence[int] = (0, 1, 2),
        noise_levels: Sequence[int] = (200, 400, 600),
        num_steps: int | None = 50,
        guidance_scales: Sequence[float] = DEFAULT_GUIDANCE_CANDIDATES,
        settings: AnoFPDMSettings | None = None,
        schedule: NoiseSchedule | None = None,
        intensity_modality: str | None = None,
        intensity_polarity: str = "bright",
        median_kernel: int | None = None,
        min_component_size: int | None = None,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        precision: str | None = None,
        progress: bool = True,
        figure_slices: int = 6,
        tuning_objective: str = "pooled",
        classifier: torch.nn.Module | None = None,
        classifier_digest: str | None = None,
        classifier_scales: Sequence[float] = DEFAULT_CLASSIFIER_SCALES,
        extra_metrics: Mapping[str, ResultMetric] | None = None,
    ) -> None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if any(METHODS[m].needs_classifier for m in methods) and classifier is None:
            raise ValueError(
                "method 'ddim_clf' needs a noise-conditioned classifier: set classifier_checkpoint "
                "(a classifier.pt written by train_classifier.json)"
            )
        if not classifier_scales or any(not float(s) >= 0 for s in classifier_scales):
            raise ValueError(f"classifier_scales must be a non-empty list of numbers >= 0, got {classifier_scales}")
        if not seeds:
            raise ValueError("seeds must not be empty")
        self.extra_metrics = dict(extra_metrics or {})
        for name, metric in self.extra_metrics.items():
            if not isinstance(metric, ResultMetric):
                raise ValueError(
                    f"extra_metrics[{name!r}] must be an anofpdm_monai.evaluation.ResultMetric wrapping a MONAI "
                    f"metric, got {type(metric).__name__}"
                )
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.digest = checkpoint_digest
        self.classifier = None if classifier is None else classifier.to(self.device).eval().requires_grad_(False)
        self.classifier_digest = classifier_digest
        self.classifier_scales = [float(s) for s in classifier_scales]
        self.modalities = list(modalities)
        self.map_modalities = list(map_modalities)
        missing = [m for m in self.map_modalities if m not in self.modalities]
        if missing:
            raise ValueError(f"map modalities {missing} are not among the model's modalities {self.modalities}")
        self.map_channels = [self.modalities.index(m) for m in self.map_modalities]
        self.intensity_modality = intensity_modality or self.map_modalities[0]
        self.polarity = intensity_polarity
        if self.intensity_modality not in self.modalities:
            raise ValueError(f"intensity modality {self.intensity_modality!r} not among {self.modalities}")
        if tuning_objective not in TUNING_OBJECTIVES:
            raise ValueError(f"unknown tuning_objective {tuning_objective!r}; choose from {list(TUNING_OBJECTIVES)}")
        self.tuning_objective = tuning_objective
        self.val, self.test = val_dataset, test_dataset
        self.output_dir = Path(output_dir)
        self.calibration = calibration
        self.methods = list(methods)
        self.seeds = [int(s) for s in seeds]
        self.noise_levels = [int(t) for t in noise_levels]
        self.num_steps = num_steps
        self.guidance_scales = [float(w) for w in guidance_scales]
        base = calibration.settings if calibration is not None else (settings or AnoFPDMSettings())
        if precision is not None and calibration is not None and precision != base.precision:
            raise ValueError(
                f"precision {precision!r} differs from the calibration's {base.precision!r}: calibrate at "
                f"{precision!r} (calibrate.json --precision {precision}) or leave precision unset"
            )
        base = base.replace(precision=precision)
        # one post-processing for every method: the given values, else the calibration's (or the settings')
        self.settings = base.replace(median_kernel=median_kernel or None, min_component_size=min_component_size)
        self.median_kernel = self.settings.median_kernel
        self.min_component_size = self.settings.min_component_size
        self.schedule = schedule or NoiseSchedule()
        self.store = ResultStore(self.output_dir)
        self.batch_size = int(batch_size)
        self.autocast = self.settings.autocast_dtype  # of the baselines; AnoFPDM's comes with its settings
        self.progress = progress
        self.figure_slices = int(figure_slices)

    # ------------------------------------------------------------------ helpers
    def _label(self, method: str) -> str:
        return METHODS[method].label.format(channel=self.intensity_modality.upper())

    def _seeds(self, method: str) -> list[int]:
        return self.seeds if METHODS[method].stochastic else self.seeds[:1]

    def _batches(self, dataset: Any, indices: Sequence[int] | None = None) -> DataLoader:
        subset = dataset if indices is None else Subset(dataset, list(indices))
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=0)

    @staticmethod
    def _noise_keys(inferer: Any, batch: Mapping[str, Any]) -> list[int] | None:
        """The per-slice noise keys of a slice batch (seed, case, slice) for an inferer with a seed."""
        seed = getattr(inferer, "seed", None)
        return slice_noise_keys(seed, batch["case_id"], batch["slice_index"])

    @staticmethod
    def _ground_truth(dataset: Any) -> dict[str, np.ndarray]:
        """Pixel labels and brain masks of a slice dataset, in dataset order (read from the cache's arrays)."""
        table = dataset.table
        label, brain = [], []
        for case, rows in table.groupby("case_id", sort=False)["row"]:
            arrays = dataset.cache.arrays(str(case))
            label.append(np.asarray(arrays["label"][rows.to_numpy()], dtype=bool))
            brain.append(np.asarray(arrays["brain"][rows.to_numpy()], dtype=bool))
        return {"label": np.concatenate(label), "brain": np.concatenate(brain)}

    # ------------------------------------------------------------------ calibration (image labels only)
    def anofpdm_calibration(self, forward: str) -> Calibration:
        """The calibration of the AnoFPDM variant with this forward mode: the given one when it fits, else one
        made here on the validation split from slice labels only (stored as ``calibration_<forward>.json``)."""
        given = self.calibration
        if given is not None and given.forward == forward:
            given.check(source="calibration", checkpoint_digest=self.digest, map_channels=self.map_channels)
            return given
        path = self.output_dir / f"calibration_{forward}.json"
        # every option as the given calibration's (or this evaluation's settings), only the forward mode differs
        settings = (given.settings if given is not None else self.settings).replace(
            forward=forward, median_kernel=self.median_kernel, min_component_size=self.min_component_size
        )
        inferer = AnoFPDMInferer(
            settings,
            map_channels=self.map_channels,
            scheduler=self.schedule,
            seed=self.seeds[0],
        )
        ws = sorted({float(c["guidance_scale"]) for c in given.candidates}) if given else self.guidance_scales
        tolerance = given.tolerance if given else DEFAULT_TOLERANCE
        if path.is_file():
            cal = Calibration.load(path)
            try:
                cal.check(
                    source=str(path),
                    settings=inferer.settings,
                    checkpoint_digest=self.digest,
                    map_channels=self.map_channels,
                    quantile_range=inferer.settings.quantile_range,
                )
                same = (
                    sorted(float(c["guidance_scale"]) for c in cal.candidates) == sorted(ws)
                    and cal.tolerance == tolerance
                    and cal.num_healthy + cal.num_unhealthy == len(self.val)
                )
                if same:
                    return cal
                logger.info("recalibrating: %s was made for other candidates or slices", path)
            except ValueError:
                logger.info("recalibrating: %s was made for another setting", path)
        stats = collect_statistics(
            self.network, inferer, self._batches(self.val), ws, self.device, self.progress, total=None
        )
        cal = make_calibration(
            stats,
            inferer,
            self.map_modalities,
            {"digest": self.digest},
            tolerance,
            datalist="validation split of the evaluation",
        )
        cal.save(path)
        return cal

    # ------------------------------------------------------------------ inferer factories (every job)
    def _intensity(self, threshold: float | None) -> IntensityInferer:
        channel = self.modalities.index(self.intensity_modality)
        return IntensityInferer(channel, threshold, self.median_kernel, self.min_component_size, self.polarity)

    def _baseline_guidance(self) -> float:
        return float(self.calibration.guidance_scale) if self.calibration is not None else DEFAULT_GUIDANCE_SCALE

    def _from_calibration(self, cal: Calibration, seed: int, **overrides: Any) -> AnoFPDMInferer:
        """An AnoFPDM inferer from a calibration with this evaluator's post-processing (shared by every method)."""
        return AnoFPDMInferer.from_calibration(
            cal,
            scheduler=self.schedule,
            seed=seed,
            median_kernel=self.median_kernel,
            min_component_size=self.min_component_size,
            **overrides,
        )

    def _baseline(
        self,
        method: str,
        noise_level: int,
        threshold: float | None,
        seed: int,
        classifier_scale: float = DEFAULT_CLASSIFIER_SCALE,
    ) -> ReconstructionInferer:
        w = self._baseline_guidance()
        return ReconstructionInferer(
            method,
            noise_level,
            num_steps=self.num_steps,
            guidance_scale=w,
            classifier=self.classifier if method == "ddim_clf" else None,
            classifier_scale=classifier_scale,
            map_channels=self.map_channels,
            threshold=threshold,
            median_kernel=self.median_kernel,
            min_component_size=self.min_component_size,
            seed=seed,
            autocast_dtype=self.autocast,
            schedule=self.schedule,
        )

    # ------------------------------------------------------------------ the whole workflow
    def _forwards(self) -> list[str]:
        """The forward modes of the AnoFPDM methods evaluated."""
        return sorted({METHODS[m].forward for m in self.methods if METHODS[m].anofpdm})

    def run(self) -> dict[str, Any] | None:
        """Tune, run every method on the test cases and report.

        Under ``torchrun``, rank 0 tunes and calibrates (validation split) while the others wait; then the ranks
        share the test cases out (on demand) into the shared result store, and rank 0 writes the report of all
        cases while the others wait (they return None). The table equals the single-process one: each case's
        results do not depend on which rank made them.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rank, _ = rank_and_world()
        # rank 0's solo work is waited for outside any collective (a barrier is aborted after dist_timeout, and
        # tuning on a large validation split takes longer): the others poll rank 0's heartbeat in the store
        tuning = run_on_rank0(self._tune_and_calibrate, "tuning and calibration on the validation split")
        if rank != 0:
            tuning = self.tune()  # read back what rank 0 wrote (nothing left to compute)
        for seed in self.seeds:
            groups = {"ddim": [m for m in ("anofpdm", "anofpdm_tuned", "anofpdm_last") if m in self.methods]}
            groups["ddpm"] = ["anofpdm_ddpm"] if "anofpdm_ddpm" in self.methods else []
            for forward, members in groups.items():
                members = [m for m in members if seed in self._seeds(m)]
                if members:
                    self._run_anofpdm_group(forward, members, seed, tuning)
            for method in self.methods:
                if method not in ANOFPDM_METHODS and seed in self._seeds(method):
                    self._run_baseline(method, seed, tuning)
        barrier()  # the cases were dealt out on demand: the ranks arrive here within about one case's time
        return run_on_rank0(lambda: self.report(tuning), "the evaluation report")

    def _tune_and_calibrate(self) -> dict[str, Any]:
        tuning = self.tune()
        for forward in self._forwards():
            self.anofpdm_calibration(forward)
        return tuning
