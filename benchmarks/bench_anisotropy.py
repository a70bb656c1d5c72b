# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""What the preprocessing does with a brain stored with non-square in-plane voxels (issue 21, item 4).

A real case (default: BraTS2021_00006, 1 mm isotropic, FLAIR + segmentation) is copied into a temporary folder with
its axial plane resampled to ``--spacing`` mm (default 1.5 x 3 mm: right-left x anterior-posterior; the slice axis
kept), image linear with a Gaussian pre-filter against aliasing, label nearest: the same brain, stored anisotropic.
Both are run through :class:`~anofpdm_monai.data.VolumePreprocessor`, once as it is (the in-plane resampling of
``IsotropicInPlaned``) and once with that step turned off (its tolerance set to infinity: the chain before the fix).

Printed, for each chain:

- **model-resolution Dice**: the copy's preprocessed label against the original's preprocessed label (both
  ``image_size`` x ``image_size`` x slices, RAS): how far the copy's slices, as the model sees them, are from the
  same brain stored isotropic (1.0 = the model sees the same slices);
- **image agreement**: Pearson r of the two preprocessed images inside the original's brain;
- **round-trip Dice**: the copy's preprocessed label brought back through ``VolumePreprocessor.invert`` (bilinear,
  thresholded at 0.5, as the inference masks are) onto the copy's own grid, against the copy's label;
- preprocessing time of the copy.

Usage::

    python benchmarks/bench_anisotropy.py [--data ../shared/data] [--case brats2021/BraTS2021_00006]
        [--spacing 1.5 3.0] [--image-size 128]

Without the data folder it prints why and exits 0 (the data are project-internal).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import monai  # noqa: E402

from anofpdm_monai.data import VolumePreprocessor  # noqa: E402
from anofpdm_monai.data.transforms import IsotropicInPlaned  # noqa: E402


def anisotropic_copy(image: Path, label: Path, spacing: tuple[float, float], out: Path) -> tuple[Path, Path]:
    """Write ``image`` and ``label`` resampled so that their right-left and anterior-posterior voxel sizes are
    ``spacing`` (mm); the inferior-superior axis and the field-of-view centre are kept."""
    img, seg = nib.load(str(image)), nib.load(str(label))
    ornt = nib.orientations.io_orientation(img.affine)  # file axis i -> (RAS axis, flip)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    factor = np.ones(3)
    for axis in range(3):
        ras = int(ornt[axis, 0])
        if ras < 2:
            factor[axis] = spacing[ras] / zooms[axis]
    shape = np.asarray(img.shape[:3])
    new_shape = np.maximum(1, np.round(shape / factor)).astype(int)
    offset = (shape - 1) / 2.0 - factor * (new_shape - 1) / 2.0  # old index = factor * new index + offset
    step = np.eye(4)
    step[:3, :3] = np.diag(factor)
    step[:3, 3] = offset
    affine = img.affine @ step
    data = np.asarray(img.dataobj, dtype=np.float32)
    sigma = np.maximum(factor - 1.0, 0.0) / 2.0
    smooth = ndimage.gaussian_filter(data, sigma) if sigma.any() else data
    moved = ndimage.affine_transform(smooth, factor, offset, output_shape=tuple(new_shape), order=1)
    lab = ndimage.affine_transform(np.asarray(seg.dataobj), factor, offset, output_shape=tuple(new_shape), order=0)
    out.mkdir(parents=True, exist_ok=True)
    new_image, new_label = out / image.name, out / label.name
    nib.save(nib.Nifti1Image(moved.astype(np.float32), affine), new_image)
    nib.save(nib.Nifti1Image(lab.astype(np.uint8), affine), new_label)
    return new_image, new_label


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum() + b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def legacy(pre: VolumePreprocessor) -> VolumePreprocessor:
    """The same preprocessing with the in-plane resampling turned off: the chain before the fix."""
    old = VolumePreprocessor.from_dict(pre.to_dict())
    steps = [t for t in old.transform.transforms if isinstance(t, IsotropicInPlaned)]
    assert len(steps) == 1
    steps[0].tolerance = math.inf
    return old


def measure(pre: VolumePreprocessor, copy: dict, reference: dict) -> dict[str, float]:
    """The figures of one chain on the copy, against the original's preprocessed ``reference`` arrays."""
    start = time.perf_counter()
    data = pre(copy)
    seconds = time.perf_counter() - start
    label = np.asarray(data["label"][0]) > 0.5
    model_dice = dice(label, reference["label"]) if label.shape == reference["label"].shape else math.nan
    image = np.asarray(data["image"][0], dtype=np.float64)
    brain = reference["brain"]
    r = float(np.corrcoef(image[brain], reference["image"][brain])[0, 1]) if image.shape == brain.shape else math.nan
    back = np.asarray(pre.invert(data["label"], data, interpolate=True)[0]) > 0.5
    truth = np.asarray(nib.load(copy["label"]).dataobj) > 0
    return {"model_dice": model_dice, "image_r": r, "roundtrip_dice": dice(back, truth), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--case", default="brats2021/BraTS2021_00006")
    parser.add_argument("--spacing", type=float, nargs=2, default=[1.5, 3.0], metavar=("RL_MM", "AP_MM"))
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args(argv)
    folder = args.data / args.case
    name = folder.name
    image, label = folder / f"{name}_flair.nii.gz", folder / f"{name}_seg.nii.gz"
    if not (image.is_file() and label.is_file()):
        print(f"skipped: {image} or {label} not found (the real data are project-internal; pass --data)")
        return 0
    torch.set_num_threads(1)
    print("command: python " + " ".join(sys.argv))
    print(f"python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}, CPU")
    pre = VolumePreprocessor(modalities=["flair"], image_size=args.image_size)
    original = {"id": name, "image": [str(image)], "label": str(label)}
    ref = pre(original)
    reference = {
        "label": np.asarray(ref["label"][0]) > 0.5,
        "brain": np.asarray(ref["brain"][0]) > 0.5,
        "image": np.asarray(ref["image"][0], dtype=np.float64),
    }
    zooms = nib.load(str(image)).header.get_zooms()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        new_image, new_label = anisotropic_copy(image, label, tuple(args.spacing), Path(tmp))
        copy = {"id": f"{name}_aniso", "image": [str(new_image)], "label": str(new_label)}
        shape = nib.load(str(new_image)).shape
        print(
            f"case {args.case}: {nib.load(str(image)).shape} at {' x '.join(f'{z:g}' for z in zooms)} mm; copy "
            f"{shape} at {args.spacing[0]:g} x {args.spacing[1]:g} mm in-plane (RL x AP), image size {args.image_size}"
        )
        same = measure(pre, original, reference)
        print(f"original through the chain (sanity): round-trip Dice {same['roundtrip_dice']:.4f}")
        print(f"{'chain':<34} {'model-res Dice':>14} {'image r':>8} {'round-trip Dice':>16} {'seconds':>8}")
        for title, chain in (("before (no in-plane resampling)", legacy(pre)), ("after (IsotropicInPlaned)", pre)):
            m = measure(chain, copy, reference)
            print(
                f"{title:<34} {m['model_dice']:>14.4f} {m['image_r']:>8.4f} {m['roundtrip_dice']:>16.4f} "
                f"{m['seconds']:>8.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
