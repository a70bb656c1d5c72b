"""MONAI transforms that turn a brain MRI case (one NIfTI file per modality) into model-ready axial slices.

The volume-level chain, in order (see :class:`VolumePreprocessor`):

1. :class:`LoadCased` loads the modalities as channels (plus label and brain mask) and validates the case;
2. ``monai.transforms.Orientationd`` reorients every input (LPS, RAS, ...) to RAS, so the axial axis is the last;
3. :class:`BinarizeLabeld` makes the anomaly mask ``label > 0``;
4. :class:`BrainMaskd` records the brain (given mask, else voxels > 0 in any channel);
5. :class:`IsotropicInPlaned` resamples the axial plane to square pixels (the finer of the two in-plane spacings;
   the through-plane axis untouched) when its two spacings differ by more than 1 %; identity otherwise;
6. :class:`SquarePadd` pads the axial plane to a square (so resizing keeps the aspect ratio);
7. :class:`ForegroundPercentileNormalized` divides each channel by its foreground 99th percentile and puts the
   background at the channel's minimum;
8. ``monai.transforms.Resized`` resizes each axial plane to the model resolution (bilinear within the plane, the
   slice axis untouched), ``monai.transforms.AsDiscreted`` thresholds label and brain at 0.5 (as the official code);
9. :class:`MinMaxScaled` scales each channel into [-1, 1], per axial slice (official) or per volume.

Spatial steps are MONAI invertible transforms, so ``Invertd`` maps anomaly maps back onto the input grid.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    InvertibleTransform,
    LoadImage,
    MapTransform,
    SpatialPad,
    SpatialPadd,
    SpatialResample,
    Transform,
)
from monai.utils import ensure_tuple_rep

from ..io import first_line
from .datalist import case_id_problem

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
    "IsotropicInPlaned",
    "IsotropicInPlaneD",
    "IsotropicInPlaneDict",
    "inplane_grid",
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
#: the correlation is taken on intensities clipped to these percentiles, so that a few hot voxels (a spike, a
#: reconstruction artefact) do not dominate the variance
CORRELATION_PERCENTILES = (0.1, 99.9)
#: a volume with at most this many distinct intensities is reported as a label or mask, not an MRI image (a BraTS
#: segmentation has 4, a brain mask 2; every real MRI volume in shared/data has thousands)
LABEL_LIKE_MAX_VALUES = 16
#: the two in-plane voxel sizes (mm) count as equal when they differ by at most this fraction of the smaller one;
#: beyond it :class:`IsotropicInPlaned` resamples the axial plane to square pixels
INPLANE_ISOTROPY_TOLERANCE = 0.01
#: largest in-plane side (voxels) :class:`IsotropicInPlaned` resamples to; more means a header with wrong voxel sizes
MAX_INPLANE_SIZE = 4096
#: the largest finite float32 (inputs are processed as float32)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def neighbour_correlation(values: torch.Tensor) -> float:
    """The largest, over the three axes, correlation between neighbouring voxels of a 3D volume (stride 2 for large
    volumes): about 1 for any image with structure, about 0 for noise. 1.0 for a constant volume.

    Intensities are clipped to their :data:`CORRELATION_PERCENTILES` first: one hot voxel in a normal scan would
    otherwise carry most of the variance and pull r to 0."""
    v = torch.as_tensor(values, dtype=torch.float32).reshape(values.shape[-3:])
    if v.numel() > 4_000_000:
        v = v[::2, ::2, ::2]
    lo, hi = np.percentile(v.numpy(), CORRELATION_PERCENTILES)
    if hi > lo:  # else (a volume that is almost all one value) the clipped copy would be constant: keep it as it is
        v = v.clamp(float(lo), float(hi))
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


def distinct_values(values: torch.Tensor, at_most: int = LABEL_LIKE_MAX_VALUES) -> np.ndarray | None:
    """The distinct intensities of a volume when there are at most ``at_most`` of them, else None.

    A strided sample of about a million voxels is looked at first, so an MRI volume (thousands of distinct values in
    any sample) costs one small ``unique``; only a volume whose sample is label-like is counted in full."""
    flat = torch.as_tensor(values).reshape(-1)
    step = max(1, flat.numel() // 1_000_000)
    if torch.unique(flat[::step]).numel() > at_most:
        return None
    found = torch.unique(flat)
    return found.numpy() if found.numel() <= at_most else None


def _shown(values: np.ndarray, limit: int = 6) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return shown + (", ..." if values.size > limit else "")


def affine_problem(affine: Any) -> str | None:
    """Why a voxel-to-world affine cannot be used (not finite, a zero voxel axis, axes in one plane), or None."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        return "its affine is not a finite 4 x 4 matrix"
    axes = a[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    det = float(np.linalg.det(axes))
    if not (lengths > 0).all() or abs(det) <= 1e-6 * float(np.prod(lengths)):
        sizes = " x ".join(f"{v:g}" for v in lengths)
        return (
            f"its affine is singular (voxel axes of length {sizes} mm, determinant {det:.3g}): the header's "
            "sform/qform does not place the voxels in space; fix the header"
        )
    return None


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


def _non_finite_reason(path: str | os.PathLike) -> str:
    """What is wrong with a file whose float32 copy is not finite: NaN/Inf in the file itself, or finite values
    beyond the float32 range (they overflow to Inf when read as float32)."""
    try:
        raw = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception:  # it was readable a moment ago; the float32 copy is what is known
        return "contains NaN or Inf values"
    if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
        return "contains NaN or Inf values"
    largest = float(np.max(np.abs(raw)))
    return (
        f"has intensities beyond the float32 range (largest magnitude {largest:.3g} > {FLOAT32_MAX:.3g}): rescale "
        "the intensities"
    )


class LoadCased(MapTransform):
    """Load one case: every modality file as a channel of ``image``, plus the optional label and brain mask.

    MONAI's ``LoadImaged`` can stack a list of files as channels, but its failures on a missing file, an
    unreadable file or mismatched grids are long tracebacks; this transform checks each file and raises a
    one-line :class:`CaseError` naming the case and the file. Checks: a filesystem-safe case id (before any file is
    read), file exists and is readable, 3D, a usable (non-singular) affine, finite in float32 (NaN/Inf and values
    beyond the float32 range named apart), not empty (all zero) or constant, some intensity > 0 when no brain mask is
    given (the brain is then the voxels > 0), all modalities on one grid (shape and affine), label and brain mask on
    the image grid. Warnings (one line, the case still runs): a modality with at most
    :data:`LABEL_LIKE_MAX_VALUES` distinct intensities (a label or mask given as the image), a modality whose
    neighbouring voxels are uncorrelated (noise; :func:`neighbour_correlation`, robust to hot voxels).

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
            with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 are reported below, in words
                img = self.loader(path)
        except Exception as exc:  # nibabel raises many different types for corrupt files
            reason = why_unreadable(path) or first_line(exc)
            raise CaseError(f"case {case}: cannot read {what} file {path}: {reason}") from exc
        if img.ndim != 4 or img.shape[0] != 1:
            raise CaseError(f"case {case}: {what} file {path} is not a single 3D volume (shape {tuple(img.shape)})")
        problem = affine_problem(img.affine)
        if problem:
            raise CaseError(f"case {case}: {what} file {path}: {problem}")
        if not torch.isfinite(img).all():
            raise CaseError(f"case {case}: {what} file {path} {_non_finite_reason(path)}")
        return img

    @staticmethod
    def _check_plausible(case: str, name: str, path: Any, values: torch.Tensor) -> None:
        """One warning line when a modality looks like a label/mask or like noise rather than an MRI image."""
        few = distinct_values(values)
        if few is not None:
            logger.warning(
                "case %s: modality '%s' file %s has only %d distinct intensities (%s): it looks like a label or mask, "
                "not an MRI image; check the file",
                case,
                name,
                path,
                few.size,
                _shown(few),
            )
            return
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
        if "id" in d:  # refused before any file is read (its output file names could not be written)
            problem = case_id_problem(d["id"])
            if problem:
                raise CaseError(problem)
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
            top = float(values.max())
            if top == float(values.min()):
                raise CaseError(f"case {case}: modality '{name}' file {path} is constant")
            if top <= 0 and d.get("brain_mask") is None:
                raise CaseError(
                    f"case {case}: modality '{name}' file {path} has no intensity > 0 (all are <= 0, the largest "
                    f"{top:.4g}): without a brain_mask the brain is the voxels > 0; give a brain_mask or unshifted "
                    "intensities"
                )
            self._check_plausible(case, name, path, values)
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
        given = d.get(self.mask_key) is not None
        if given:
            d[self.output_key] = (d[self.mask_key] > 0).to(torch.float32)
        else:
            d[self.output_key] = (d[self.image_key] > 0).any(dim=0, keepdim=True).to(torch.float32)
        if not bool(d[self.output_key].any()):
            if given:
                raise CaseError(f"case {_case_name(d)}: the brain mask is empty")
            raise CaseError(
                f"case {_case_name(d)}: no voxel of the image is > 0 (without a brain_mask the brain is the voxels > 0)"
            )
        return d


def inplane_grid(
    affine: Any,
    spatial_shape: Sequence[int],
    tolerance: float = INPLANE_ISOTROPY_TOLERANCE,
    max_size: int = MAX_INPLANE_SIZE,
    name: str = "<image>",
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The grid with square in-plane pixels that covers a RAS-oriented volume (axes 0 and 1 the axial plane).

    Both in-plane voxel sizes become the finer of the two (nothing is lost); the through-plane axis (axis 2), the
    axis directions and the centre of the field of view are kept. When the two in-plane sizes differ by at most
    ``tolerance`` (relative), the input grid itself is returned (the resampling is then the identity).

    Returns:
        ``(affine, spatial shape)`` of the target grid.

    Raises:
        CaseError: one line naming ``name`` when the target grid would exceed ``max_size`` voxels per side.
    """
    src = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(n) for n in spatial_shape)
    sizes = np.linalg.norm(src[:3, :3], axis=0)
    finer = float(min(sizes[0], sizes[1]))
    if abs(float(sizes[0]) - float(sizes[1])) <= tolerance * finer:
        return src, shape  # type: ignore[return-value]
    factor = np.array([sizes[0] / finer, sizes[1] / finer, 1.0])
    new_shape = (max(1, round(shape[0] * factor[0])), max(1, round(shape[1] * factor[1])), shape[2])
    if max(new_shape[:2]) > max_size:
        raise CaseError(
            f"{name}: in-plane voxel size {sizes[0]:g} x {sizes[1]:g} mm would be resampled to {new_shape[0]} x "
            f"{new_shape[1]} voxels of {finer:g} mm (more than {max_size}): check the voxel sizes in the header"
        )
    dst = src.copy()
    dst[:3, :3] = src[:3, :3] / factor  # columns 0 and 1 shortened to the finer size, directions kept
    centre_src = src @ np.append((np.asarray(shape) - 1) / 2.0, 1.0)
    centre_dst = dst @ np.append((np.asarray(new_shape) - 1) / 2.0, 1.0)
    dst[:3, 3] += centre_src[:3] - centre_dst[:3]  # the same field-of-view centre
    return dst, new_shape  # type: ignore[return-value]


class IsotropicInPlaned(MapTransform, InvertibleTransform):
    """Resample the axial plane of a RAS-oriented case to square pixels when its two in-plane voxel sizes differ.

    The model sees each axial slice as a square image: a slice stored at 1.5 x 3 mm would be squashed by the square
    pad and the resize that follow (measured: the label's Dice against the same brain at 1 mm fell to 0.3;
    benchmarks/bench_anisotropy.py). Every key is resampled onto the grid of :func:`inplane_grid` computed from
    ``image_key`` (the finer in-plane size for both axes; the slice axis kept). For in-plane sizes equal within
    ``tolerance`` the grid is the input's and MONAI's ``SpatialResample`` returns the data unchanged, so isotropic
    inputs (every volume a model was trained on so far) are preprocessed exactly as before. Invertible
    (``Invertd`` undoes it through ``SpatialResample.inverse``), so maps still come back on the input grid.

    Args:
        keys: keys to resample (all on the grid of ``image_key``).
        image_key: the key whose affine and shape define the grid.
        mode: interpolation per key (``"bilinear"``, ``"nearest"``), or one for all.
        tolerance: relative in-plane size difference below which nothing is resampled.
        max_size: largest in-plane side to resample to (a larger one is refused as a wrong header).
        allow_missing_keys: don't raise if a key (e.g. ``label``) is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        mode: str | Sequence[str] = "bilinear",
        tolerance: float = INPLANE_ISOTROPY_TOLERANCE,
        max_size: int = MAX_INPLANE_SIZE,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.tolerance = float(tolerance)
        self.max_size = int(max_size)
        self.resampler = SpatialResample(padding_mode="border", align_corners=False, dtype=torch.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.image_key]
        affine, shape = inplane_grid(
            ref.affine, ref.shape[1:], self.tolerance, self.max_size, name=f"case {_case_name(d)}"
        )
        target = torch.as_tensor(affine, dtype=torch.float64)
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.resampler(d[key], dst_affine=target, spatial_size=shape, mode=mode)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler.inverse(d[key])
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
IsotropicInPlaneD = IsotropicInPlaneDict = IsotropicInPlaned
SquarePadD = SquarePadDict = SquarePadd
ForegroundPercentileNormalizeD = ForegroundPercentileNormalizeDict = ForegroundPercentileNormalized
MinMaxScaleD = MinMaxScaleDict = MinMaxScaled
