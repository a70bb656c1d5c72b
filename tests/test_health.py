"""Slice health scores (anofpdm_monai/inferers/health.py) against values computed by hand, and the option's path
through the inferer and the calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anofpdm_monai.calibration.algorithm import CalibrationStatistics, calibrate_from_statistics
from anofpdm_monai.inferers.forward_process import ForwardProcessResult
from anofpdm_monai.inferers.health import health_score, health_scores
from anofpdm_monai.settings import HEALTH_SCORES, AnoFPDMSettings

# two guidance scales, two slices, three grid steps, one map modality
MSE_G = [[[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], [[2.0, 4.0, 6.0], [1.0, 2.0, 1.0]]]
MSE_R = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
DIV = [[[0.1, 0.5, 0.2], [0.0, 0.1, 0.05]], [[0.3, 0.9, 0.4], [0.2, 0.2, 0.1]]]


def _result() -> ForwardProcessResult:
    return ForwardProcessResult(
        timesteps=torch.tensor([0, 10, 20]),
        guidance_scales=torch.tensor([1.0, 2.0]),
        divergence=torch.tensor(DIV)[..., None],
        mse_guided=torch.tensor(MSE_G),
        mse_reference=torch.tensor(MSE_R),
        end_index=torch.zeros(2, 2, 1, dtype=torch.long),
        end_index_joint=torch.zeros(2, 2, dtype=torch.long),
    )


def test_scores_equal_hand_computed_values():
    scores = health_scores(_result())
    assert set(scores) == set(HEALTH_SCORES)
    # cosine of (1, 2, 3) and (1, 1, 1): 6 / (sqrt(14) sqrt(3))
    assert scores["cosine"][0, 0].item() == pytest.approx(6 / math.sqrt(42), rel=1e-6)
    assert scores["cosine"][0, 1].item() == pytest.approx(1.0, rel=1e-6)
    # minus the relative area between the curves: -((1+2+3) - 3) / 3 = -1, -(12 - 3) / 3 = -3, -(4 - 3) / 3
    np.testing.assert_allclose(scores["mse_gap"].numpy(), [[-1.0, 0.0], [-3.0, -1 / 3]], rtol=1e-6)
    # minus the peak divergence over the mean reference MSE (1)
    np.testing.assert_allclose(scores["divergence"].numpy(), [[-0.5, -0.1], [-0.9, -0.2]], rtol=1e-6)


def test_relative_scores_do_not_grow_with_brain_area():
    """Scaling every MSE and divergence value by a factor (a slice with more brain) leaves the scores unchanged."""
    r = _result()
    scaled = ForwardProcessResult(
        timesteps=r.timesteps,
        guidance_scales=r.guidance_scales,
        divergence=r.divergence * 7.0,
        mse_guided=r.mse_guided * 7.0,
        mse_reference=r.mse_reference * 7.0,
        end_index=r.end_index,
        end_index_joint=r.end_index_joint,
    )
    for kind in HEALTH_SCORES:
        torch.testing.assert_close(health_score(scaled, kind), health_score(r, kind), rtol=1e-5, atol=1e-6)


def test_unknown_score_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="health_score must be one of"):
        health_score(_result(), "brain_area")
    with pytest.raises(ValueError, match="health_score must be one of"):
        AnoFPDMSettings(health_score="area")


def test_calibration_thresholds_the_chosen_score():
    """tau is searched on whatever score the statistics carry. With separable scores the only error is the lowest
    healthy slice, which lies below every tau_q (q >= 0.005 of the healthy scores): accuracy 7/8, tau between the
    classes."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    score = np.array([[-0.1, -0.2, -0.15, -0.05, -2.0, -3.0, -2.5, -1.5]])
    stats = CalibrationStatistics(
        guidance_scales=np.array([2.0]),
        divergence_max=np.ones((1, 8, 1)),
        divergence_max_joint=np.ones((1, 8)),
        score=score,
        labels=labels,
    )
    out = calibrate_from_statistics(stats)
    assert out["candidates"][0]["accuracy"] == pytest.approx(7 / 8)
    assert -0.2 < out["tau"] < -0.15


def test_health_score_is_a_calibrated_setting():
    """A calibration made for one score is refused for another (tau is on that score's scale)."""
    a, b = AnoFPDMSettings(), AnoFPDMSettings(health_score="cosine")
    assert any(d.startswith("health_score") for d in a.differences(b))
    assert AnoFPDMSettings.from_dict(a.to_dict()) == a


def test_calibration_bundle_exposes_the_health_score():
    """`--health_score mse_gap` on the calibration bundle reaches the settings it calibrates (and records)."""
    from monai.bundle import ConfigParser

    from anofpdm_monai.bundle import config_files

    parser = ConfigParser()
    parser.read_config(config_files("anofpdm_brats21", "calibrate"))
    assert parser.get_parsed_content("settings").health_score == "mse_gap"  # the library default
    parser["health_score"] = "mse_gap"
    assert parser.get_parsed_content("settings", lazy=False).health_score == "mse_gap"


def test_a_calibration_file_without_the_option_is_read_as_cosine():
    """Files written before the option existed thresholded the cosine: they keep doing so whatever the default."""
    from anofpdm_monai.calibration import Calibration

    cal = Calibration(
        settings=AnoFPDMSettings(timesteps=(0, 10, 20)),
        guidance_scale=2.0,
        m_max=[0.1],
        m_max_joint=0.1,
        tau=0.9,
        map_modalities=["flair"],
        map_channels=[0],
    )
    assert cal.settings.health_score == "mse_gap"  # today's default
    content = cal.to_dict()
    del content["settings"]["health_score"]
    assert Calibration.from_dict(content).settings.health_score == "cosine"
