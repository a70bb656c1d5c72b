"""Synthetic cases for tests and the demo: NIfTI volumes with drawn-in (synthetic) lesions.

Two anatomies are available:

- :func:`phantom_anatomy`: a procedural head phantom (ellipsoidal brain, ventricles, cortex band), fast and tiny;
- :func:`template_anatomy`: a real healthy brain, the MNI152 2009 T1 template that ``nilearn`` ships inside its
  package (nothing is downloaded), with grey/white-matter probability maps.

:func:`make_case` turns an anatomy into a multi-modality case with per-subject variation (a random smooth
deformation, intensity bias and noise) and optional lesions, and writes it like a real dataset (one NIfTI file per
modality, a segmentation with ``label > 0`` = lesion). The lesions are synthetic: hyperintense blobs on FLAIR/T2
and hypointense on T1, following the appearance of oedema.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["Anatomy", "phantom_anatomy", "template_anatomy", "make_case", "make_dataset", "LESION_CONTRAST"]

#: relative intensity change of a lesion per modality (oedema-like: bright on FLAIR/T2, dark on T1)
LESION_CONTRAST: dict[str, float] = {"flair": 0.9, "t2": 0.8, "t1ce": 0.35, "t1": -0.5, "t1w": -0.6}

# tissue intensities per modality: (CSF, grey matter, white matter)
_TISSUE = {
    "flair": (0.15, 0.75, 0.6),
    "t1": (0.2, 0.55, 0.8),
    "t1ce": (0.2, 0.6, 0.75),
    "t2": (0.95, 0.6, 0.45),
    "t1w": (0.2, 0.55, 0.8),
}


@dataclass
class Anatomy:
    """Tissue probability maps (CSF, GM, WM) on one grid, the affine, and optional real intensity images per
    modality name (used instead of the tissue-contrast model for those modalities)."""

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray
    images: dict[str, np.ndarray] | None = None

    @property
    def brain(self) -> np.ndarray:
        return (self.csf + self.gm + self.wm) > 0.3


def phantom_anatomy(shape: Sequence[int] = (48, 56, 40), spacing: float = 4.0) -> Anatomy:
    """A procedural brain: ellipsoid with a cortex band (GM), white matter inside and two ventricles (CSF)."""
    shape = tuple(int(s) for s in shape)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt((grid[0] / 0.8) ** 2 + (grid[1] / 0.85) ** 2 + (grid[2] / 0.8) ** 2)
    brain = np.clip((1.0 - r) / 0.05, 0, 1)
    gm = np.clip(brain - np.clip((0.85 - r) / 0.05, 0, 1), 0, 1)
    vent = np.zeros(shape)
    for sx in (-0.18, 0.18):
        rv = np.sqrt(((grid[0] - sx) / 0.1) ** 2 + ((grid[1] - 0.05) / 0.35) ** 2 + (grid[2] / 0.2) ** 2)
        vent = np.maximum(vent, np.clip((1.0 - rv) / 0.2, 0, 1))
    wm = np.clip(brain - gm - vent, 0, 1)
    csf = np.clip(vent * brain, 0, 1)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return Anatomy(csf=csf, gm=gm, wm=wm, affine=affine)


def template_anatomy(resolution: int = 2) -> Anatomy:
    """The MNI152 2009 template shipped with ``nilearn`` (a real healthy brain), resampled to ``resolution`` mm.

    Raises:
        ImportError: with install instructions when nilearn is missing (``pip install anofpdm-monai[demo]``).
    """
    try:
        from nilearn import datasets, image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the MNI template needs nilearn: pip install 'anofpdm-monai[demo]'") from exc
    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    gm = image.resample_to_img(gm, t1, interpolation="linear", force_resample=True, copy_header=True)
    wm = image.resample_to_img(wm, t1, interpolation="linear", force_resample=True, copy_header=True)
    t1a = np.asarray(t1.get_fdata(), dtype=np.float32)
    gma = np.clip(np.asarray(gm.get_fdata(), dtype=np.float32), 0, 1)
    wma = np.clip(np.asarray(wm.get_fdata(), dtype=np.float32), 0, 1)
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(t1a > 0.05 * t1a.max(), iterations=2))
    csf = np.clip(brain.astype(np.float32) - gma - wma, 0, 1)
    t1n = t1a * brain / max(float(np.percentile(t1a[brain], 99)), 1e-6)
    return Anatomy(
        csf=csf * brain,
        gm=gma * brain,
        wm=wma * brain,
        affine=np.asarray(t1.affine, dtype=np.float64),
        images={"t1w": t1n, "t1": t1n},
    )


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="nearest")
    return field / (np.abs(field).max() + 1e-8)


def _lesion(shape: Sequence[int], brain: np.ndarray, rng: np.random.Generator, radius: float) -> np.ndarray:
    """A smooth irregular blob (soft mask in [0, 1]) centred inside the brain."""
    inner = ndimage.binary_erosion(brain, iterations=max(1, int(radius)))
    candidates = np.argwhere(inner if inner.any() else brain)
    centre = candidates[rng.integers(len(candidates))]
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    axes = radius * rng.uniform(0.7, 1.3, size=3)
    r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, axes)))
    r = r + 0.35 * _smooth_field(shape, rng, sigma=max(1.0, radius / 2))
    return np.clip((1.0 - r) / 0.25, 0, 1) * brain


def make_case(
    anatomy: Anatomy,
    out_dir: str | os.PathLike,
    case_id: str,
    modalities: Sequence[str] = ("flair", "t1", "t1ce", "t2"),
    num_lesions: int = 1,
    lesion_radius: float | tuple[float, float] = (3.0, 6.0),
    seed: int = 0,
    deformation: float = 2.0,
    noise: float = 0.02,
    orientation: str = "RAS",
    intensity_scale: float = 1000.0,
    file_pattern: str = "{case}_{modality}.nii.gz",
    label_name: str | None = "{case}_seg.nii.gz",
) -> dict[str, Any]:
    """Write one synthetic case (a folder ``out_dir/case_id``) and return its datalist entry (relative paths).

    Args:
        anatomy: tissue maps to start from.
        out_dir: dataset root.
        case_id: case name (also the folder name).
        modalities: channel names (known contrasts: flair, t1, t1ce, t2, t1w).
        num_lesions: number of synthetic lesions (0: a healthy subject).
        lesion_radius: radius in voxels, or a (min, max) range drawn per lesion.
        seed: random seed of this subject.
        deformation: amplitude (voxels) of the random smooth deformation that makes subjects differ.
        noise: Gaussian noise relative to the tissue intensities.
        orientation: ``"RAS"`` or ``"LPS"`` axis order of the written files (the same anatomy either way).
        intensity_scale: intensities are written as int16 in [0, intensity_scale].
        file_pattern: file name per modality.
        label_name: segmentation file name (None: no label file).

    Returns:
        ``{"id", "image": [...], "label"}`` with paths relative to ``out_dir``.
    """
    rng = np.random.default_rng(seed)
    shape = anatomy.csf.shape
    coords = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    warp = [c + deformation * _smooth_field(shape, rng, sigma=max(2.0, min(shape) / 6)) for c in coords]
    csf, gm, wm = (
        ndimage.map_coordinates(t, warp, order=1, mode="constant") for t in (anatomy.csf, anatomy.gm, anatomy.wm)
    )
    real = {k: ndimage.map_coordinates(v, warp, order=1, mode="constant") for k, v in (anatomy.images or {}).items()}
    brain = (csf + gm + wm) > 0.3
    lesion = np.zeros(shape, dtype=np.float32)
    for _ in range(int(num_lesions)):
        radius = lesion_radius if np.isscalar(lesion_radius) else rng.uniform(*lesion_radius)
        lesion = np.maximum(lesion, _lesion(shape, brain, rng, float(radius)))
    bias = 1.0 + 0.1 * _smooth_field(shape, rng, sigma=max(3.0, min(shape) / 3))
    case_dir = Path(out_dir) / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(anatomy.affine, dtype=np.float64)
    flip = orientation.upper() == "LPS"

    def write(array: np.ndarray, name: str, dtype: Any) -> str:
        data, aff = array, affine.copy()
        if flip:  # same anatomy stored with the first two axes reversed (L->R and P->A flipped)
            data = data[::-1, ::-1, :]
            flip_mat = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip_mat[0, 3], flip_mat[1, 3] = shape[0] - 1, shape[1] - 1
            aff = aff @ flip_mat
        img = nib.Nifti1Image(np.ascontiguousarray(data).astype(dtype), aff)
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=1)
        nib.save(img, case_dir / name)
        return f"{case_id}/{name}"

    images = []
    for m in modalities:
        if m.lower() in real:
            tissue = real[m.lower()]
        else:
            c_csf, c_gm, c_wm = _TISSUE.get(m.lower(), _TISSUE["t1"])
            tissue = c_csf * csf + c_gm * gm + c_wm * wm
        tissue = tissue * (1.0 + LESION_CONTRAST.get(m.lower(), 0.5) * lesion)
        tissue = tissue * bias + noise * rng.standard_normal(shape) * brain
        tissue = np.clip(tissue, 0, None) * brain
        scaled = np.round(tissue / max(float(tissue.max()), 1e-6) * intensity_scale)
        images.append(write(scaled, file_pattern.format(case=case_id, modality=m), np.int16))
    entry: dict[str, Any] = {"id": case_id, "image": images}
    if label_name is not None:
        entry["label"] = write((lesion > 0.5).astype(np.uint8), label_name.format(case=case_id), np.uint8)
    return entry


def make_dataset(
    root: str | os.PathLike,
    anatomy: Anatomy,
    splits: Mapping[str, int] | None = None,
    modalities: Sequence[str] = ("flair", "t1", "t1ce", "t2"),
    lesion_fraction: float = 0.75,
    seed: int = 0,
    prefix: str = "synth",
    lesions_per_subject: int = 1,
    **case_kwargs: Any,
) -> dict[str, Any]:
    """Write a synthetic dataset and return its datalist (paths relative to ``root``).

    Args:
        root: dataset folder.
        anatomy: the anatomy every subject is derived from.
        splits: number of subjects per split (default: training 4, validation 2, test 2).
        modalities: channel names.
        lesion_fraction: fraction of subjects with lesions (the others are healthy).
        seed: base seed; subject i uses ``seed + i``.
        prefix: case id prefix.
        lesions_per_subject: lesions drawn into each subject with lesions.
        case_kwargs: passed to :func:`make_case`.
    """
    splits = dict(splits or {"training": 4, "validation": 2, "test": 2})
    datalist: dict[str, Any] = {
        "name": "synthetic",
        "description": "synthetic subjects derived from one anatomy, with synthetic lesions",
        "modalities": list(modalities),
        "training": [],
        "validation": [],
        "test": [],
    }
    index = 0
    for split, count in splits.items():
        for j in range(int(count)):
            with_lesion = j < int(round(lesion_fraction * count)) or count == 1
            entry = make_case(
                anatomy,
                root,
                f"{prefix}_{index:03d}",
                modalities=modalities,
                num_lesions=lesions_per_subject if with_lesion else 0,
                seed=seed + index,
                **case_kwargs,
            )
            datalist[split].append(entry)
            index += 1
    return datalist
