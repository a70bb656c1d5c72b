"""Slice health scores from the streamed forward process (docs/method.md §5).

Every score is a *healthiness*: LOW means unhealthy, and a slice is called unhealthy iff its score <= the calibrated
threshold ``tau`` (the same rule and the same threshold search for every score, :mod:`anofpdm_monai.calibration`).

- ``cosine`` (the papers and the official code): cosine similarity of the guided and reference MSE curves over the
  grid.
- ``mse_gap`` (the default of :class:`~anofpdm_monai.settings.AnoFPDMSettings`): minus the area between the two
  MSE curves relative to the area under the reference curve, ``-sum_t (mse_g - mse_ref) / sum_t mse_ref``: healthy
  guidance moves an unhealthy slice's prediction away from the input, so the gap grows.
- ``divergence``: minus the largest divergence between the guided and reference predictions relative to the
  reference MSE, ``-max_t mean_m M_t / mean_t mse_ref``.

The two relative scores divide by the reference MSE so that they do not grow with the amount of brain in the slice
(a score that does would separate central from peripheral slices, not tumour from healthy tissue).
"""

from __future__ import annotations

from typing import Any

import torch

from ..settings import DEFAULT_HEALTH_SCORE, HEALTH_SCORES, check_choice
from .forward_process import ForwardProcessResult

__all__ = ["HEALTH_SCORES", "health_score", "health_scores", "is_unhealthy"]

_EPS = 1e-12


def is_unhealthy(score: Any, tau: float) -> Any:
    """The slice rule: unhealthy iff ``score <= tau`` (a score exactly at tau is unhealthy); elementwise on tensors,
    arrays and numbers. The calibration's threshold search counts its errors with it, and
    ``AnoFPDMInferer.thresholds`` classifies by the same comparison (tests/test_inputs.py checks both at tau)."""
    return score <= tau


def health_score(result: ForwardProcessResult, kind: str = DEFAULT_HEALTH_SCORE) -> torch.Tensor:
    """(W, B) healthiness score ``kind`` of each slice for each guidance scale of ``result`` (low = unhealthy); the
    default is the settings' default ``health_score``, ``mse_gap``."""
    check_choice("health_score", kind, HEALTH_SCORES)
    if kind == "cosine":
        return result.cosine()
    guided = result.mse_guided.double()
    reference = result.mse_reference.double()[None].expand_as(guided)
    if kind == "mse_gap":
        gap = (guided - reference).sum(dim=-1) / reference.sum(dim=-1).clamp_min(_EPS)
        return (-gap).to(result.mse_guided.dtype)
    peak = result.divergence.double().mean(dim=-1).amax(dim=-1)  # (W, B): max_t of the modality-mean M_t
    return (-peak / reference.mean(dim=-1).clamp_min(_EPS)).to(result.mse_guided.dtype)


def health_scores(result: ForwardProcessResult) -> dict[str, torch.Tensor]:
    """Every score of :data:`HEALTH_SCORES`, ``{name: (W, B)}``."""
    return {kind: health_score(result, kind) for kind in HEALTH_SCORES}
