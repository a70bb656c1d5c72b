"""Pixel-label tuning of the baselines' thresholds on the validation split (docs/method.md §7).

AnoFPDM's own rows never use it: they are calibrated from image labels only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..metrics import dice_per_slice, pooled_dice
from ..postprocessing import remove_small_components

__all__ = ["TUNING_OBJECTIVES", "threshold_candidates", "tune_threshold"]

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
