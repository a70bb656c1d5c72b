"""benchmarks/bench_grid.py: its grid builders and early-exit rule, the DDPM step recording against the library's
streamed forward process, the prefix statistics of a DDIM run against a run on the prefix grid, and one end-to-end
run on a tiny random-weight checkpoint and a synthetic datalist."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_grid as bg  # noqa: E402

from anofpdm_monai.calibration import Calibration  # noqa: E402
from anofpdm_monai.data import VolumePreprocessor  # noqa: E402
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy  # noqa: E402
from anofpdm_monai.inferers import AnoFPDMInferer  # noqa: E402
from anofpdm_monai.networks import build_diffusion_unet, save_checkpoint  # noqa: E402
from anofpdm_monai.schedule import NoiseSchedule  # noqa: E402
from anofpdm_monai.settings import AnoFPDMSettings  # noqa: E402


def _network(channels: int = 1) -> torch.nn.Module:
    """A tiny network whose zero-initialised layers are re-drawn, so that the label changes its prediction."""
    torch.manual_seed(0)
    net = build_diffusion_unet(channels, "tiny", use_flash_attention=False)
    for module in net.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() > 1 and not weight.detach().any():
            module.reset_parameters()
    return net.eval()


def test_grid_builders():
    assert bg.uniform_grid(599, 10) == list(range(0, 600, 10))
    assert bg.uniform_grid(599, 1)[-1] == 599 and len(bg.uniform_grid(599, 30)) == 20
    g = bg.nonuniform_grid(599, (200, 300), 10, 50)
    assert g[0] == 0 and g[-1] == 599 and g == sorted(set(g))
    inside = [t for t in g if 200 <= t <= 300]
    assert inside == list(range(200, 301, 10))
    assert [t for t in g if t < 200] == [0, 50, 100, 150]
    assert [t for t in g if t > 300] == [350, 400, 450, 500, 550, 599]
    # quantiles of the validation t_e, widened by the margin and rounded outwards to multiples of 10
    assert bg.dense_range(np.array([100, 120, 130, 140, 200]), 599, (0.0, 1.0), margin=15) == (80, 220)
    assert bg.dense_range(np.array([5, 590]), 599, (0.0, 1.0), margin=30) == (0, 599)


def test_early_exit_stop():
    t = list(range(0, 100, 10))  # K = 10
    curve = np.array([1, 3, 5, 4, 2, 1, 0.5, 0.4, 0.3, 6.0])  # peak at t=20; a late bigger peak at t=90
    div = np.stack([curve, curve[::-1].copy()])[..., None]  # (2, 10, 1); the second rises until t=0's mirror
    stop = bg.early_exit_stop(div, t, drop=0.5, patience=20)
    # slice 0: running max 5 at t=20; M <= 2.5 first at t=40, and 40 - 20 >= 20: stop at index 4
    assert stop[0] == 4
    # slice 1 (6, .3, .4, .5, 1, 2, 4, 5, 3, 1): max 6 at t=0, falls at t=10 and has waited 20 steps at t=20
    assert stop[1] == 2
    # never triggers with a drop it cannot reach: the whole grid
    assert (bg.early_exit_stop(div, t, drop=0.99, patience=20) == 9).all()
    # every modality must have peaked: a second modality still rising keeps the slice going
    rising = np.stack([np.stack([curve, np.arange(10.0)], -1)])
    assert bg.early_exit_stop(rising, t, drop=0.5, patience=20)[0] == 9


def test_ddpm_recording_equals_the_streamed_run():
    net = _network()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    inferer = AnoFPDMInferer(AnoFPDMSettings(t_max=11, stride=1, forward="ddpm"), guidance_scale=2.0, map_channels=[0])
    streamed = inferer.forward_process(x, net)
    rec = bg.select_w(bg.record_ddpm(net, inferer, x, need_maps=True), 0)
    rebuilt, inexact = bg.result_for(rec, w=2.0)
    assert inexact == 0
    for key in ("divergence", "mse_guided", "mse_reference", "end_index", "end_index_joint"):
        torch.testing.assert_close(getattr(rebuilt, key), getattr(streamed, key), atol=1e-6, rtol=1e-5, msg=key)
    torch.testing.assert_close(rebuilt.cosine(), streamed.cosine(), atol=1e-6, rtol=1e-5)
    # maps from float16 steps
    torch.testing.assert_close(rebuilt.anomaly_maps(), streamed.anomaly_maps(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(rebuilt.anomaly_maps("joint"), streamed.anomaly_maps("joint"), atol=2e-3, rtol=2e-3)


def test_prefix_of_a_ddim_run_is_the_run_on_the_prefix_grid():
    net = _network()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    full = AnoFPDMInferer(AnoFPDMSettings(timesteps=list(range(0, 40, 4))), guidance_scale=2.0, map_channels=[0])
    arrays = bg.select_w(bg.arrays_of(full.forward_process(x, net)), 0)
    stop = np.array([9, 6, 4])
    cut, inexact = bg.result_for(arrays, stop=stop, w=2.0)
    for b, k in enumerate(stop):
        prefix = AnoFPDMInferer(
            AnoFPDMSettings(timesteps=list(range(0, 4 * (k + 1), 4))), guidance_scale=2.0, map_channels=[0]
        )
        r = prefix.forward_process(x, net)  # the whole batch: the same first-step noise
        torch.testing.assert_close(cut.divergence[0, b, : k + 1], r.divergence[0, b], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cut.cosine()[0, b], r.cosine()[0, b], atol=1e-6, rtol=1e-5)
        assert int(cut.end_index[0, b, 0]) == int(r.end_index[0, b, 0])
        moved = int(cut.end_index[0, b, 0]) != int(arrays["end_index"][b, 0])
        if not moved:
            torch.testing.assert_close(cut.anomaly_maps()[0, b], r.anomaly_maps()[0, b], atol=1e-6, rtol=1e-5)
    assert inexact == sum(int(cut.end_index[0, b, 0]) != int(arrays["end_index"][b, 0]) for b in range(3))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    anatomy = phantom_anatomy(shape=(24, 28, 12), spacing=8.0)
    dl = make_dataset(
        root / "data", anatomy, splits={"validation": 2, "test": 2}, modalities=["flair"], lesion_fraction=1.0
    )
    (root / "datalist.json").write_text(json.dumps(dl))
    pre = VolumePreprocessor(modalities=["flair"], image_size=16)
    net = _network()
    checkpoint = save_checkpoint(root / "model.pt", net, ema=net, preprocessing=pre, schedule=NoiseSchedule())
    settings = AnoFPDMSettings(t_max=11, stride=3, min_component_size=2).with_grid()  # grid 0..9: t_max 9
    cal = Calibration(
        settings=settings,
        guidance_scale=2.0,
        m_max=[1e-3],
        m_max_joint=1e-3,
        tau=0.5,
        map_modalities=["flair"],
        map_channels=[0],
    )
    cal.save(root / "calibration.json")
    return root, checkpoint


def test_end_to_end_on_a_tiny_checkpoint(tiny_study, capsys):
    root, checkpoint = tiny_study
    argv = [
        "--checkpoint", str(checkpoint), "--datalist", str(root / "datalist.json"),
        "--dataset-dir", str(root / "data"), "--cache-dir", str(root / "cache"),
        "--calibration", str(root / "calibration.json"), "--output", str(root / "out"),
        "--strides", "1", "2", "4", "--dense", "1", "4", "--early-exit", "0.3", "2", "--val-slices", "6",
        "--test-slices", "6", "--batch-size", "8", "--t-max", "9", "--measure", "2", "2",
        "--range-grid", "0", "4", "1", "3", "--bootstrap", "50",
    ]  # fmt: skip
    assert bg.main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads((root / "out" / "bench_grid.json").read_text())["rows"]
    for forward in ("ddim", "ddpm"):
        mine = {r["grid"]: r for r in rows if r["forward"] == forward}
        assert {"stride 1", "stride 2", "stride 4"} <= set(mine)
        ref = mine["stride 1"]
        assert ref["evals"] == 20 and ref["d_unhealthy_dice"] == 0 and ref["map_r"] == pytest.approx(1.0)
        assert mine["stride 4"]["evals"] == 6 and mine["stride 4"]["steps"] == 3
        assert any(g.startswith("dense 1 in") for g in mine)
        # the bootstrap interval of stride 1 against itself is [0, 0]; every row has one
        assert all(ci == [0.0, 0.0] for ci in ref["ci"].values()) and all("ci" in r for r in mine.values())
        assert all(lo <= hi for r in mine.values() for lo, hi in r["ci"].values())
        if forward == "ddim":  # grid 0, 2, 4, 6, 8 measured at 0, 4, 8: 5 + 3 evaluations; the fixed-range grid
            sparse = mine["stride 2, measured every 2"]
            assert (sparse["evals"], sparse["steps"]) == (8, 3)
            assert mine["1 in 0..4, 3 outside"]["steps"] == len(bg.nonuniform_grid(9, (0, 4), 1, 3))
        exits = [r for g, r in mine.items() if "early exit" in g]
        assert exits and all(r["evals"] <= 2 * r["steps"] for r in exits)
        for r in mine.values():
            assert all(np.isfinite(r[k]) for k in ("unhealthy_dice", "mixed_dice", "pooled_auprc", "accuracy", "map_r"))
    # DDPM rows come from the one recorded pass: the same stride 1 draws, so a sub-grid's first step agrees
    assert "cheapest grid within 1 point" in out or "no" in out
    assert "skip brain <" in out
    # a rerun reads every forward process from the cache (no new files)
    cached = sorted((root / "out" / "cache").iterdir())
    assert bg.main(argv) == 0
    assert sorted((root / "out" / "cache").iterdir()) == cached


def test_bootstrap_metrics_equal_the_library_on_duplicated_slices():
    """A replicate's weights are slice counts: the weighted metrics must equal the library's metrics on the slices
    repeated that many times (tied map values included), and the weights redraw each volume's slices within it."""
    from types import SimpleNamespace

    from anofpdm_monai.metrics import segmentation_metrics

    rng = np.random.default_rng(4)
    n, size = 12, 6
    label = rng.uniform(size=(n, size, size)) < 0.25
    label[:4] = False  # healthy slices
    brain = rng.uniform(size=(n, size, size)) < 0.8
    label &= brain
    maps = np.round(rng.uniform(size=(n, size, size)) + 0.6 * label, 1)  # rounded: many tied values
    out = SimpleNamespace(
        mask=torch.from_numpy(maps > 0.9),
        mask_ungated=torch.from_numpy(maps > 0.8),
        filtered_map=torch.from_numpy(maps),
    )
    gt = {
        "label": label,
        "brain": brain,
        "y": label.reshape(n, -1).any(1).astype(np.int64),
        "case": np.array(["a"] * 5 + ["b"] * 4 + ["c"] * 3),
    }
    tidx = np.arange(n)
    parts = bg.SliceParts(out, gt, tidx)
    counts = np.array([2, 0, 1, 3, 1, 1, 0, 2, 2, 1, 0, 4], dtype=float)
    rep = np.repeat(tidx, counts.astype(int))
    lib = segmentation_metrics(
        out.mask.numpy()[rep], out.mask_ungated.numpy()[rep], label[rep], maps[rep], brain[rep],
        gt["y"][rep], gt["case"][rep],
    )  # fmt: skip
    mine = parts.metrics(counts)
    for k in bg.BOOT_METRICS:
        assert mine[k] == pytest.approx(lib[k], rel=1e-12), k
    w = bg.bootstrap_weights(parts.volume, 200, seed=1)
    assert w.shape == (200, n) and (w.sum(1) == n).all()
    for v, size_v in ((0, 5), (1, 4), (2, 3)):
        assert (w[:, parts.volume == v].sum(1) == size_v).all()
    same = bg.paired_intervals(parts, parts, w)
    assert all(ci == (0.0, 0.0) for ci in same.values())
