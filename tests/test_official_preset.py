# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""The ``official`` settings preset and the options it needs (issue 20; docs/method.md "Project default vs official
code"): the end step excluded from the map (official ``mse[t_s:t_e]``), ``last`` at t_e - 1 (``--last_only``), the
DDIM inversion noise re-derived from the clipped x0 (guided-diffusion ``ddim_reverse_sample``) and the official
inversion timing (``calc_pred_xstart_loop``), M_max and tau from a seeded subset of the validation slices, a fixed w;
and that the defaults still compute what they did.

Every value is checked against one derived here independently, with analytic mock networks: a network whose x0
predictions are given images (the 3-step aggregation example is computed by hand), the closed-form network of
tests/test_inferer_math.py, and hand-written float64 loops of the formulas.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_device_path import RowwiseNet
from test_inferer_math import (
    ABAR_NP,
    SCHEDULE,
    SEED,
    AnalyticEpsNet,
    forward_noises,
    make_slices,
    naive_maps,
    naive_statistics,
    naive_trajectory,
)

from anofpdm_monai.calibration import (
    Calibration,
    CalibrationInferer,
    CalibrationStatistics,
    calibrate_from_statistics,
    collect_statistics,
    make_calibration,
)
from anofpdm_monai.calibration.algorithm import select_subset
from anofpdm_monai.inferers import AnoFPDMInferer, run_forward_process
from anofpdm_monai.inferers.health import health_score
from anofpdm_monai.networks.unet import HEALTHY, NULL
from anofpdm_monai.settings import CALIBRATED_FIELDS, DEFAULT_GUIDANCE_SCALE, PRESETS, AnoFPDMSettings

NEW_DEFAULTS = {
    "end_step_inclusive": True,
    "inversion_eps": "raw",
    "inversion_timing": "aligned",
    "measure_every": 1,
    "calibration_subset": None,
    "calibration_subset_seed": 0,
    "fixed_guidance_scale": None,
}


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


# --------------------------------------------------------------------------------------------------------------------
# A network whose x0 predictions are given images: the 3-step example, by hand
# --------------------------------------------------------------------------------------------------------------------

GRID3 = [0, 100, 200]
# x0 = 0 (one 2 x 2 slice, one channel), the null prediction x0_n = 0, the healthy one h_k at grid step k. With w = 1:
# x0_g = (1 + w) h_k - w 0 = 2 h_k (no clipping: |2 h_k| <= 0.8), S_k = (2 h_k)^2, M_k = mean_px S_k (v2, reference
# null: x0_r = 0) = 0.05, 0.10, 0.30: t_e = 200 (k_e = 2).
H = {0: [[0.1, 0.2], [0.0, 0.0]], 100: [[0.3, 0.0], [0.1, 0.0]], 200: [[0.2, 0.4], [0.1, 0.3]]}
S0 = [[0.04, 0.16], [0.0, 0.0]]
S1 = [[0.36, 0.0], [0.04, 0.0]]
S2 = [[0.16, 0.64], [0.04, 0.36]]
BY_HAND = {
    # (end_step_inclusive, aggregation): the map
    (True, "mean"): [[0.56 / 3, 0.80 / 3], [0.08 / 3, 0.36 / 3]],  # (S0 + S1 + S2) / 3
    (False, "mean"): [[0.20, 0.08], [0.02, 0.0]],  # (S0 + S1) / 2: t_e excluded
    (True, "last"): S2,  # S at t_e
    (False, "last"): S1,  # S at t_e - 1 (the official --last_only)
}


class TargetNet(nn.Module):
    """eps_y = (x_t - sqrt(abar_t) target_y(t)) / sqrt(1 - abar_t), so that the x0 prediction of label y at step t is
    ``target_y(t)`` whatever x_t is: H[t] for the healthy label, 0 for the null one."""

    def __init__(self, healthy: dict[int, list]) -> None:
        super().__init__()
        self.healthy = {t: torch.tensor(v, dtype=torch.float64) for t, v in healthy.items()}

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        out = []
        for row, t, y in zip(x.double(), timesteps.tolist(), class_labels.tolist()):
            target = self.healthy[t] if y == HEALTHY else torch.zeros_like(self.healthy[t])
            abar = float(ABAR_NP[t])
            out.append((row - abar**0.5 * target) / (1.0 - abar) ** 0.5)
        return torch.stack(out).float()


@pytest.mark.parametrize("inclusive, aggregation", list(BY_HAND))
@pytest.mark.parametrize("forward", ["ddim", "ddpm"])
def test_three_step_aggregation_by_hand(inclusive, aggregation, forward):
    x0 = torch.zeros(1, 1, 2, 2)
    res = run_forward_process(
        TargetNet(H), x0, SCHEDULE, GRID3, [1.0], [0], forward, end_inclusive=inclusive, generator=torch.Generator()
    )
    np.testing.assert_allclose(_np(res.divergence[0, 0, :, 0]), [0.05, 0.10, 0.30], rtol=1e-5)
    assert res.end_index.item() == 2
    for end_step in ("per_modality", "joint"):  # one map modality: the joint end step is the same
        got = res.anomaly_maps(end_step, aggregation)[0, 0, 0]
        np.testing.assert_allclose(_np(got), BY_HAND[inclusive, aggregation], rtol=1e-5, atol=1e-7)
    # the inferer passes the setting through
    inferer = AnoFPDMInferer(
        AnoFPDMSettings(timesteps=GRID3, forward=forward, aggregation=aggregation, end_step_inclusive=inclusive),
        guidance_scale=1.0,
        m_max=[1.0],
        min_component_size=0,
    )
    out = inferer(x0, TargetNet(H))
    np.testing.assert_allclose(_np(out.anomaly_map[0]), BY_HAND[inclusive, aggregation], rtol=1e-5, atol=1e-7)


def test_exclusive_end_step_at_the_first_step_takes_that_step():
    """t_e at the first grid step (M decreasing): there is no step before it (the official map is NaN); both
    aggregations then take S at the first step."""
    reverse = {0: H[200], 100: H[100], 200: H[0]}  # M = 0.30, 0.10, 0.05
    res = run_forward_process(
        TargetNet(reverse), torch.zeros(1, 1, 2, 2), SCHEDULE, GRID3, [1.0], [0], "ddpm", end_inclusive=False
    )
    assert res.end_index.item() == 0
    for aggregation in ("mean", "last"):
        np.testing.assert_allclose(_np(res.anomaly_maps("per_modality", aggregation)[0, 0, 0]), S2, rtol=1e-5)
    assert res.map_count.item() == 1


def test_exclusive_end_step_per_modality_and_joint():
    """Two map modalities with different end steps: per modality each averages its own steps before t_e^m; joint
    averages the steps before the argmax of the modality mean."""
    a = {0: [[0.1]], 100: [[0.3]], 200: [[0.2]]}  # M = 4 h^2: 0.04, 0.36, 0.16 -> k_e = 1
    b = {0: [[0.1]], 100: [[0.2]], 200: [[0.4]]}  # 0.04, 0.16, 0.64 -> k_e = 2
    both = {t: [a[t], b[t]] for t in GRID3}  # mean 0.04, 0.26, 0.40 -> joint k_e = 2
    net = TargetNet(both)
    res = run_forward_process(net, torch.zeros(1, 2, 1, 1), SCHEDULE, GRID3, [1.0], [0, 1], "ddpm", end_inclusive=False)
    assert res.end_index[0, 0].tolist() == [1, 2] and res.end_index_joint.item() == 2
    per = _np(res.anomaly_maps("per_modality", "mean")[0, 0, :, 0, 0])
    np.testing.assert_allclose(per, [0.04, (0.04 + 0.16) / 2], rtol=1e-5)  # modality a: S_0 only; b: S_0, S_1
    joint = _np(res.anomaly_maps("joint", "mean")[0, 0, :, 0, 0])
    np.testing.assert_allclose(joint, [(0.04 + 0.36) / 2, (0.04 + 0.16) / 2], rtol=1e-5)
    last = _np(res.anomaly_maps("per_modality", "last")[0, 0, :, 0, 0])
    np.testing.assert_allclose(last, [0.04, 0.16], rtol=1e-5)  # S at t_e^m - 1


# --------------------------------------------------------------------------------------------------------------------
# DDIM inversion: the noise re-derived from the clipped x0, and the official timing
# --------------------------------------------------------------------------------------------------------------------


def _eps(net: AnalyticEpsNet, x: np.ndarray, t: int, label: int) -> np.ndarray:
    n = x.shape[0]
    return net.eps_numpy(x, np.full(n, t), np.full(n, label), np.arange(n))


def _clip(v: np.ndarray) -> np.ndarray:
    return np.clip(v, -1.0, 1.0)


@pytest.mark.parametrize("t0, t1", [(300, 420), (500, 501)])
def test_clipped_eps_inversion_step_by_hand(t0, t1):
    """eps' = (x_t - sqrt(abar_t) x0_c) / sqrt(1 - abar_t) with x0_c the clipped null x0 prediction, then the DDIM
    move x_{t1} = sqrt(abar_{t1}) x0_c + sqrt(1 - abar_{t1}) eps'; it differs from the raw-eps move exactly where the
    x0 prediction is clipped."""
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    inputs = {}
    for mode in ("raw", "clipped"):
        net = AnalyticEpsNet("affine")
        run_forward_process(
            net,
            x0,
            SCHEDULE,
            [t0, t1],
            [2.0],
            [0],
            "ddim",
            inversion_eps=mode,
            generator=torch.Generator().manual_seed(SEED),
        )
        assert len(net.calls) == 2  # the aligned timing: no extra call
        inputs[mode] = _np(net.calls[1]["x"])
    ref = AnalyticEpsNet("affine")
    noise = forward_noises("ddim", 1)[0]
    sa0, sb0 = np.sqrt(ABAR_NP[t0]), np.sqrt(1.0 - ABAR_NP[t0])
    sa1, sb1 = np.sqrt(ABAR_NP[t1]), np.sqrt(1.0 - ABAR_NP[t1])
    x_t0 = sa0 * x0_np + sb0 * noise
    e_n = _eps(ref, x_t0, t0, NULL)
    x0_raw = (x_t0 - sb0 * e_n) / sa0
    x0_c = _clip(x0_raw)
    eps_c = (x_t0 - sa0 * x0_c) / sb0
    expected = {"clipped": sa1 * x0_c + sb1 * eps_c, "raw": sa1 * x0_c + sb1 * e_n}
    for mode in expected:
        np.testing.assert_allclose(inputs[mode], expected[mode], rtol=0, atol=5e-5, err_msg=mode)
    clipped = np.abs(x0_raw) > 1.0 + 1e-3
    assert 0.001 < clipped.mean() < 0.9, "the test needs some clipped pixels and some not"
    gap = np.abs(inputs["clipped"] - inputs["raw"])
    assert gap[clipped].min() > 1e-4  # differ where the x0 prediction is clipped
    assert gap[np.abs(x0_raw) < 1.0 - 1e-3].max() < 5e-5  # the same elsewhere


def test_clipped_eps_without_clipping_is_raw():
    x0 = torch.from_numpy(make_slices()).float()
    out = {}
    for mode in ("raw", "clipped"):
        gen = torch.Generator().manual_seed(SEED)
        res = run_forward_process(
            AnalyticEpsNet("affine"),
            x0,
            SCHEDULE,
            [300, 420, 540],
            [2.0],
            [0, 1],
            clip=False,
            inversion_eps=mode,
            generator=gen,
        )
        out[mode] = res
    for f in ("divergence", "mse_guided", "mse_reference", "map_sum"):
        torch.testing.assert_close(getattr(out["raw"], f), getattr(out["clipped"], f), rtol=0, atol=0)


def test_official_inversion_timing_by_hand():
    """The official loop (stride 1 from 0): z_0 = q_sample(x0, 0); at t >= 1 a null call on z_{t-1} at step t, the
    clipped x0 and re-derived eps at abar_t, moved to abar_{t+1}; the healthy and null predictions of step t are made
    on z_t (one level ahead of t)."""
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    grid = [0, 1, 2, 3, 4, 300, 301, 500]  # official: 0..599; the later steps make the x0 clipping matter
    net = AnalyticEpsNet("affine", x0_star=x0_np)  # background at -1: its x0 predictions clip
    res = run_forward_process(
        net,
        x0,
        SCHEDULE,
        grid,
        [0.0, 2.0],
        [0, 2],
        "ddim",
        reference="healthy",
        inversion_eps="clipped",
        inversion_timing="official",
        generator=torch.Generator().manual_seed(SEED),
    )
    n = x0_np.shape[0]
    # call pattern: one 2B call at t = 0, then per step a B-slice null call followed by the 2B call
    pattern = [(c["batch"], c["t"]) for c in net.calls]
    assert pattern == [(2 * n, [0])] + [p for t in grid[1:] for p in ((n, [t]), (2 * n, [t]))]
    assert all(c["labels"] == [NULL] * n for c in net.calls[1::2])
    ref = AnalyticEpsNet("affine", x0_star=x0_np)
    z = np.sqrt(ABAR_NP[0]) * x0_np + np.sqrt(1.0 - ABAR_NP[0]) * forward_noises("ddim", 1)[0]
    states, clipped = [z], []
    for t in grid[1:]:
        sa, sb = np.sqrt(ABAR_NP[t]), np.sqrt(1.0 - ABAR_NP[t])
        x0_raw = (z - sb * _eps(ref, z, t, NULL)) / sa
        clipped.append(np.mean(np.abs(x0_raw) > 1.0 + 1e-3))
        x0_c = _clip(x0_raw)
        eps_c = (z - sa * x0_c) / sb
        z = np.sqrt(ABAR_NP[t + 1]) * x0_c + np.sqrt(1.0 - ABAR_NP[t + 1]) * eps_c
        states.append(z)
    assert max(clipped) > 0.001, "the test needs clipped x0 predictions in the inversion"
    prediction_calls = [net.calls[0]] + net.calls[2::2]
    for call, state in zip(prediction_calls, states):
        np.testing.assert_allclose(_np(call["x"]), state, rtol=0, atol=5e-5)
    # the curves are those of predictions at step t on z_t
    w = 2.0
    mse_g, m_t = [], []
    for t, state in zip(grid, states):
        sa, sb = np.sqrt(ABAR_NP[t]), np.sqrt(1.0 - ABAR_NP[t])
        e_h, e_n = _eps(ref, state, t, HEALTHY), _eps(ref, state, t, NULL)
        x0_g = _clip((state - sb * ((1 + w) * e_h - w * e_n)) / sa)[:, [0, 2]]
        x0_r = _clip((state - sb * e_h) / sa)[:, [0, 2]]
        mse_g.append(((x0_g - x0_np[:, [0, 2]]) ** 2).mean(axis=(1, 2, 3)))
        m_t.append(((x0_g - x0_r) ** 2).mean(axis=(2, 3)))
    np.testing.assert_allclose(_np(res.mse_guided[1]), np.stack(mse_g, 1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_np(res.divergence[1]), np.stack(m_t, 1), rtol=1e-4, atol=1e-6)
    assert res.divergence[0].abs().max() == 0  # w = 0 with the healthy reference: x0_g = x0_r


# --------------------------------------------------------------------------------------------------------------------
# Calibration: a seeded subset of the validation slices, a fixed w
# --------------------------------------------------------------------------------------------------------------------


def _stats(n: int = 40, seed: int = 11) -> CalibrationStatistics:
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n // 2))
    return CalibrationStatistics(
        guidance_scales=np.array([2.0]),
        divergence_max=rng.uniform(0.01, 1.0, size=(1, n, 2)),
        divergence_max_joint=rng.uniform(0.01, 1.0, size=(1, n)),
        score=rng.uniform(0.0, 1.0, size=(1, n)) - 0.3 * labels,
        labels=labels,
    )


def test_m_max_over_a_seeded_subset():
    stats = _stats()
    n, size, seed = 40, 12, 5
    index = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    assert index.tolist() == select_subset(n, size, seed).tolist()
    out = calibrate_from_statistics(stats, subset=size, subset_seed=seed)
    unhealthy = index[stats.labels[index] == 1]
    expected = stats.divergence_max[0, unhealthy].max(axis=0)
    np.testing.assert_array_equal(out["m_max"], expected)
    assert out["m_max_joint"] == stats.divergence_max_joint[0, unhealthy].max()
    # the subset matters: the maximum over every unhealthy slice is larger here
    assert np.any(stats.divergence_max[0, stats.labels == 1].max(axis=0) > expected)
    assert out["num_healthy"] + out["num_unhealthy"] == size
    assert out["num_unhealthy"] == unhealthy.size
    assert out["subset"] == {"size": size, "of": n, "seed": seed}
    # tau from the subset's scores as well (the official code takes both from its validation batches)
    assert out["tau"] == calibrate_from_statistics(_take(stats, index))["tau"]
    # reproducible by seed; another seed, another subset
    assert calibrate_from_statistics(stats, subset=size, subset_seed=seed) == out
    other = calibrate_from_statistics(stats, subset=size, subset_seed=seed + 1)
    assert other["m_max"] != out["m_max"] or other["tau"] != out["tau"]
    # a subset at least as large as the set: every slice
    everything = calibrate_from_statistics(stats, subset=n, subset_seed=seed)
    assert everything["m_max"] == calibrate_from_statistics(stats)["m_max"]
    assert everything["subset"] == {"size": n, "of": n, "seed": seed}
    assert calibrate_from_statistics(stats)["subset"] is None


def _take(stats: CalibrationStatistics, index: np.ndarray) -> CalibrationStatistics:
    return CalibrationStatistics(
        guidance_scales=stats.guidance_scales,
        divergence_max=stats.divergence_max[:, index],
        divergence_max_joint=stats.divergence_max_joint[:, index],
        score=stats.score[:, index],
        labels=stats.labels[index],
    )


def test_calibration_records_the_subset_and_the_fixed_w(tmp_path):
    """End to end through the engine pieces: the settings' fixed w is the only candidate, the subset is drawn from
    the settings' size and seed, and the record keeps both (and reloads)."""
    settings = AnoFPDMSettings(timesteps=[0, 100, 200], calibration_subset=6, calibration_subset_seed=3)
    settings = settings.replace(fixed_guidance_scale=30.0)
    inferer = AnoFPDMInferer(settings, map_channels=[0, 3])
    assert inferer.guidance_scale == 30.0  # the settings' w when none is given
    assert CalibrationInferer(inferer, [5.0, 10.0]).guidance_scales == [30.0]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 4, 8, 8, generator=g) * 1.8 - 0.9
    labels = torch.tensor([0, 1] * 5)
    batches = [{"image": x[:5], "class_label": labels[:5]}, {"image": x[5:], "class_label": labels[5:]}]
    stats = collect_statistics(RowwiseNet(), inferer, batches, [5.0, 10.0], progress=False)
    assert stats.guidance_scales.tolist() == [30.0] and stats.score.shape == (1, 10)
    cal = make_calibration(stats, inferer, ["flair", "t2"])
    assert cal.guidance_scale == 30.0 and [c["guidance_scale"] for c in cal.candidates] == [30.0]
    assert cal.subset == {"size": 6, "of": 10, "seed": 3}
    index = np.sort(np.random.default_rng(3).choice(10, size=6, replace=False))
    assert cal.num_healthy + cal.num_unhealthy == 6 and cal.num_unhealthy == int(labels.numpy()[index].sum())
    path = cal.save(tmp_path / "calibration.json")
    loaded = Calibration.load(path)
    assert loaded == cal and loaded.settings.calibration_subset == 6 and loaded.settings.fixed_guidance_scale == 30.0


def test_subset_record_is_checked():
    cal = make_calibration(
        _stats(), AnoFPDMInferer(AnoFPDMSettings(timesteps=[0, 1]), map_channels=[0, 3]), ["flair", "t2"]
    ).to_dict()
    Calibration.from_dict(cal | {"subset": {"size": 3, "of": 40, "seed": 0}})
    for bad in ({"size": 41, "of": 40, "seed": 0}, {"size": 3}, [3, 40, 0], {"size": 3, "of": 40, "seed": -1}):
        with pytest.raises(ValueError, match="subset"):
            Calibration.from_dict(cal | {"subset": bad})


# --------------------------------------------------------------------------------------------------------------------
# The preset
# --------------------------------------------------------------------------------------------------------------------

OFFICIAL_COMMON = {
    "t_max": 599,
    "stride": 1,
    "timesteps": None,
    "forward": "ddim",
    "reference": "healthy",
    "divergence": "v2",
    "end_step": "per_modality",
    "quantile_range": (0.90, 0.98),
    "median_kernel": 5,
    "min_component_size": 40,
    "clip": True,
    "health_score": "cosine",
    "divergence_baseline": "none",
    "precision": "fp32",
    "end_step_inclusive": False,
    "inversion_eps": "clipped",
    "inversion_timing": "official",
    "measure_every": 1,
    "calibration_subset_seed": 0,
}


@pytest.mark.parametrize(
    "dataset, aggregation, subset, w", [("brats", "mean", 500, 2.0), ("atlas", "last", 1000, 30.0)]
)
def test_official_preset_fields(dataset, aggregation, subset, w):
    s = AnoFPDMSettings.preset("official", dataset=dataset)
    assert s == AnoFPDMSettings.preset(f"official_{dataset}") == AnoFPDMSettings.preset("official", dataset.upper())
    expected = OFFICIAL_COMMON | {"aggregation": aggregation, "calibration_subset": subset, "fixed_guidance_scale": w}
    assert dataclasses.asdict(s) == expected
    assert s.grid() == list(range(600))
    assert AnoFPDMSettings.from_dict(s.to_dict()) == s
    # single options can still be changed
    assert s.replace(precision="bf16").precision == "bf16" and s.replace(precision="bf16").reference == "healthy"


def test_presets_and_their_errors():
    assert AnoFPDMSettings.preset() == AnoFPDMSettings.preset(None) == AnoFPDMSettings.preset("default")
    assert AnoFPDMSettings.preset() == AnoFPDMSettings()
    assert sorted(PRESETS) == ["default", "official_atlas", "official_brats"]
    for args, match in (
        (("official",), "needs dataset"),
        (("official", "isles"), "preset must be one of"),
        (("officiel",), "preset must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            AnoFPDMSettings.preset(*args)
    # the dataset only picks the official variant (the bundles always pass theirs)
    assert AnoFPDMSettings.preset("default", "brats") == AnoFPDMSettings()
    assert AnoFPDMSettings.preset("official_atlas", "brats") == AnoFPDMSettings.preset("official", "atlas")


def test_new_options_are_validated_and_calibrated():
    for name in ("inversion_eps", "inversion_timing", "calibration_subset", "calibration_subset_seed"):
        assert name in CALIBRATED_FIELDS
    assert "fixed_guidance_scale" in CALIBRATED_FIELDS
    # what the maps are made of does not touch the calibrated constants (like aggregation)
    assert "end_step_inclusive" not in CALIBRATED_FIELDS and "aggregation" not in CALIBRATED_FIELDS
    for bad, match in (
        ({"inversion_eps": "clip"}, "inversion_eps must be one of"),
        ({"inversion_timing": "shifted"}, "inversion_timing must be one of"),
        ({"end_step_inclusive": "no"}, "end_step_inclusive must be true or false"),
        ({"calibration_subset": 1}, "calibration_subset must be >= 2"),
        ({"calibration_subset": 2.5}, "calibration_subset must be an integer"),
        ({"calibration_subset_seed": -1}, "calibration_subset_seed must be >= 0"),
        ({"fixed_guidance_scale": 0}, "fixed_guidance_scale must be a finite number > 0"),
    ):
        with pytest.raises(ValueError, match=match):
            AnoFPDMSettings(**bad)
    assert AnoFPDMSettings(calibration_subset="500").calibration_subset == 500
    assert AnoFPDMSettings(fixed_guidance_scale=30).fixed_guidance_scale == 30.0


def test_official_preset_runs_end_to_end():
    """The whole preset on a short grid: 1 + 2 (K - 1) network calls, finite maps, the cosine health score."""
    settings = AnoFPDMSettings.preset("official_atlas").replace(t_max=5)
    net = RowwiseNet()
    inferer = AnoFPDMInferer(settings, map_channels=[0], m_max=[0.05], tau=0.9, min_component_size=2)
    assert inferer.guidance_scale == 30.0
    x = torch.rand(3, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9
    out = inferer(x, net)
    assert net.calls == 1 + 2 * 5
    assert torch.isfinite(out.anomaly_map).all()
    torch.testing.assert_close(out.health, out.cosine)


# --------------------------------------------------------------------------------------------------------------------
# The defaults are unchanged
# --------------------------------------------------------------------------------------------------------------------


def test_default_settings_are_unchanged():
    s = AnoFPDMSettings()
    assert {k: getattr(s, k) for k in NEW_DEFAULTS} == NEW_DEFAULTS
    assert (s.stride, s.reference, s.aggregation, s.health_score) == (10, "null", "mean", "mse_gap")
    assert s.network_evaluations() == 120  # issue 23: at most 120 network evaluations per slice
    inferer = AnoFPDMInferer()
    assert inferer.guidance_scale == DEFAULT_GUIDANCE_SCALE


@pytest.mark.parametrize("forward", ["ddim", "ddpm"])
def test_default_run_is_the_current_code_path(forward):
    """A default run equals a run with every new option given at its default, and the float64 reference of
    tests/test_inferer_math.py (the inversion reusing the raw null eps of the previous step, t_e included)."""
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    grid, ws, channels = [0, 37, 120, 250, 420, 599], [0.0, 2.0], [0, 3]
    net = AnalyticEpsNet("affine")
    res = run_forward_process(
        net, x0, SCHEDULE, grid, ws, channels, forward, generator=torch.Generator().manual_seed(SEED)
    )
    assert len(net.calls) == len(grid)
    explicit = run_forward_process(
        AnalyticEpsNet("affine"),
        x0,
        SCHEDULE,
        grid,
        ws,
        channels,
        forward,
        generator=torch.Generator().manual_seed(SEED),
        end_inclusive=True,
        inversion_eps="raw",
        inversion_timing="aligned",
    )
    for f in ("divergence", "mse_guided", "mse_reference", "end_index", "map_sum", "map_last", "map_count"):
        torch.testing.assert_close(getattr(res, f), getattr(explicit, f), rtol=0, atol=0)
    noises = forward_noises(forward, len(grid))
    for wi, w in enumerate(ws):
        traj = naive_trajectory(AnalyticEpsNet("affine"), x0_np, noises, grid, w, forward, "null", True)
        stats = naive_statistics(traj, x0_np, channels, "v2")
        np.testing.assert_allclose(_np(res.divergence[wi]), stats["M"], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(res.end_index[wi].numpy(), stats["te"])
        for aggregation in ("mean", "last"):
            np.testing.assert_allclose(
                _np(res.anomaly_maps("per_modality", aggregation)[wi]),
                naive_maps(stats, "per_modality", aggregation),
                rtol=3e-4,
                atol=1e-4,
            )
    # health score default: the settings' default (mse_gap)
    torch.testing.assert_close(health_score(res), health_score(res, "mse_gap"))
