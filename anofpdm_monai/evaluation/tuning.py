"""Pixel-label tuning of the baselines' thresholds on the validation split (docs/method.md §7).

AnoFPDM's own rows never use it: they are calibrated from image labels only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..inferers.baselines import ReconstructionInferer
from ..io import write_text
from ..metrics import dice_per_slice, pooled_dice
from ..postprocessing import remove_small_components
from .methods import METHODS
from .store import fingerprint

__all__ = ["TUNING_OBJECTIVES", "PixelLabelTuning", "threshold_candidates", "tune_threshold"]

logger = logging.getLogger(__name__)

TUNING_OBJECTIVES = ("pooled", "unhealthy", "mixed")


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
            dice = pooled_dice(mask, gt)
        else:
            per_slice = dice_per_slice(mask, gt)
            dice = float((per_slice[lesion] if objective == "unhealthy" else per_slice).mean())
        if dice > best_dice:
            best_thr, best_dice = thr, dice
    return best_thr, best_dice


class PixelLabelTuning:
    """The evaluator's job on the validation split with pixel labels: the thresholds (and noise levels) of the
    methods tuned WITH pixel labels, cached in ``tuning.json``. A part of
    :class:`~anofpdm_monai.evaluation.runner.Evaluator` (its attributes and inferer factories)."""

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
