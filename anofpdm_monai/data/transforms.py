"""MONAI transforms that turn a brain MRI case (one NIfTI file per modality) into model-ready axial slices.

The volume-level chain, in order (see :class:`VolumePreprocessor`):

1. :class:`LoadCased` loads the modalities as channels (plus label and brain mask) and validates the case;
2. ``monai.transforms.Orientationd`` reorients every input (LPS, RAS, ...) to RAS, so the axial axis is the last;
3. :class:`BinarizeLabeld` makes the anomaly mask ``label > 0``;
4. :class:`BrainMaskd` records the brain (given mask, else voxels > 0 in any channel);
5. :class:`SquarePadd` pads the axial plane to a square (so resizing keeps the aspect ratio);
6. :class:`ForegroundPercentileNormalized` divides each channel by its foreground 99th percentile and puts the
   background at the channel's minimum;
7. ``monai.transforms.Resized`` resizes each axial plane to the model resolution (bilinear within the plane, the
   slice axis untouched), ``monai.transforms.AsDiscreted`` thresholds label and brain at 0.5 (as the official code);
8. :class:`MinMaxScaled` scales each channel into [-1, 1], per axial slice (official) or per volume.

Spatial steps are MONAI invertible transforms, so ``Invertd`` maps anomaly maps back onto the input grid.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, SpatialPad, SpatialPadd, Transform

from ..io import first_line

__all__ = [
    "CaseError",
    "why_unreadable",
    "LoadCased",
    "LoadCaseD",
    "LoadCaseDict",
    "BinarizeLabeld",
    "BinarizeLabelD",
    "BinarizeLabelDict",
    "BrainMaskd",
    "BrainMaskD",
    "BrainMaskDict",
    "SquarePad",
    "SquarePadd",
    "SquarePadD",
    "SquarePadDict",
    "ForegroundPercentileNormalize",
    "ForegroundPercentileNormalized",
    "ForegroundPercentileNormalizeD",
    "ForegroundPercentileNormalizeDict",
    "MinMaxScale",
    "MinMaxScaled",
    "MinMaxScaleD",
    "MinMaxScaleDict",
]


logger = logging.getLogger(__name__)

#: below this neighbouring-voxel correlation a volume is reported as not looking like MRI (real MRI: r > 0.8 along
#: its best axis, uniform or Gaussian noise: r ~ 0)
MIN_NEIGHBOUR_CORRELATION = 0.3


def neighbour_correlation(values: torch.Tensor) -> float:
    """The largest, over the three axes, correlation between neighbouring voxels of a 3D volume (stride 2 for large
    volumes): about 1 for any image with structure, about 0 for noise. 1.0 for a constant volume."""
    v = torch.as_tensor(values, dtype=torch.float32).reshape(values.shape[-3:])
    if v.numel() > 4_000_000:
        v = v[::2, ::2, ::2]
    best = -1.0
    for axis in range(3):
        a = v.movedim(axis, 0)
        if a.shape[0] < 2:
            continue
        x, y = a[:-1].reshape(-1).double(), a[1:].reshape(-1).double()
        x, y = x - x.mean(), y - y.mean()
        denominator = float(torch.sqrt((x * x).sum() * (y * y).sum()))
        best = max(best, float((x * y).sum()) / denominator if denominator > 0 else 1.0)
    return best


class CaseError(ValueError):
    """A case that cannot be used; the message is one line naming the case and the file or key at fault."""


def why_unreadable(path: str | os.PathLike) -> str | None:
    """Why a NIfTI file cannot be read, in words (MONAI only says "cannot find a suitable reader"): a ``.gz`` file
    that is not gzip-compressed, a truncated or corrupt gzip stream, a file that is not NIfTI; None when none of
    these (the reader's own message is then the reason)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as exc:
        return f"cannot open it ({exc.strerror or first_line(exc)})"
    opener: Any = open
    if str(path).lower().endswith(".gz"):
        if head != b"\x1f\x8b":
            return "it is named .gz but is not gzip-compressed (rename it without .gz, or gzip it)"
        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 22):
                    pass
        except (OSError, EOFError, zlib.error) as exc:
            return f"its gzip stream is truncated or corrupt ({first_line(exc)})"
        opener = gzip.open
    with opener(path, "rb") as f:
        header = f.read(4)
    sizes = {int.from_bytes(header, "little"), int.from_bytes(header, "big")} if len(header) == 4 else set()
    if not sizes & {348, 540}:  # sizeof_hdr of NIfTI-1 / NIfTI-2
        return "it is not a NIfTI file (no NIfTI header)"
    return None


def _case_name(data: Mapping) -> str:
    return str(data.get("id", "<case>"))


class LoadCased(MapTransform):
    """Load one case: every modality file as a channel of ``image``, plus the optional label and brain mask.

    MONAI's ``LoadImaged`` can stack a list of files as channels, but its failures on a missing file, an
    unreadable file or mismatched grids are long tracebacks; this transform checks each file and raises a
    one-line :class:`CaseError` naming the case and the file. Checks: file exists and is readable, 3D,
    finite, not empty (all zero) or constant, all modalities on one grid (shape and affine), label and brain
    mask on the image grid.

    Args:
        keys: keys to load; ``image_key`` holds a list of paths (one per modality), others one path each.
        image_key: the key of the multi-modality image.
        modality_names: names of the modalities, only used in error messages.
        affine_atol: tolerance when comparing affines (mm).
        allow_missing_keys: don't raise if a key (e.g. ``label``) is missing from the data.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label", "brain_mask"),
        image_key: str = "image",
        modality_names: Sequence[str] | None = None,
        affine_atol: float = 1e-3,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.modality_names = list(modality_names) if modality_names is not None else None
        self.affine_atol = affine_atol
        self.loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)

    def _load_file(self, case: str, path: Any, what: str) -> MetaTensor:
        if not isinstance(path, (str, os.PathLike)):
            raise CaseError(f"case {case}: {what} must be a file path, got {type(path).__name__}")
        if not os.path.isfile(path):
            raise CaseError(f"case {case}: {what} file not found: {path}")
        try:
            img = self.loader(path)
        except Exception as exc:  # nibabel raises many different types for corrupt files
            reason = why_unreadable(path) or first_line(exc)
            raise CaseError(f"case {case}: cannot read {what} file {path}: {reason}") from exc
        if img.ndim != 4 or img.shape[0] != 1:
            raise CaseError(f"case {case}: {what} file {path} is not a single 3D volume (shape {tuple(img.shape)})")
        if not torch.isfinite(img).all():
            raise CaseError(f"case {case}: {what} file {path} contains NaN or Inf values")
        return img

    def _check_grid(self, case: str, ref: MetaTensor, ref_path: Any, img: MetaTensor, path: Any, what: str) -> None:
        if tuple(img.shape[1:]) != tuple(ref.shape[1:]):
            raise CaseError(
                f"case {case}: {what} {path} has shape {tuple(img.shape[1:])} but {ref_path} has "
                f"{tuple(ref.shape[1:])}: all files of a case must share one grid"
            )
        if not np.allclose(np.asarray(img.affine), np.asarray(ref.affine), atol=self.affine_atol):
            raise CaseError(
                f"case {case}: {what} {path} is on another grid than {ref_path} (affines differ): "
                "resample it onto the image grid first"
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = _case_name(d)
        if self.image_key not in d:
            raise CaseError(f"case {case}: no '{self.image_key}' key")
        paths = d[self.image_key]
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise CaseError(f"case {case}: '{self.image_key}' lists no files")
        names = self.modality_names or [f"modality {i}" for i in range(len(paths))]
        if len(names) != len(paths):
            raise CaseError(f"case {case}: {len(paths)} image files given but {len(names)} modalities expected {names}")
        channels = []
        for name, path in zip(names, paths):
            img = self._load_file(case, path, f"modality '{name}'")
            if channels:
                self._check_grid(case, channels[0], paths[0], img, path, f"modality '{name}'")
            values = img.as_tensor()
            if not bool((values != 0).any()):
                raise CaseError(f"case {case}: modality '{name}' file {path} is empty (all voxels are zero)")
            if float(values.max()) == float(values.min()):
                raise CaseError(f"case {case}: modality '{name}' file {path} is constant")
            r = neighbour_correlation(values)
            if r < MIN_NEIGHBOUR_CORRELATION:
                logger.warning(
                    "case %s: modality '%s' file %s does not look like an MRI volume (neighbouring voxels are "
                    "uncorrelated, r = %.2f; MRI has r > 0.8, noise r ~ 0): check the file",
                    case,
                    name,
                    path,
                    r,
                )
            channels.append(img)
        image = torch.cat(channels, dim=0) if len(channels) > 1 else channels[0]
        image.meta["filename_or_obj"] = str(paths[0])
        d[self.image_key] = image
        for key in self.key_iterator(d):
            if key == self.image_key:
                continue
            if d[key] is None:
                del d[key]
                continue
            img = self._load_file(case, d[key], str(key))
            self._check_grid(case, channels[0], paths[0], img, d[key], str(key))
            d[key] = img
        return d


class BinarizeLabeld(MapTransform):
    """Binarise a segmentation into the anomaly mask ``label > 0`` (float 0/1).

    ``AsDiscreted(threshold=...)`` keeps values ``>= threshold``; the anomaly definition used by the papers is the
    strict ``> 0`` over integer label sets ({0,1,2,4} for BraTS), which this states directly.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (d[key] > 0).to(torch.float32)
        return d


class BrainMaskd(MapTransform):
    """Create the brain mask ``output_key``: the given mask (``mask_key``, > 0) where present, else voxels > 0 in
    any channel of ``image_key``. Used for the brain range of a volume and as the pixel set of AUPRC."""

    def __init__(self, image_key: str = "image", mask_key: str = "brain_mask", output_key: str = "brain") -> None:
        super().__init__([image_key], allow_missing_keys=False)
        self.image_key, self.mask_key, self.output_key = image_key, mask_key, output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(self.mask_key) is not None:
            d[self.output_key] = (d[self.mask_key] > 0).to(torch.float32)
        else:
            d[self.output_key] = (d[self.image_key] > 0).any(dim=0, keepdim=True).to(torch.float32)
        if not bool(d[self.output_key].any()):
            raise CaseError(f"case {_case_name(d)}: the brain mask is empty")
        return d


class SquarePad(SpatialPad):
    """Pad the first two spatial dimensions (the axial plane after RAS reorientation) to a square, centred.

    Invertible through MONAI's ``Pad.inverse``. Resizing a non-square plane (e.g. 197 x 233 for MNI-space ATLAS
    data) straight to 128 x 128 would squash the anatomy; padding first keeps the aspect ratio.
    """

    def __init__(self, mode: str = "constant", **kwargs: Any) -> None:
        super().__init__(spatial_size=-1, method="symmetric", mode=mode, **kwargs)

    def compute_pad_width(self, spatial_shape: Sequence[int]) -> tuple[tuple[int, int]]:
        side = max(int(spatial_shape[0]), int(spatial_shape[1]))
        self.spatial_size = (side, side) + (-1,) * (len(spatial_shape) - 2)
        return super().compute_pad_width(spatial_shape)


class SquarePadd(SpatialPadd):
    """Dictionary version of :class:`SquarePad`."""

    def __init__(self, keys: KeysCollection, mode: str = "constant", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, spatial_size=-1, mode=mode, allow_missing_keys=allow_missing_keys)
        self.padder = SquarePad(mode=mode)


class ForegroundPercentileNormalize(Transform):
    """Divide each channel by the ``percentile``-th percentile of its foreground voxels; set the background to the
    channel's minimum.

    Foreground is ``mask > 0`` when a brain mask is given, else the channel's voxels > 0 (BraTS backgrounds are 0).
    The background is set to ``min(0, min over the foreground)``, so that inputs already z-scored inside the brain
    (negative brain values, arbitrary background) still end with the background at the bottom of the range and
    hence at -1 after min-max scaling. MONAI has no foreground-percentile scaling (``ScaleIntensityRangePercentiles``
    uses all voxels), hence this transform.

    Args:
        percentile: the percentile of foreground intensities that maps to 1.
    """

    def __init__(self, percentile: float = 99.0) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def __call__(self, img: torch.Tensor, mask: torch.Tensor | None = None, name: str = "<image>") -> torch.Tensor:
        out = img.clone().to(torch.float32)
        arr = np.asarray(out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else out)
        result = np.empty_like(arr)
        for c in range(arr.shape[0]):
            channel = arr[c]
            fg = (np.asarray(mask[0]) > 0) if mask is not None else channel > 0
            if not fg.any():
                raise CaseError(f"{name}: channel {c} has no foreground voxels")
            scale = float(np.percentile(channel[fg], self.percentile))
            if not scale > 0:
                raise CaseError(
                    f"{name}: channel {c}: the {self.percentile}th percentile of the foreground is {scale:.4g}, "
                    "not positive; cannot normalise"
                )
            scaled = channel / scale
            background = min(0.0, float(scaled[fg].min()))
            result[c] = np.where(fg, scaled, background)
        return out.copy_(torch.from_numpy(result)) if isinstance(out, torch.Tensor) else result


class ForegroundPercentileNormalized(MapTransform):
    """Dictionary version of :class:`ForegroundPercentileNormalize`.

    Args:
        keys: image keys to normalise.
        mask_key: key of the brain mask; when absent from the data, foreground is voxels > 0.
        percentile: the percentile that maps to 1.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | None = "brain_mask",
        percentile: float = 99.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.normalizer = ForegroundPercentileNormalize(percentile)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key], mask=mask, name=f"case {_case_name(d)}")
        return d


class MinMaxScale(Transform):
    """Scale each channel into [-1, 1]: ``2 (x - min) / (max - min + eps) - 1``.

    ``per_slice=True`` takes min and max per axial slice (the last axis) as the official AnoFPDM data loader does;
    ``per_slice=False`` per volume. A constant slice maps to -1. MONAI's ``ScaleIntensity`` has no per-slice
    mode, hence this transform.
    """

    def __init__(self, per_slice: bool = True, eps: float = 1e-5) -> None:
        self.per_slice = per_slice
        self.eps = eps

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        reduce_dims = tuple(range(1, img.ndim - 1)) if self.per_slice else tuple(range(1, img.ndim))
        lo = torch.amin(img, dim=reduce_dims, keepdim=True)
        hi = torch.amax(img, dim=reduce_dims, keepdim=True)
        return (img - lo) / (hi - lo + self.eps) * 2.0 - 1.0


class MinMaxScaled(MapTransform):
    """Dictionary version of :class:`MinMaxScale`."""

    def __init__(
        self, keys: KeysCollection = "image", per_slice: bool = True, eps: float = 1e-5, allow_missing_keys=False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = MinMaxScale(per_slice=per_slice, eps=eps)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d


LoadCaseD = LoadCaseDict = LoadCased
BinarizeLabelD = BinarizeLabelDict = BinarizeLabeld
BrainMaskD = BrainMaskDict = BrainMaskd
SquarePadD = SquarePadDict = SquarePadd
ForegroundPercentileNormalizeD = ForegroundPercentileNormalizeDict = ForegroundPercentileNormalized
MinMaxScaleD = MinMaxScaleDict = MinMaxScaled
