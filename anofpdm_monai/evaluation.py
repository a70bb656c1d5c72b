"""The evaluate workflow: AnoFPDM against the papers' baselines on one checkpoint, with the papers' metrics.

Methods (keys of :data:`METHODS`):

- ``anofpdm``: AnoFPDM, DDIM forward, image-level calibration only;
- ``anofpdm_ddpm``: AnoFPDM, DDPM forward (stochastic: run over several seeds);
- ``anofpdm_tuned``: AnoFPDM (DDIM) maps with a global threshold tuned WITH pixel labels ("tuned with labels");
- ``anofpdm_last``: AnoFPDM (DDIM) with H = S_{t_e} only (the "S_te only" ablation);
- ``anoddpm``, ``ddim``, ``ddim_cfg``: reconstruction baselines, noise level and threshold tuned WITH pixel labels;
- ``intensity``: the intensity floor (e.g. FLAIR), threshold tuned WITH pixel labels.

AnoFPDM variants sharing a forward mode and seed share one forward pass. Every per-case result is stored under
``<output_dir>/cases/<method>/seed<k>/<case>.npz`` with the settings it was made with (calibration, tuned values,
post-processing) and reused by reruns with the same settings; tuning results in ``tuning.json``.
Outputs: ``metrics.csv`` (per slice, method and seed), ``summary.json``, ``summary.md`` (laid out like the papers'
Table 1, mean +- std over seeds) and ``figures/`` (overlays, curves, PR curves).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .calibration import Calibration, calibrate_from_statistics, collect_statistics
from .inferers.anofpdm import AnoFPDMInferer
from .inferers.baselines import IntensityInferer, ReconstructionInferer
from .inferers.postprocess import remove_small_components
from .inferers.volume import inferer_from_calibration
from .metrics import PooledAUPRC, aggregate_over_seeds, dice_per_slice, iou_per_slice, segmentation_metrics
from .utils import atomic_path

__all__ = ["METHODS", "TUNING_OBJECTIVES", "tune_threshold", "threshold_candidates", "Evaluator", "run_evaluation"]

logger = logging.getLogger(__name__)

#: method key -> (table label, tuning note)
METHODS: dict[str, tuple[str, str]] = {
    "anofpdm": ("AnoFPDM (DDIM)", "image labels only"),
    "anofpdm_ddpm": ("AnoFPDM (DDPM)", "image labels only"),
    "anofpdm_tuned": ("AnoFPDM (DDIM), threshold tuned", "pixel labels"),
    "anofpdm_last": ("AnoFPDM (DDIM), S_te only", "image labels only"),
    "anoddpm": ("AnoDDPM (Gaussian)", "pixel labels"),
    "ddim": ("DDIM", "pixel labels"),
    "ddim_cfg": ("DDIM + classifier-free guidance", "pixel labels"),
    "intensity": ("{channel} intensity threshold", "pixel labels"),
}
STOCHASTIC = ("anofpdm_ddpm", "anoddpm")
_ANOFPDM = ("anofpdm", "anofpdm_ddpm", "anofpdm_tuned", "anofpdm_last")


def threshold_candidates(
    filtered_maps: np.ndarray,
    brain: np.ndarray | None = None,
    num: int = 100,
    levels: tuple[float, float] = (0.5, 0.9995),
) -> np.ndarray:
    """Candidate thresholds: quantiles of the (brain-pixel) map values between ``levels``, so that the search does
    not depend on the map's scale (the official code searches 0.01..0.69, which suits squared differences only)."""
    values = np.asarray(filtered_maps, dtype=np.float64)
    if brain is not None:
        values = values[np.asarray(brain, dtype=bool)]
    values = values.reshape(-1)
    if values.size == 0:
        raise ValueError("no map values to choose thresholds from")
    return np.unique(np.quantile(values, np.linspace(levels[0], levels[1], num)))


TUNING_OBJECTIVES = ("pooled", "unhealthy", "mixed")


def tune_threshold(
    filtered_maps: np.ndarray,
    ground_truth: np.ndarray,
    candidates: Sequence[float],
    min_component_size: int = 40,
    objective: str = "pooled",
) -> tuple[float, float]:
    """The threshold maximising a Dice objective over the given (validation) slices, WITH pixel labels.

    Objectives:

    - ``"pooled"`` (default): one Dice over all pixels of all slices, ``2 sum|P & G| / (sum|P| + sum|G|)``. False
      positives on healthy slices count, and predicting nothing scores 0.
    - ``"unhealthy"``: mean per-slice Dice over the slices that hold a lesion (the papers' "unhealthy" setting);
      false positives on healthy slices do not count.
    - ``"mixed"``: mean per-slice Dice over all slices (smoothed, so an empty mask on a healthy slice scores 1).
      With a weak map the empty mask everywhere can win this one (it scores the healthy fraction), which is why it
      is not the default.

    The same post-processing as at test time is applied (connected components of <= ``min_component_size`` pixels
    removed after thresholding). Ties go to the lowest candidate.

    Returns:
        ``(threshold, objective value)``.
    """
    if objective not in TUNING_OBJECTIVES:
        raise ValueError(f"unknown tuning objective {objective!r}; choose from {list(TUNING_OBJECTIVES)}")
    maps = torch.as_tensor(np.asarray(filtered_maps, dtype=np.float32))
    gt = np.asarray(ground_truth, dtype=bool)
    lesion = gt.reshape(gt.shape[0], -1).any(axis=1)
    if objective == "unhealthy" and not lesion.any():
        raise ValueError("the 'unhealthy' tuning objective needs validation slices with lesions; there are none")
    best_thr, best_dice = float("nan"), -1.0
    for thr in sorted(float(c) for c in candidates):
        mask = remove_small_components(maps >= thr, min_component_size).numpy()
        if objective == "pooled":
            inter = float(np.logical_and(mask, gt).sum())
            total = float(mask.sum()) + float(gt.sum())
            dice = 2.0 * inter / total if total > 0 else 1.0
        else:
            per_slice = dice_per_slice(mask, gt)
            dice = float((per_slice[lesion] if objective == "unhealthy" else per_slice).mean())
        if dice > best_dice:
            best_thr, best_dice = thr, dice
    return best_thr, best_dice


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def _fingerprint(settings: Mapping[str, Any]) -> str:
    """Canonical JSON of the settings a stored result was made with (compared on reuse)."""
    return json.dumps(settings, sort_keys=True, default=str)


def _calibration_settings(cal: Calibration) -> dict[str, Any]:
    """Everything of a calibration that results depend on (not its creation time)."""
    return {k: v for k, v in cal.to_dict().items() if k != "created"}


def _stored_result_matches(path: Path, settings: str, num_slices: int) -> bool:
    """Whether ``path`` holds a per-case result made with ``settings`` for ``num_slices`` slices."""
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
        methods: method keys (see :data:`METHODS`).
        seeds: seeds of the stochastic methods (the others use the first).
        noise_levels: candidate noise levels of the reconstruction baselines (tuned on validation).
        num_steps: sampling steps of the reconstruction baselines (None: every step).
        guidance_scales: candidates of the w sweep when calibrating here.
        anofpdm_options: forward-process options (``t_max``, ``stride``, ``timesteps``, ``reference``,
            ``divergence``, ``end_step``) used when calibrating here.
        intensity_modality: channel of the intensity floor (default: the first map modality).
        intensity_polarity: ``"bright"`` (lesions hyperintense, e.g. FLAIR) or ``"dark"`` (e.g. T1w stroke).
        median_kernel, min_component_size: the post-processing of every method (default: the calibration's, else
            5 and 40).
        batch_size, device, amp, progress: execution.
        figure_slices: number of example slices in the overlay figure.
        tuning_objective: what the pixel-label tuning maximises on the validation split, ``"pooled"`` (default),
            ``"unhealthy"`` or ``"mixed"`` (see :func:`tune_threshold`).
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
        methods: Sequence[str] = tuple(METHODS),
        seeds: Sequence[int] = (0, 1, 2),
        noise_levels: Sequence[int] = (200, 400, 600),
        num_steps: int | None = 50,
        guidance_scales: Sequence[float] = (0.5, 1.0, 2.0, 3.0, 5.0),
        anofpdm_options: Mapping[str, Any] | None = None,
        intensity_modality: str | None = None,
        intensity_polarity: str = "bright",
        median_kernel: int | None = None,
        min_component_size: int | None = None,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        amp: bool = False,
        progress: bool = True,
        figure_slices: int = 6,
        tuning_objective: str = "pooled",
    ) -> None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if not seeds:
            raise ValueError("seeds must not be empty")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.digest = checkpoint_digest
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
        self.anofpdm_options = dict(anofpdm_options or {})
        self.median_kernel = int(median_kernel or (calibration.median_kernel if calibration else 5))
        if min_component_size is None:
            min_component_size = calibration.min_component_size if calibration else 40
        self.min_component_size = int(min_component_size)
        self.batch_size = int(batch_size)
        self.autocast = torch.bfloat16 if (amp and self.device.type == "cuda") else None
        self.progress = progress
        self.figure_slices = int(figure_slices)

    # ------------------------------------------------------------------ helpers
    def _label(self, method: str) -> str:
        return METHODS[method][0].format(channel=self.intensity_modality.upper())

    def _seeds(self, method: str) -> list[int]:
        return self.seeds if method in STOCHASTIC else self.seeds[:1]

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
        options = dict(self.anofpdm_options)
        if given is not None:  # same grid and options as the given calibration, other forward mode
            options = {
                "timesteps": given.timesteps,
                "reference": given.reference,
                "divergence": given.divergence,
                "end_step": given.end_step,
            }
        options.setdefault("median_kernel", self.median_kernel)
        options.setdefault("min_component_size", self.min_component_size)
        inferer = AnoFPDMInferer(
            map_channels=self.map_channels, forward=forward, seed=self.seeds[0], autocast_dtype=self.autocast, **options
        )
        ws = sorted({float(c["guidance_scale"]) for c in given.candidates}) if given else self.guidance_scales
        tolerance = given.tolerance if given else 0.99
        if path.is_file():
            cal = Calibration.load(path)
            try:
                cal.check(
                    source=str(path),
                    checkpoint_digest=self.digest,
                    timesteps=inferer.timesteps,
                    forward=forward,
                    reference=inferer.reference,
                    divergence=inferer.divergence,
                    end_step=inferer.end_step,
                    map_channels=self.map_channels,
                )
                same = (
                    sorted(float(c["guidance_scale"]) for c in cal.candidates) == sorted(ws)
                    and list(cal.quantile_range) == list(inferer.quantile_range)
                    and cal.tolerance == tolerance
                    and cal.num_healthy + cal.num_unhealthy == len(self.val)
                )
                if same:
                    return cal
                logger.info("recalibrating: %s was made for other candidates, quantile range or slices", path)
            except ValueError:
                logger.info("recalibrating: %s was made for another setting", path)
        stats = collect_statistics(
            self.network, inferer, self._batches(self.val), ws, self.device, self.progress, total=None
        )
        result = calibrate_from_statistics(stats, tolerance=tolerance)
        cal = Calibration(
            timesteps=list(inferer.timesteps),
            forward=forward,
            reference=inferer.reference,
            divergence=inferer.divergence,
            end_step=inferer.end_step,
            quantile_range=list(inferer.quantile_range),
            map_modalities=self.map_modalities,
            map_channels=self.map_channels,
            median_kernel=inferer.median_kernel,
            min_component_size=inferer.min_component_size,
            checkpoint_digest=self.digest,
            datalist="validation split of the evaluation",
            tolerance=tolerance,
            **result,
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
        with atomic_path(self.output_dir / "tuning.json") as tmp:
            tmp.write_text(json.dumps(state, indent=2))

    def _val_maps(self, inferer: Any) -> np.ndarray:
        maps = []
        for batch in tqdm(self._batches(self.val), desc="validation", leave=False, disable=not self.progress):
            out = inferer(batch["image"].to(self.device), self.network)
            maps.append(out.filtered_map.float().cpu().numpy())
        return np.concatenate(maps)

    def tune(self) -> dict[str, Any]:
        """Tune the pixel-label methods on the validation split (cached in ``tuning.json``)."""
        state = self._tuning()
        gt = self._ground_truth(self.val)
        for method in self.methods:
            if METHODS[method][1] != "pixel labels":
                continue
            cal_key = None
            if method == "anofpdm_tuned":  # its maps depend on the AnoFPDM calibration too
                cal = self.anofpdm_calibration("ddim")
                cal_key = _fingerprint(_calibration_settings(cal))
            if method in state and state[method].get("calibration") == cal_key:
                continue
            logger.info("tuning %s on the validation split with pixel labels", method)
            best: dict[str, Any] = {"val_dice": -1.0}
            if method == "anofpdm_tuned":
                maps = self._val_maps(self._from_calibration(cal, self.seeds[0]))
                thr, dice = self._tune(maps, gt)
                best = {"threshold": thr, "val_dice": dice}
            elif method == "intensity":
                maps = self._val_maps(self._intensity(None))
                thr, dice = self._tune(maps, gt)
                best = {"threshold": thr, "val_dice": dice}
            else:
                for t in self.noise_levels:
                    maps = self._val_maps(self._baseline(method, t, None, self.seeds[0]))
                    thr, dice = self._tune(maps, gt)
                    if dice > best["val_dice"]:
                        best = {"noise_level": t, "threshold": thr, "val_dice": dice}
            if cal_key is not None:
                best["calibration"] = cal_key
            state[method] = best
            self._save_tuning(state)
        return state

    def _tune(self, maps: np.ndarray, gt: Mapping[str, np.ndarray]) -> tuple[float, float]:
        candidates = threshold_candidates(maps, gt["brain"])
        return tune_threshold(maps, gt["label"], candidates, self.min_component_size, self.tuning_objective)

    def _intensity(self, threshold: float | None) -> IntensityInferer:
        channel = self.modalities.index(self.intensity_modality)
        return IntensityInferer(channel, threshold, self.median_kernel, self.min_component_size, self.polarity)

    def _baseline_guidance(self) -> float:
        return float(self.calibration.guidance_scale) if self.calibration is not None else 2.0

    def _from_calibration(self, cal: Calibration, seed: int, **overrides: Any) -> AnoFPDMInferer:
        """An AnoFPDM inferer from a calibration with this evaluator's post-processing (shared by every method)."""
        return inferer_from_calibration(
            cal,
            seed=seed,
            median_kernel=self.median_kernel,
            min_component_size=self.min_component_size,
            autocast_dtype=self.autocast,
            **overrides,
        )

    def _baseline(self, method: str, noise_level: int, threshold: float | None, seed: int) -> ReconstructionInferer:
        w = self._baseline_guidance()
        return ReconstructionInferer(
            method,
            noise_level,
            num_steps=self.num_steps,
            guidance_scale=w,
            map_channels=self.map_channels,
            threshold=threshold,
            median_kernel=self.median_kernel,
            min_component_size=self.min_component_size,
            seed=seed,
            autocast_dtype=self.autocast,
        )

    # ------------------------------------------------------------------ test runs with per-case caching
    def _case_path(self, method: str, seed: int, case: str) -> Path:
        return self.output_dir / "cases" / method / f"seed{seed}" / f"{case}.npz"

    def _case_indices(self) -> dict[str, list[int]]:
        cases: dict[str, list[int]] = {}
        for i, case in enumerate(self.test.table["case_id"].astype(str)):
            cases.setdefault(case, []).append(i)
        return cases

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
            m: _fingerprint(
                {
                    "method": m,
                    "seed": seed,
                    "calibration": _calibration_settings(cal),
                    "median_kernel": self.median_kernel,
                    "min_component_size": self.min_component_size,
                    "threshold": tuning["anofpdm_tuned"]["threshold"] if m == "anofpdm_tuned" else None,
                }
            )
            for m in members
        }
        for case, idx in tqdm(
            self._case_indices().items(), desc=f"AnoFPDM ({forward}, seed {seed})", disable=not self.progress
        ):
            todo = [
                m for m in members if not _stored_result_matches(self._case_path(m, seed, case), settings[m], len(idx))
            ]
            if not todo:
                continue
            chunks: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in todo}
            for batch in self._batches(self.test, idx):
                result = base.forward_process(batch["image"].to(self.device), self.network, need_maps=True)
                for m in todo:
                    out = post[m].postprocess(result)
                    chunks[m].append(
                        {
                            "map": out.filtered_map.cpu().numpy().astype(np.float32),
                            "mask": out.mask.cpu().numpy(),
                            "mask_ungated": out.mask_ungated.cpu().numpy(),
                            "pred_label": out.pred_label.cpu().numpy(),
                            "cosine": out.cosine.cpu().numpy(),
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
                _save_npz(self._case_path(m, seed, case), settings=np.asarray(settings[m]), **merged)

    def _run_baseline(self, method: str, seed: int, tuning: Mapping[str, Any]) -> None:
        params = tuning[method]
        if method == "intensity":
            inferer: Any = self._intensity(params["threshold"])
        else:
            inferer = self._baseline(method, params["noise_level"], params["threshold"], seed)
        settings = _fingerprint(
            {
                "method": method,
                "seed": seed,
                "tuned": dict(params),
                "tuning_key": tuning.get("_key"),
                "median_kernel": self.median_kernel,
                "min_component_size": self.min_component_size,
            }
        )
        for case, idx in tqdm(self._case_indices().items(), desc=f"{method} (seed {seed})", disable=not self.progress):
            path = self._case_path(method, seed, case)
            if _stored_result_matches(path, settings, len(idx)):
                continue
            parts = []
            for batch in self._batches(self.test, idx):
                out = inferer(batch["image"].to(self.device), self.network)
                parts.append((out.filtered_map.cpu().numpy(), out.mask.cpu().numpy(), out.pred_label.cpu().numpy()))
            maps, masks, pred = (np.concatenate(p) for p in zip(*parts))
            _save_npz(
                path,
                settings=np.asarray(settings),
                map=maps.astype(np.float32),
                mask=masks,
                mask_ungated=masks,
                pred_label=pred,
            )

    def _load(self, method: str, seed: int) -> dict[str, np.ndarray]:
        parts = [np.load(self._case_path(method, seed, case)) for case in self._case_indices()]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files if k not in ("timesteps", "settings")}

    # ------------------------------------------------------------------ the whole workflow
    def run(self) -> dict[str, Any]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tuning = self.tune()
        for seed in self.seeds:
            groups = {"ddim": [m for m in ("anofpdm", "anofpdm_tuned", "anofpdm_last") if m in self.methods]}
            groups["ddpm"] = ["anofpdm_ddpm"] if "anofpdm_ddpm" in self.methods else []
            for forward, members in groups.items():
                members = [m for m in members if seed in self._seeds(m)]
                if members:
                    self._run_anofpdm_group(forward, members, seed, tuning)
            for method in self.methods:
                if method not in _ANOFPDM and seed in self._seeds(method):
                    self._run_baseline(method, seed, tuning)
        return self.report(tuning)

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
        rows, summary, pr_curves, examples, curves = [], {}, {}, {}, None
        for method in self.methods:
            per_seed = []
            for seed in self._seeds(method):
                r = self._load(method, seed)
                maps = r["map"].astype(np.float32)
                cosine = r.get("cosine") if method in _ANOFPDM else None
                per_seed.append(
                    segmentation_metrics(
                        r["mask"],
                        r["mask_ungated"],
                        gt["label"],
                        maps,
                        gt["brain"],
                        y,
                        cases,
                        cosine=cosine,
                        y_pred=r["pred_label"],
                    )
                )
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
                if method in _ANOFPDM and (curves is None or method == "anofpdm"):
                    first = np.load(self._case_path(method, seed, cases[0]))
                    curves = {k: r[k][curve_picks] for k in ("divergence", "mse_guided", "mse_reference", "end_step")}
                    curves["cosine"] = r["cosine"][curve_picks]
                    curves["steps"] = first["timesteps"]
            agg = aggregate_over_seeds(per_seed)
            summary[method] = {
                "label": self._label(method),
                "tuning": METHODS[method][1],
                "seeds": self._seeds(method),
                "metrics": {k: {"mean": v[0], "std": v[1]} for k, v in agg.items()},
                "tuned": dict(tuning.get(method, {})),
            }
        with atomic_path(self.output_dir / "metrics.csv") as tmp:
            pd.concat(rows, ignore_index=True).to_csv(tmp, index=False)
        out = {
            "num_test_slices": int(len(y)),
            "num_unhealthy": int(y.sum()),
            "test_cases": sorted(set(cases.tolist())),
            "tuning_objective": self.tuning_objective,
            "methods": summary,
        }
        with atomic_path(self.output_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(out, indent=2, default=float))
        with atomic_path(self.output_dir / "summary.md") as tmp:
            tmp.write_text(summary_markdown(out))
        self._figures(gt, y, picks, curve_picks, examples, pr_curves, curves)
        logger.info("evaluation written to %s", self.output_dir)
        return out

    def _figures(
        self,
        gt: Mapping[str, np.ndarray],
        y: np.ndarray,
        picks: list[int],
        curve_picks: list[int],
        examples: Mapping[str, Any],
        pr_curves: Mapping[str, Any],
        curves: Mapping[str, np.ndarray] | None,
    ) -> None:
        from .visualize import save_curves, save_overlay_grid, save_pr_curves

        fig_dir = self.output_dir / "figures"
        table = self.test.table
        cases = table["case_id"].astype(str).to_numpy()
        channel = self.modalities.index(self.intensity_modality)
        images = np.stack([self.test[i]["image"][channel].numpy() for i in picks])
        labels = [f"{cases[i]} slice {int(table['source_index'].iloc[i])}" for i in picks]
        save_overlay_grid(fig_dir / "overlay.png", images, gt["label"][picks], examples, row_labels=labels)
        if pr_curves:
            save_pr_curves(fig_dir / "pr_curves.png", pr_curves, title="pooled precision-recall over brain pixels")
        if curves is not None and curve_picks:
            state = {0: "healthy", 1: "unhealthy"}
            titles = [
                f"{cases[i]} {int(table['source_index'].iloc[i])}, c={float(c):.4f}, {state[int(y[i])]}"
                for i, c in zip(curve_picks, curves["cosine"])
            ]
            save_curves(
                fig_dir / "curves.png",
                curves["steps"],
                curves["divergence"],
                curves["mse_guided"],
                curves["mse_reference"],
                t_end=curves["end_step"],
                titles=titles,
                modality_names=self.map_modalities,
            )


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown table laid out like the papers' Table 1 (values x 100, mean +- std over seeds)."""

    def cell(m: Mapping[str, Any], key: str) -> str:
        v = m["metrics"].get(key)
        if v is None or v["mean"] is None or not np.isfinite(v["mean"]):
            return "n/a"
        if len(m["seeds"]) > 1:
            return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"
        return f"{100 * v['mean']:.1f}"

    head = (
        "| Method | Tuned with | Mixed Dice | Mixed IoU | Mixed AUPRC | Unhealthy Dice | Unhealthy IoU | "
        "Unhealthy AUPRC | Pooled AUPRC | Volume Dice | Slice acc. | AUROC (c) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for m in summary["methods"].values():
        keys = (
            "mixed_dice",
            "mixed_iou",
            "mixed_auprc_batched",
            "unhealthy_dice",
            "unhealthy_iou",
            "unhealthy_auprc_batched",
            "pooled_auprc",
            "volume_dice",
            "accuracy",
            "auroc",
        )
        lines.append(f"| {m['label']} | {m['tuning']} | " + " | ".join(cell(m, k) for k in keys) + " |")
    note = (
        f"\n{summary['num_test_slices']} test slices ({summary['num_unhealthy']} unhealthy) from "
        f"{len(summary['test_cases'])} case(s). Values x 100; mean ± std over seeds for stochastic methods. "
        "'Mixed' uses every slice with health-gated masks; 'Unhealthy' only lesion slices with ungated masks; "
        "Mixed/Unhealthy AUPRC follow the official batched protocol (batches of 100 slices), Pooled AUPRC is over "
        "all brain pixels. Methods tuned with pixel labels used the validation split's segmentations (objective: "
        f"{summary.get('tuning_objective', 'pooled')} Dice); AnoFPDM rows marked 'image labels only' never saw a "
        "pixel label.\n"
    )
    return head + "\n".join(lines) + "\n" + note


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
    **evaluator_kwargs: Any,
) -> dict[str, Any]:
    """Load the checkpoint (its EMA weights, or the raw ones with ``use_ema=False``) and the calibration file when it
    exists, build the validation and test slice datasets through the cache, and run :class:`Evaluator`. Returns the
    summary."""
    from .data import SliceDataset
    from .networks import load_network

    network, info = load_network(checkpoint, use_ema=use_ema, map_location="cpu")
    if not info.get("preprocessing"):
        raise ValueError(f"checkpoint {checkpoint} records no preprocessing; train with the bundle")
    cal = None
    if calibration is not None and Path(calibration).is_file():
        cal = Calibration.load(calibration)
        cal.check(source=f"calibration {calibration}", checkpoint_digest=info["digest"])
    progress = evaluator_kwargs.get("progress", True)
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
