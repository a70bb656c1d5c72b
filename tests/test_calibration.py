"""Calibration from image-level labels only (docs/method.md §6): tau, w*, M_max, the one-pass w
sweep, the calibration file (round trip, consistency checks, bad files) and ``run_calibration`` end to end on
synthetic NIfTI cases with a tiny checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from anofpdm_monai.apps.calibrate import run_calibration
from anofpdm_monai.calibration import (
    CALIBRATION_FORMAT,
    DEFAULT_TAU_LEVELS,
    Calibration,
    CalibrationError,
    CalibrationStatistics,
    calibrate_from_statistics,
    collect_statistics,
    select_guidance,
    select_tau,
)
from anofpdm_monai.data import VolumePreprocessor
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy
from anofpdm_monai.inferers import AnoFPDMInferer
from anofpdm_monai.io import default_mode
from anofpdm_monai.networks import build_diffusion_unet, file_digest, save_checkpoint
from anofpdm_monai.settings import AnoFPDMSettings

GRID = [0, 100, 200, 300]
BRATS = ["flair", "t1", "t1ce", "t2"]


# --------------------------------------------------------------------------------------------------------------------
# select_tau: tau_q = numpy-linear quantile of the healthy c; first tau_q minimising FN + FP under inference's rule
# (c <= tau is unhealthy: a healthy slice exactly AT tau_q is an error)
# --------------------------------------------------------------------------------------------------------------------

HEALTHY_C = [0.90, 0.95, 0.97, 0.99, 1.00]  # sorted; linear quantile at q sits at position 4 q

# (unhealthy c, levels, expected tau, expected errors), derived by hand:
SELECT_TAU_CASES = [
    # levels on the order statistics: every tau is a healthy c, counted unhealthy at tau: taus .90/.95/.97/.99/1.0
    # give (2+1)/(1+2)/(0+3)/(0+4)/(0+5) = 3/3/3/4/5 errors -> the FIRST minimiser, .90
    ([0.50, 0.60, 0.93, 0.96], [0.0, 0.25, 0.5, 0.75, 1.0], 0.90, 3),
    # same taus, errors (3+1)/(1+2)/(0+3)/4/5 -> .95 (first of the tie .95/.97)
    ([0.50, 0.60, 0.93, 0.96, 0.94], [0.0, 0.25, 0.5, 0.75, 1.0], 0.95, 3),
    # interpolated levels: q=.1 -> position .4 -> .90 + .4 * .05 = .92 (errors 1 + 1); q=.6 -> position 2.4 ->
    # .97 + .4 * .02 = .978 (errors 0 + 3)
    ([0.50, 0.60, 0.975], [0.1, 0.6], 0.92, 2),
    # the levels order matters only through "first": reversed, the minimiser is still .92 (unique)
    ([0.50, 0.60, 0.975], [0.6, 0.1], 0.92, 2),
    # default levels linspace(.005, .095, 100): positions .02 .. .38 -> taus in (.90, .919]; every tau has the
    # same 2 errors (.93 above, .90 below) -> the first level: .90 + .02 * .05 = .901
    ([0.50, 0.60, 0.93], DEFAULT_TAU_LEVELS, 0.901, 2),
]


@pytest.mark.parametrize("unhealthy, levels, tau, errors", SELECT_TAU_CASES)
def test_select_tau_hand_derived(unhealthy, levels, tau, errors):
    got_tau, got_errors = select_tau(HEALTHY_C, unhealthy, levels)
    assert got_tau == pytest.approx(tau, abs=1e-12)
    assert got_errors == errors


def test_select_tau_matches_brute_force_with_numpy_linear_quantile():
    rng = np.random.default_rng(0)
    healthy = rng.uniform(0.8, 1.0, size=37)
    unhealthy = rng.uniform(0.5, 0.95, size=23)
    taus = [float(np.quantile(healthy, q, method="linear")) for q in DEFAULT_TAU_LEVELS]
    errs = [int((unhealthy > t).sum() + (healthy <= t).sum()) for t in taus]
    first = int(np.argmin(errs))  # argmin returns the first minimiser
    assert select_tau(healthy, unhealthy) == (pytest.approx(taus[first], abs=0), errs[first])


def test_select_tau_needs_healthy_slices():
    with pytest.raises(CalibrationError, match="no healthy validation slices"):
        select_tau([], [0.5, 0.6])


# --------------------------------------------------------------------------------------------------------------------
# select_guidance: the largest w whose accuracy is >= tolerance x best
# --------------------------------------------------------------------------------------------------------------------

ACCURACIES = {0.5: 0.90, 1.0: 0.95, 2.0: 0.942, 3.0: 0.935, 5.0: 0.80}


@pytest.mark.parametrize(
    "tolerance, expected",
    [
        (1.0, 1.0),  # only the best
        (0.99, 2.0),  # >= 0.9405: w = 1 and 2 -> the largest, 2
        (0.98, 3.0),  # >= 0.931: w = 1, 2, 3 -> 3
        (0.80 / 0.95, 5.0),  # exactly the worst accuracy: ">=" takes it in
    ],
)
def test_select_guidance_tolerance(tolerance, expected):
    assert select_guidance(ACCURACIES, tolerance) == expected


def test_select_guidance_is_order_independent_and_takes_the_largest_of_ties():
    acc = {3.0: 0.9, 0.5: 0.9, 2.0: 0.9, 1.0: 0.5}
    assert select_guidance(acc) == 3.0
    assert select_guidance(dict(reversed(list(acc.items())))) == 3.0


def test_select_guidance_at_chance_takes_the_candidate_nearest_the_papers_w():
    """The real-MRI case: accuracy falls with w and never beats the majority class (0.55) by the margin; the
    papers' rule would take w = 0.5, the fallback takes 2 (DEFAULT_GUIDANCE_SCALE); an informative classification
    keeps the papers' rule."""
    falling = {0.5: 0.64, 1.0: 0.58, 2.0: 0.52, 3.0: 0.48, 5.0: 0.45}
    assert select_guidance(falling) == 0.5
    assert select_guidance(falling, chance=0.62) == 2.0
    assert select_guidance({1.0: 0.5, 3.0: 0.5}, chance=0.6) == 3.0  # tie in distance to 2: the larger
    assert select_guidance(falling, chance=0.55) == 0.5  # 0.64 >= 0.55 + 0.05: informative


def test_calibration_at_chance_warns_and_uses_the_papers_w(caplog):
    labels = np.array([0] * 6 + [1] * 4)
    # interleaved scores: every tau_q lies in [1.025, 1.475], so 4 unhealthy + 1 healthy errors (accuracy 0.5,
    # below the majority rate 0.6)
    mixed = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.5, 2.5, 3.5, 4.5])
    flat = np.stack([mixed, mixed])
    stats = CalibrationStatistics(
        guidance_scales=np.array([0.5, 3.0]),
        divergence_max=np.ones((2, 10, 1)),
        divergence_max_joint=np.ones((2, 10)),
        score=flat,
        labels=labels,
    )
    with caplog.at_level("WARNING"):
        out = calibrate_from_statistics(stats)
    assert out["guidance_scale"] == 3.0  # nearest 2 among {0.5, 3}
    assert "at chance" in caplog.text


@pytest.mark.parametrize("accuracies, tolerance", [({}, 0.99), ({1.0: 0.9}, 0.0), ({1.0: 0.9}, 1.5)])
def test_select_guidance_errors(accuracies, tolerance):
    with pytest.raises(CalibrationError):
        select_guidance(accuracies, tolerance)


# --------------------------------------------------------------------------------------------------------------------
# calibrate_from_statistics
# --------------------------------------------------------------------------------------------------------------------


def _statistics(labels, cosine, div, div_joint, ws=(1.0, 3.0)):
    return CalibrationStatistics(
        guidance_scales=np.asarray(ws, dtype=np.float64),
        divergence_max=np.asarray(div, dtype=np.float64),
        divergence_max_joint=np.asarray(div_joint, dtype=np.float64),
        score=np.asarray(cosine, dtype=np.float64),
        labels=np.asarray(labels),
    )


# 3 healthy then 3 unhealthy slices; the healthy ones have the LARGEST divergences (must be ignored for M_max)
LABELS = [0, 0, 0, 1, 1, 1]
DIV = [  # (W=2, N=6, Cm=2)
    [[9.0, 9.0], [8.0, 8.0], [7.0, 7.0], [0.2, 0.7], [0.5, 0.1], [0.3, 0.3]],
    [[9.5, 9.5], [8.5, 8.5], [7.5, 7.5], [0.4, 0.9], [0.8, 0.2], [0.6, 0.5]],
]
DIV_JOINT = [[9.0, 8.0, 7.0, 0.45, 0.30, 0.30], [9.5, 8.5, 7.5, 0.65, 0.50, 0.55]]
# healthy c .97/.98/.99 -> tau = quantile(.005) = .97 + .01 * .01 = .9701 for both w; the healthy .97 < tau is one
# error for both; w = 1 also misses the unhealthy .975 (> tau): accuracy 4/6 vs 5/6
COSINE = [[0.97, 0.98, 0.99, 0.50, 0.60, 0.975], [0.97, 0.98, 0.99, 0.50, 0.60, 0.70]]


def test_calibrate_from_statistics_hand_derived():
    out = calibrate_from_statistics(_statistics(LABELS, COSINE, DIV, DIV_JOINT))
    assert out["guidance_scale"] == 3.0  # 4/6 < 0.99 * 5/6
    assert out["tau"] == pytest.approx(0.9701, abs=1e-12)
    assert out["m_max"] == pytest.approx([0.8, 0.9])  # max over UNHEALTHY slices of w = 3, per modality
    assert out["m_max_joint"] == pytest.approx(0.65)
    assert (out["num_healthy"], out["num_unhealthy"]) == (3, 3)
    by_w = {c["guidance_scale"]: c for c in out["candidates"]}
    assert by_w[1.0]["accuracy"] == pytest.approx(4 / 6)
    assert by_w[3.0]["accuracy"] == pytest.approx(5 / 6)
    assert by_w[1.0]["m_max"] == pytest.approx([0.5, 0.7])
    assert by_w[1.0]["m_max_joint"] == pytest.approx(0.45)
    json.dumps(out)  # JSON-serialisable as it is (no numpy scalars)


def test_calibrate_from_statistics_largest_w_within_tolerance():
    cosine = [COSINE[1], COSINE[1]]  # equal accuracy: the larger w wins
    out = calibrate_from_statistics(_statistics(LABELS, cosine, DIV, DIV_JOINT))
    assert out["guidance_scale"] == 3.0
    cosine = [COSINE[1], COSINE[0]]  # w = 1 better (5/6 vs 4/6); 4/6 < 0.99 * 5/6 -> 1; tolerance 0.8 -> 3
    assert calibrate_from_statistics(_statistics(LABELS, cosine, DIV, DIV_JOINT))["guidance_scale"] == 1.0
    assert calibrate_from_statistics(_statistics(LABELS, cosine, DIV, DIV_JOINT), tolerance=0.8)[
        "guidance_scale"
    ] == pytest.approx(3.0)


@pytest.mark.parametrize("labels, found", [([0] * 6, "6 healthy, 0 unhealthy"), ([1] * 6, "0 healthy, 6 unhealthy")])
def test_calibrate_from_statistics_needs_both_classes(labels, found):
    with pytest.raises(CalibrationError, match=found):
        calibrate_from_statistics(_statistics(labels, COSINE, DIV, DIV_JOINT))


def test_calibrate_from_statistics_refuses_a_zero_m_max():
    """Algorithm 1 divides by M_max: a calibration with M_max = 0 must be refused when it is made, not at inference."""
    div = np.asarray(DIV)
    div[1, 3:, 1] = 0.0  # modality 2 of w = 3 (the chosen one) never diverges on unhealthy slices
    with pytest.raises(CalibrationError, match=r"M_max for w=3 is \[0.8, 0.0\].*not positive"):
        calibrate_from_statistics(_statistics(LABELS, COSINE, div, DIV_JOINT))
    div = np.asarray(DIV)
    div[0, 3:, 1] = 0.0  # only a candidate that is not chosen: fine
    assert calibrate_from_statistics(_statistics(LABELS, COSINE, div, DIV_JOINT))["guidance_scale"] == 3.0


def test_calibrate_with_the_healthy_baseline_hand_derived():
    """``divergence_baseline="healthy"``: b_t = median of the healthy slices' M_t per step (and modality); M_max and
    the joint M_max are taken on M_t / b_t; the curve of w* is recorded."""
    # one w, K = 3 steps, Cm = 1; healthy slices 0-2, unhealthy 3-4
    curves = np.array(
        [
            [[1.0], [10.0], [100.0]],
            [[2.0], [20.0], [200.0]],
            [[4.0], [40.0], [400.0]],
            [[6.0], [30.0], [220.0]],
            [[2.0], [60.0], [100.0]],
        ]
    )[None]  # (1, 5, 3, 1)
    stats = CalibrationStatistics(
        guidance_scales=np.asarray([2.0]),
        divergence_max=curves.max(axis=2),
        divergence_max_joint=curves.mean(axis=3).max(axis=2),
        score=np.asarray([[0.0, 0.1, 0.2, -1.0, -2.0]]),
        labels=np.asarray([0, 0, 0, 1, 1]),
        divergence=curves,
    )
    out = calibrate_from_statistics(stats, divergence_baseline="healthy")
    # healthy medians per step: 2, 20, 200; relative curves of the unhealthy slices: (3, 1.5, 1.1) and (1, 3, 0.5)
    np.testing.assert_allclose(out["baseline_curve"], [[2.0], [20.0], [200.0]])
    assert out["m_max"] == pytest.approx([3.0]) and out["m_max_joint"] == pytest.approx(3.0)
    # without the baseline: the raw maxima (220 and 100 -> 220)
    raw = calibrate_from_statistics(stats)
    assert raw["m_max"] == pytest.approx([220.0]) and raw["baseline_curve"] is None
    stats.divergence = None
    with pytest.raises(CalibrationError, match="needs the M_t curves"):
        calibrate_from_statistics(stats, divergence_baseline="healthy")


def test_the_baseline_curve_in_the_calibration_file(tmp_path):
    healthy = AnoFPDMSettings(timesteps=GRID, min_component_size=10, divergence_baseline="healthy")
    curve = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]]  # 4 steps x 2 map channels
    cal = _calibration(settings=healthy, baseline_curve=curve)
    loaded = Calibration.load(cal.save(tmp_path / "c.json"))
    assert loaded.baseline_curve == curve and loaded.divergence_baseline == "healthy"
    inferer = AnoFPDMInferer.from_calibration(loaded)
    np.testing.assert_array_equal(inferer.baseline_curve.numpy(), curve)
    with pytest.raises(CalibrationError, match="divergence_baseline 'healthy' vs 'none'"):
        loaded.check(settings=AnoFPDMSettings(timesteps=GRID))
    bad = {
        "missing": None,
        "one step short": curve[:3],
        "a zero": [[0.0, 0.2], *curve[1:]],
        "not numbers": [["a", "b"], *curve[1:]],
    }
    for name, value in bad.items():
        data = cal.to_dict() | {"baseline_curve": value}
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(CalibrationError, match=r"key 'baseline_curve' must be 4 x 2 finite numbers > 0") as info:
            Calibration.load(tmp_path / "bad.json")
        assert "\n" not in str(info.value), name
    data = _calibration().to_dict() | {"baseline_curve": curve}  # a curve the settings do not use
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="baseline_curve' is set but settings.divergence_baseline is 'none'"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot be combined"):
        AnoFPDMSettings(divergence_baseline="healthy", health_score="divergence")


# --------------------------------------------------------------------------------------------------------------------
# collect_statistics: one pass for all w == separate passes per w
# --------------------------------------------------------------------------------------------------------------------


class CountingNet(torch.nn.Module):
    """Wraps a network and counts its calls."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x, timesteps, class_labels=None):
        self.calls += 1
        return self.net(x, timesteps=timesteps, class_labels=class_labels)


def _tiny_net(in_channels: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny untrained network with every weight perturbed: MONAI zero-initialises the output convolution (and the
    second convolution of each residual block), so a fresh network predicts eps = 0 for every label and AnoFPDM's
    divergence would be identically zero."""
    torch.manual_seed(seed)
    net = build_diffusion_unet(in_channels, "tiny", use_flash_attention=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _batches(n_batches: int = 2, b: int = 3, size: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        {
            "image": torch.rand(b, 4, size, size, generator=g) * 2 - 1,
            "class_label": torch.tensor([i % 2 for i in range(b)]),
        }
        for _ in range(n_batches)
    ]


@pytest.mark.parametrize("forward", ["ddim", "ddpm"])
def test_one_pass_sweep_equals_separate_runs(forward):
    net = CountingNet(_tiny_net())
    inferer = AnoFPDMInferer(timesteps=GRID, map_channels=[0, 3], forward=forward, seed=3)
    batches = _batches()
    ws = [0.5, 2.0, 5.0]
    joint = collect_statistics(net, inferer, batches, ws, progress=False)
    assert net.calls == len(batches) * len(GRID)  # one batched call per step, whatever the number of w
    assert joint.divergence_max.shape == (3, 6, 2)
    assert joint.score.shape == joint.divergence_max_joint.shape == (3, 6)
    np.testing.assert_array_equal(joint.labels, [0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(joint.guidance_scales, ws)
    for i, w in enumerate(ws):
        single = collect_statistics(net, inferer, batches, [w], progress=False)
        for name in ("divergence_max", "divergence_max_joint", "score"):
            np.testing.assert_allclose(getattr(joint, name)[i], getattr(single, name)[0], rtol=1e-6, atol=1e-7)
    # the candidates really differ (the test would be vacuous otherwise)
    assert not np.allclose(joint.divergence_max[0], joint.divergence_max[2])


def test_untrained_network_cannot_be_calibrated():
    """A fresh MONAI UNet predicts eps = 0 for every label: M is identically 0 and the calibration is refused."""
    torch.manual_seed(0)
    fresh = build_diffusion_unet(4, "tiny", use_flash_attention=False).eval()
    inferer = AnoFPDMInferer(timesteps=GRID, map_channels=[0, 3])
    stats = collect_statistics(fresh, inferer, _batches(1, b=4), [1.0, 2.0], progress=False)
    assert not stats.divergence_max.any()
    with pytest.raises(CalibrationError, match="not positive"):
        calibrate_from_statistics(stats)


def test_collect_statistics_without_batches():
    inferer = AnoFPDMInferer(timesteps=GRID, map_channels=[0])
    with pytest.raises(CalibrationError, match="no validation slices"):
        collect_statistics(_tiny_net(), inferer, [], [1.0], progress=False)


# --------------------------------------------------------------------------------------------------------------------
# the calibration file
# --------------------------------------------------------------------------------------------------------------------


def _calibration(**changes) -> Calibration:
    values = dict(
        guidance_scale=2.0,
        m_max=[0.012, 0.034],
        m_max_joint=0.02,
        tau=0.9731,
        settings=AnoFPDMSettings(timesteps=GRID, min_component_size=10),
        map_modalities=["flair", "t2"],
        map_channels=[0, 3],
        checkpoint_digest="0123456789abcdef",
        preprocessing=VolumePreprocessor(image_size=32).to_dict(),
        datalist="datalist.json [validation]",
        candidates=[{"guidance_scale": 2.0, "accuracy": 0.9, "tau": 0.9731, "m_max": [0.012, 0.034]}],
        num_healthy=10,
        num_unhealthy=5,
    )
    values.update(changes)
    return Calibration(**values)


def test_calibration_json_round_trip(tmp_path):
    cal = _calibration()
    path = cal.save(tmp_path / "sub" / "calibration.json")
    assert path.is_file() and cal.created
    assert os.stat(path).st_mode & 0o777 == default_mode()
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temporary file left
    data = json.loads(path.read_text())
    assert data["format"] == CALIBRATION_FORMAT
    loaded = Calibration.load(path)
    assert loaded == cal
    assert loaded.to_dict() == cal.to_dict()
    loaded.check(
        checkpoint_digest=cal.checkpoint_digest,
        timesteps=tuple(GRID),
        forward="ddim",
        guidance_scale=2,
        preprocessing=cal.preprocessing,
    )


def test_load_ignores_unknown_fields(tmp_path):
    data = _calibration().to_dict()
    data["comment"] = "written by a newer version"
    (tmp_path / "c.json").write_text(json.dumps(data))
    assert Calibration.load(tmp_path / "c.json").tau == pytest.approx(0.9731)


# (setting that differs, field names the message must contain)
CHECK_CASES = [
    ({"checkpoint_digest": "fedcba9876543210"}, ["checkpoint_digest"]),
    ({"timesteps": [0, 100, 200]}, ["timesteps"]),
    ({"forward": "ddpm"}, ["forward"]),
    ({"guidance_scale": 3.0}, ["guidance_scale"]),
    (
        {"checkpoint_digest": "x", "timesteps": list(range(0, 600, 3)), "guidance_scale": 0.5},
        ["checkpoint_digest", "timesteps", "guidance_scale"],
    ),
    ({"preprocessing": VolumePreprocessor(image_size=64).to_dict()}, ["preprocessing"]),
]


@pytest.mark.parametrize("setting, fields", CHECK_CASES)
def test_check_refuses_another_setting(setting, fields):
    cal = _calibration()
    with pytest.raises(CalibrationError) as info:
        cal.check(source="calibration my_cal.json", **setting)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("calibration my_cal.json was made for another setting")
    for name in fields:
        assert name in message
    for name in {"checkpoint_digest", "timesteps", "forward", "guidance_scale"} - set(fields):
        assert name not in message


def test_check_accepts_none_and_equal_values():
    cal = _calibration()
    cal.check(checkpoint_digest=None, timesteps=None, forward=None, guidance_scale=None, preprocessing=None)
    cal.check(timesteps=np.asarray(GRID), guidance_scale=2.0 + 1e-12, forward="ddim")
    cal.check(map_channels=(0, 3), map_modalities=("flair", "t2"), quantile_range=np.asarray([0.90, 0.98]))
    with pytest.raises(CalibrationError, match="map_channels"):
        cal.check(map_channels=(3, 0))


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "not found"),
        ("{not json", "cannot read"),
        ("[1, 2, 3]", "not an anofpdm_monai calibration"),
        ('{"format": "something else", "tau": 0.9}', "not an anofpdm_monai calibration"),
        (json.dumps({"format": CALIBRATION_FORMAT, "tau": 0.9}), "missing fields"),
    ],
)
def test_load_bad_files(tmp_path, content, match):
    path = tmp_path / "calibration.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationError, match=match) as info:
        Calibration.load(path)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# run_calibration end to end
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Two synthetic validation cases (with lesions, so healthy and unhealthy slices) and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("calib")
    datalist = make_dataset(
        root / "data",
        phantom_anatomy((32, 40, 24)),
        splits={"validation": 2},
        lesion_radius=4.0,
        deformation=1.0,
    )
    pre = VolumePreprocessor(image_size=32)
    ckpt = save_checkpoint(root / "model.pt", _tiny_net(), preprocessing=pre.to_dict())
    return {"root": root, "datalist": datalist, "pre": pre, "checkpoint": ckpt}


def test_run_calibration_end_to_end(synthetic, tmp_path):
    out = tmp_path / "eval" / "calibration.json"
    cal = run_calibration(
        synthetic["checkpoint"],
        synthetic["datalist"],
        synthetic["root"] / "data",
        out,
        tmp_path / "cache",
        map_modalities=["flair", "t2"],
        guidance_scales=[0.5, 2.0],
        timesteps=GRID,
        min_component_size=10,
        batch_size=32,
        progress=False,
    )
    assert out.is_file()
    loaded = Calibration.load(out)
    assert loaded == cal
    assert loaded.timesteps == GRID
    assert loaded.checkpoint_digest == file_digest(synthetic["checkpoint"]) + "-model"  # no EMA weights saved
    assert loaded.preprocessing == synthetic["pre"].to_dict()
    assert loaded.min_component_size == 10 and loaded.median_kernel == 5
    assert loaded.map_modalities == ["flair", "t2"] and loaded.map_channels == [0, 3]
    assert loaded.guidance_scale in (0.5, 2.0)
    assert [c["guidance_scale"] for c in loaded.candidates] == [0.5, 2.0]
    assert len(loaded.m_max) == 2 and all(m > 0 for m in loaded.m_max) and loaded.m_max_joint > 0
    assert loaded.num_healthy > 0 and loaded.num_unhealthy > 0
    assert "[validation]" in loaded.datalist
    assert (loaded.forward, loaded.reference, loaded.divergence, loaded.end_step) == (
        "ddim",
        "null",
        "v2",
        "per_modality",
    )
    # the file is what inference checks against
    loaded.check(checkpoint_digest=file_digest(synthetic["checkpoint"]) + "-model", timesteps=GRID, forward="ddim")
    # the chosen candidate's values are the ones recorded
    chosen = next(c for c in loaded.candidates if c["guidance_scale"] == loaded.guidance_scale)
    assert (chosen["tau"], chosen["m_max"]) == (loaded.tau, loaded.m_max)


def test_run_calibration_with_the_healthy_baseline(synthetic, tmp_path):
    """The file records the median raw M_t of the healthy validation slices at w* (recomputed here from a raw pass),
    and inference from it divides by that curve."""
    kwargs = dict(map_modalities=["flair"], timesteps=GRID, batch_size=32, progress=False, seed=0)
    out = tmp_path / "calibration.json"
    cal = run_calibration(
        synthetic["checkpoint"],
        synthetic["datalist"],
        synthetic["root"] / "data",
        out,
        tmp_path / "cache",
        guidance_scales=[2.0],
        divergence_baseline="healthy",
        **kwargs,
    )
    assert Calibration.load(out) == cal and cal.divergence_baseline == "healthy"
    from anofpdm_monai.data import SliceDataset
    from anofpdm_monai.networks import load_network

    network, info = load_network(synthetic["checkpoint"])
    data = SliceDataset.from_datalist(
        synthetic["datalist"],
        synthetic["root"] / "data",
        "validation",
        tmp_path / "cache",
        info["preprocessing"],
        progress=False,
    )
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    labels = np.asarray(data.slice_labels)
    inferer = AnoFPDMInferer.from_calibration(cal, scheduler=info["schedule"], seed=0)
    # each slice's noise keyed by (seed, case, slice), as the calibration drew it
    keys = inferer.noise_keys([data[i]["case_id"] for i in range(len(data))], data.table["slice_index"].tolist())
    raw = inferer.forward_process(x, network, relative=False, noise_keys=keys).divergence[0].numpy()  # (N, K, 1)
    expected = np.median(raw[labels == 0], axis=0)
    np.testing.assert_allclose(cal.baseline_curve, expected, rtol=1e-4)  # batches of 32 vs one batch: float32
    rel = inferer.run(x, network, noise_keys=keys).divergence[0].numpy()
    np.testing.assert_allclose(rel, raw / expected, rtol=1e-4)
    np.testing.assert_allclose(cal.m_max, [(raw / expected)[labels == 1].max()], rtol=1e-4)


def test_run_calibration_refuses_unknown_map_modality(synthetic, tmp_path):
    with pytest.raises(CalibrationError, match="map modalities"):
        run_calibration(
            synthetic["checkpoint"],
            synthetic["datalist"],
            synthetic["root"] / "data",
            tmp_path / "c.json",
            tmp_path / "cache",
            map_modalities=["flair", "dwi"],
            timesteps=GRID,
            progress=False,
        )
    assert not (tmp_path / "c.json").exists()


def test_run_calibration_needs_preprocessing_in_checkpoint(synthetic, tmp_path):
    bare = save_checkpoint(tmp_path / "bare.pt", _tiny_net())
    with pytest.raises(CalibrationError, match="records no preprocessing"):
        run_calibration(
            bare,
            synthetic["datalist"],
            synthetic["root"] / "data",
            tmp_path / "c.json",
            tmp_path / "cache",
            map_modalities=["flair"],
            timesteps=GRID,
            progress=False,
        )


def test_format_1_files_still_load(tmp_path):
    """Calibrations written before the settings object (flat option fields) load into the same record."""
    old = {
        "format": "anofpdm_monai.calibration/1",
        "guidance_scale": 2.0,
        "m_max": [0.012, 0.034],
        "m_max_joint": 0.02,
        "tau": 0.9731,
        "timesteps": GRID,
        "forward": "ddpm",
        "reference": "null",
        "divergence": "v1",
        "end_step": "per_modality",
        "quantile_range": [0.85, 0.97],
        "map_modalities": ["flair", "t2"],
        "map_channels": [0, 3],
        "median_kernel": 3,
        "min_component_size": 10,
        "checkpoint_digest": "0123456789abcdef",
        "created": "2026-01-01T00:00:00+00:00",
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    cal = Calibration.load(tmp_path / "old.json")
    assert cal.settings == AnoFPDMSettings(
        timesteps=GRID,
        forward="ddpm",
        divergence="v1",
        quantile_range=(0.85, 0.97),
        median_kernel=3,
        min_component_size=10,
        health_score="cosine",  # what files written before the option existed were calibrated with
    )
    assert cal.timesteps == GRID and cal.m_max == [0.012, 0.034] and cal.format == CALIBRATION_FORMAT
