"""Inputs (issue 21, item 4): what the package does with inputs that are unusual rather than broken.

- anisotropic in-plane voxels: resampled to square pixels before the square pad and the resize (invertibly; the
  identity for isotropic input), measured on a synthetic brain and on a real one;
- case ids: fullmatch (a trailing newline is not safe), unicode and over-long ids fail alone, before any file is
  read, in a run over a datalist file that is not refused as a whole;
- paths outside ``dataset_dir`` warn however they get there (``../``, absolute, symlink);
- datalist and calibration reads are bounded (``/dev/zero``, a folder, a huge file);
- calibrated constants are checked against the range of what they measure (tau of each health score, M_max);
- the plausibility of an image: a label or mask given as the image warns, one hot voxel does not, and each refusal
  says what is wrong (values beyond float32, no intensity > 0, a singular affine);
- a preprocessing dict with keys this version does not know is refused;
- slice labels other than 0/1 are refused by the calibration;
- the health rule (score <= tau is unhealthy) is the same in the calibration's threshold search and at inference.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from test_volume_inference import BRATS, GRID, SIZE, _tiny_net

from anofpdm_monai.apps import datalist as datalist_cli
from anofpdm_monai.apps.inference import VolumeInferer, cases_for_inference
from anofpdm_monai.calibration import Calibration, CalibrationError
from anofpdm_monai.calibration.algorithm import CalibrationStatistics, calibrate_from_statistics, select_tau
from anofpdm_monai.data import CacheBuildError, SliceCache, VolumePreprocessor
from anofpdm_monai.data.datalist import (
    MAX_CASE_ID_LENGTH,
    DatalistError,
    case_id_problem,
    datalist_from_folder,
    is_safe_case_id,
    load_datalist,
    validate_datalist,
)
from anofpdm_monai.data.synthetic import make_case, phantom_anatomy
from anofpdm_monai.data.transforms import (
    INPLANE_ISOTROPY_TOLERANCE,
    CaseError,
    IsotropicInPlaned,
    LoadCased,
    distinct_values,
    inplane_grid,
    neighbour_correlation,
)
from anofpdm_monai.inferers import AnoFPDMInferer
from anofpdm_monai.inferers.health import is_unhealthy
from anofpdm_monai.networks import load_network, save_checkpoint
from anofpdm_monai.settings import AnoFPDMSettings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY = SHARED_DATA / "tiny" / "BraTS2021_00006_3mm"
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_anisotropy  # noqa: E402


def _one_line(text: str) -> None:
    assert text and "\n" not in text.strip(), text


def _save(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return str(path)


def _dice(a, b) -> float:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict:
    """One synthetic single-modality case at 2 mm isotropic with a lesion, stored LPS, and its copy resampled to
    2 x 4 mm in-plane (right-left x anterior-posterior) with the benchmark's own function."""
    root = tmp_path_factory.mktemp("phantom")
    anatomy = phantom_anatomy((48, 56, 16), spacing=2.0)
    entry = make_case(anatomy, root, "iso", modalities=("flair",), lesion_radius=(5.0, 6.0), seed=3, orientation="LPS")
    image, label = root / entry["image"][0], root / entry["label"]
    new_image, new_label = bench_anisotropy.anisotropic_copy(image, label, (2.0, 4.0), root / "aniso")
    return {
        "iso": {"id": "iso", "image": [str(image)], "label": str(label)},
        "aniso": {"id": "aniso", "image": [str(new_image)], "label": str(new_label)},
    }


# --------------------------------------------------------------------------------------------------------------------
# anisotropic in-plane voxels
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, expected_shape",
    [
        ((1.0, 1.0, 3.0), (40, 60, 10)),  # isotropic in-plane: the input grid itself
        ((1.0, 1.0 + INPLANE_ISOTROPY_TOLERANCE / 2, 2.0), (40, 60, 10)),  # within the tolerance: unchanged
        ((1.5, 3.0, 1.0), (40, 120, 10)),  # the coarse axis gets the fine size: 60 x 3 mm = 120 x 1.5 mm
        ((3.0, 1.5, 1.0), (80, 60, 10)),
        ((1.0, 1.05, 5.0), (40, 63, 10)),  # beyond the tolerance: 60 x 1.05 mm = 63 x 1 mm
    ],
)
def test_inplane_grid_square_pixels_through_plane_and_centre_kept(sizes, expected_shape):
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # directions must be kept as they are
    src = np.eye(4)
    src[:3, :3] = rotation * np.asarray(sizes)
    src[:3, 3] = [-20.0, 7.0, 3.0]
    shape = (40, 60, 10)
    dst, new_shape = inplane_grid(src, shape)
    assert new_shape == expected_shape
    lengths = np.linalg.norm(dst[:3, :3], axis=0)
    if new_shape == shape:
        np.testing.assert_array_equal(dst, src)
        return
    assert lengths[0] == pytest.approx(lengths[1]) and lengths[0] == pytest.approx(min(sizes[:2]))
    np.testing.assert_allclose(dst[:3, 2], src[:3, 2])  # the slice axis untouched
    np.testing.assert_allclose(dst[:3, :2] / lengths[:2], src[:3, :2] / np.asarray(sizes[:2]))  # same directions
    centre = src @ np.append((np.asarray(shape) - 1) / 2, 1)
    np.testing.assert_allclose(dst @ np.append((np.asarray(new_shape) - 1) / 2, 1), centre)


def test_inplane_grid_refuses_a_header_whose_voxel_sizes_would_explode_the_grid():
    with pytest.raises(CaseError) as info:
        inplane_grid(np.diag([0.01, 5.0, 1.0, 1.0]), (200, 200, 10), name="case x")
    _one_line(str(info.value))
    assert str(info.value).startswith("case x: in-plane voxel size 0.01 x 5 mm") and "check the voxel sizes" in str(
        info.value
    )


def test_isotropic_input_is_preprocessed_exactly_as_without_the_step(phantom):
    """Checkpoints, calibrations and slice caches made before the step keep their meaning: on isotropic input the
    chain's outputs and the inversion are bitwise those of the chain without it."""
    pre = VolumePreprocessor(modalities=["flair"], image_size=SIZE)
    without = Compose([t for t in pre.transform.transforms if not isinstance(t, IsotropicInPlaned)])
    assert len(without.transforms) == len(pre.transform.transforms) - 1
    entry = phantom["iso"]
    new = pre(entry)
    old = without({k: entry[k] for k in ("id", "image", "label")})
    for key in ("image", "label", "brain"):
        torch.testing.assert_close(new[key].as_tensor(), old[key].as_tensor(), rtol=0, atol=0)
    vol = torch.rand((1, *new["image"].shape[1:]))
    back_new = pre.invert(vol, new)
    ref = old["image"]
    moved = MetaTensor(vol.clone(), meta=dict(ref.meta))
    moved.applied_operations = [dict(op) for op in ref.applied_operations]
    back_old = Invertd(keys="v", transform=without, orig_keys="image", nearest_interp=False)({"v": moved, "image": ref})
    torch.testing.assert_close(torch.as_tensor(back_new), torch.as_tensor(back_old["v"]), rtol=0, atol=0)


def test_the_preprocessing_dict_is_unchanged_so_old_checkpoints_stay_loadable():
    pre = VolumePreprocessor()
    assert sorted(pre.to_dict()) == [
        "image_size",
        "min_brain_pixels",
        "modalities",
        "percentile",
        "scaling",
        "square_pad",
    ]
    old = {"modalities": ["flair"], "image_size": 8}  # a checkpoint's dict written before the step existed
    assert VolumePreprocessor.from_dict(old).to_dict() == {**pre.to_dict(), **old}


def test_an_anisotropic_copy_is_seen_like_the_isotropic_brain_and_maps_come_back_on_its_grid(phantom):
    """The same brain stored at 2 x 4 mm in-plane: the model-resolution label matches the isotropic one's (it did
    not before: the copy's slices were squashed), and a map at model resolution comes back on the copy's grid."""
    pre = VolumePreprocessor(modalities=["flair"], image_size=SIZE)
    before = bench_anisotropy.legacy(pre)
    iso = pre(phantom["iso"])
    reference = np.asarray(iso["label"][0]) > 0.5
    after_data, before_data = pre(phantom["aniso"]), before(phantom["aniso"])
    after = _dice(np.asarray(after_data["label"][0]) > 0.5, reference)
    squashed = _dice(np.asarray(before_data["label"][0]) > 0.5, reference)
    assert after > 0.85 and squashed < 0.7, (after, squashed)
    truth_img = nib.load(phantom["aniso"]["label"])
    back = pre.invert(after_data["label"], after_data, interpolate=True)
    assert tuple(back.shape[1:]) == truth_img.shape
    np.testing.assert_allclose(np.asarray(back.affine), truth_img.affine, atol=1e-4)
    assert _dice(np.asarray(back[0]) > 0.5, np.asarray(truth_img.dataobj) > 0) > 0.9


@pytest.mark.skipif(not TINY.is_dir(), reason=f"real MRI test data not found at {TINY} (project-internal)")
def test_a_real_brain_stored_anisotropic_in_plane(tmp_path):
    """BraTS2021_00006 (the 3 mm tiny copy) re-stored at 3 x 6 mm in-plane: the figures of
    benchmarks/bench_anisotropy.py on the small case."""
    image, label = TINY / "BraTS2021_00006_flair.nii.gz", TINY / "BraTS2021_00006_seg.nii.gz"
    new_image, new_label = bench_anisotropy.anisotropic_copy(image, label, (3.0, 6.0), tmp_path)
    pre = VolumePreprocessor(modalities=["flair"], image_size=SIZE)
    ref = pre({"id": "tiny", "image": [str(image)], "label": str(label)})
    reference = {
        "label": np.asarray(ref["label"][0]) > 0.5,
        "brain": np.asarray(ref["brain"][0]) > 0.5,
        "image": np.asarray(ref["image"][0], dtype=np.float64),
    }
    copy = {"id": "tiny_aniso", "image": [str(new_image)], "label": str(new_label)}
    after = bench_anisotropy.measure(pre, copy, reference)
    before = bench_anisotropy.measure(bench_anisotropy.legacy(pre), copy, reference)
    assert after["model_dice"] > 0.8 and before["model_dice"] < 0.6, (before, after)
    assert after["image_r"] > 0.9 > before["image_r"], (before, after)
    assert after["roundtrip_dice"] > 0.9, after


# --------------------------------------------------------------------------------------------------------------------
# case ids
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case_id, problem",
    [
        ("BraTS2021_00001", None),
        ("sub-r001s001_ses-1.v2+b", None),
        ("x" * MAX_CASE_ID_LENGTH, None),
        ("BraTS2021_00001\n", "not filesystem-safe"),  # re.match with "$" let this through
        ("café", "not filesystem-safe"),
        (".hidden", "not filesystem-safe"),
        ("a/b", "not filesystem-safe"),
        ("x" * (MAX_CASE_ID_LENGTH + 1), "would exceed the 255-byte file-name limit"),
        ("", "non-empty string"),
        (7, "non-empty string"),
    ],
)
def test_case_id_problem(case_id, problem):
    found = case_id_problem(case_id)
    assert is_safe_case_id(case_id) == (problem is None)
    if problem is None:
        assert found is None
    else:
        _one_line(found)
        assert problem in found


def test_the_longest_id_keeps_every_output_name_within_255_bytes():
    longest = "x" * MAX_CASE_ID_LENGTH
    # the final mask file and the temporary name anofpdm_monai.io.atomic_path gives it
    for name in (f"{longest}_anomaly_mask.nii.gz", f".{longest}_anomaly_mask.nii.gz.abcdefgh.nii.gz"):
        assert len(name.encode()) <= 255


def _brats2021_folder(root: Path, names: list[str]) -> None:
    for name in names:
        folder = root / name
        folder.mkdir(parents=True)
        for m in ("flair", "t1", "t1ce", "t2", "seg"):
            (folder / f"{name}_{m}.nii.gz").write_bytes(b"")


def test_a_case_folder_named_with_a_trailing_newline_is_named_not_listed(tmp_path, capsys):
    """The datalist command used to write the id 'BraTS2021_00002\\n' (a "$" match accepts it)."""
    root = tmp_path / "data"
    _brats2021_folder(root, ["BraTS2021_00001", "BraTS2021_00002\n"])
    out = tmp_path / "list.json"
    assert datalist_cli.main(["brats2021", "--root", str(root), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    _one_line(err)
    assert "'BraTS2021_00002\\n' is not filesystem-safe" in err and not out.exists()
    found = datalist_from_folder(root, layout="brats2021", report_unusable=True)
    assert [e["id"] for e in found["test"]] == ["BraTS2021_00001"]
    assert list(found["unusable"]) == ["BraTS2021_00002\n"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """A random-weight checkpoint and a calibration for it (as tests/test_reliability.py)."""
    root = tmp_path_factory.mktemp("model")
    pre = VolumePreprocessor(modalities=BRATS, image_size=SIZE)
    ckpt = save_checkpoint(root / "model.pt", _tiny_net(), preprocessing=pre.to_dict())
    cal = Calibration(
        guidance_scale=2.0,
        m_max=[0.05, 0.05],
        m_max_joint=0.05,
        tau=0.5,
        settings=AnoFPDMSettings(timesteps=GRID, min_component_size=3, health_score="cosine"),
        map_modalities=["flair", "t2"],
        map_channels=[0, 3],
        checkpoint_digest=load_network(ckpt)[1]["digest"],
        preprocessing=pre.to_dict(),
        datalist="synthetic [validation]",
    )
    return {"checkpoint": ckpt, "calibration": cal.save(root / "calibration.json"), "pre": pre}


UNSAFE_IDS = ["café", "ok\n", "y" * (MAX_CASE_ID_LENGTH + 12), "z" * 300]


@pytest.fixture(scope="module")
def id_datalist(tmp_path_factory) -> dict:
    """A datalist FILE with one good case and the unsafe ids, all pointing at the good case's files."""
    root = tmp_path_factory.mktemp("ids")
    good = make_case(phantom_anatomy((32, 40, 12)), root, "good", num_lesions=1, seed=1)
    entries = [{"id": i, "image": good["image"], "label": good["label"]} for i in ["good", *UNSAFE_IDS]]
    path = root / "datalist.json"
    path.write_text(json.dumps({"modalities": BRATS, "training": [], "validation": [], "test": entries}))
    return {"root": root, "path": path}


def test_unsafe_ids_do_not_refuse_the_datalist_and_fail_alone_at_inference(model, id_datalist, tmp_path):
    entries = cases_for_inference(model["pre"], datalist=id_datalist["path"], dataset_dir=id_datalist["root"])
    assert sorted(e["id"] for e in entries) == sorted(["good", *UNSAFE_IDS])
    vi = VolumeInferer.from_files(model["checkpoint"], model["calibration"], progress=False)
    summary = vi.run(entries, tmp_path / "out", raise_on_failure=False)
    assert summary["done"] == ["good"]
    assert sorted(summary["failed"]) == sorted(UNSAFE_IDS)
    for reason in summary["failed"].values():
        _one_line(reason)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good", "inference_summary.json"]


def test_unsafe_ids_fail_alone_in_the_slice_cache_before_any_file_is_read(id_datalist, tmp_path, monkeypatch):
    """Training, calibration and evaluation cache their cases through the same chain: each unsafe id fails with the
    reason, before its files are opened, and the good case is cached."""
    # ids of more than 255 characters are left out here: SliceCache.is_current stats <cache>/<id>/meta.json first, and
    # the file system refuses that name (ENAMETOOLONG) before any case is built (anofpdm_monai/data/cache.py)
    entries = [e for e in load_datalist(id_datalist["path"], id_datalist["root"])["test"] if len(e["id"]) < 255]
    cache = SliceCache(tmp_path / "cache", VolumePreprocessor(modalities=BRATS, image_size=SIZE))
    opened = []
    load_file = LoadCased._load_file

    def recording(self, case, *args):
        opened.append(case)
        return load_file(self, case, *args)

    monkeypatch.setattr(LoadCased, "_load_file", recording)
    with pytest.raises(CacheBuildError) as info:
        cache.build(entries, progress=False)
    failures = info.value.failures
    assert sorted(failures) == sorted(i for i in UNSAFE_IDS if len(i) < 255)
    assert "'café' is not filesystem-safe" in failures["café"] and "'ok\\n' is not filesystem-safe" in failures["ok\n"]
    assert "would exceed the 255-byte file-name limit" in failures["y" * (MAX_CASE_ID_LENGTH + 12)]
    assert set(opened) == {"good"}
    assert cache.is_current(entries[0])


# --------------------------------------------------------------------------------------------------------------------
# paths outside dataset_dir, bounded reads
# --------------------------------------------------------------------------------------------------------------------


def test_paths_outside_dataset_dir_warn_however_reached(tmp_path, caplog):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere" / "x.nii.gz"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"")
    os.symlink(elsewhere, root / "a" / "link.nii.gz")
    os.symlink(root, tmp_path / "data_link")  # the dataset folder itself reached through a link: not outside
    entries = {
        "inside": "a/in.nii.gz",
        "inside_absolute": str(root / "a" / "in.nii.gz"),
        "absolute": str(elsewhere),
        "symlink": "a/link.nii.gz",
        "dotdot": "../elsewhere/x.nii.gz",
    }
    datalist = {"modalities": ["t1w"], "training": [], "validation": []}
    datalist["test"] = [{"id": k, "image": [v]} for k, v in entries.items()]
    for dataset_dir in (root, tmp_path / "data_link"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="anofpdm_monai"):
            load_datalist(datalist, dataset_dir)
        lines = _warnings(caplog)
        assert len(lines) == 1, lines
        _one_line(lines[0])
        assert "3 path(s) lead outside dataset_dir" in lines[0] and str(elsewhere) in lines[0]
    caplog.clear()
    datalist["test"] = datalist["test"][:2]
    with caplog.at_level(logging.WARNING, logger="anofpdm_monai"):
        load_datalist(datalist, root)
    assert not _warnings(caplog)


@pytest.mark.parametrize("kind", ["/dev/zero", "folder", "huge"])
def test_a_datalist_read_is_bounded(tmp_path, kind):
    if kind == "/dev/zero":
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero here")
        text = "is not a regular file"
    elif kind == "folder":
        path = tmp_path
        text = "is not a regular file"
    else:
        path = tmp_path / "huge.json"
        with open(path, "wb") as f:  # sparse: no disk space used
            f.truncate(65 * 2**20)
        text = "65 MB, over the 64 MB limit of a datalist"
    with pytest.raises(DatalistError) as info:
        load_datalist(path)
    _one_line(str(info.value))
    assert str(path) in str(info.value) and text in str(info.value)
    from anofpdm_monai.apps.inference import cases_for_inference as cases

    with pytest.raises(DatalistError, match="datalist"):
        cases(VolumePreprocessor(modalities=["t1w"]), datalist=path)


def test_a_calibration_read_is_bounded(tmp_path):
    for path in (Path("/dev/zero"), tmp_path):
        if not path.exists():
            continue
        with pytest.raises(CalibrationError, match="is not a regular file"):
            Calibration.load(path)


# --------------------------------------------------------------------------------------------------------------------
# calibrated constants within the range of what they measure
# --------------------------------------------------------------------------------------------------------------------


def _calibration_file(tmp_path: Path, **edits) -> Path:
    settings = edits.pop("settings", {})
    cal = Calibration(
        settings=AnoFPDMSettings(timesteps=GRID, **settings),
        guidance_scale=2.0,
        m_max=[0.05],
        m_max_joint=0.05,
        tau=-0.1,
        map_modalities=["flair"],
        map_channels=[0],
    )
    content = cal.to_dict() | edits
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize(
    "score, tau, ok",
    [
        ("mse_gap", 1e300, False),
        ("mse_gap", 1.5, False),  # 1 - sum mse_g / sum mse_ref <= 1
        ("mse_gap", 1.0, True),
        ("mse_gap", -3.0, True),
        ("divergence", 0.1, False),  # minus a divergence: <= 0
        ("divergence", -0.2, True),
        ("cosine", 1e300, False),
        ("cosine", 0.97, True),
    ],
)
def test_tau_must_lie_in_the_range_of_its_health_score(tmp_path, score, tau, ok):
    path = _calibration_file(tmp_path, tau=tau, settings={"health_score": score})
    if ok:
        assert Calibration.load(path).tau == tau
        return
    with pytest.raises(CalibrationError) as info:
        Calibration.load(path)
    _one_line(str(info.value))
    assert str(path) in str(info.value) and "key 'tau' must be" in str(info.value)


@pytest.mark.parametrize(
    "edits, settings, text",
    [
        ({"m_max": [1e300]}, {}, "key 'm_max' must be a non-empty list of finite numbers in (0, 4]"),
        ({"m_max": [4.5]}, {}, "key 'm_max'"),
        ({"m_max_joint": 1e300}, {}, "key 'm_max_joint' must be a finite number in (0, 4]"),
        ({"m_max": [4.5]}, {"clip": False}, None),  # unclipped x0 predictions: no bound
        ({"m_max": [4.0], "m_max_joint": 4.0}, {}, None),
    ],
)
def test_m_max_must_lie_in_the_range_of_the_divergence(tmp_path, edits, settings, text):
    path = _calibration_file(tmp_path, settings=settings, **edits)
    if text is None:
        Calibration.load(path)
        return
    with pytest.raises(CalibrationError) as info:
        Calibration.load(path)
    _one_line(str(info.value))
    assert str(path) in str(info.value) and text in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# is it an MRI image? each refusal says what is wrong
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("scan")
    entry = make_case(phantom_anatomy((32, 40, 24)), root, "scan", modalities=("flair",), num_lesions=1, seed=2)
    img = nib.load(root / entry["image"][0])
    return {
        "root": root,
        "data": np.asarray(img.dataobj, dtype=np.float32),
        "affine": img.affine,
        "label": str(root / entry["label"]),
    }


def _load(paths: list[str], **extra):
    return LoadCased(modality_names=[f"m{i}" for i in range(len(paths))])({"id": "c", "image": paths, **extra})


def test_a_label_given_as_the_image_warns_and_a_hot_voxel_does_not(scan, tmp_path, caplog):
    binary = _save((scan["data"] > 300).astype(np.uint8), tmp_path / "binary.nii.gz", scan["affine"])
    hot = scan["data"].copy()
    hot[16, 20, 12] = 1e30  # one hot voxel in a normal scan
    hot_path = _save(hot, tmp_path / "hot.nii.gz", scan["affine"])
    with caplog.at_level(logging.WARNING, logger="anofpdm_monai"):
        _load([scan["label"]])
    lines = _warnings(caplog)
    assert len(lines) == 1 and "has only 2 distinct intensities (0, 1): it looks like a label or mask" in lines[0]
    _one_line(lines[0])
    for path in (binary,):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="anofpdm_monai"):
            _load([path])
        assert len(_warnings(caplog)) == 1 and "looks like a label or mask" in _warnings(caplog)[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anofpdm_monai"):
        _load([hot_path])
    assert not _warnings(caplog)
    assert neighbour_correlation(torch.as_tensor(hot)) > 0.8
    assert distinct_values(torch.as_tensor(hot)) is None


def _real_labels() -> list[Path]:
    """One label and one mask file per source folder of shared/data (brats2018 alone has 15 alike)."""
    found: dict[tuple[str, bool], Path] = {}
    for p in sorted(SHARED_DATA.rglob("*.nii.gz") if SHARED_DATA.is_dir() else []):
        name = p.name.lower()
        if any(k in name for k in ("seg", "msk", "mask", "otmulticlass")):
            found.setdefault((p.relative_to(SHARED_DATA).parts[0], "mask" in name), p)
    return list(found.values())


REAL_LABELS = _real_labels()


@pytest.mark.skipif(not REAL_LABELS, reason=f"real data absent ({SHARED_DATA})")
def test_every_real_label_and_mask_would_be_flagged_if_given_as_the_image():
    """(No real image is flagged: tests/test_reliability.py::test_the_mri_check_passes_every_real_volume_...)"""
    loader = LoadCased(keys="image").loader
    for path in REAL_LABELS:
        found = distinct_values(loader(str(path)).as_tensor())
        assert found is not None and found.size <= 6, (path, found)


@pytest.mark.parametrize(
    "kind, text",
    [
        ("beyond_float32", "has intensities beyond the float32 range (largest magnitude 1e+39 > 3.4e+38)"),
        ("nan", "contains NaN or Inf values"),
        ("negative", "has no intensity > 0 (all are <= 0, the largest -1)"),
        ("zero_affine", "its affine is singular (voxel axes of length 0 x 0 x 0 mm"),
        ("collinear_affine", "its affine is singular"),
    ],
)
def test_a_refusal_says_what_is_wrong(scan, tmp_path, kind, text):
    data, affine = scan["data"].astype(np.float64), scan["affine"].copy()
    if kind == "beyond_float32":
        data[10:14, 10:14, 10:14] = 1e39
    elif kind == "nan":
        data[3, 3, 3] = np.nan
    elif kind == "negative":
        data = -1.0 - data
    elif kind == "zero_affine":
        affine = np.zeros((4, 4))
    else:
        affine[:3, 1] = affine[:3, 0]
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_sform(affine, code=2)
    img.set_qform(None, code=0)
    # voxel sizes as a writer of that sform would store them (MONAI replaces an sform that disagrees with them)
    img.header.set_zooms(tuple(np.linalg.norm(affine[:3, :3], axis=0)))
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(img, path)
    with pytest.raises(CaseError) as info:
        _load([str(path)])
    _one_line(str(info.value))
    assert str(info.value).startswith(f"case c: modality 'm0' file {path}") and text in str(info.value)


def test_negative_intensities_are_fine_with_a_brain_mask(scan, tmp_path):
    """z-scored data (negative in the brain) come with a brain mask: then no intensity > 0 is not an error."""
    negative = _save(-1.0 - scan["data"], tmp_path / "neg.nii.gz", scan["affine"])
    mask = _save((scan["data"] > 0).astype(np.uint8), tmp_path / "mask.nii.gz", scan["affine"])
    out = LoadCased(keys=("image", "brain_mask"))({"id": "c", "image": [negative], "brain_mask": mask})
    assert float(out["image"].max()) < 0


def test_a_label_with_a_singular_affine_names_the_label(scan, tmp_path):
    img = nib.Nifti1Image(np.asarray(nib.load(scan["label"]).dataobj), np.eye(4))
    img.set_sform(np.zeros((4, 4)), code=2)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "seg0.nii.gz")
    image = _save(scan["data"], tmp_path / "img.nii.gz", scan["affine"])
    with pytest.raises(CaseError, match=r"case c: label file .*seg0\.nii\.gz: its affine is singular"):
        LoadCased(keys=("image", "label"))({"id": "c", "image": [image], "label": str(tmp_path / "seg0.nii.gz")})


# --------------------------------------------------------------------------------------------------------------------
# preprocessing dicts, slice labels, the health rule
# --------------------------------------------------------------------------------------------------------------------


def test_a_preprocessing_dict_with_unknown_keys_is_refused():
    params = VolumePreprocessor().to_dict() | {"bias_correction": True}
    with pytest.raises(ValueError) as info:
        VolumePreprocessor.from_dict(params, source="checkpoint model.pt")
    _one_line(str(info.value))
    assert str(info.value).startswith("checkpoint model.pt: unknown preprocessing key(s) ['bias_correction']")
    with pytest.raises(ValueError, match="unknown preprocessing key"):
        SliceCache("unused", params)
    with pytest.raises(ValueError, match="preprocessing: scaling must be 'slice' or 'volume'"):
        VolumePreprocessor.from_dict({"scaling": "row"})


@pytest.mark.parametrize("label", [-1, 2, 0.5])
def test_an_unknown_slice_label_is_refused_not_taken_as_healthy(label):
    labels = np.array([0, 0, 1, label, 1], dtype=np.float64)
    stats = CalibrationStatistics(
        guidance_scales=np.array([2.0]),
        divergence_max=np.full((1, 5, 1), 0.1),
        divergence_max_joint=np.full((1, 5), 0.1),
        score=np.array([[0.9, 0.95, 0.2, 0.5, 0.3]]),
        labels=labels,
    )
    with pytest.raises(CalibrationError) as info:
        calibrate_from_statistics(stats)
    _one_line(str(info.value))
    message = str(info.value)
    assert f"value {labels[3].item()!r} at slice 3" in message and "neither 0 (healthy) nor 1" in message
    stats.labels = np.array([0, 0, 1, 0, 1])
    assert calibrate_from_statistics(stats)["num_healthy"] == 3


def test_a_score_exactly_at_tau_is_unhealthy_in_the_calibration_and_at_inference():
    """One rule (inferers/health.py ``is_unhealthy``): the calibration counts a healthy slice AT tau as an error
    because inference calls it unhealthy."""
    torch.manual_seed(0)
    net = _tiny_net()
    x = torch.rand(3, len(BRATS), SIZE, SIZE) * 2 - 1
    inferer = AnoFPDMInferer(timesteps=GRID, map_channels=(0,), m_max=[0.05], health_score="cosine")
    result = inferer.run(x, net)
    health = inferer.thresholds(result).health.double()
    tau = float(health[1])
    inferer.tau = tau
    pred = inferer.thresholds(result).pred_label
    assert int(pred[1]) == 1
    assert torch.equal(pred.bool(), is_unhealthy(inferer.thresholds(result).health, tau))
    # the calibration's threshold search on the same value: tau = the 0-quantile of the healthy scores = that score
    got, errors = select_tau([tau, tau + 1.0], [tau - 1.0], levels=[0.0])
    assert got == tau and errors == 1  # the healthy slice at tau is misclassified, exactly as inference would
    assert is_unhealthy(tau, tau) and not is_unhealthy(math.nextafter(tau, math.inf), tau)


def test_the_datalist_validation_still_refuses_structural_id_errors():
    base = {"modalities": ["flair"], "training": [], "validation": []}
    with pytest.raises(DatalistError, match="'id' must be a non-empty string"):
        validate_datalist({**base, "test": [{"id": None, "image": ["x.nii.gz"]}]}, source="d.json")
