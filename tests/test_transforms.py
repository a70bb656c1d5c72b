# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""Tests of anofpdm_monai.data.transforms and the VolumePreprocessor chain.

Expected values are derived independently of the package: by hand for tiny arrays, and for real MRI by a
reference pipeline written here with nibabel + numpy + torch only (``as_closest_canonical`` -> pad the axial
plane to a square -> ``F.interpolate`` bilinear per axial plane -> threshold).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Resize, Resized

from anofpdm_monai.data import (
    BinarizeLabeld,
    BrainMaskd,
    CaseError,
    ForegroundPercentileNormalize,
    ForegroundPercentileNormalized,
    MinMaxScale,
    MinMaxScaled,
    SquarePad,
    SquarePadd,
    VolumePreprocessor,
)
from anofpdm_monai.data.synthetic import make_case, phantom_anatomy
from anofpdm_monai.data.transforms import IsotropicInPlaned

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = SHARED_DATA / "tiny" / "BraTS2021_00006_3mm"
BRATS = SHARED_DATA / "brats2021" / "BraTS2021_00006"
MODALITIES = ["flair", "t1", "t1ce", "t2"]
needs_tiny = pytest.mark.skipif(
    not TINY.is_dir(), reason=f"real MRI test data not found at {TINY} (project-internal, absent on user machines)"
)
needs_brats = pytest.mark.skipif(
    not BRATS.is_dir(), reason=f"real MRI test data not found at {BRATS} (project-internal, absent on user machines)"
)


def _tiny_entry(root: Path = TINY, case_id: str = "tiny") -> dict:
    return {
        "id": case_id,
        "image": [str(root / f"BraTS2021_00006_{m}.nii.gz") for m in MODALITIES],
        "label": str(root / "BraTS2021_00006_seg.nii.gz"),
    }


# ---------------------------------------------------------------------------------------------------------------
# independent reference pipeline (nibabel + numpy + torch only)
# ---------------------------------------------------------------------------------------------------------------
def _canonical(path: str | Path) -> np.ndarray:
    """The volume in RAS voxel order (nibabel's own reorientation)."""
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).get_fdata(), dtype=np.float64)


def _pad_square(vol: np.ndarray) -> np.ndarray:
    """Zero-pad the first two axes to a square, centred (the odd pixel, if any, on the high side)."""
    x, y = vol.shape[:2]
    side = max(x, y)
    pads = [((side - n) // 2, side - n - (side - n) // 2) for n in (x, y)]
    return np.pad(vol, pads + [(0, 0)] * (vol.ndim - 2))


def _resize_planes(vol: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of every plane vol[:, :, k] to (size, size) with F.interpolate(align_corners=False)."""
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, 2, 0)))[:, None].double()
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return np.moveaxis(out.numpy(), 0, 2)


def _ref_label(seg: np.ndarray, size: int) -> np.ndarray:
    """Model-resolution anomaly mask of a segmentation already in (plane, plane, slice) order: label > 0."""
    return _resize_planes(_pad_square((seg > 0).astype(np.float64)), size) > 0.5


def _ref_image(paths: list[str], size: int, percentile: float = 99.0) -> np.ndarray:
    """(C, S, S, D) reference image: divide by the foreground percentile, background 0, resize, per-slice min-max."""
    channels = []
    for path in paths:
        vol = _canonical(path)
        fg = vol > 0
        scaled = np.where(fg, vol / np.percentile(vol[fg], percentile), 0.0)
        small = _resize_planes(_pad_square(scaled), size)
        lo = small.min(axis=(0, 1), keepdims=True)
        hi = small.max(axis=(0, 1), keepdims=True)
        span = np.where(hi > lo, hi - lo, 1.0)
        channels.append(np.where(hi > lo, (small - lo) / span * 2 - 1, -1.0))
    return np.stack(channels)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _reorient_copy(src: dict, dst: Path, axcodes: str) -> dict:
    """Write the case's files with their voxel axes reordered/flipped to ``axcodes`` (same anatomy, same world)."""
    dst.mkdir(parents=True, exist_ok=True)

    def one(path: str) -> str:
        img = nib.load(path)
        ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt(axcodes))
        out = img.as_reoriented(ornt)
        assert "".join(nib.aff2axcodes(out.affine)) == axcodes
        target = dst / Path(path).name
        nib.save(out, target)
        return str(target)

    return {"id": src["id"], "image": [one(p) for p in src["image"]], "label": one(src["label"])}


# ---------------------------------------------------------------------------------------------------------------
# real data: the whole chain against the reference
# ---------------------------------------------------------------------------------------------------------------
TINY_SIZES = [32, 64]


@needs_tiny
@pytest.mark.parametrize("size", TINY_SIZES)
def test_tiny_shapes_range_background(size):
    pre = VolumePreprocessor(modalities=MODALITIES, image_size=size)
    data = pre(_tiny_entry())
    assert tuple(data["image"].shape) == (4, size, size, 46)
    assert tuple(data["label"].shape) == tuple(data["brain"].shape) == (1, size, size, 46)
    out = pre.slices(data)
    n = len(out.table)
    assert out.image.shape == (n, 4, size, size) and out.image.dtype == np.float32
    assert out.label.shape == out.brain.shape == (n, size, size) and out.label.dtype == np.uint8
    assert float(out.image.min()) == pytest.approx(-1.0, abs=1e-6)
    assert float(out.image.max()) <= 1.0 and float(out.image.max()) > 0.999
    assert set(np.unique(out.label)) == {0, 1}
    assert set(np.unique(np.asarray(data["label"]))) == {0.0, 1.0}
    # background: pixels whose whole bilinear footprint lies outside the brain are exactly -1 in every channel
    brain = np.stack([_canonical(p) > 0 for p in _tiny_entry()["image"]]).any(axis=0)
    outside = _resize_planes(_pad_square(brain.astype(np.float64)), size)[..., out.table.slice_index] == 0
    outside = np.moveaxis(outside, 2, 0)  # (N, S, S)
    assert outside.sum() > 0.3 * outside.size
    assert np.all(out.image.transpose(1, 0, 2, 3)[:, outside] == -1.0)


@needs_tiny
@pytest.mark.parametrize("size", TINY_SIZES)
def test_tiny_image_matches_reference(size):
    pre = VolumePreprocessor(modalities=MODALITIES, image_size=size)
    data = pre(_tiny_entry())
    expected = _ref_image(_tiny_entry()["image"], size)
    # MinMaxScale divides by (max - min + 1e-5): up to 3e-4 off on the edge slices, which hold few brain pixels
    np.testing.assert_allclose(np.asarray(data["image"]), expected, atol=1e-3)


@needs_tiny
@pytest.mark.parametrize("size", [32, 48, 64])
def test_tiny_slice_labels_match_segmentation(size):
    pre = VolumePreprocessor(modalities=MODALITIES, image_size=size)
    out = pre.slices(pre(_tiny_entry()))
    ref = _ref_label(_canonical(_tiny_entry()["label"]), size)  # (S, S, D)
    ref_area = ref.sum(axis=(0, 1))
    k = out.table["slice_index"].to_numpy()
    np.testing.assert_array_equal(out.table["lesion_area"].to_numpy(), ref_area[k])
    np.testing.assert_array_equal(out.table["label"].to_numpy(), (ref_area[k] > 0).astype(int))
    np.testing.assert_array_equal(out.label, np.moveaxis(ref, 2, 0)[k].astype(np.uint8))
    # the segmentation has lesion voxels in RAS slices 15..37; slice 37 holds too little to survive resizing
    assert out.table["label"].sum() >= 20
    # every tiny slice holds brain: the kept range is the whole volume
    np.testing.assert_array_equal(k, np.arange(46))


@needs_brats
def test_full_brats_case_slice_labels_and_brain_range():
    """One full 240 x 240 x 155 case (FLAIR only, to stay fast)."""
    entry = {
        "id": "BraTS2021_00006",
        "image": [str(BRATS / "BraTS2021_00006_flair.nii.gz")],
        "label": str(BRATS / "BraTS2021_00006_seg.nii.gz"),
    }
    pre = VolumePreprocessor(modalities=["flair"], image_size=128)
    out = pre.slices(pre(entry))
    ref = _ref_label(_canonical(entry["label"]), 128)
    brain_area = (_resize_planes(_canonical(entry["image"][0]) > 0, 128) > 0.5).sum(axis=(0, 1))
    bearing = np.nonzero(brain_area)[0]
    k = out.table["slice_index"].to_numpy()
    np.testing.assert_array_equal(k, np.arange(bearing[0], bearing[-1] + 1))
    np.testing.assert_array_equal(out.table["brain_area"].to_numpy(), brain_area[k])
    np.testing.assert_array_equal(out.table["lesion_area"].to_numpy(), ref.sum(axis=(0, 1))[k])
    np.testing.assert_array_equal(out.table["label"].to_numpy(), ref.any(axis=(0, 1))[k].astype(int))
    assert out.image.shape == (len(k), 1, 128, 128)
    assert 0 < out.table["label"].sum() < len(k)


# ---------------------------------------------------------------------------------------------------------------
# orientation: the same anatomy stored with different voxel axes gives identical slices
# ---------------------------------------------------------------------------------------------------------------
# (target axcodes, the input voxel axis that is axial, whether the input's axial axis runs S->I)
ORIENTATION_CASES = [
    ("RAS", 2, False),
    ("LPI", 2, True),  # axial axis flipped
    ("SLP", 0, False),  # axial axis first
    ("PIR", 1, True),  # permuted and flipped
]


@needs_tiny
@pytest.mark.parametrize("axcodes, axial_axis, flipped", ORIENTATION_CASES)
def test_reoriented_copies_give_identical_slices(tmp_path, axcodes, axial_axis, flipped):
    size = 32
    pre = VolumePreprocessor(modalities=MODALITIES, image_size=size)
    lps = pre.slices(pre(_tiny_entry()))  # the tiny files are LPS
    entry = _reorient_copy(_tiny_entry(), tmp_path / axcodes, axcodes)
    other = pre.slices(pre(entry))
    np.testing.assert_array_equal(other.image, lps.image)
    np.testing.assert_array_equal(other.label, lps.label)
    np.testing.assert_array_equal(other.brain, lps.brain)
    cols = ["row", "slice_index", "label", "lesion_area", "brain_area"]
    assert other.table[cols].equals(lps.table[cols])

    # source_index points at the right slice of the file: by construction ...
    seg = np.asarray(nib.load(entry["label"]).dataobj)
    depth = seg.shape[axial_axis]
    k = other.table["slice_index"].to_numpy()
    expected_source = depth - 1 - k if flipped else k
    np.testing.assert_array_equal(other.table["source_index"].to_numpy(), expected_source)
    # ... and by the lesion found in that file slice: pad + bilinear resize of the file's own plane (its in-plane
    # axis order/flips do not matter: the pad difference is even, hence symmetric, and both axes resize alike)
    plane_first = np.moveaxis(seg, axial_axis, -1)
    assert (max(plane_first.shape[:2]) - min(plane_first.shape[:2])) % 2 == 0
    per_source = _ref_label(plane_first, size).sum(axis=(0, 1))
    src = other.table["source_index"].to_numpy()
    np.testing.assert_array_equal(other.table["lesion_area"].to_numpy(), per_source[src])
    assert not np.array_equal(per_source, per_source[::-1])  # the check could tell a flipped index apart


@needs_tiny
def test_lps_source_index_is_identity():
    pre = VolumePreprocessor(modalities=MODALITIES, image_size=32)
    data = pre(_tiny_entry())
    axis, index = pre.source_axial_index(data)
    assert axis == 2
    np.testing.assert_array_equal(index, np.arange(46))
    seg = np.asarray(nib.load(_tiny_entry()["label"]).dataobj)
    table = pre.slices(data).table
    present = (seg > 0).any(axis=(0, 1))
    # a slice labelled unhealthy has lesion voxels in the source slice it names
    assert present[table.loc[table["label"] == 1, "source_index"]].all()


SYNTH_MODALITIES = ["flair", "t2"]


@pytest.mark.parametrize("seed", [0, 5])
def test_synthetic_lps_equals_ras(tmp_path, seed):
    anatomy = phantom_anatomy((24, 28, 20), spacing=8.0)
    ras = make_case(anatomy, tmp_path, "ras", modalities=SYNTH_MODALITIES, seed=seed, orientation="RAS")
    lps = make_case(anatomy, tmp_path, "lps", modalities=SYNTH_MODALITIES, seed=seed, orientation="LPS")
    pre = VolumePreprocessor(modalities=SYNTH_MODALITIES, image_size=16)

    def absolute(e):
        return {"id": e["id"], "image": [str(tmp_path / p) for p in e["image"]], "label": str(tmp_path / e["label"])}

    assert nib.aff2axcodes(nib.load(absolute(lps)["label"]).affine) == ("L", "P", "S")
    a, b = pre.slices(pre(absolute(ras))), pre.slices(pre(absolute(lps)))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    cols = ["slice_index", "source_index", "label", "lesion_area", "brain_area"]
    assert a.table[cols].equals(b.table[cols])
    # the synthetic lesion is in the table: compare with the written segmentation, slice by slice
    seg = np.asarray(nib.load(absolute(ras)["label"]).dataobj)
    ref = _ref_label(seg, 16).sum(axis=(0, 1))
    np.testing.assert_array_equal(a.table["lesion_area"].to_numpy(), ref[a.table["slice_index"]])
    assert a.table["label"].sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# geometry round trip
# ---------------------------------------------------------------------------------------------------------------
@needs_tiny
@pytest.mark.parametrize("axcodes", ["LPS", "RAS", "LPI"])
@pytest.mark.parametrize("interpolate", [True, False])
def test_invert_restores_input_grid(tmp_path, axcodes, interpolate):
    entry = _tiny_entry() if axcodes == "LPS" else _reorient_copy(_tiny_entry(), tmp_path, axcodes)
    pre = VolumePreprocessor(modalities=MODALITIES, image_size=48)
    data = pre(entry)
    back = pre.invert(data["label"], data, interpolate=interpolate)
    ref_img = nib.load(entry["label"])
    assert tuple(back.shape) == (1, *ref_img.shape)
    np.testing.assert_allclose(np.asarray(back.affine), ref_img.affine, atol=1e-4)
    original = np.asarray(ref_img.dataobj) > 0
    assert _dice(np.asarray(back[0]) > 0.5, original) > 0.9


# ---------------------------------------------------------------------------------------------------------------
# normalisation by hand
# ---------------------------------------------------------------------------------------------------------------
def _vol(values, shape=None) -> torch.Tensor:
    arr = torch.tensor(values, dtype=torch.float32)
    return arr.reshape(shape if shape is not None else (1, -1, 1, 1))


# (input values, mask or None, percentile, expected output); arrays are (1, n, 1, 1)
PERCENTILE_CASES = [
    # 99th percentile of 1..100 (numpy/linear): 99 + 0.01 * (100 - 99) = 99.01; background (zeros) stays 0
    ([0, 0] + list(range(1, 101)), None, 99.0, [0, 0] + [v / 99.01 for v in range(1, 101)]),
    # median of {2, 4, 6, 8, 10} is 6
    ([0, 2, 4, 6, 8, 10], None, 50.0, [0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3]),
    # without a mask the foreground is > 0: negative voxels are background and go to 0
    ([-3, 0, 2, 4], None, 100.0, [0, 0, 0.5, 1]),
    # mask given, z-scored brain (negative values): background -> min(0, min fg) = -2/3
    ([-5, -5, -2, -1, 1, 3], [0, 0, 1, 1, 1, 1], 100.0, [-2 / 3, -2 / 3, -2 / 3, -1 / 3, 1 / 3, 1]),
    # mask given, positive brain, non-zero background: background -> min(0, 0.5) = 0
    ([7, 9, 2, 4], [0, 0, 1, 1], 100.0, [0, 0, 0.5, 1]),
]


@pytest.mark.parametrize("values, mask, percentile, expected", PERCENTILE_CASES)
def test_foreground_percentile_by_hand(values, mask, percentile, expected):
    norm = ForegroundPercentileNormalize(percentile=percentile)
    out = norm(_vol(values), mask=None if mask is None else _vol(mask))
    np.testing.assert_allclose(out.numpy().ravel(), expected, rtol=1e-6, atol=1e-7)
    # dictionary version, the mask under "brain_mask"
    data = {"image": _vol(values)} | ({} if mask is None else {"brain_mask": _vol(mask)})
    out_d = ForegroundPercentileNormalized(keys="image", percentile=percentile)(data)["image"]
    np.testing.assert_allclose(out_d.numpy().ravel(), expected, rtol=1e-6, atol=1e-7)


def test_foreground_percentile_per_channel():
    img = torch.tensor([[0, 1, 2, 4], [0, 10, 20, 50]], dtype=torch.float32).reshape(2, 4, 1, 1)
    out = ForegroundPercentileNormalize(percentile=100.0)(img).numpy().reshape(2, 4)
    np.testing.assert_allclose(out, [[0, 0.25, 0.5, 1], [0, 0.2, 0.4, 1]], rtol=1e-6)


def test_zscored_background_ends_at_minus_one():
    """Brain mask + z-scored values: background -> the minimum -> -1 after min-max (per slice and per volume)."""
    # (1, H=2, W=3, D=2): column w = 0 is background with value 0, above the lowest brain values
    img = torch.zeros(1, 2, 3, 2)
    img[0, :, 1:, 0] = torch.tensor([[-1.0, 1.0], [2.0, 0.5]])
    img[0, :, 1:, 1] = torch.tensor([[-0.5, 4.0], [3.0, 1.0]])
    mask = torch.ones_like(img)
    mask[:, :, 0, :] = 0
    norm = ForegroundPercentileNormalize(percentile=100.0)(img, mask=mask)
    # scale = max fg = 4, min fg / 4 = -0.25: the background becomes -0.25
    np.testing.assert_allclose(norm[0, :, 0, :].numpy(), -0.25)
    np.testing.assert_allclose(norm[0, :, 1:, 1].numpy(), [[-0.125, 1.0], [0.75, 0.25]])
    for per_slice in (True, False):
        scaled = MinMaxScale(per_slice=per_slice)(norm)
        np.testing.assert_allclose(scaled[0, :, 0, :].numpy(), -1.0, atol=1e-6)
        assert float(scaled.max()) == pytest.approx(1.0, abs=1e-4)
    # per slice, slice 1: (x + 0.25) / 1.25 * 2 - 1
    np.testing.assert_allclose(
        MinMaxScale(per_slice=True)(norm)[0, :, 1:, 1].numpy(), [[-0.8, 1.0], [0.6, -0.2]], atol=1e-4
    )
    # without the mask handling, the background (0) would sit mid-range: per volume (0 + 1) / 5 * 2 - 1 = -0.6
    assert float(MinMaxScale(per_slice=False)(img)[0, 0, 0, 0]) == pytest.approx(-0.6, abs=1e-4)


PERCENTILE_ERROR_CASES = [
    # (values, mask, expected error text)
    ([0, 0, 0, 0], None, "no foreground"),
    ([0, 5, -2, -1], [0, 0, 1, 1], "not positive"),
]


@pytest.mark.parametrize("values, mask, text", PERCENTILE_ERROR_CASES)
def test_foreground_percentile_errors(values, mask, text):
    with pytest.raises(CaseError, match=text):
        ForegroundPercentileNormalize(percentile=99.0)(_vol(values), mask=None if mask is None else _vol(mask))


@pytest.mark.parametrize("percentile", [0.0, -1.0, 100.5])
def test_foreground_percentile_invalid_parameter(percentile):
    with pytest.raises(ValueError, match="percentile"):
        ForegroundPercentileNormalize(percentile=percentile)


# one channel, 2 x 2 plane, 2 slices: slice 0 = [[0, 1], [2, 4]], slice 1 constant 10
MINMAX_INPUT = torch.tensor([[[0.0, 10.0], [1.0, 10.0]], [[2.0, 10.0], [4.0, 10.0]]])[None]  # (1, H, W, D)
MINMAX_CASES = [
    (True, [[-1.0, -0.5], [0.0, 1.0]], [[-1.0, -1.0], [-1.0, -1.0]]),  # per slice; constant slice -> -1
    (False, [[-1.0, -0.8], [-0.6, -0.2]], [[1.0, 1.0], [1.0, 1.0]]),  # per volume: x / 10 * 2 - 1
]


@pytest.mark.parametrize("per_slice, slice0, slice1", MINMAX_CASES)
def test_minmax_scale_by_hand(per_slice, slice0, slice1):
    for out in (
        MinMaxScale(per_slice=per_slice)(MINMAX_INPUT),
        MinMaxScaled(keys="image", per_slice=per_slice)({"image": MINMAX_INPUT})["image"],
    ):
        np.testing.assert_allclose(out[0, :, :, 0].numpy(), slice0, atol=1e-4)
        np.testing.assert_allclose(out[0, :, :, 1].numpy(), slice1, atol=1e-4)


def test_minmax_scale_per_channel():
    img = torch.stack([MINMAX_INPUT[0], MINMAX_INPUT[0] * 3 + 7])  # an affine change per channel
    out = MinMaxScale(per_slice=True)(img)
    np.testing.assert_allclose(out[1].numpy(), out[0].numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# resizing: trilinear with the slice axis kept == bilinear per axial plane
# ---------------------------------------------------------------------------------------------------------------
RESIZE_CASES = [((23, 17), (12, 12)), ((23, 17), (40, 40)), ((16, 16), (9, 13)), ((59, 59), (32, 32))]


@pytest.mark.parametrize("plane, size", RESIZE_CASES)
def test_resize_keeping_slice_axis_is_bilinear_per_plane(plane, size):
    gen = torch.Generator().manual_seed(0)
    img = torch.rand((2, *plane, 5), generator=gen)
    out = Resize(spatial_size=(*size, -1), mode="trilinear")(img)
    out_d = Resized(keys="x", spatial_size=(*size, -1), mode="trilinear")({"x": img})["x"]
    per_plane = F.interpolate(img.permute(3, 0, 1, 2), size=size, mode="bilinear", align_corners=False)
    expected = per_plane.permute(1, 2, 3, 0)
    assert tuple(out.shape) == (2, *size, 5)
    np.testing.assert_allclose(np.asarray(out), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_d), expected.numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# SquarePad
# ---------------------------------------------------------------------------------------------------------------
# (input spatial shape, expected (low, high) pads on axes 1 and 2)
SQUARE_PAD_CASES = [
    ((5, 3, 2), ((0, 0), (1, 1))),
    ((3, 6, 2), ((1, 2), (0, 0))),
    ((4, 4, 3), ((0, 0), (0, 0))),
    ((45, 59, 2), ((7, 7), (0, 0))),
    ((7, 2), ((0, 0), (2, 3))),  # a 2D plane
]


@pytest.mark.parametrize("shape, pads", SQUARE_PAD_CASES)
def test_square_pad_centred_and_invertible(shape, pads):
    img = torch.arange(1, int(np.prod(shape)) + 1, dtype=torch.float32).reshape(1, *shape)
    side = max(shape[0], shape[1])
    pad = SquarePad()
    out = pad(img)
    assert tuple(out.shape) == (1, side, side, *shape[2:])
    (x0, x1), (y0, y1) = pads
    assert x0 + shape[0] + x1 == side and y0 + shape[1] + y1 == side
    np.testing.assert_array_equal(np.asarray(out[:, x0 : x0 + shape[0], y0 : y0 + shape[1]]), img.numpy())
    assert float(out.sum()) == float(img.sum())  # only zeros were added
    back = pad.inverse(out)
    np.testing.assert_array_equal(np.asarray(back), img.numpy())
    # dictionary version on two keys, inverted through the recorded operations
    padd = SquarePadd(keys=["image", "label"])
    data = padd({"image": img, "label": (img > 3).float()})
    assert tuple(data["label"].shape) == tuple(out.shape)
    np.testing.assert_array_equal(np.asarray(data["image"]), np.asarray(out))
    restored = padd.inverse(data)
    np.testing.assert_array_equal(np.asarray(restored["image"]), img.numpy())
    np.testing.assert_array_equal(np.asarray(restored["label"]), (img > 3).float().numpy())


# ---------------------------------------------------------------------------------------------------------------
# label and brain mask
# ---------------------------------------------------------------------------------------------------------------
def test_binarize_label():
    seg = torch.tensor([0, 1, 2, 4, 0, 3], dtype=torch.float32).reshape(1, 6, 1, 1)
    out = BinarizeLabeld(keys="label")({"label": seg})["label"]
    np.testing.assert_array_equal(out.numpy().ravel(), [0, 1, 1, 1, 0, 1])
    assert out.dtype == torch.float32


BRAIN_MASK_CASES = [
    # (image channels, given mask or None, expected brain)
    ([[0, 3, 0, 0], [0, 0, 2, 0]], None, [0, 1, 1, 0]),  # any channel > 0
    ([[-1, -2, 5, 0]], [0, 1, 1, 0], [0, 1, 1, 0]),  # the given mask wins
]


@pytest.mark.parametrize("image, mask, expected", BRAIN_MASK_CASES)
def test_brain_mask(image, mask, expected):
    data = {"image": torch.tensor(image, dtype=torch.float32).reshape(len(image), 4, 1, 1)}
    if mask is not None:
        data["brain_mask"] = torch.tensor(mask, dtype=torch.float32).reshape(1, 4, 1, 1)
    out = BrainMaskd()(data)["brain"]
    np.testing.assert_array_equal(out.numpy().ravel(), expected)


def test_brain_mask_empty_raises():
    with pytest.raises(CaseError, match="brain mask is empty"):
        BrainMaskd()({"id": "c", "image": torch.zeros(1, 3, 3, 3), "brain_mask": torch.zeros(1, 3, 3, 3)})
    # no mask given and no voxel > 0: said as such, not as an empty mask
    with pytest.raises(CaseError, match=r"case c: no voxel of the image is > 0 \(without a brain_mask"):
        BrainMaskd()({"id": "c", "image": -torch.ones(1, 3, 3, 3)})


# ---------------------------------------------------------------------------------------------------------------
# square pixels in the axial plane
# ---------------------------------------------------------------------------------------------------------------
def test_isotropic_in_plane_by_hand_and_inverted():
    """A 4 x 3 plane at 1 x 2 mm becomes 4 x 6 at 1 x 1 mm: along the coarse axis the new samples sit at old
    positions -0.25, 0.25, 0.75, ... (centres kept), i.e. linear interpolation between old columns (border-padded
    beyond the ends); the slice axis and the other in-plane axis are untouched; the inverse resamples back onto the
    input grid."""
    plane = torch.tensor([[0.0, 4.0, 8.0]] * 4)  # (4, 3): grows by 4 per old column along axis 1
    img = MetaTensor(
        torch.stack([plane, plane + 100], dim=-1)[None], affine=torch.diag(torch.tensor([1.0, 2.0, 3.0, 1]))
    )
    step = IsotropicInPlaned(keys=["image", "label"], mode=["bilinear", "nearest"])
    out = step({"image": img, "label": (img > 4).float()})
    assert tuple(out["image"].shape) == (1, 4, 6, 2)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["image"].affine)[:3, :3], axis=0), [1, 1, 3])
    expected = [0.0, 1.0, 3.0, 5.0, 7.0, 8.0]  # 4 * clip(-0.25, 0.25, ..., 2.25 to [0, 2])
    np.testing.assert_allclose(out["image"][0, 2, :, 0].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out["image"][0, 2, :, 1].numpy(), np.add(expected, 100), atol=1e-4)
    assert set(np.unique(out["label"].numpy())) <= {0.0, 1.0}  # nearest keeps a label binary
    back = step.inverse(out)
    assert tuple(back["image"].shape) == tuple(img.shape)
    # the middle column comes back exactly (halfway between new samples 3 and 5); the end columns are averaged with
    # the border-clamped samples beside them (0 -> 0.5, 8 -> 7.5): the inversion is interpolation, not an undo
    np.testing.assert_allclose(back["image"][0, :, 1].numpy(), img[0, :, 1].numpy(), atol=1e-4)
    np.testing.assert_allclose(back["image"][0, :, [0, 2], 0].numpy(), [[0.5, 7.5]] * 4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(back["image"].affine), np.asarray(img.affine), atol=1e-6)
    # square pixels already: nothing changes, bitwise
    square = MetaTensor(img.as_tensor().clone(), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1])))
    same = IsotropicInPlaned(keys="image")({"image": square})["image"]
    assert torch.equal(same.as_tensor(), square.as_tensor())


# ---------------------------------------------------------------------------------------------------------------
# bad input: one-line CaseError naming the file
# ---------------------------------------------------------------------------------------------------------------
GRID = (10, 12, 8)


def _write(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return str(path)


def _good_volume(seed: int) -> np.ndarray:
    vol = np.zeros(GRID, dtype=np.float32)
    vol[2:8, 3:9, 2:6] = np.random.default_rng(seed).uniform(10, 100, size=(6, 6, 4))
    return vol


def _bad_entry(tmp_path: Path, kind: str) -> tuple[dict, str]:
    """A two-modality case with one defect; returns the entry and the path of the faulty file."""
    flair = _write(tmp_path / "flair.nii.gz", _good_volume(0))
    t2 = tmp_path / "t2.nii.gz"
    seg = np.zeros(GRID, dtype=np.uint8)
    seg[4:6, 5:7, 3:5] = 2
    label = tmp_path / "seg.nii.gz"
    entry = {"id": "bad_case", "image": [flair, str(t2)], "label": str(label)}
    faulty = str(t2)
    if kind == "missing":
        _write(label, seg)
    elif kind == "unreadable":
        t2.write_bytes(b"this is not a NIfTI file" * 20)
        _write(label, seg)
    elif kind == "truncated":
        _write(t2, _good_volume(1))
        t2.write_bytes(t2.read_bytes()[:200])
        _write(label, seg)
    elif kind == "shape_mismatch":
        _write(t2, np.ones((10, 12, 9), dtype=np.float32))
        _write(label, seg)
    elif kind == "not_3d":
        _write(t2, np.stack([_good_volume(1)] * 2, axis=-1))
        _write(label, seg)
    elif kind in ("empty", "constant", "nan", "inf"):
        bad = {"empty": np.zeros(GRID), "constant": np.full(GRID, 5.0), "nan": _good_volume(1), "inf": _good_volume(1)}
        if kind == "nan":
            bad["nan"][5, 5, 5] = np.nan
        if kind == "inf":
            bad["inf"][5, 5, 5] = np.inf
        _write(t2, bad[kind].astype(np.float32))
        _write(label, seg)
    elif kind in ("label_affine", "label_shape", "mask_affine"):
        _write(t2, _good_volume(1))
        shifted = np.eye(4)
        shifted[:3, 3] = [5.0, 0.0, 0.0]
        if kind == "label_affine":
            _write(label, seg, affine=shifted)
        elif kind == "label_shape":
            _write(label, np.zeros((20, 24, 16), dtype=np.uint8), affine=np.diag([0.5, 0.5, 0.5, 1.0]))
        else:
            _write(label, seg)
            entry["brain_mask"] = _write(tmp_path / "mask.nii.gz", (_good_volume(2) > 0).astype(np.uint8), shifted)
        faulty = entry.get("brain_mask", str(label))
    else:
        raise AssertionError(kind)
    return entry, faulty


# (defect, expected text in the message)
BAD_INPUT_CASES = [
    ("missing", "not found"),
    ("unreadable", "cannot read"),
    ("truncated", "cannot read"),
    ("shape_mismatch", "shape"),
    ("not_3d", "not a single 3D volume"),
    ("empty", "empty"),
    ("constant", "constant"),
    ("nan", "NaN"),
    ("inf", "Inf"),
    ("label_affine", "another grid"),
    ("label_shape", "shape"),
    ("mask_affine", "another grid"),
]


@pytest.mark.parametrize("kind, text", BAD_INPUT_CASES)
def test_bad_input_one_line_case_error(tmp_path, kind, text):
    entry, faulty = _bad_entry(tmp_path, kind)
    pre = VolumePreprocessor(modalities=["flair", "t2"], image_size=8)
    with pytest.raises(CaseError) as info:
        pre(entry)
    message = str(info.value)
    assert "\n" not in message
    assert text in message
    assert faulty in message
    assert message.startswith("case bad_case:")


def test_good_small_case_passes(tmp_path):
    """The defect-free version of the bad-input case preprocesses (so the errors above are caused by the defect)."""
    flair = _write(tmp_path / "flair.nii.gz", _good_volume(0))
    t2 = _write(tmp_path / "t2.nii.gz", _good_volume(1))
    seg = np.zeros(GRID, dtype=np.uint8)
    seg[4:6, 5:7, 3:5] = 2
    entry = {"id": "ok", "image": [flair, t2], "label": _write(tmp_path / "seg.nii.gz", seg)}
    pre = VolumePreprocessor(modalities=["flair", "t2"], image_size=12)
    out = pre.slices(pre(entry))
    # brain in input slices 2..5; lesion in slices 3..4 (identity affine: RAS, no flip)
    np.testing.assert_array_equal(out.table["slice_index"], [2, 3, 4, 5])
    np.testing.assert_array_equal(out.table["label"], [0, 1, 1, 0])
    np.testing.assert_array_equal(out.table["lesion_area"], _ref_label(seg, 12).sum(axis=(0, 1))[2:6])


def test_other_failures_name_case_and_transform(tmp_path, monkeypatch):
    """A failure that is not a CaseError comes out as one line naming the case and the transform (not MONAI's
    'applying transform <object at 0x...>')."""
    flair = _write(tmp_path / "flair.nii.gz", _good_volume(0))
    t2 = _write(tmp_path / "t2.nii.gz", _good_volume(1))
    entry = {"id": "odd", "image": [flair, t2], "label": _write(tmp_path / "seg.nii.gz", np.zeros(GRID, np.uint8))}

    def broken(self, data):
        raise ZeroDivisionError("float division by zero\nsecond line")

    monkeypatch.setattr(BinarizeLabeld, "__call__", broken)
    with pytest.raises(RuntimeError) as info:
        VolumePreprocessor(modalities=["flair", "t2"], image_size=8)(entry)
    assert (
        str(info.value) == "case odd: preprocessing failed in BinarizeLabeld: ZeroDivisionError: float division by zero"
    )
    assert isinstance(info.value.__cause__, ZeroDivisionError)
