# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""One post-processing chain (issue 24 item 2): the evaluation's path (``AnoFPDMInferer.postprocess``, which the
runner calls on each batch: :func:`~anofpdm_monai.postprocessing.binarize_map` then health gating) and the NIfTI
writer's path (the volume inferer's outputs through the ``postprocessing`` transforms of ``inference.json`` and of
:func:`~anofpdm_monai.apps.inference.default_postprocessing`: median filter, per-slice threshold, component
removal, health gating) turn the same map, thresholds and health labels into identical masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose

from anofpdm_monai.apps.inference import default_postprocessing
from anofpdm_monai.inferers import AnoFPDMInferer, AnoFPDMVolumeInferer
from anofpdm_monai.networks import build_diffusion_unet
from anofpdm_monai.postprocessing import binarize_map
from anofpdm_monai.settings import AnoFPDMSettings

REPO = Path(__file__).resolve().parents[1]
CHAIN = ("MedianFilterSlicesd", "ThresholdSlicesd", "RemoveSmallComponentsSlicesd", "HealthGated")


def _bundle_chain(median_kernel: int, min_component_size: int) -> Compose:
    """The map-to-mask transforms of the inference bundle's ``postprocessing``, parsed from the config."""
    parser = ConfigParser()
    parser.read_config(REPO / "bundles" / "common" / "configs" / "inference.json")
    parser["settings"] = {
        "_target_": "anofpdm_monai.settings.AnoFPDMSettings",
        "median_kernel": median_kernel,
        "min_component_size": min_component_size,
    }
    targets = [t["_target_"].rsplit(".", 1)[-1] for t in parser["postprocessing"]["transforms"]]
    idx = [targets.index(name) for name in CHAIN]
    assert idx == list(range(idx[0], idx[0] + len(CHAIN))), targets  # consecutive, in this order
    return Compose([parser.get_parsed_content(f"postprocessing#transforms#{i}") for i in idx])


def _app_chain(median_kernel: int, min_component_size: int, tmp_path: Path) -> Compose:
    settings = AnoFPDMSettings(median_kernel=median_kernel, min_component_size=min_component_size)
    full = default_postprocessing(Compose([]), tmp_path, ["t1w"], settings)
    chain = [t for t in full.transforms if type(t).__name__ in CHAIN]
    assert [type(t).__name__ for t in chain] == list(CHAIN)
    return Compose(chain)


def _writer_path(chain: Compose, maps: torch.Tensor, threshold: torch.Tensor, pred_label: torch.Tensor):
    """(D, H, W) slices -> the writer's (1, H, W, D) item -> (filtered map, mask) back as (D, H, W)."""
    item = {"anomaly_map": maps.permute(1, 2, 0)[None], "threshold": threshold, "pred_label": pred_label}
    out = chain(item)
    return out["anomaly_map"][0].permute(2, 0, 1), out["anomaly_mask"][0].permute(2, 0, 1)


def _evaluation_path(maps, threshold, pred_label, median_kernel, min_component_size):
    """What ``AnoFPDMInferer.postprocess`` does with the slices' thresholds (``mask`` is the gated mask)."""
    filtered, ungated = binarize_map(maps, threshold, median_kernel, min_component_size)
    return filtered, ungated & pred_label.bool()[:, None, None]


def _synthetic(d: int = 7, size: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(d, size, size, generator=g) * 0.6  # noise above some thresholds: speckles
    for k in range(d):  # blobs of several sizes, some at the border, so the filters have work to do
        for r, c, h in ((2, 3, 6), (12, 14, 3), (0, 18, 4), (20, 2, 2)):
            maps[k, r : r + h, c : c + h] += 0.5 + 0.1 * k
    threshold = torch.tensor([0.4, 0.55, 0.5, float("inf"), 0.45, 0.9, 0.35])[:d]
    pred_label = torch.tensor([1, 1, 0, 1, 1, 1, 0])[:d]
    return maps, threshold, pred_label


@pytest.mark.parametrize("median_kernel,min_component_size", [(5, 40 * 24 * 24 // 128**2 + 4), (3, 2), (1, 0)])
def test_same_masks_on_synthetic_maps(median_kernel, min_component_size, tmp_path):
    maps, threshold, pred_label = _synthetic()
    ref_map, ref_mask = _evaluation_path(maps, threshold, pred_label, median_kernel, min_component_size)
    assert ref_mask.any() and not ref_mask.all()
    for chain in (
        _bundle_chain(median_kernel, min_component_size),
        _app_chain(median_kernel, min_component_size, tmp_path),
    ):
        w_map, w_mask = _writer_path(chain, maps, threshold, pred_label)
        assert w_mask.dtype == torch.bool
        assert torch.equal(w_mask, ref_mask)
        assert torch.equal(w_map, ref_map)


def _tiny_net():
    torch.manual_seed(0)
    net = build_diffusion_unet(1, "tiny", use_flash_attention=False)
    for m in net.modules():  # MONAI zero-initialises some convolutions: give every layer weights
        if isinstance(m, torch.nn.Conv2d) and not m.weight.detach().abs().max() > 0:
            m.reset_parameters()
    return net.eval()


def test_same_masks_end_to_end(tmp_path):
    """A calibrated inferer (Algorithm 1 quantile thresholds, tau gating): the volume inferer + the bundle's
    transforms against the evaluation's ``postprocess`` of the same slices with the same noise keys."""
    settings = AnoFPDMSettings(t_max=30, stride=10, median_kernel=3, min_component_size=2)
    net = _tiny_net()
    g = torch.Generator().manual_seed(4)
    depth, size = 7, 16
    volume = torch.rand(1, 1, size, size, depth, generator=g) * 1.6 - 0.8
    volume[..., 4:10, 5:11, 2:5] += 0.6
    brain = torch.ones(1, 1, size, size, depth)
    brain[..., [0, depth - 1]] = 0  # slices without brain: outside the kept range
    keep = list(range(1, depth - 1))
    slices = volume[0, ..., keep].permute(3, 0, 1, 2).contiguous()
    probe = AnoFPDMInferer(settings, threshold=0.0, seed=0)
    keys = probe.noise_keys("case", torch.as_tensor(keep))
    result = probe.run(slices, net, noise_keys=keys)
    first = probe.thresholds(result)
    m_max = float(result.select(0).divergence_max(settings.end_step)[0].max()) * 1.05
    tau = float(first.health.median())
    inferer = AnoFPDMInferer(settings, m_max=[m_max], tau=tau, seed=0)

    direct = inferer.postprocess(inferer.run(slices, net, noise_keys=keys))
    assert direct.pred_label.unique().numel() == 2  # gating removes some masks, keeps others
    assert direct.mask_ungated.any() and not torch.isnan(direct.quantile).any()

    out = AnoFPDMVolumeInferer(inferer, batch_size=16)(volume, net, brain=brain, case_id="case")
    item = {k: v[0] for k, v in out.items()}
    for chain in (_bundle_chain(3, 2), _app_chain(3, 2, tmp_path)):
        w_map, w_mask = _writer_path(
            chain, item["anomaly_map"][0].permute(2, 0, 1), item["threshold"], item["pred_label"]
        )
        assert torch.equal(w_mask[keep], direct.mask)
        assert not w_mask[[0, depth - 1]].any()
        torch.testing.assert_close(w_map[keep], direct.filtered_map.float(), rtol=0, atol=0)
    np.testing.assert_array_equal(item["pred_label"][keep].numpy(), direct.pred_label.numpy())
