"""Post-processing shared by AnoFPDM and the baselines (docs/method.md §4-5): Algorithm 1's quantile, quantiles
per slice, the 5x5 median filter, thresholding and the connected-component filter, as functions on (B, H, W) slice
batches and as MONAI dictionary transforms on (1, H, W, D) volumes (one axial slice per index of the last axis), which
the inference bundle lists in its ``postprocessing`` Compose."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.layers import median_filter
from monai.transforms import MapTransform
from scipy import ndimage

__all__ = [
    "quantile_level",
    "batch_quantile",
    "median_filter_2d",
    "remove_small_components",
    "scaled_min_component_size",
    "binarize_map",
    "MedianFilterSlicesd",
    "ThresholdSlicesd",
    "RemoveSmallComponentsSlicesd",
    "HealthGated",
    "mask_pixels_per_slice",
]


def quantile_level(
    divergence_max: torch.Tensor, m_max: torch.Tensor | float, a: float = 0.90, b: float = 0.98
) -> torch.Tensor:
    """Algorithm 1: the quantile level q of the anomaly map used as threshold.

    ``ratio = clamp(M / M_max, 0, 1)``, ``idx = round(100 ratio)`` (half to even, in float64), and
    ``q = reverse(linspace(a, b, 101))[idx] = b - idx (b - a) / 100``: a strong divergence (ratio near 1) gives a low
    quantile (a larger mask), a weak one a high quantile.

    The official code computes ``(torch.round(ratio, decimals=2) * 100).to(torch.int64)`` in float32, which truncates
    e.g. 0.53 to index 52 (0.53 * 100 is 52.999996 in float32); here the index is the nearest integer as the
    algorithm states.

    Args:
        divergence_max: M = max_t M_t, any shape.
        m_max: calibrated M_max, broadcastable to ``divergence_max``.
        a: lowest quantile level.
        b: highest quantile level.

    Returns:
        q, float64, same shape as ``divergence_max``.
    """
    if not 0.0 <= a <= b <= 1.0:
        raise ValueError(f"need 0 <= a <= b <= 1, got a={a}, b={b}")
    m = torch.as_tensor(divergence_max, dtype=torch.float64)
    m_max = torch.as_tensor(m_max, dtype=torch.float64, device=m.device)
    if bool((m_max <= 0).any()):
        raise ValueError("M_max must be positive")
    ratio = (m / m_max).clamp(0.0, 1.0)
    idx = torch.round(ratio * 100.0)
    levels = torch.linspace(a, b, 101, dtype=torch.float64, device=m.device).flip(0)
    return levels[idx.long()]


def batch_quantile(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row quantile with linear interpolation (``torch.quantile``'s default), with one level per row.

    Args:
        values: (B, ...) values; each row is flattened.
        q: (B,) levels in [0, 1].

    Returns:
        (B,) quantiles in ``values``' dtype.
    """
    flat = values.reshape(values.shape[0], -1)
    srt = flat.sort(dim=1).values.to(torch.float64)
    pos = torch.as_tensor(q, dtype=torch.float64, device=flat.device).reshape(-1) * (flat.shape[1] - 1)
    lo = pos.floor().long().clamp(0, flat.shape[1] - 1)
    hi = pos.ceil().long().clamp(0, flat.shape[1] - 1)
    frac = pos - lo.to(torch.float64)
    v_lo = srt.gather(1, lo[:, None])[:, 0]
    v_hi = srt.gather(1, hi[:, None])[:, 0]
    return (v_lo + (v_hi - v_lo) * frac).to(values.dtype)


def median_filter_2d(maps: torch.Tensor, kernel_size: int = 5) -> torch.Tensor:
    """Median filter of (B, H, W) maps with MONAI's ``median_filter`` (replicate padding; the official code pads
    by reflection, which only differs within two pixels of the image border)."""
    if kernel_size <= 1:
        return maps
    return median_filter(maps[:, None].float(), kernel_size=(kernel_size, kernel_size), spatial_dims=2)[:, 0]


def scaled_min_component_size(image_size: int, size_at_128: int = 40) -> int:
    """The papers' component rule (<= 40 px removed at 128 x 128) scaled by area to another model resolution."""
    return max(1, round(size_at_128 * (image_size / 128) ** 2))


def remove_small_components(mask: torch.Tensor, max_size: int = 40) -> torch.Tensor:
    """Remove 8-connected components of at most ``max_size`` pixels from each (H, W) slice of a (B, H, W) mask.

    All slices are labelled in one ``scipy.ndimage.label`` call with a structure that connects within a slice only.
    """
    if max_size <= 0:
        return mask.bool()
    arr = mask.detach().cpu().numpy().astype(bool)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity inside a slice, none across slices
    labels, n = ndimage.label(arr, structure=structure)
    if n == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes > max_size
    keep[0] = False
    return torch.from_numpy(keep[labels]).to(mask.device)


def binarize_map(
    maps: torch.Tensor, threshold: torch.Tensor | float, median_kernel: int = 5, min_component_size: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """The common post-processing: median filter, ``map >= threshold``, connected-component filter.

    Args:
        maps: (B, H, W) anomaly maps.
        threshold: scalar or (B,) thresholds.
        median_kernel: median filter size (1 disables).
        min_component_size: components of at most this many pixels are removed (0 disables).

    Returns:
        ``(filtered_maps, masks)``: the median-filtered maps and the boolean masks.
    """
    filtered = median_filter_2d(maps, median_kernel)
    thr = torch.as_tensor(threshold, dtype=filtered.dtype, device=filtered.device)
    if thr.ndim == 1:
        thr = thr[:, None, None]
    mask = remove_small_components(filtered >= thr, min_component_size)
    return filtered, mask


# ---------------------------------------------------------------------------------------------------------- transforms
def _as_slices(volume: Any) -> torch.Tensor:
    """(1, H, W, D) volume -> (D, H, W) slice batch."""
    v = torch.as_tensor(volume)
    if v.ndim != 4 or v.shape[0] != 1:
        raise ValueError(f"expected a (1, H, W, D) volume, got shape {tuple(v.shape)}")
    return v[0].permute(2, 0, 1)


def _as_volume(slices: torch.Tensor, like: Any) -> Any:
    """(D, H, W) slice batch -> (1, H, W, D), keeping ``like``'s MetaTensor metadata."""
    out = slices.permute(1, 2, 0)[None].contiguous()
    if isinstance(like, MetaTensor):
        out = MetaTensor(out, meta=dict(like.meta), applied_operations=list(like.applied_operations))
    return out


class MedianFilterSlicesd(MapTransform):
    """Median-filter each axial slice of (1, H, W, D) maps (``kernel_size`` 1 leaves them unchanged)."""

    def __init__(self, keys: KeysCollection, kernel_size: int = 5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.kernel_size = int(kernel_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _as_volume(median_filter_2d(_as_slices(d[key]).float(), self.kernel_size), d[key])
        return d


class ThresholdSlicesd(MapTransform):
    """``mask = map >= threshold`` with one threshold per axial slice (``threshold_key``: (D,) values; a slice with
    an infinite threshold gets an empty mask).

    Args:
        keys: the map key(s).
        threshold_key: key of the per-slice thresholds.
        output_key: key of the mask (one map key) or ``None`` to replace the map.
    """

    def __init__(
        self,
        keys: KeysCollection,
        threshold_key: str = "threshold",
        output_key: str | None = "anomaly_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold_key = threshold_key
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            maps = _as_slices(d[key])
            thr = torch.as_tensor(d[self.threshold_key], dtype=maps.dtype, device=maps.device).reshape(-1, 1, 1)
            d[self.output_key or key] = _as_volume(maps >= thr, d[key])
        return d


class RemoveSmallComponentsSlicesd(MapTransform):
    """Remove 8-connected components of at most ``max_size`` pixels within each axial slice of (1, H, W, D) masks."""

    def __init__(self, keys: KeysCollection, max_size: int = 40, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_size = int(max_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _as_volume(remove_small_components(_as_slices(d[key]), self.max_size), d[key])
        return d


class HealthGated(MapTransform):
    """Empty the masks of slices classified healthy (``label_key``: (D,) predicted labels, 1 unhealthy); the
    ungated mask is kept under ``<key>_ungated`` when ``keep_ungated``."""

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "pred_label",
        keep_ungated: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.keep_ungated = keep_ungated

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            masks = _as_slices(d[key])
            unhealthy = torch.as_tensor(d[self.label_key], device=masks.device).reshape(-1, 1, 1).bool()
            if self.keep_ungated:
                d[f"{key}_ungated"] = d[key]
            d[key] = _as_volume(masks.bool() & unhealthy, d[key])
        return d


def mask_pixels_per_slice(mask: Any) -> torch.Tensor:
    """(D,) number of mask pixels in each axial slice of a (1, H, W, D) mask."""
    return _as_slices(mask).bool().sum(dim=(1, 2))
