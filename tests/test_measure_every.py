# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""``measure_every``: a fine DDIM inversion with the statistics measured at every n-th grid step only (issue 23).

The steps between measurements advance the inversion with one null call each, so a K-step grid costs K + ceil(K / n)
network evaluations per slice instead of 2K. Checked against the float64 reference loops of tests/test_inferer_math.py
(the trajectory on the full grid, its statistics taken at the measured steps), the call pattern, the official
inversion timing, the calibration record and the errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_device_path import RowwiseNet
from test_inferer_math import (
    CURVE_TOL,
    MAP_ATOL,
    MAP_RTOL,
    SCHEDULE,
    SEED,
    STRIDED_GRID,
    AnalyticEpsNet,
    _check_tie_margins,
    _net,
    _safe_m_max,
    forward_noises,
    keyed_noises,
    make_slices,
    naive_divergence_max,
    naive_postprocess,
    naive_statistics,
    naive_trajectory,
    positional_keys,
)

from anofpdm_monai.calibration import Calibration, collect_statistics, make_calibration
from anofpdm_monai.inferers import AnoFPDMInferer, run_forward_process
from anofpdm_monai.networks.unet import HEALTHY, NULL
from anofpdm_monai.settings import CALIBRATED_FIELDS, AnoFPDMSettings


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _subsample(traj: dict[str, np.ndarray], every: int) -> dict[str, np.ndarray]:
    return {k: v[:, ::every] for k, v in traj.items()}


@pytest.mark.parametrize("every", [2, 3, 5])
def test_sparse_measurements_follow_the_full_inversion(every):
    """The curves, end steps and maps equal those of the float64 reference trajectory on the FULL grid, taken at the
    measured steps only; the call pattern is a 2B call at measured steps and a B-slice null call in between."""
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    grid, channels, w = STRIDED_GRID, [0, 2], 2.0
    n = x0_np.shape[0]
    net = _net("affine", x0_np)
    result = run_forward_process(
        net,
        x0,
        SCHEDULE,
        grid,
        [w],
        channels,
        "ddim",
        generator=torch.Generator().manual_seed(SEED),
        measure_every=every,
    )
    measured = grid[::every]
    assert result.timesteps.tolist() == measured
    pattern = [(c["batch"], c["t"][0], tuple(c["labels"])) for c in net.calls]
    expected = [
        (2 * n, t, (HEALTHY,) * n + (NULL,) * n) if k % every == 0 else (n, t, (NULL,) * n) for k, t in enumerate(grid)
    ]
    assert pattern == expected
    settings = AnoFPDMSettings(timesteps=grid, measure_every=every)
    assert sum(c["batch"] for c in net.calls) == n * settings.network_evaluations()
    assert settings.network_evaluations() == len(grid) + len(measured)

    traj = naive_trajectory(_net("affine", x0_np), x0_np, forward_noises("ddim", 1), grid, w, "ddim", "null", True)
    st = naive_statistics(_subsample(traj, every), x0_np, channels, "v2")
    _check_tie_margins(st, _np(result.divergence[0]), f"every={every}")
    np.testing.assert_allclose(_np(result.divergence[0]), st["M"], **CURVE_TOL)
    np.testing.assert_allclose(_np(result.mse_guided[0]), st["mse_h"], **CURVE_TOL)
    np.testing.assert_allclose(_np(result.mse_reference), st["mse_r"], **CURVE_TOL)
    np.testing.assert_array_equal(result.end_index[0].numpy(), st["te"])
    # a coarse grid of the measured steps alone is a different (coarser) inversion: the test would be vacuous if it
    # gave the same curves
    coarse = run_forward_process(
        _net("affine", x0_np),
        x0,
        SCHEDULE,
        measured,
        [w],
        channels,
        "ddim",
        generator=torch.Generator().manual_seed(SEED),
    )
    assert not np.allclose(_np(coarse.divergence[0]), st["M"], rtol=1e-3, atol=1e-5)


def test_inferer_maps_and_masks_at_the_measured_steps():
    """Through AnoFPDMInferer (per-slice noise keys): maps, thresholds and the end step in diffusion steps."""
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    grid, channels, w, every = STRIDED_GRID, [0, 2], 2.0, 4
    net = _net("affine", x0_np)
    noises = keyed_noises("ddim", len(grid), positional_keys())
    traj = naive_trajectory(net, x0_np, noises, grid, w, "ddim", "null", True)
    st = naive_statistics(_subsample(traj, every), x0_np, channels, "v2")
    m_max = _safe_m_max(naive_divergence_max(st, "per_modality"))
    ref = naive_postprocess(st, "per_modality", "mean", m_max, None)
    inferer = AnoFPDMInferer(
        guidance_scale=w, map_channels=channels, timesteps=grid, measure_every=every, m_max=m_max.tolist(), seed=SEED
    )
    assert inferer.measured_timesteps == grid[::every]
    out = inferer.postprocess(inferer.run(x0, _net("affine", x0_np)))
    np.testing.assert_array_equal(out.end_step.numpy(), np.asarray(grid[::every])[st["te"]])
    np.testing.assert_allclose(_np(out.anomaly_map), ref["H"], rtol=MAP_RTOL, atol=MAP_ATOL)
    np.testing.assert_allclose(_np(out.threshold), ref["thr"], rtol=MAP_RTOL, atol=MAP_ATOL)
    assert out.timesteps.tolist() == grid[::every]


def test_official_timing_needs_no_call_between_measurements():
    """With the official inversion timing the extra null call of every step already moves the state: the steps
    between measurements make no other call, and the measured curves are those of the every-step run."""
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    grid, every, n = [0, 1, 2, 3, 4, 300, 301, 500], 3, x0_np.shape[0]
    options = dict(reference="healthy", inversion_eps="clipped", inversion_timing="official")
    runs = {}
    for e in (1, every):
        net = AnalyticEpsNet("affine", x0_star=x0_np)
        runs[e] = run_forward_process(
            net,
            x0,
            SCHEDULE,
            grid,
            [2.0],
            [0, 2],
            "ddim",
            generator=torch.Generator().manual_seed(SEED),
            measure_every=e,
            **options,
        )
        settings = AnoFPDMSettings(timesteps=grid, measure_every=e, inversion_timing="official")
        assert sum(c["batch"] for c in net.calls) == n * settings.network_evaluations()
    assert AnoFPDMSettings(timesteps=grid, measure_every=every, inversion_timing="official").network_evaluations() == (
        2 * 3 + 7
    )
    for f in ("divergence", "mse_guided"):
        np.testing.assert_allclose(_np(getattr(runs[every], f)), _np(getattr(runs[1], f))[:, :, ::every], rtol=1e-6)
    np.testing.assert_allclose(_np(runs[every].mse_reference), _np(runs[1].mse_reference)[:, ::every], rtol=1e-6)


def test_options_errors_and_calibration_record(tmp_path):
    assert "measure_every" in CALIBRATED_FIELDS
    s = AnoFPDMSettings()
    assert s.measure_every == 1 and s.network_evaluations() == 2 * len(s.grid())
    assert AnoFPDMSettings(measure_every="3").measure_every == 3
    assert AnoFPDMSettings(t_max=20, stride=5, measure_every=2).measured_grid() == [0, 10, 20]
    for bad, match in (
        ({"measure_every": 0}, "measure_every must be >= 1"),
        ({"measure_every": 1.5}, "measure_every must be an integer"),
    ):
        with pytest.raises(ValueError, match=match):
            AnoFPDMSettings(**bad)
    x = torch.rand(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    # DDPM has nothing to advance between measurements: it measures every step of its grid and ignores the option
    ddpm = AnoFPDMSettings(t_max=20, stride=5, measure_every=2, forward="ddpm")
    assert ddpm.measured_grid() == ddpm.grid() == [0, 5, 10, 15, 20] and ddpm.network_evaluations() == 10
    runs = [
        run_forward_process(
            RowwiseNet(), x, SCHEDULE, [0, 5, 10], [1.0], [0], "ddpm", measure_every=e,
            generator=torch.Generator().manual_seed(3),
        )
        for e in (1, 2)
    ]  # fmt: skip
    for f in ("divergence", "mse_guided", "mse_reference", "map_sum"):
        torch.testing.assert_close(getattr(runs[0], f), getattr(runs[1], f), rtol=0, atol=0)
    # a baseline curve has one row per MEASURED step
    with pytest.raises(ValueError, match=r"\(measured grid steps, map channels\) = \(2, 1\)"):
        AnoFPDMInferer(
            timesteps=[0, 5, 10, 15], measure_every=2, divergence_baseline="healthy", baseline_curve=[[1.0]] * 4
        )
    # calibration: recorded, reloaded, and a calibration made at another measure_every is refused
    settings = AnoFPDMSettings(timesteps=[0, 50, 100, 150, 200], measure_every=2, divergence_baseline="healthy")
    inferer = AnoFPDMInferer(settings, map_channels=[0])
    x = torch.rand(8, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9
    batches = [{"image": x, "class_label": torch.tensor([0, 1] * 4)}]
    stats = collect_statistics(RowwiseNet(), inferer, batches, [1.0, 2.0], progress=False)
    cal = Calibration.load(make_calibration(stats, inferer, ["flair"]).save(tmp_path / "calibration.json"))
    assert cal.settings.measure_every == 2
    assert np.asarray(cal.baseline_curve).shape == (3, 1)  # one row per measured step
    cal.check("cal.json", settings=cal.settings)
    assert AnoFPDMInferer.from_calibration(cal).measured_timesteps == [0, 100, 200]
    with pytest.raises(ValueError, match="measure_every"):
        cal.check("cal.json", settings=cal.settings.replace(measure_every=1))
