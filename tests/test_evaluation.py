"""The evaluate workflow and the baselines (docs/method.md §7-8): threshold tuning with pixel labels on
constructed maps, the reconstruction baselines with a perfect analytic model, the intensity floor by hand, the
Markdown table, and :class:`Evaluator` end to end on tiny synthetic data (outputs, figures, the per-case cache that
a rerun reuses without a network call, per-slice metrics checked against the stored masks)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from anofpdm_monai.calibration import Calibration, CalibrationError
from anofpdm_monai.data import SliceDataset, VolumePreprocessor
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy
from anofpdm_monai.evaluation import METHODS, Evaluator, summary_markdown, threshold_candidates, tune_threshold
from anofpdm_monai.inferers import AnoFPDMInferer, IntensityInferer, ReconstructionInferer
from anofpdm_monai.networks import build_diffusion_unet
from anofpdm_monai.networks.unet import HEALTHY
from anofpdm_monai.schedule import NoiseSchedule
from anofpdm_monai.settings import AnoFPDMSettings

SCHEDULE = NoiseSchedule()
BRATS = ["flair", "t1", "t1ce", "t2"]
GRID = [0, 100, 200, 300]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------------------------
# threshold tuning (pixel labels)
# --------------------------------------------------------------------------------------------------------------------


def _tuning_maps() -> tuple[np.ndarray, np.ndarray]:
    """Slice 0: a 4 x 4 lesion scored 1.0 and a 2 x 2 false blob scored 0.5; slice 1: healthy with the same blob."""
    maps = np.zeros((2, 12, 12), np.float32)
    gt = np.zeros((2, 12, 12), bool)
    maps[0, 2:6, 2:6], gt[0, 2:6, 2:6] = 1.0, True
    maps[0, 8:10, 8:10] = 0.5
    maps[1, 8:10, 8:10] = 0.5
    return maps, gt


@pytest.mark.parametrize(
    "min_size, threshold, dice",
    [
        # no component filter: .25 keeps the blobs (slice 0: 32/36, slice 1: a false positive, ~0) -> .444; .75 is
        # exact on both slices -> 1; 1.5 misses the lesion -> (0 + 1) / 2
        (0, 0.75, 1.0),
        # components of <= 4 px removed: .25 is now exact too; ties go to the lowest candidate
        (4, 0.25, 1.0),
        # components of <= 16 px removed: the lesion goes as well; every candidate gives (0 + 1) / 2 -> the lowest
        (16, 0.25, 0.5),
    ],
)
def test_tune_threshold_known_best(min_size, threshold, dice):
    maps, gt = _tuning_maps()
    thr, best = tune_threshold(maps, gt, [1.5, 0.75, 0.25], min_component_size=min_size, objective="mixed")
    assert thr == threshold
    assert best == pytest.approx(dice, abs=1e-6)


def test_tune_threshold_scores_every_candidate_like_the_protocol():
    maps, gt = _tuning_maps()
    _, at_quarter = tune_threshold(maps, gt, [0.25], min_component_size=0, objective="mixed")
    assert at_quarter == pytest.approx((32 / 36 + 0.0) / 2, abs=1e-6)
    _, too_high = tune_threshold(maps, gt, [1.5], min_component_size=0, objective="mixed")
    assert too_high == pytest.approx(0.5, abs=1e-6)


def test_tune_threshold_pooled_and_unhealthy_values():
    """Pooled: one Dice over all pixels; unhealthy: mean per-slice Dice over lesion slices only."""
    maps, gt = _tuning_maps()
    # .25 keeps the 16-px lesion and two 4-px false blobs: pooled 2*16 / (24 + 16); on the lesion slice 32 / 36
    _, pooled = tune_threshold(maps, gt, [0.25], min_component_size=0, objective="pooled")
    assert pooled == pytest.approx(32 / 40)
    _, unhealthy = tune_threshold(maps, gt, [0.25], min_component_size=0, objective="unhealthy")
    assert unhealthy == pytest.approx(32 / 36, abs=1e-6)
    # 1.5 predicts nothing: pooled Dice 0 (not the healthy fraction)
    _, empty = tune_threshold(maps, gt, [1.5], min_component_size=0, objective="pooled")
    assert empty == 0.0
    assert tune_threshold(maps, gt, [1.5, 0.75, 0.25], min_component_size=0)[0] == 0.75  # default: pooled


def test_tune_threshold_mixed_prefers_empty_masks_on_a_weak_map_pooled_does_not():
    """Three healthy slices with a false blob scored like the lesion's weak part: 'mixed' (the official objective)
    picks the threshold that predicts nothing, 'pooled' picks the one that finds most of the lesion."""
    maps = np.zeros((4, 12, 12), np.float32)
    gt = np.zeros((4, 12, 12), bool)
    gt[0, 2:6, 2:6] = True
    maps[0, 2:6, 2:6] = 0.6
    maps[0, 2:4, 2:6] = 1.0  # half the lesion scores high
    for i in (1, 2, 3):
        maps[i, 8:10, 8:10] = 1.0  # a false blob as strong as the lesion's best half
    candidates = [0.5, 2.0]
    thr_mixed, mixed = tune_threshold(maps, gt, candidates, min_component_size=0, objective="mixed")
    # at 0.5: lesion slice Dice 1, three healthy slices ~0 -> 1/4; at 2.0: empty -> (0 + 3) / 4
    assert thr_mixed == 2.0 and mixed == pytest.approx(0.75, abs=1e-6)
    thr_pooled, pooled = tune_threshold(maps, gt, candidates, min_component_size=0, objective="pooled")
    # at 0.5: 2*16 / (16 + 12 + 16)
    assert thr_pooled == 0.5 and pooled == pytest.approx(32 / 44)
    with pytest.raises(ValueError, match="unknown tuning objective"):
        tune_threshold(maps, gt, candidates, objective="best")
    with pytest.raises(ValueError, match="needs validation slices with lesions"):
        tune_threshold(maps[1:], gt[1:], candidates, objective="unhealthy")


def test_threshold_candidates_quantiles_of_brain_pixels():
    maps = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    np.testing.assert_allclose(threshold_candidates(maps, num=3, levels=(0.5, 1.0)), [49.5, 74.25, 99.0])
    brain = np.zeros_like(maps, dtype=bool)
    brain[0, 0, :] = True  # values 0..9 only
    np.testing.assert_allclose(threshold_candidates(maps, brain, num=3, levels=(0.0, 1.0)), [0.0, 4.5, 9.0])
    # default levels 0.5 .. 0.9995, sorted and unique
    cands = threshold_candidates(maps)
    assert cands[0] == pytest.approx(49.5) and cands[-1] == pytest.approx(np.quantile(np.arange(100), 0.9995))
    assert np.all(np.diff(cands) > 0) and len(cands) == 100
    # a constant map collapses to one candidate; an empty brain is an error
    np.testing.assert_array_equal(threshold_candidates(np.full((2, 4, 4), 0.3)), [0.3])
    with pytest.raises(ValueError, match="no map values"):
        threshold_candidates(maps, np.zeros_like(brain))


# --------------------------------------------------------------------------------------------------------------------
# reconstruction baselines with a perfect model
# --------------------------------------------------------------------------------------------------------------------


class PerfectNet(torch.nn.Module):
    """eps(x_t, t) = (x_t - sqrt(abar_t) x0*) / sqrt(1 - abar_t) for every label: the model "knows" the clean
    (healthy) image x0*, so every x0 prediction is x0* exactly."""

    def __init__(self, x0_star: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("x0_star", x0_star.float())
        self.calls = 0

    def forward(self, x, timesteps, class_labels=None):
        self.calls += 1
        x0 = self.x0_star.repeat(x.shape[0] // self.x0_star.shape[0], 1, 1, 1)
        s0 = SCHEDULE.sqrt_alpha_bar(timesteps, x)
        s1 = SCHEDULE.sqrt_one_minus_alpha_bar(timesteps, x)
        return (x - s0 * x0) / s1


class ShrinkNet(torch.nn.Module):
    """An imperfect deterministic model (eps = 0.3 x_t, 0.5 x_t for healthy), for the noise-dependence tests."""

    def forward(self, x, timesteps, class_labels=None):
        scale = torch.where(class_labels == HEALTHY, 0.5, 0.3).to(x.dtype).view(-1, 1, 1, 1)
        return scale * x


def _clean_and_anomalous() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 16, 16, generator=g) * 1.6 - 0.8  # inside (-1, 1): clipping never acts
    patch = torch.zeros(2, 16, 16, dtype=torch.bool)
    patch[0, 4:10, 5:11] = True
    anomalous = x0.clone()
    anomalous[:, 0][patch] = 0.95  # a bright lesion on channel 0 of slice 0
    return x0, anomalous, patch


@pytest.mark.parametrize("method", ["ddim", "ddim_cfg", "anoddpm"])
def test_reconstruction_with_a_perfect_model(method):
    x0, anomalous, patch = _clean_and_anomalous()
    net = PerfectNet(x0)
    inferer = ReconstructionInferer(
        method, noise_level=200, num_steps=4, guidance_scale=2.0, map_channels=[0, 2], median_kernel=1
    )
    torch.testing.assert_close(inferer.reconstruct(x0, net), x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(inferer.reconstruct(anomalous, net), x0, atol=1e-4, rtol=0)
    out = inferer(x0, net)
    assert out.anomaly_map.shape == (2, 16, 16)
    assert float(out.anomaly_map.abs().max()) < 1e-7  # the map of the healthy image is ~0
    assert not out.mask.any() and out.pred_label.tolist() == [0, 0]  # no threshold: maps only
    # the map of the anomalous image is the squared lesion contrast, averaged over the 2 map channels
    expected = torch.zeros(2, 16, 16)
    expected[0][patch[0]] = (0.95 - x0[0, 0][patch[0]]) ** 2 / 2
    torch.testing.assert_close(inferer(anomalous, net).anomaly_map, expected, atol=1e-4, rtol=0)
    # with a threshold the mask is the lesion (36 px, above the component filter)
    inferer.threshold, inferer.min_component_size = 1e-3, 10
    out = inferer(anomalous, net)
    assert torch.equal(out.mask, patch & (expected > 1e-3)) and out.pred_label.tolist() == [1, 0]


def test_reconstruction_network_calls():
    x0, _, _ = _clean_and_anomalous()
    for method, calls in (("ddim", 4 + 5), ("ddim_cfg", 4 + 5), ("anoddpm", 5)):
        net = PerfectNet(x0)
        ReconstructionInferer(method, noise_level=200, num_steps=4).reconstruct(x0, net)
        assert net.calls == calls, method  # grid 0, 50, 100, 150, 200: 4 encoding moves, 5 decoding predictions


def test_anoddpm_is_reproducible_with_a_seed():
    _, anomalous, _ = _clean_and_anomalous()
    net = ShrinkNet()

    def run(seed):
        return ReconstructionInferer("anoddpm", noise_level=300, num_steps=5, seed=seed).reconstruct(anomalous, net)

    torch.testing.assert_close(run(0), run(0), atol=0, rtol=0)
    assert not torch.allclose(run(0), run(1))
    ddim = ReconstructionInferer("ddim", noise_level=300, num_steps=5)
    torch.testing.assert_close(ddim.reconstruct(anomalous, net), ddim.reconstruct(anomalous, net), atol=0, rtol=0)


def test_reconstruction_inferer_errors():
    with pytest.raises(ValueError, match="method"):
        ReconstructionInferer("ddpm", noise_level=100)
    for level in (0, 1000):
        with pytest.raises(ValueError, match="noise_level"):
            ReconstructionInferer("ddim", noise_level=level)
    with pytest.raises(ValueError, match="guidance_scale"):
        ReconstructionInferer("ddim_cfg", noise_level=100, guidance_scale=-1)


# --------------------------------------------------------------------------------------------------------------------
# the intensity floor
# --------------------------------------------------------------------------------------------------------------------

# channel 1 values -> bright: (x + 1) / 2; dark: (1 - x) / 2 inside the head, 0 for the background at -1
INTENSITY_VALUES = [-1.0, -0.5, 0.0, 0.5, 1.0]
BRIGHT = [0.0, 0.25, 0.5, 0.75, 1.0]
DARK = [0.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("polarity, expected", [("bright", BRIGHT), ("dark", DARK)])
def test_intensity_inferer_by_hand(polarity, expected):
    x = torch.zeros(1, 2, 1, 5)
    x[0, 0] = 0.9  # channel 0 is ignored
    x[0, 1, 0] = torch.tensor(INTENSITY_VALUES)
    out = IntensityInferer(channel=1, median_kernel=1, min_component_size=0, polarity=polarity)(x)
    torch.testing.assert_close(out.anomaly_map[0, 0], torch.tensor(expected))
    assert not out.mask.any() and out.pred_label.tolist() == [0] and out.reconstruction is None
    out = IntensityInferer(1, threshold=0.5, median_kernel=1, min_component_size=0, polarity=polarity)(x)
    assert out.mask[0, 0].tolist() == [v >= 0.5 for v in expected]
    assert out.pred_label.tolist() == [1]


def test_intensity_inferer_rejects_unknown_polarity():
    with pytest.raises(ValueError, match="polarity"):
        IntensityInferer(polarity="both")


# --------------------------------------------------------------------------------------------------------------------
# summary_markdown
# --------------------------------------------------------------------------------------------------------------------


def test_summary_markdown_formatting():
    summary = {
        "num_test_slices": 120,
        "num_unhealthy": 45,
        "test_cases": ["a", "b"],
        "methods": {
            "anofpdm_ddpm": {
                "label": "AnoFPDM (DDPM)",
                "tuning": "image labels only",
                "seeds": [0, 1, 2],
                "metrics": {
                    "mixed_dice": {"mean": 0.77449, "std": 0.01234},
                    "unhealthy_dice": {"mean": 0.6, "std": 0.0},
                    "auroc": {"mean": math.nan, "std": math.nan},
                    "accuracy": {"mean": None, "std": None},
                },
            },
            "ddim": {
                "label": "DDIM",
                "tuning": "pixel labels",
                "seeds": [0],
                "metrics": {"mixed_dice": {"mean": 0.5, "std": 0.0}, "pooled_auprc": {"mean": 0.123, "std": 0.0}},
            },
        },
    }
    text = summary_markdown(summary)
    lines = text.splitlines()
    assert lines[0].startswith("| Method | Tuned with | Mixed Dice | Mixed IoU | Mixed AUPRC | Unhealthy Dice")
    assert lines[1] == "|" + "---|" * 12
    ddpm = [c.strip() for c in lines[2].strip("|").split("|")]
    assert ddpm[:4] == ["AnoFPDM (DDPM)", "image labels only", "77.4 ± 1.2", "n/a"]
    assert ddpm[5] == "60.0 ± 0.0"  # unhealthy dice of a multi-seed row keeps its (zero) std
    assert ddpm[10] == "n/a" and ddpm[11] == "n/a"  # None and NaN
    ddim = [c.strip() for c in lines[3].strip("|").split("|")]
    assert ddim[:3] == ["DDIM", "pixel labels", "50.0"] and ddim[8] == "12.3" and "±" not in lines[3]
    assert "120 test slices (45 unhealthy) from 2 case(s)" in text


# --------------------------------------------------------------------------------------------------------------------
# Evaluator end to end
# --------------------------------------------------------------------------------------------------------------------

# a tiny class-conditioned MONAI UNet without attention (attention dominates the CPU time at this size)
MICRO = {
    "channels": (8, 16),
    "attention_levels": (False, False),
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "dropout": 0.0,
}
E2E_METHODS = ["anofpdm", "anofpdm_last", "anofpdm_tuned", "ddim", "intensity", "anofpdm_ddpm"]


class Counting(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, timesteps, class_labels=None):
        self.calls += 1
        return self.net(x, timesteps=timesteps, class_labels=class_labels)


def _micro_net(seed: int = 0) -> torch.nn.Module:
    """Untrained, with perturbed weights (MONAI zero-initialises the output convolution: eps would be 0)."""
    torch.manual_seed(seed)
    net = build_diffusion_unet(len(BRATS), MICRO, use_flash_attention=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluation")
    datalist = make_dataset(
        root / "data",
        phantom_anatomy((32, 40, 24)),
        splits={"validation": 2, "test": 1},
        lesion_radius=4.0,
        deformation=1.0,
    )
    pre = VolumePreprocessor(image_size=32)
    kwargs = dict(progress=False, require_labels=True)
    val = SliceDataset.from_datalist(datalist, root / "data", "validation", root / "cache", pre, **kwargs)
    test = SliceDataset.from_datalist(datalist, root / "data", "test", root / "cache", pre, **kwargs)
    assert set(val.slice_labels) == {0, 1} and set(test.slice_labels) == {0, 1}
    return {"root": root, "val": val, "test": test}


def _evaluator(datasets, output_dir, network, **kwargs) -> Evaluator:
    options = dict(
        methods=E2E_METHODS,
        seeds=[0, 1],
        noise_levels=[100],
        num_steps=3,
        guidance_scales=[0.5, 2.0],
        settings=AnoFPDMSettings(timesteps=GRID),
        median_kernel=3,
        min_component_size=0,
        batch_size=64,
        progress=False,
    )
    options.update(kwargs)
    return Evaluator(
        network, "digest0", BRATS, ["flair", "t2"], datasets["val"], datasets["test"], output_dir, **options
    )


@pytest.fixture(scope="module")
def evaluated(datasets) -> dict:
    out = datasets["root"] / "out"
    net = Counting(_micro_net())
    summary = _evaluator(datasets, out, net).run()
    assert net.calls > 0
    return {"out": out, "summary": summary}


def test_evaluator_outputs(evaluated, datasets):
    out = evaluated["out"]
    for name in ("metrics.csv", "summary.json", "summary.md", "tuning.json", "calibration_ddim.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "calibration_ddpm.json").is_file()  # the DDPM variant has its own calibration (image labels)
    for name in ("overlay.png", "curves.png", "pr_curves.png"):
        data = (out / "figures" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary files left behind"

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == E2E_METHODS
    assert summary["num_test_slices"] == len(datasets["test"])
    assert summary["num_unhealthy"] == int(datasets["test"].slice_labels.sum())
    for method, entry in summary["methods"].items():
        assert entry["seeds"] == ([0, 1] if method == "anofpdm_ddpm" else [0])
        assert entry["tuning"] == METHODS[method].tuning
        assert 0.0 <= entry["metrics"]["mixed_dice"]["mean"] <= 1.0
    assert summary["methods"]["intensity"]["label"] == "FLAIR intensity threshold"
    assert set(summary["methods"]["ddim"]["tuned"]) == {"noise_level", "threshold", "val_dice"}
    assert "threshold" in summary["methods"]["anofpdm_tuned"]["tuned"]
    assert "auroc" in summary["methods"]["anofpdm"]["metrics"]

    lines = (out / "summary.md").read_text().splitlines()
    assert lines[0].startswith("| Method | Tuned with | Mixed Dice | Mixed IoU | Mixed AUPRC |")
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert len(rows) == len(E2E_METHODS)
    flags = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in rows}
    assert flags == {
        "AnoFPDM (DDIM)": "image labels only",
        "AnoFPDM (DDIM), S_te only": "image labels only",
        "AnoFPDM (DDIM), threshold tuned": "pixel labels",
        "DDIM": "pixel labels",
        "FLAIR intensity threshold": "pixel labels",
        "AnoFPDM (DDPM)": "image labels only",
    }
    ddpm_row = next(row for row in rows if row.startswith("| AnoFPDM (DDPM) "))
    assert "±" in ddpm_row  # mean ± std over the two seeds
    assert "±" not in "".join(row for row in rows if not row.startswith("| AnoFPDM (DDPM) "))


def test_metrics_csv_matches_stored_masks(evaluated, datasets):
    out, test = evaluated["out"], datasets["test"]
    metrics = pd.read_csv(out / "metrics.csv")
    n = len(test)
    assert len(metrics) == n * (len(E2E_METHODS) + 1)  # the DDPM variant twice (two seeds)
    table = test.table
    nonempty = 0
    for (method, seed), rows in metrics.groupby(["method", "seed"], sort=False):
        parts_pred, parts_gt = [], []
        for case, case_rows in table.groupby("case_id", sort=False)["row"]:
            stored = np.load(out / "cases" / method / f"seed{seed}" / f"{case}.npz")
            parts_pred.append(stored["mask"].astype(bool))
            parts_gt.append(np.asarray(test.cache.arrays(str(case))["label"])[case_rows.to_numpy()].astype(bool))
        pred, gt = np.concatenate(parts_pred), np.concatenate(parts_gt)
        assert pred.shape == gt.shape == (n, 32, 32)
        inter = (pred & gt).sum(axis=(1, 2))
        dice = (2.0 * inter + 1e-6) / (pred.sum(axis=(1, 2)) + gt.sum(axis=(1, 2)) + 1e-6)
        np.testing.assert_allclose(rows["dice_mixed"].to_numpy(), dice, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(rows["mask_area"].to_numpy(), pred.sum(axis=(1, 2)))
        np.testing.assert_array_equal(rows["label"].to_numpy(), gt.any(axis=(1, 2)).astype(int))
        np.testing.assert_array_equal(rows["source_index"].to_numpy(), table["source_index"].to_numpy())
        nonempty += int(pred.any())
    assert nonempty > 0  # some methods produced non-empty masks: the comparison is not vacuous


def test_per_case_tables_and_monai_reports(evaluated, datasets):
    """cases.csv holds one row per (method, seed, case): its 3D Dice is recomputed here from the stored masks; the
    MONAI metrics reports (MetricsSaver layout) of each method and seed carry the same per-case values."""
    out, test = evaluated["out"], datasets["test"]
    cases = pd.read_csv(out / "cases.csv")
    case_ids = list(dict.fromkeys(test.table["case_id"].astype(str)))
    assert len(cases) == len(case_ids) * (len(E2E_METHODS) + 1)
    for (method, seed), rows in cases.groupby(["method", "seed"], sort=False):
        assert rows["case_id"].astype(str).tolist() == case_ids
        for case, case_rows in test.table.groupby("case_id", sort=False)["row"]:
            pred = np.load(out / "cases" / method / f"seed{seed}" / f"{case}.npz")["mask"].astype(bool)
            gt = np.asarray(test.cache.arrays(str(case))["label"])[case_rows.to_numpy()].astype(bool)
            dice = (2.0 * (pred & gt).sum() + 1e-6) / (pred.sum() + gt.sum() + 1e-6)
            mine = rows.loc[rows["case_id"].astype(str) == str(case), "volume_dice"].item()
            assert mine == pytest.approx(dice, rel=1e-9), (method, seed, case)
        report = out / "metrics_reports" / f"{method}_seed{seed}"
        raw = pd.read_csv(report / "volume_dice_raw.csv", sep=",")
        assert raw.iloc[:, 0].astype(str).tolist() == case_ids
        # MONAI writes 4 decimals
        np.testing.assert_allclose(raw.iloc[:, 1].to_numpy(), rows["volume_dice"].to_numpy(), atol=1e-4)
        summary = (report / "volume_dice_summary.csv").read_text()
        assert "mean" in summary.splitlines()[0] and "notnans" in summary.splitlines()[0]
        overall = dict(line.split(",") for line in (report / "metrics.csv").read_text().splitlines())
        assert float(overall["volume_dice"]) == pytest.approx(rows["volume_dice"].mean(), abs=1e-4)


def test_extra_metrics_from_json(evaluated, datasets, tmp_path):
    """evaluate.json's ``extra_metrics``: stock MONAI metrics configured in JSON become summary columns; MONAI's
    DiceMetric on the ungated masks of the lesion slices reproduces the papers' unhealthy Dice (which adds 1e-6 to
    numerator and denominator), this project's VolumeDiceMetric per case the 3D Dice. The stored results are reused."""
    import shutil

    from monai.bundle import ConfigParser

    out = tmp_path / "out"
    shutil.copytree(evaluated["out"], out)
    parser = ConfigParser(
        {
            "extra_metrics": {
                "monai_dice": {
                    "_target_": "anofpdm_monai.evaluation.ResultMetric",
                    "metric": {"_target_": "monai.metrics.DiceMetric", "include_background": True},
                    "y_pred": "mask_ungated",
                    "unhealthy_only": True,
                },
                "dice_3d": {
                    "_target_": "anofpdm_monai.evaluation.ResultMetric",
                    "metric": {"_target_": "anofpdm_monai.metrics.VolumeDiceMetric"},
                    "per_case": True,
                },
            }
        }
    )
    net = Counting(_micro_net())
    summary = _evaluator(datasets, out, net, extra_metrics=parser.get_parsed_content("extra_metrics")).run()
    assert net.calls == 0
    checked = 0
    for method, entry in summary["methods"].items():
        m = {k: v["mean"] for k, v in entry["metrics"].items()}
        assert m["dice_3d"] == pytest.approx(m["volume_dice"], rel=1e-9, abs=1e-12), method
        assert m["monai_dice"] == pytest.approx(m["unhealthy_dice"], abs=1e-5), method
        checked += m["unhealthy_dice"] > 0.01
    assert checked > 0, "some method must have non-trivial masks (else the comparison is vacuous)"
    with pytest.raises(ValueError, match=r"extra_metrics\['bad'\] must be an anofpdm_monai.evaluation.ResultMetric"):
        _evaluator(datasets, out, net, extra_metrics={"bad": object()})


def test_rerun_reuses_the_stored_results(evaluated, datasets):
    out = evaluated["out"]
    before = {name: (out / name).read_text() for name in ("summary.json", "metrics.csv", "summary.md")}
    npz = sorted((out / "cases").rglob("*.npz"))
    mtimes = {p: p.stat().st_mtime_ns for p in npz}
    net = Counting(_micro_net())
    _evaluator(datasets, out, net).run()
    assert net.calls == 0, "a rerun must reuse the calibration, the tuning and the per-case results"
    assert {p: p.stat().st_mtime_ns for p in npz} == mtimes
    for name, text in before.items():
        assert (out / name).read_text() == text, name


def test_rerun_with_other_settings_recomputes(evaluated, datasets, tmp_path):
    """Stored per-case results and calibrations are reused only for the setting they were made with."""
    out = tmp_path / "out"
    methods = ["anofpdm", "intensity"]
    _evaluator(datasets, out, _micro_net(), methods=methods, seeds=[0]).run()
    first = np.load(out / "cases" / "anofpdm" / "seed0" / f"{datasets['test'].table['case_id'][0]}.npz")
    np.testing.assert_array_equal(first["timesteps"], GRID)

    # another step grid: recalibrated AND the AnoFPDM test results recomputed on the new grid
    grid = [0, 150, 300]
    _evaluator(datasets, out, _micro_net(), methods=methods, seeds=[0], settings=AnoFPDMSettings(timesteps=grid)).run()
    assert Calibration.load(out / "calibration_ddim.json").timesteps == grid
    case = datasets["test"].table["case_id"][0]
    np.testing.assert_array_equal(np.load(out / "cases" / "anofpdm" / "seed0" / f"{case}.npz")["timesteps"], grid)
    steps = json.loads((out / "summary.json").read_text())
    assert steps["methods"]["anofpdm"]["seeds"] == [0]

    # another forward-process option: recalibrated
    options = AnoFPDMSettings(timesteps=grid, reference="healthy")
    _evaluator(datasets, out, _micro_net(), methods=methods, seeds=[0], settings=options).run()
    assert Calibration.load(out / "calibration_ddim.json").reference == "healthy"

    # other post-processing: the intensity floor is re-tuned and recomputed with it
    tuned = json.loads((out / "tuning.json").read_text())["intensity"]
    net = Counting(_micro_net())
    _evaluator(datasets, out, net, methods=["intensity"], seeds=[0], median_kernel=1, settings=options).run()
    retuned = json.loads((out / "tuning.json").read_text())["intensity"]
    assert retuned != tuned
    stored = np.load(out / "cases" / "intensity" / "seed0" / f"{case}.npz")
    image = np.stack([datasets["test"][i]["image"][0].numpy() for i in range(len(datasets["test"]))])
    np.testing.assert_allclose(stored["map"], (image + 1) / 2, atol=1e-6)  # unfiltered: median_kernel 1


def test_given_calibration_post_processing_override(datasets, tmp_path, monkeypatch):
    """median_kernel / min_component_size given to the Evaluator apply to every method, AnoFPDM included."""
    cal = Calibration(
        guidance_scale=2.0,
        m_max=[0.05, 0.05],
        m_max_joint=0.05,
        tau=0.5,
        settings=AnoFPDMSettings(timesteps=GRID, median_kernel=5, min_component_size=40),
        map_modalities=["flair", "t2"],
        map_channels=[0, 3],
        checkpoint_digest="digest0",
    )
    made = []
    original = AnoFPDMInferer.from_calibration.__func__

    def spy(cls, calibration, **overrides):
        inferer = original(cls, calibration, **overrides)
        made.append(inferer)
        return inferer

    monkeypatch.setattr(AnoFPDMInferer, "from_calibration", classmethod(spy))
    ev = _evaluator(datasets, tmp_path, _micro_net(), calibration=cal, methods=["anofpdm", "anofpdm_last"], seeds=[0])
    ev.run()
    assert made and all((i.median_kernel, i.min_component_size) == (3, 0) for i in made)
    # without explicit values, the calibration's are used
    made.clear()
    ev = Evaluator(
        _micro_net(),
        "digest0",
        BRATS,
        ["flair", "t2"],
        datasets["val"],
        datasets["test"],
        tmp_path / "b",
        calibration=cal,
        methods=["anofpdm"],
        seeds=[0],
        progress=False,
    )
    assert (ev.median_kernel, ev.min_component_size) == (5, 40)
    ev.run()
    assert made and all((i.median_kernel, i.min_component_size) == (5, 40) for i in made)


def test_given_calibration_for_another_checkpoint_or_modalities(datasets, tmp_path):
    cal = Calibration(
        guidance_scale=2.0,
        m_max=[0.05],
        m_max_joint=0.05,
        tau=0.5,
        settings=AnoFPDMSettings(timesteps=GRID),
        map_modalities=["t1"],
        map_channels=[1],
        checkpoint_digest="digest0",
    )
    ev = _evaluator(datasets, tmp_path, _micro_net(), calibration=cal, methods=["anofpdm"], seeds=[0])
    with pytest.raises(CalibrationError, match="map_channels"):
        ev.run()
    cal.map_channels, cal.checkpoint_digest = [0, 3], "another"
    ev = _evaluator(datasets, tmp_path, _micro_net(), calibration=cal, methods=["anofpdm"], seeds=[0])
    with pytest.raises(CalibrationError, match="checkpoint_digest"):
        ev.run()


def test_ddpm_calibration_keeps_every_option_of_the_given_calibration(datasets, tmp_path):
    """The DDPM row is calibrated here with the given (DDIM) calibration's settings, only the forward mode differs:
    its quantile range used to fall back to the default (0.90, 0.98)."""
    given = Calibration(
        settings=AnoFPDMSettings(
            timesteps=GRID, quantile_range=(0.80, 0.95), reference="healthy", min_component_size=0
        ),
        guidance_scale=2.0,
        m_max=[0.05, 0.05],
        m_max_joint=0.05,
        tau=0.5,
        map_modalities=["flair", "t2"],
        map_channels=[0, 3],
        checkpoint_digest="digest0",
        candidates=[{"guidance_scale": 0.5}, {"guidance_scale": 2.0}],
    )
    ev = _evaluator(datasets, tmp_path, _micro_net(), calibration=given, methods=["anofpdm_ddpm"], seeds=[0])
    ev.run()
    made = Calibration.load(tmp_path / "calibration_ddpm.json")
    assert made.forward == "ddpm"
    assert made.quantile_range == (0.80, 0.95)
    assert made.settings.differences(given.settings, ("timesteps", "reference", "divergence", "end_step")) == []
    assert made.settings.replace(forward="ddim") == given.settings.replace(median_kernel=3)
