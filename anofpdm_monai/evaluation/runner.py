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

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..calibration import Calibration, collect_statistics, make_calibration
from ..engines.distributed import barrier, claim, rank_and_world, run_on_rank0
from ..inferers.anofpdm import AnoFPDMInferer
from ..inferers.baselines import (
    DEFAULT_CLASSIFIER_SCALE,
    DEFAULT_CLASSIFIER_SCALES,
    IntensityInferer,
    ReconstructionInferer,
)
from ..inferers.noise import slice_noise_keys
from ..io import atomic_path, write_text
from ..metrics import PooledAUPRC, aggregate_over_seeds, dice_per_slice, iou_per_slice, segmentation_metrics
from ..schedule import NoiseSchedule
from ..settings import DEFAULT_GUIDANCE_CANDIDATES, DEFAULT_GUIDANCE_SCALE, DEFAULT_TOLERANCE, AnoFPDMSettings
from .methods import ANOFPDM_METHODS, DEFAULT_METHODS, METHODS
from .report import case_metrics, summary_markdown, write_case_reports, write_figures
from .store import ResultStore, fingerprint
from .tuning import TUNING_OBJECTIVES, threshold_candidates, tune_threshold

__all__ = ["Evaluator"]

logger = logging.getLogger(__name__)


class Evaluator:
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

    # ------------------------------------------------------------------ tuning (pixel labels)
    def _tuning(self) -> dict[str, Any]:
        path = self.output_dir / "tuning.json"
        state = json.loads(path.read_text()) if path.is_file() else {}
        key = {
            "noise_levels": self.noise_levels,
            "num_steps": self.num_steps,
            "digest": self.digest,
            "median_kernel": self.median_kernel,
            "min_component_size": self.min_component_size,
            "map_channels": self.map_channels,
            "intensity": [self.intensity_modality, self.polarity],
            "guidance_scale": self._baseline_guidance(),
            "seed": self.seeds[0],
            "objective": self.tuning_objective,
            "validation": [sorted(set(self.val.table["case_id"].astype(str))), len(self.val)],
        }
        if state.get("_key") != key:
            state = {"_key": key}
        return state

    def _save_tuning(self, state: Mapping[str, Any]) -> None:
        write_text(self.output_dir / "tuning.json", json.dumps(state, indent=2))

    @staticmethod
    def _noise_keys(inferer: Any, batch: Mapping[str, Any]) -> list[int] | None:
        """The per-slice noise keys of a slice batch (seed, case, slice) for an inferer with a seed."""
        seed = getattr(inferer, "seed", None)
        return slice_noise_keys(seed, batch["case_id"], batch["slice_index"])

    def _val_maps(self, inferer: Any) -> np.ndarray:
        maps = []
        for batch in tqdm(self._batches(self.val), desc="validation", leave=False, disable=not self.progress):
            keys = self._noise_keys(inferer, batch)
            out = inferer(batch["image"].to(self.device), self.network, noise_keys=keys)
            maps.append(out.filtered_map.float().cpu().numpy())
        return np.concatenate(maps)

    def _val_maps_shared_inversion(self, inferers: Sequence[ReconstructionInferer]) -> list[np.ndarray]:
        """:meth:`_val_maps` of several DDIM inferers with the same noise level and steps: each batch is inverted
        once and decoded by each of them."""
        maps: list[list[np.ndarray]] = [[] for _ in inferers]
        for batch in tqdm(self._batches(self.val), desc="validation", leave=False, disable=not self.progress):
            x = batch["image"].to(self.device)
            inverted = inferers[0].invert(x, self.network)
            for parts, inferer in zip(maps, inferers):
                parts.append(inferer(x, self.network, inverted=inverted).filtered_map.float().cpu().numpy())
        return [np.concatenate(parts) for parts in maps]

    def tune(self) -> dict[str, Any]:
        """Tune the pixel-label methods on the validation split (cached in ``tuning.json``)."""
        state = self._tuning()
        for method in self.methods:
            if not METHODS[method].pixel_labels:
                continue
            # what a method's maps depend on beyond the tuning key: the AnoFPDM calibration, the classifier
            depends: dict[str, Any] = {}
            if method == "anofpdm_tuned":
                cal = self.anofpdm_calibration("ddim")
                depends["calibration"] = fingerprint(cal.without_created())
            if method == "ddim_clf":
                depends = {"classifier": self.classifier_digest, "classifier_scales": self.classifier_scales}
            if method in state and all(state[method].get(k) == v for k, v in depends.items()):
                continue
            logger.info("tuning %s on the validation split with pixel labels", method)
            best: dict[str, Any] = {"val_dice": -1.0}
            if method == "anofpdm_tuned":
                maps = self._val_maps(self._from_calibration(cal, self.seeds[0]))
                thr, dice = self._tune(maps)
                best = {"threshold": thr, "val_dice": dice}
            elif method == "intensity":
                maps = self._val_maps(self._intensity(None))
                thr, dice = self._tune(maps)
                best = {"threshold": thr, "val_dice": dice}
            elif method == "ddim_clf":
                for t in self.noise_levels:
                    inferers = [self._baseline(method, t, None, self.seeds[0], s) for s in self.classifier_scales]
                    for scale, maps in zip(self.classifier_scales, self._val_maps_shared_inversion(inferers)):
                        thr, dice = self._tune(maps)
                        if dice > best["val_dice"]:
                            best = {"noise_level": t, "classifier_scale": scale, "threshold": thr, "val_dice": dice}
            else:
                for t in self.noise_levels:
                    maps = self._val_maps(self._baseline(method, t, None, self.seeds[0]))
                    thr, dice = self._tune(maps)
                    if dice > best["val_dice"]:
                        best = {"noise_level": t, "threshold": thr, "val_dice": dice}
            best.update(depends)
            state[method] = best
            self._save_tuning(state)
        return state

    @cached_property
    def _val_truth(self) -> dict[str, np.ndarray]:
        """Pixel labels and brain masks of the validation split, read once (only when something is tuned)."""
        return self._ground_truth(self.val)

    def _tune(self, maps: np.ndarray) -> tuple[float, float]:
        gt = self._val_truth
        candidates = threshold_candidates(maps, gt["brain"])
        return tune_threshold(maps, gt["label"], candidates, self.min_component_size, self.tuning_objective)

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

    # ------------------------------------------------------------------ test runs with per-case caching
    def _case_indices(self) -> dict[str, list[int]]:
        cases: dict[str, list[int]] = {}
        for i, case in enumerate(self.test.table["case_id"].astype(str)):
            cases.setdefault(case, []).append(i)
        return cases

    def _my_cases(self) -> Iterator[tuple[str, list[int]]]:
        """This rank's test cases and their slice indices, dealt out on demand among the ranks (:func:`claim`: a
        rank whose cases are already stored takes more of the others'); all of them in one process."""
        return claim(list(self._case_indices().items()), "evaluation test cases")

    def _run_anofpdm_group(self, forward: str, members: list[str], seed: int, tuning: Mapping[str, Any]) -> None:
        cal = self.anofpdm_calibration(forward)
        base = self._from_calibration(cal, seed)
        post = {
            "anofpdm": base,
            "anofpdm_ddpm": base,
            "anofpdm_last": self._from_calibration(cal, seed, aggregation="last"),
        }
        if "anofpdm_tuned" in members:
            post["anofpdm_tuned"] = self._from_calibration(
                cal, seed, m_max=None, threshold=tuning["anofpdm_tuned"]["threshold"]
            )
        settings = {
            m: fingerprint(
                {
                    "method": m,
                    "seed": seed,
                    "calibration": cal.without_created(),
                    "median_kernel": self.median_kernel,
                    "min_component_size": self.min_component_size,
                    "threshold": tuning["anofpdm_tuned"]["threshold"] if m == "anofpdm_tuned" else None,
                }
            )
            for m in members
        }
        for case, idx in tqdm(self._my_cases(), desc=f"AnoFPDM ({forward}, seed {seed})", disable=not self.progress):
            todo = [m for m in members if not self.store.matches(m, seed, case, settings[m], len(idx))]
            if not todo:
                continue
            chunks: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in todo}
            for batch in self._batches(self.test, idx):
                keys = self._noise_keys(base, batch)
                result = base.forward_process(
                    batch["image"].to(self.device), self.network, need_maps=True, noise_keys=keys
                )
                for m in todo:
                    out = post[m].postprocess(result)
                    chunks[m].append(
                        {
                            "map": out.filtered_map.cpu().numpy().astype(np.float32),
                            "mask": out.mask.cpu().numpy(),
                            "mask_ungated": out.mask_ungated.cpu().numpy(),
                            "pred_label": out.pred_label.cpu().numpy(),
                            "cosine": out.cosine.cpu().numpy(),
                            "health": out.health.cpu().numpy(),
                            "divergence": out.divergence.cpu().numpy().astype(np.float32),
                            "mse_guided": out.mse_guided.cpu().numpy().astype(np.float32),
                            "mse_reference": out.mse_reference.cpu().numpy().astype(np.float32),
                            "end_step": out.end_step.cpu().numpy(),
                            "timesteps": out.timesteps.cpu().numpy(),
                        }
                    )
            for m in todo:
                merged = {k: np.concatenate([c[k] for c in chunks[m]]) for k in chunks[m][0] if k != "timesteps"}
                merged["timesteps"] = chunks[m][0]["timesteps"]
                self.store.save(m, seed, case, settings[m], **merged)

    def _run_baseline(self, method: str, seed: int, tuning: Mapping[str, Any]) -> None:
        params = tuning[method]
        if method == "intensity":
            inferer: Any = self._intensity(params["threshold"])
        else:
            scale = params.get("classifier_scale", DEFAULT_CLASSIFIER_SCALE)
            inferer = self._baseline(method, params["noise_level"], params["threshold"], seed, scale)
        settings = fingerprint(
            {
                "method": method,
                "seed": seed,
                "tuned": dict(params),
                "tuning_key": tuning.get("_key"),
                "median_kernel": self.median_kernel,
                "min_component_size": self.min_component_size,
            }
        )
        for case, idx in tqdm(self._my_cases(), desc=f"{method} (seed {seed})", disable=not self.progress):
            if self.store.matches(method, seed, case, settings, len(idx)):
                continue
            parts = []
            for batch in self._batches(self.test, idx):
                keys = self._noise_keys(inferer, batch)
                out = inferer(batch["image"].to(self.device), self.network, noise_keys=keys)
                parts.append((out.filtered_map.cpu().numpy(), out.mask.cpu().numpy(), out.pred_label.cpu().numpy()))
            maps, masks, pred = (np.concatenate(p) for p in zip(*parts))
            self.store.save(
                method,
                seed,
                case,
                settings,
                map=maps.astype(np.float32),
                mask=masks,
                mask_ungated=masks,
                pred_label=pred,
            )

    def _load(self, method: str, seed: int) -> dict[str, np.ndarray]:
        return self.store.load(method, seed, list(self._case_indices()))

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

    def _picks(self, gt: Mapping[str, np.ndarray], y: np.ndarray) -> tuple[list[int], list[int]]:
        """Example slices: the largest lesion of each case first (then more), one healthy slice; and for the
        curves two lesion slices and two healthy ones."""
        lesion = gt["label"].reshape(len(y), -1).sum(1)
        cases = self.test.table["case_id"].astype(str).to_numpy()
        picks: list[int] = []
        for i in np.argsort(-lesion, kind="stable"):
            if lesion[i] == 0 or len(picks) >= max(1, self.figure_slices - 1):
                break
            if cases[i] not in {cases[j] for j in picks} or len(picks) >= len(set(cases)):
                picks.append(int(i))
        healthy = np.nonzero(y == 0)[0]
        if len(healthy):
            picks.append(int(healthy[len(healthy) // 2]))
        ill = np.nonzero(y == 1)[0]
        curves = [int(i) for i in ill[np.argsort(-lesion[ill], kind="stable")][:2]] + [int(i) for i in healthy[:2]]
        return picks, curves

    def report(self, tuning: Mapping[str, Any]) -> dict[str, Any]:
        """Metrics, tables and figures from the stored per-case results (one method and seed in memory at a time)."""
        gt = self._ground_truth(self.test)
        table = self.test.table
        y = gt["label"].reshape(len(table), -1).any(axis=1).astype(np.int64)
        cases = table["case_id"].astype(str).to_numpy()
        picks, curve_picks = self._picks(gt, y)
        rows, case_rows, summary, pr_curves, examples, curves = [], [], {}, {}, {}, None
        for method in self.methods:
            per_seed = []
            for seed in self._seeds(method):
                r = self._load(method, seed)
                maps = r["map"].astype(np.float32)
                cosine = r.get("cosine") if method in ANOFPDM_METHODS else None
                # the slice classification is the health score's (the cosine unless the settings choose another)
                health = r.get("health", cosine) if method in ANOFPDM_METHODS else None
                per_seed.append(
                    segmentation_metrics(
                        r["mask"],
                        r["mask_ungated"],
                        gt["label"],
                        maps,
                        gt["brain"],
                        y,
                        cases,
                        cosine=health,
                        y_pred=r["pred_label"],
                    )
                )
                per_case = case_metrics(r, gt["label"], gt["brain"], cases, health)
                case_rows += [{"method": method, "seed": seed, **row} for row in per_case]
                write_case_reports(self.output_dir / "metrics_reports" / f"{method}_seed{seed}", per_case)
                ungated = r["mask_ungated"]
                rows.append(
                    pd.DataFrame(
                        {
                            "method": method,
                            "seed": seed,
                            "case_id": cases,
                            "slice_index": table["slice_index"].to_numpy(),
                            "source_index": table["source_index"].to_numpy(),
                            "label": y,
                            "lesion_area": gt["label"].reshape(len(y), -1).sum(1),
                            "pred_label": r["pred_label"],
                            "mask_area": r["mask"].reshape(len(y), -1).sum(1),
                            "dice_mixed": dice_per_slice(r["mask"], gt["label"]),
                            "iou_mixed": iou_per_slice(r["mask"], gt["label"]),
                            "dice_unhealthy": np.where(y == 1, dice_per_slice(ungated, gt["label"]), np.nan),
                            "iou_unhealthy": np.where(y == 1, iou_per_slice(ungated, gt["label"]), np.nan),
                            "cosine": cosine if cosine is not None else np.nan,
                            "health": health if health is not None else np.nan,
                        }
                    )
                )
                if seed != self._seeds(method)[0]:
                    continue
                examples[self._label(method)] = {"map": maps[picks], "mask": r["mask"][picks]}
                if y.any():
                    acc = PooledAUPRC()
                    acc.update(maps, gt["label"], gt["brain"])
                    precision, recall, _ = acc.precision_recall_curve()
                    pr_curves[self._label(method)] = (precision, recall, acc.compute())
                if method in ANOFPDM_METHODS and (curves is None or method == "anofpdm"):
                    curves = {k: r[k][curve_picks] for k in ("divergence", "mse_guided", "mse_reference", "end_step")}
                    curves["cosine"] = r["cosine"][curve_picks]
                    curves["steps"] = self.store.timesteps(method, seed, cases[0])
            agg = aggregate_over_seeds(per_seed)
            summary[method] = {
                "label": self._label(method),
                "tuning": METHODS[method].tuning,
                "seeds": self._seeds(method),
                "metrics": {k: {"mean": v[0], "std": v[1]} for k, v in agg.items()},
                "tuned": dict(tuning.get(method, {})),
            }
        with atomic_path(self.output_dir / "metrics.csv") as tmp:
            pd.concat(rows, ignore_index=True).to_csv(tmp, index=False)
        with atomic_path(self.output_dir / "cases.csv") as tmp:
            pd.DataFrame(case_rows).to_csv(tmp, index=False)
        out = {
            "num_test_slices": int(len(y)),
            "num_unhealthy": int(y.sum()),
            "test_cases": sorted(set(cases.tolist())),
            "tuning_objective": self.tuning_objective,
            "methods": summary,
        }
        write_text(self.output_dir / "summary.json", json.dumps(out, indent=2, default=float))
        write_text(self.output_dir / "summary.md", summary_markdown(out))
        write_figures(
            self.output_dir,
            self.test,
            self.modalities,
            self.intensity_modality,
            self.map_modalities,
            gt,
            y,
            picks,
            curve_picks,
            examples,
            pr_curves,
            curves,
        )
        logger.info("evaluation written to %s", self.output_dir)
        return out
