"""Calibration from image-level (slice) labels only: the pure algorithm (docs/method.md §6).

From the validation slices' statistics and their healthy/unhealthy labels (no pixel labels):

- ``M_max`` per map modality: the largest max_t M_t over unhealthy slices (Algorithm 1's normaliser);
- ``tau``: over q in linspace(0.005, 0.095, 100), tau_q = the q-quantile of the healthy slices' health score c (the
  settings' ``health_score``: ``mse_gap`` by default, the papers' cosine with the official preset; any score of
  :mod:`anofpdm_monai.inferers.health`, low = unhealthy); the first tau_q
  minimising the slices inference would misclassify with it (:func:`~anofpdm_monai.inferers.health.is_unhealthy`,
  c <= tau_q is unhealthy): #(unhealthy with c > tau_q) + #(healthy with c <= tau_q);
- the fixed guidance ``w*``: for each candidate w, the classification accuracy at its own tau; w* is the largest
  candidate whose accuracy is >= ``tolerance`` x the best (0.99 by default; the extended paper states 0.98 in one
  place and 0.99 in another). Beyond the papers: when no candidate classifies better than calling every slice the
  majority class plus ``CHANCE_MARGIN``, the accuracies cannot rank w (on real MRI with a small model they fell with w
  and the rule then picked the weakest guidance, whose maps were empty); w* is then the candidate nearest the
  papers' w (``DEFAULT_GUIDANCE_SCALE``), with a warning.

With ``subset`` (the settings' ``calibration_subset``, as the official code), everything above is computed on a seeded
random subset of that many validation slices, drawn from all of them without replacement; the calibration records its
size. With a single candidate (``fixed_guidance_scale``), w* is that candidate.

With ``divergence_baseline="healthy"`` (beyond the papers), M_t is first divided, step by step, by the baseline
curve: the median M_t of the healthy validation slices at that step and w (one curve per map modality); M_max and
everything after it are then taken on the relative curves, and the curve of w* is recorded.

The statistics come from ONE pass of network calls over the validation set for all candidates at once
(:mod:`anofpdm_monai.calibration.engine`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..inferers.health import is_unhealthy
from ..settings import DEFAULT_GUIDANCE_SCALE, DEFAULT_TOLERANCE
from .record import CalibrationError

__all__ = [
    "CHANCE_MARGIN",
    "DEFAULT_TAU_LEVELS",
    "CalibrationStatistics",
    "select_tau",
    "select_guidance",
    "select_subset",
    "baseline_curve",
    "calibrate_from_statistics",
]

DEFAULT_TAU_LEVELS = tuple(np.linspace(0.005, 0.095, 100).tolist())
#: a classification counts as informative when its accuracy exceeds the majority-class rate by this much
CHANCE_MARGIN = 0.05

logger = logging.getLogger(__name__)


def select_tau(
    cosine_healthy: Sequence[float] | np.ndarray,
    cosine_unhealthy: Sequence[float] | np.ndarray,
    levels: Sequence[float] = DEFAULT_TAU_LEVELS,
) -> tuple[float, int]:
    """The health-score threshold: the first ``tau_q = quantile(healthy c, q)`` (linear interpolation) over ``levels``
    minimising the misclassified slices under inference's rule
    (:func:`~anofpdm_monai.inferers.health.is_unhealthy`): #(unhealthy with c > tau_q) + #(healthy with c <= tau_q).

    Returns:
        ``(tau, errors)``.
    """
    healthy = np.asarray(cosine_healthy, dtype=np.float64)
    unhealthy = np.asarray(cosine_unhealthy, dtype=np.float64)
    if healthy.size == 0:
        raise CalibrationError("no healthy validation slices: tau needs healthy and unhealthy slice labels")
    best_tau, best_err = float("nan"), None
    for q in levels:
        tau = float(np.quantile(healthy, q))
        err = int((~is_unhealthy(unhealthy, tau)).sum() + is_unhealthy(healthy, tau).sum())
        if best_err is None or err < best_err:
            best_tau, best_err = tau, err
    return best_tau, int(best_err)


def select_guidance(
    accuracies: Mapping[float, float], tolerance: float = DEFAULT_TOLERANCE, chance: float | None = None
) -> float:
    """w* = the largest candidate whose accuracy is >= ``tolerance`` x the best accuracy.

    With ``chance`` (the majority-class rate of the validation slices), a best accuracy below
    ``chance + CHANCE_MARGIN`` selects the candidate nearest ``DEFAULT_GUIDANCE_SCALE`` instead (the larger on a tie).
    """
    if not accuracies:
        raise CalibrationError("no guidance scale candidates")
    if not 0 < tolerance <= 1:
        raise CalibrationError(f"tolerance must be in (0, 1], got {tolerance}")
    best = max(accuracies.values())
    if chance is not None and best < chance + CHANCE_MARGIN:
        w_star = float(min(accuracies, key=lambda w: (abs(w - DEFAULT_GUIDANCE_SCALE), -w)))
        logger.warning(
            "the slice classification is at chance for every w (best accuracy %.3f, majority class %.3f): w* = %g, "
            "the candidate nearest the papers' w; the health labels of this calibration are unreliable",
            best,
            chance,
            w_star,
        )
        return w_star
    return float(max(w for w, acc in accuracies.items() if acc >= tolerance * best))


@dataclass
class CalibrationStatistics:
    """What one pass over the validation slices yields, for W candidate guidance scales and N slices.

    Attributes:
        guidance_scales: (W,).
        divergence_max: (W, N, Cm) max_t M_t per map modality.
        divergence_max_joint: (W, N) max_t of the modality-mean M_t.
        score: (W, N) health score of each slice (the settings' ``health_score``; low = unhealthy).
        labels: (N,) slice labels (0 healthy, 1 unhealthy).
        divergence: (W, N, K, Cm) the M_t curves themselves; needed only for ``divergence_baseline="healthy"``.
    """

    guidance_scales: np.ndarray
    divergence_max: np.ndarray
    divergence_max_joint: np.ndarray
    score: np.ndarray
    labels: np.ndarray
    divergence: np.ndarray | None = None


def select_subset(num_slices: int, size: int | None, seed: int = 0) -> np.ndarray | None:
    """The sorted indices of a seeded random subset of ``size`` of ``num_slices`` slices, drawn without replacement
    with ``numpy.random.default_rng(seed)``; None (every slice) when ``size`` is None or not smaller than
    ``num_slices``."""
    if size is None or int(size) >= num_slices:
        return None
    if int(size) < 1:
        raise CalibrationError(f"the calibration subset must hold at least one slice, got {size}")
    rng = np.random.default_rng(int(seed))
    return np.sort(rng.choice(num_slices, size=int(size), replace=False))


def _take(stats: CalibrationStatistics, index: np.ndarray) -> CalibrationStatistics:
    """The statistics of the slices ``index`` (the N axis: labels' first, the others' second)."""
    return CalibrationStatistics(
        guidance_scales=stats.guidance_scales,
        divergence_max=np.asarray(stats.divergence_max)[:, index],
        divergence_max_joint=np.asarray(stats.divergence_max_joint)[:, index],
        score=np.asarray(stats.score)[:, index],
        labels=np.asarray(stats.labels).reshape(-1)[index],
        divergence=None if stats.divergence is None else np.asarray(stats.divergence)[:, index],
    )


def baseline_curve(curves: np.ndarray, healthy: np.ndarray) -> np.ndarray:
    """(K, Cm) the median M_t of the healthy slices at each step, from (N, K, Cm) curves; floored at 1e-12 of its
    largest value (and at the smallest positive float64), so that the division is defined where healthy slices have
    M_t = 0 (e.g. w = 0 with the healthy reference)."""
    median = np.median(np.asarray(curves, dtype=np.float64)[np.asarray(healthy, dtype=bool)], axis=0)
    floor = max(float(np.nanmax(median)) * 1e-12, np.finfo(np.float64).tiny) if median.size else 1.0
    return np.maximum(median, floor)


def calibrate_from_statistics(
    stats: CalibrationStatistics,
    tolerance: float = DEFAULT_TOLERANCE,
    tau_levels: Sequence[float] = DEFAULT_TAU_LEVELS,
    divergence_baseline: str = "none",
    subset: int | None = None,
    subset_seed: int = 0,
) -> dict[str, Any]:
    """M_max, tau and w* from validation statistics (pure function).

    ``subset``: compute them on a seeded random subset of that many slices (:func:`select_subset` with
    ``subset_seed``); None: on every slice.

    Returns:
        dict with ``guidance_scale``, ``m_max`` (list per modality), ``m_max_joint``, ``tau``, ``candidates``,
        ``num_healthy``, ``num_unhealthy`` (of the slices used), ``baseline_curve`` ((K, Cm) list of w*, or None)
        and ``subset`` (``{"size", "of", "seed"}``: the slices used, of how many, and the seed; None without a
        subset).
    """
    labels = np.asarray(stats.labels).reshape(-1)
    unknown = ~np.isin(labels, (0, 1))
    if unknown.any():
        where = np.flatnonzero(unknown)
        raise CalibrationError(
            f"{int(unknown.sum())} validation slice label(s) are neither 0 (healthy) nor 1 (unhealthy): value "
            f"{labels[where[0]].item()!r} at slice {int(where[0])}; every calibration slice needs a known label (a "
            "case without a segmentation has none)"
        )
    num_slices = labels.size
    index = select_subset(num_slices, subset, subset_seed)
    subset_record = None
    if subset is not None:
        used = num_slices if index is None else int(index.size)
        subset_record = {"size": used, "of": int(num_slices), "seed": int(subset_seed)}
        if index is None:
            logger.info("calibration subset of %d slices: all %d validation slices are used", subset, num_slices)
        else:
            stats, labels = _take(stats, index), labels[index]
    labels = labels.astype(np.int64)
    healthy, unhealthy = labels == 0, labels == 1
    if healthy.sum() == 0 or unhealthy.sum() == 0:
        raise CalibrationError(
            f"calibration needs healthy and unhealthy validation slices (found {int(healthy.sum())} healthy, "
            f"{int(unhealthy.sum())} unhealthy"
            + (f" in the subset of {labels.size} of {num_slices} slices)" if index is not None else ")")
        )
    ws = [float(w) for w in np.asarray(stats.guidance_scales).reshape(-1)]
    relative = divergence_baseline == "healthy"
    if relative and stats.divergence is None:
        raise CalibrationError("divergence_baseline='healthy' needs the M_t curves of the validation slices")
    candidates, accuracies, curves = [], {}, {}
    for i, w in enumerate(ws):
        c = np.asarray(stats.score[i], dtype=np.float64)
        tau, err = select_tau(c[healthy], c[unhealthy], tau_levels)
        accuracy = 1.0 - err / labels.size
        if relative:
            curves[w] = baseline_curve(stats.divergence[i], healthy)
            rel = np.asarray(stats.divergence[i], dtype=np.float64) / curves[w]  # (N, K, Cm)
            div_max, div_max_joint = rel.max(axis=1), rel.mean(axis=2).max(axis=1)
        else:
            div_max, div_max_joint = np.asarray(stats.divergence_max[i]), np.asarray(stats.divergence_max_joint[i])
        m_max = div_max[unhealthy].max(axis=0)
        m_max_joint = float(div_max_joint[unhealthy].max())
        accuracies[w] = accuracy
        candidates.append(
            {
                "guidance_scale": w,
                "accuracy": accuracy,
                "tau": tau,
                "m_max": [float(v) for v in m_max],
                "m_max_joint": m_max_joint,
            }
        )
    chance = float(max(healthy.mean(), unhealthy.mean()))
    if len(accuracies) == 1:  # a fixed w: nothing to choose
        w_star = next(iter(accuracies))
        if accuracies[w_star] < chance + CHANCE_MARGIN:
            logger.warning(
                "the slice classification at w = %g is at chance (accuracy %.3f, majority class %.3f): the health "
                "labels of this calibration are unreliable",
                w_star,
                accuracies[w_star],
                chance,
            )
    else:
        w_star = select_guidance(accuracies, tolerance, chance=chance)
    chosen = next(c for c in candidates if c["guidance_scale"] == w_star)
    m_chosen = np.asarray(chosen["m_max"] + [chosen["m_max_joint"]], dtype=np.float64)
    if not bool(np.all(np.isfinite(m_chosen) & (m_chosen > 0))):
        # Algorithm 1 divides by M_max: a zero (or NaN) would only fail later, at inference
        raise CalibrationError(
            f"M_max for w={w_star:g} is {chosen['m_max']} (joint {chosen['m_max_joint']:.3g}), not positive: the "
            "guided and reference predictions do not differ on the unhealthy validation slices (an untrained "
            "network, or w = 0 with reference='healthy')"
        )
    return {
        "guidance_scale": w_star,
        "m_max": chosen["m_max"],
        "m_max_joint": chosen["m_max_joint"],
        "tau": chosen["tau"],
        "candidates": candidates,
        "num_healthy": int(healthy.sum()),
        "num_unhealthy": int(unhealthy.sum()),
        "baseline_curve": curves[w_star].tolist() if relative else None,
        "subset": subset_record,
    }
