"""Volume inference: NIfTI volumes in, anomaly maps and masks out on the input's own grid (docs/method.md §1, §5;
docs/architecture.md): geometry round trips (LPS, RAS, the real tiny BraTS case), a known answer with an analytic
network that removes a synthetic lesion, the calibration consistency checks of ``from_files``, batch runs with a bad
case, reruns, atomic writes and permissions, datalist checks, and the inference bundle run on a folder of cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from anofpdm_monai.apps.inference import VolumeInferer
from anofpdm_monai.calibration import Calibration, CalibrationError
from anofpdm_monai.data import VolumePreprocessor
from anofpdm_monai.data.synthetic import make_case, phantom_anatomy
from anofpdm_monai.data.writers import write_nifti_like
from anofpdm_monai.engines import InferenceFailures
from anofpdm_monai.inferers import AnoFPDMInferer
from anofpdm_monai.io import default_mode
from anofpdm_monai.networks import build_diffusion_unet, load_network, save_checkpoint
from anofpdm_monai.networks.unet import HEALTHY
from anofpdm_monai.schedule import NoiseSchedule
from anofpdm_monai.settings import AnoFPDMSettings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_CASE = SHARED_DATA / "tiny" / "BraTS2021_00006_3mm"
needs_tiny = pytest.mark.skipif(not TINY_CASE.is_dir(), reason=f"real tiny case not available ({TINY_CASE})")

BRATS = ["flair", "t1", "t1ce", "t2"]
GRID = [0, 100, 200, 300]
SIZE = 32
SCHEDULE = NoiseSchedule()
LESION_SEED = 3  # a lesion away from the mid-planes: a flipped mask hardly overlaps it (checked below)


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _tiny_net(seed: int = 0) -> torch.nn.Module:
    """A tiny untrained network with perturbed weights (a fresh MONAI UNet predicts eps = 0 everywhere)."""
    torch.manual_seed(seed)
    net = build_diffusion_unet(len(BRATS), "tiny", use_flash_attention=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


class LesionRemover(torch.nn.Module):
    """Analytic epsilon network: the null prediction is eps = 0 (so x0_null = x_t / sqrt(abar_t), the input
    itself along the DDIM forward trajectory); the healthy prediction's x0 is the input with every value above
    ``threshold`` replaced by ``fill``, i.e. a "healthy" model that removes bright lesions."""

    def __init__(self, threshold: float = 0.3, fill: float = 0.0) -> None:
        super().__init__()
        self.threshold, self.fill = threshold, fill
        self.calls = 0

    def forward(self, x, timesteps, class_labels=None):
        self.calls += 1
        s0 = SCHEDULE.sqrt_alpha_bar(timesteps, x)
        s1 = SCHEDULE.sqrt_one_minus_alpha_bar(timesteps, x)
        v = x / s0
        target = torch.where(v > self.threshold, torch.full_like(v, self.fill), v)
        eps_healthy = (x - s0 * target) / s1
        healthy = (class_labels == HEALTHY).view(-1, 1, 1, 1)
        return torch.where(healthy, eps_healthy, torch.zeros_like(x))


class Counting(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, timesteps, class_labels=None):
        self.calls += 1
        return self.net(x, timesteps=timesteps, class_labels=class_labels)


def _absolute(entry: dict, root: Path) -> dict:
    out = {"id": entry["id"], "image": [str(root / p) for p in entry["image"]]}
    if entry.get("label"):
        out["label"] = str(root / entry["label"])
    return out


def _tiny_entry() -> dict:
    case = "BraTS2021_00006"
    return {
        "id": case,
        "image": [str(TINY_CASE / f"{case}_{m}.nii.gz") for m in BRATS],
        "label": str(TINY_CASE / f"{case}_seg.nii.gz"),
    }


def _inferer(**kwargs) -> AnoFPDMInferer:
    options = dict(timesteps=GRID, map_channels=[0, 3], m_max=[0.05, 0.05], tau=None, min_component_size=3)
    options.update(kwargs)
    return AnoFPDMInferer(**options)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    """The same synthetic subject written as RAS and as LPS (plus a healthy RAS subject), absolute entries."""
    root = tmp_path_factory.mktemp("volumes")
    anatomy = phantom_anatomy((32, 40, 24))
    common = dict(num_lesions=1, lesion_radius=5.0, seed=LESION_SEED, noise=0.0, deformation=1.0)
    entries = {
        orientation: _absolute(make_case(anatomy, root, f"case_{orientation}", orientation=orientation, **common), root)
        for orientation in ("RAS", "LPS")
    }
    entries["healthy"] = _absolute(make_case(anatomy, root, "case_healthy", num_lesions=0, seed=11), root)
    return entries


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict:
    """A tiny checkpoint (BraTS modalities, 32 x 32) and a calibration file made for it."""
    root = tmp_path_factory.mktemp("model")
    pre = VolumePreprocessor(modalities=BRATS, image_size=SIZE)
    ckpt = save_checkpoint(root / "model.pt", _tiny_net(), preprocessing=pre.to_dict())
    other = save_checkpoint(root / "other.pt", _tiny_net(seed=1), preprocessing=pre.to_dict())
    cal = Calibration(
        guidance_scale=2.0,
        m_max=[0.05, 0.05],
        m_max_joint=0.05,
        tau=0.5,
        settings=AnoFPDMSettings(timesteps=GRID, min_component_size=3),
        map_modalities=["flair", "t2"],
        map_channels=[0, 3],
        checkpoint_digest=load_network(ckpt)[1]["digest"],
        preprocessing=pre.to_dict(),
        datalist="synthetic [validation]",
    )
    path = cal.save(root / "calibration.json")
    return {"checkpoint": ckpt, "other": other, "calibration": path, "pre": pre, "cal": cal}


# --------------------------------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------------------------------


def _check_geometry(entry: dict, output_dir: Path) -> pd.DataFrame:
    case = entry["id"]
    ref = nib.load(entry["image"][0])
    table = pd.read_csv(output_dir / case / f"{case}_slices.csv")
    depth = ref.shape[2]  # axial axis of every input here (LPS and RAS both store S along axis 2)
    inside = np.zeros(depth, dtype=bool)
    inside[table["index"].to_numpy()] = True
    assert inside.any()
    for kind, dtype in (("anomaly_map", np.float32), ("anomaly_mask", np.uint8)):
        out = nib.load(output_dir / case / f"{case}_{kind}.nii.gz")
        assert out.shape == ref.shape[:3]
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
        assert int(out.header["qform_code"]) == int(ref.header["qform_code"]), kind
        assert int(out.header["sform_code"]) == int(ref.header["sform_code"]), kind
        np.testing.assert_allclose(out.header.get_zooms()[:3], ref.header.get_zooms()[:3])
        assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)
        assert out.get_data_dtype() == dtype
        data = np.asarray(out.dataobj)
        assert data.dtype == dtype
        assert np.isfinite(data).all()
        assert not data[..., ~inside].any(), f"{kind}: non-zero outside the brain-bearing slices"
        if kind == "anomaly_map":
            assert data[..., inside].any()
            assert (data >= 0).all()
        else:
            assert set(np.unique(data)) <= {0, 1}
    return table


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_geometry_round_trip_synthetic(cases, tmp_path, orientation):
    entry = cases[orientation]
    vi = VolumeInferer(_tiny_net(), _inferer(), VolumePreprocessor(image_size=SIZE), progress=False)
    summary = vi.run([entry], tmp_path)
    assert summary["done"] == [entry["id"]] and not summary["failed"]
    table = _check_geometry(entry, tmp_path)
    assert 0 < len(table) < nib.load(entry["image"][0]).shape[2]  # some slices lie outside the brain range
    columns = {"index", "ras_index", "t_e_flair", "t_e_t2", "M_flair", "M_t2", "cosine", "pred_label", "threshold"}
    assert set(table.columns) >= columns and "c" not in table.columns
    assert set(table["label"]) == {0, 1}


@needs_tiny
def test_geometry_round_trip_real_tiny_case(tmp_path):
    entry = _tiny_entry()
    ref = nib.load(entry["image"][0])
    assert nib.aff2axcodes(ref.affine) == ("L", "P", "S")
    vi = VolumeInferer(_tiny_net(), _inferer(), VolumePreprocessor(image_size=SIZE), progress=False)
    vi.run([entry], tmp_path)
    table = _check_geometry(entry, tmp_path)  # (this 3 mm crop has brain in every axial slice)
    assert table["label"].max() == 1  # the tumour slices are there


def test_write_nifti_like_keeps_header_geometry(tmp_path):
    """qform and sform codes are copied as they are, including a code of 0 (BraTS: qform 0, sform 2)."""
    affine = np.array([[-3.0, 0, 0, 90], [0, -3.0, 0, 120], [0, 0, 3.0, -70], [0, 0, 0, 1]])
    for qcode, scode in ((0, 2), (1, 0), (1, 1), (2, 4), (0, 0)):
        ref = nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), affine)
        ref.set_qform(affine, code=qcode)
        ref.set_sform(affine, code=scode)
        ref.header.set_xyzt_units("mm", "sec")
        nib.save(ref, tmp_path / "ref.nii.gz")
        ref = nib.load(tmp_path / "ref.nii.gz")
        out_path = write_nifti_like(np.ones((5, 6, 7), np.float32), ref, tmp_path / "o" / "out.nii.gz")
        out = nib.load(out_path)
        assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (qcode, scode)
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-6)
        assert out.header.get_xyzt_units() == ("mm", "sec")
        assert [p.name for p in _files(tmp_path / "o")] == ["out.nii.gz"]
        assert os.stat(out_path).st_mode & 0o777 == default_mode()
    with pytest.raises(ValueError, match="does not match the input grid"):
        write_nifti_like(np.ones((5, 6, 8), np.float32), ref, tmp_path / "o" / "bad.nii.gz")


# --------------------------------------------------------------------------------------------------------------------
# a known answer: the analytic "healthy" model removes the lesion, the mask lands on it in the input grid
# --------------------------------------------------------------------------------------------------------------------


def test_known_answer_mask_lands_on_the_lesion(cases, tmp_path):
    # volume scaling keeps the lesion the brightest structure of every slice; a fixed map threshold, no gating
    pre = VolumePreprocessor(image_size=SIZE, scaling="volume")
    masks = {}
    for orientation in ("RAS", "LPS"):
        entry = cases[orientation]
        inferer = _inferer(map_channels=[0], m_max=None, threshold=0.05, median_kernel=3, min_component_size=2)
        vi = VolumeInferer(LesionRemover(), inferer, pre, progress=False)
        vi.run([entry], tmp_path)
        case = entry["id"]
        mask = np.asarray(nib.load(tmp_path / case / f"{case}_anomaly_mask.nii.gz").dataobj)
        label = np.asarray(nib.load(entry["label"]).dataobj) > 0
        assert label.sum() > 100
        assert _dice(mask, label) > 0.6, orientation
        # the test has power: the same mask mirrored along any axis misses the lesion
        for axes in ((0,), (1,), (2,), (0, 1)):
            assert _dice(np.flip(mask, axes), label) < 0.45, (orientation, axes)
        table = pd.read_csv(tmp_path / case / f"{case}_slices.csv")
        lesion_slices = set(np.nonzero(label.any(axis=(0, 1)))[0])
        flagged = set(table.loc[table["mask_pixels"] > 0, "index"])
        assert len(flagged & lesion_slices) >= 0.6 * len(lesion_slices)
        masks[orientation] = mask
    # the same anatomy stored in two orientations gives the same mask (up to the forward noise, keyed by the case id,
    # which differs between the two cases)
    assert _dice(masks["LPS"][::-1, ::-1, :], masks["RAS"]) > 0.95


# --------------------------------------------------------------------------------------------------------------------
# from_files: the calibration must belong to the checkpoint and the requested setting
# --------------------------------------------------------------------------------------------------------------------


def test_from_files_accepts_none_overrides(model_files):
    vi = VolumeInferer.from_files(model_files["checkpoint"], model_files["calibration"], progress=False)
    inf = vi.inferer
    assert inf.timesteps == GRID and inf.guidance_scale == 2.0 and inf.forward == "ddim"
    assert inf.map_channels == [0, 3] and inf.tau == 0.5 and inf.min_component_size == 3
    assert inf.m_max.tolist() == [0.05, 0.05]
    assert vi.map_modalities == ["flair", "t2"]
    assert vi.preprocessor.to_dict() == model_files["pre"].to_dict()
    # explicit values equal to the calibrated ones are accepted too
    vi = VolumeInferer.from_files(
        model_files["checkpoint"],
        model_files["calibration"],
        guidance_scale=2.0,
        t_max=300,
        stride=100,
        forward="ddim",
        progress=False,
        aggregation="last",
        reference="null",
        map_channels=(0, 3),
    )
    assert vi.inferer.timesteps == GRID and vi.inferer.aggregation == "last"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"checkpoint": "other"}, "checkpoint_digest"),
        ({"timesteps": [0, 100, 200]}, "timesteps"),
        ({"stride": 50}, "timesteps"),
        ({"t_max": 599}, "timesteps"),
        ({"guidance_scale": 3.0}, "guidance_scale"),
        ({"forward": "ddpm"}, "forward"),
        # forward-process options passed as inferer overrides must match the calibration as well
        ({"reference": "healthy"}, "reference"),
        ({"end_step": "joint"}, "end_step"),
        ({"divergence": "v1"}, "divergence"),
        ({"map_channels": [0]}, "map_channels"),
    ],
)
def test_from_files_refuses_another_setting(model_files, kwargs, field):
    kwargs = dict(kwargs)
    checkpoint = model_files[kwargs.pop("checkpoint", "checkpoint")]
    with pytest.raises(CalibrationError) as info:
        VolumeInferer.from_files(checkpoint, model_files["calibration"], progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert field in message and str(model_files["calibration"]) in message and "recalibrate" in message


def test_from_files_missing_calibration(model_files, tmp_path):
    with pytest.raises(CalibrationError, match="calibration file not found"):
        VolumeInferer.from_files(model_files["checkpoint"], tmp_path / "none.json", progress=False)


# --------------------------------------------------------------------------------------------------------------------
# batch runs: a bad case, reruns, overwrite, atomic writes, permissions
# --------------------------------------------------------------------------------------------------------------------


def test_run_bad_case_rerun_and_overwrite(cases, tmp_path):
    good = [cases["RAS"], cases["healthy"]]
    bad = {"id": "case_missing", "image": [str(tmp_path / "nowhere" / f"x_{m}.nii.gz") for m in BRATS]}
    net = Counting(_tiny_net())
    vi = VolumeInferer(net, _inferer(), VolumePreprocessor(image_size=SIZE), progress=False)
    out = tmp_path / "out"
    with pytest.raises(InferenceFailures, match="1 of 3 case"):
        vi.run([good[0], bad, good[1]], out)
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["done"] == [good[0]["id"], good[1]["id"]]
    assert list(summary["failed"]) == ["case_missing"]
    assert "x_flair.nii.gz" in summary["failed"]["case_missing"]
    assert "\n" not in summary["failed"]["case_missing"]
    files = _files(out)
    assert not [p for p in files if p.name.startswith(".")], "temporary files left behind"
    assert not (out / "case_missing").exists() or not _files(out / "case_missing")
    outputs = [p for p in files if p.name != "inference_summary.json"]
    assert len(outputs) == 8  # map, mask, slices table and provenance per case
    for p in files:
        assert os.stat(p).st_mode & 0o777 == default_mode(), p
    assert net.calls > 0

    # a rerun skips the finished cases: no network call, files untouched
    old = 1_000_000_000
    for p in outputs:
        os.utime(p, ns=(old, old))
    net.calls = 0
    summary = vi.run([good[0], bad, good[1]], out, raise_on_failure=False)
    assert summary["skipped"] == [good[0]["id"], good[1]["id"]] and summary["done"] == []
    assert list(summary["failed"]) == ["case_missing"]
    assert net.calls == 0
    assert all(os.stat(p).st_mtime_ns == old for p in outputs)

    # overwrite=True recomputes
    vi.overwrite = True
    summary = vi.run(good, out)
    assert summary["done"] == [good[0]["id"], good[1]["id"]] and not summary["skipped"]
    assert net.calls > 0
    assert all(os.stat(p).st_mtime_ns != old for p in outputs)
    assert not [p for p in _files(out) if p.name.startswith(".")]


def test_run_recomputes_cases_made_by_another_setting(cases, tmp_path):
    entry = cases["RAS"]
    net = Counting(_tiny_net())
    vi = VolumeInferer(net, _inferer(), VolumePreprocessor(image_size=SIZE), progress=False)
    vi.provenance = {"checkpoint_digest": "aaaa", "calibration": {"guidance_scale": 2.0}}
    assert vi.run([entry], tmp_path)["done"] == [entry["id"]]
    net.calls = 0
    assert vi.run([entry], tmp_path)["skipped"] == [entry["id"]] and net.calls == 0
    vi.provenance = {"checkpoint_digest": "bbbb", "calibration": {"guidance_scale": 2.0}}  # another checkpoint
    assert vi.run([entry], tmp_path)["done"] == [entry["id"]] and net.calls > 0
    stored = json.loads((tmp_path / entry["id"] / f"{entry['id']}_provenance.json").read_text())
    assert stored["made_with"]["checkpoint_digest"] == "bbbb"


def test_run_recomputes_a_partly_written_case(cases, tmp_path):
    entry = cases["RAS"]
    vi = VolumeInferer(_tiny_net(), _inferer(), VolumePreprocessor(image_size=SIZE), progress=False)
    vi.run([entry], tmp_path)
    mask = tmp_path / entry["id"] / f"{entry['id']}_anomaly_mask.nii.gz"
    mask.unlink()
    assert vi.run([entry], tmp_path)["done"] == [entry["id"]]
    assert mask.is_file()


def test_failed_write_leaves_no_partial_output(cases, tmp_path, monkeypatch):
    entry = cases["RAS"]
    vi = VolumeInferer(_tiny_net(), _inferer(), VolumePreprocessor(image_size=SIZE), progress=False)

    def broken_save(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    summary = vi.run([entry], tmp_path, raise_on_failure=False)
    assert "disk full" in summary["failed"][entry["id"]]
    # the slice table was written before the map failed: the whole case folder goes, not only the map
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inference_summary.json"]


def test_run_datalist_checks_modalities(cases, tmp_path):
    vi = VolumeInferer(_tiny_net(), _inferer(), VolumePreprocessor(image_size=SIZE), progress=False)
    swapped = {"modalities": ["t1", "flair", "t1ce", "t2"], "test": [cases["RAS"]]}
    with pytest.raises(ValueError, match=r"modalities \['t1', 'flair', 't1ce', 't2'\] but the model expects"):
        vi.run_datalist(swapped, tmp_path)
    with pytest.raises(ValueError, match="modalities"):
        vi.run_datalist({"modalities": ["flair", "t1"], "test": [cases["RAS"]]}, tmp_path)
    assert not _files(tmp_path)
    with pytest.raises(KeyError, match="no split 'validation'"):
        vi.run_datalist({"modalities": BRATS, "test": [cases["RAS"]]}, tmp_path, split="validation")
    summary = vi.run_datalist({"modalities": BRATS, "test": [cases["RAS"]]}, tmp_path)
    assert summary["done"] == [cases["RAS"]["id"]]


# --------------------------------------------------------------------------------------------------------------------
# the inference bundle on a folder of cases (no datalist)
# --------------------------------------------------------------------------------------------------------------------


def test_inference_bundle_on_an_input_folder(model_files, tmp_path):
    anatomy = phantom_anatomy((32, 40, 24))
    input_dir = tmp_path / "BraTS2021_Training_Data"
    ids = ["BraTS2021_00001", "BraTS2021_00002"]
    for i, case in enumerate(ids):
        make_case(
            anatomy, input_dir, case, num_lesions=1, seed=i, orientation="LPS", file_pattern="{case}_{modality}.nii.gz"
        )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(
            [
                str(REPO / "bundles" / "anofpdm_brats21" / "configs" / "dataset.json"),
                str(REPO / "bundles" / "common" / "configs" / "inference.json"),
            ]
        ),
        "--input_dir",
        str(input_dir),
        "--checkpoint",
        str(model_files["checkpoint"]),
        "--calibration",
        str(model_files["calibration"]),
        "--output_dir",
        str(out),
        "--progress",
        "False",
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["done"] == ids and not summary["failed"]
    for case in ids:
        ref = nib.load(input_dir / case / f"{case}_flair.nii.gz")
        for kind in ("anomaly_map", "anomaly_mask"):
            img = nib.load(out / case / f"{case}_{kind}.nii.gz")
            assert img.shape == ref.shape
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
        assert (out / case / f"{case}_slices.csv").is_file()


def test_an_unusable_label_does_not_fail_inference(cases, tmp_path, caplog):
    """Inference does not need the label: a missing one, or one on another grid, is dropped with a warning and the
    case's outputs equal those of the case given without a label; a bad image still fails the case."""
    import logging

    base = {k: v for k, v in cases["RAS"].items() if k != "label"}
    small = nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4))
    nib.save(small, tmp_path / "other_grid_seg.nii.gz")
    entries = [
        {**base, "id": "no_label"},
        {**base, "id": "missing_label", "label": str(tmp_path / "nowhere_seg.nii.gz")},
        {**base, "id": "other_grid_label", "label": str(tmp_path / "other_grid_seg.nii.gz")},
        {**base, "id": "bad_image", "image": [str(tmp_path / "nowhere.nii.gz")] * 4, "label": base.get("image")[0]},
    ]
    vi = VolumeInferer(_tiny_net(), _inferer(), VolumePreprocessor(image_size=SIZE), progress=False)
    with caplog.at_level(logging.WARNING):
        summary = vi.run(entries, tmp_path / "out", raise_on_failure=False)
    assert summary["done"] == ["no_label", "missing_label", "other_grid_label"]
    assert list(summary["failed"]) == ["bad_image"] and "nowhere.nii.gz" in summary["failed"]["bad_image"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "missing_label: label not used" in warned and "other_grid_label: label not used" in warned
    # the forward noise is keyed by case id: the reference is each case run under its own id without a label
    unlabelled = [{**base, "id": case} for case in ("missing_label", "other_grid_label")]
    assert vi.run(unlabelled, tmp_path / "reference")["done"] == ["missing_label", "other_grid_label"]
    for case in ("missing_label", "other_grid_label"):
        reference = np.asarray(nib.load(tmp_path / "reference" / case / f"{case}_anomaly_map.nii.gz").dataobj)
        got = np.asarray(nib.load(tmp_path / "out" / case / f"{case}_anomaly_map.nii.gz").dataobj)
        np.testing.assert_array_equal(got, reference)
        assert "label" not in pd.read_csv(tmp_path / "out" / case / f"{case}_slices.csv").columns


def test_input_folder_reports_unusable_cases_and_runs_the_others(tmp_path):
    """A BraTS case folder missing a modality is one failed case with its reason, not a refused folder."""
    from anofpdm_monai.apps.inference import cases_for_inference

    anatomy = phantom_anatomy((32, 40, 24))
    folder = tmp_path / "BraTS2021_Training_Data"
    ids = ["BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"]
    for i, case in enumerate(ids):
        make_case(anatomy, folder, case, num_lesions=1, seed=i, file_pattern="{case}_{modality}.nii.gz")
    (folder / ids[1] / f"{ids[1]}_t1ce.nii.gz").unlink()
    pre = VolumePreprocessor(modalities=BRATS, image_size=SIZE)
    entries = cases_for_inference(pre, input_dir=folder)
    assert [e["id"] for e in entries] == ids and "t1ce" in entries[1]["error"]
    vi = VolumeInferer(_tiny_net(), _inferer(), pre, progress=False)
    summary = vi.run(entries, tmp_path / "out", raise_on_failure=False)
    assert summary["done"] == [ids[0], ids[2]]
    assert list(summary["failed"]) == [ids[1]] and "missing t1ce file" in summary["failed"][ids[1]]
    assert not (tmp_path / "out" / ids[1]).exists()


def test_atlas_folder_reports_sessions_without_t1w_and_unsafe_ids(tmp_path):
    from anofpdm_monai.data.datalist import DatalistError, datalist_from_folder

    anat = tmp_path / "R001" / "sub-r001s001" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    image = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    nib.save(image, anat / "sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz")
    empty = tmp_path / "R001" / "sub-r001s002" / "ses-1" / "anat"
    empty.mkdir(parents=True)
    odd = tmp_path / "R001" / "sub-r001 s003" / "ses-1" / "anat"
    odd.mkdir(parents=True)
    nib.save(image, odd / "sub-r001 s003_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz")
    with pytest.raises(DatalistError, match="not filesystem-safe"):
        datalist_from_folder(tmp_path, layout="atlas2")  # a datalist for training still refuses the folder
    dl = datalist_from_folder(tmp_path, layout="atlas2", report_unusable=True)
    assert [e["id"] for e in dl["test"]] == ["sub-r001s001_ses-1"]
    assert "no T1w image" in dl["unusable"]["sub-r001s002_ses-1"]
    assert "not filesystem-safe" in dl["unusable"]["sub-r001 s003_ses-1"]


def _inference_bundle(overrides: dict, cwd: Path) -> subprocess.CompletedProcess:
    files = [str(REPO / "bundles" / "anofpdm_brats21" / "configs" / "dataset.json")]
    files.append(str(REPO / "bundles" / "common" / "configs" / "inference.json"))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files)]
    cmd += [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_bundle_ends_with_one_line_and_an_exit_status(model_files, tmp_path):
    """Could not start: exit 2 and one line naming the file; some cases failed: exit 3 after every case; --debug true
    keeps the traceback."""
    anatomy = phantom_anatomy((32, 40, 24))
    folder = tmp_path / "BraTS2021_Training_Data"
    ids = ["BraTS2021_00001", "BraTS2021_00002"]
    for i, case in enumerate(ids):
        make_case(anatomy, folder, case, num_lesions=1, seed=i, file_pattern="{case}_{modality}.nii.gz")
    (folder / ids[1] / f"{ids[1]}_t2.nii.gz").unlink()
    base = {"input_dir": folder, "checkpoint": model_files["checkpoint"], "progress": False}

    missing = tmp_path / "no_calibration.json"
    proc = _inference_bundle({**base, "calibration": missing, "output_dir": tmp_path / "a"}, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: CalibrationError: calibration file not found: {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = _inference_bundle({**base, "calibration": missing, "output_dir": tmp_path / "a", "debug": True}, tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr

    out = tmp_path / "b"
    proc = _inference_bundle({**base, "calibration": model_files["calibration"], "output_dir": out}, tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: InferenceFailures: 1 of 2 case(s) failed: BraTS2021_00002: missing t2 file" in proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["done"] == [ids[0]] and list(summary["failed"]) == [ids[1]]
