"""Reliability (docs/reliability.md): the bad-input matrix through the library (one inference run over a datalist in
which every case but two is bad: each bad case fails, or warns, with one line naming its file, and the good cases are
written), calibration files with bad keys, bad arguments and unwritable outputs refused before any work, the same
through the bundle command (exit status and one line), inputs never modified, and the warnings (paths outside
dataset_dir, a volume that does not look like MRI, ignite's misleading resume line silenced)."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_volume_inference import BRATS, GRID, SIZE, _tiny_net

from anofpdm_monai.apps import datalist as datalist_cli
from anofpdm_monai.apps.calibrate import run_calibration
from anofpdm_monai.apps.errors import root_cause
from anofpdm_monai.apps.evaluate import run_evaluation
from anofpdm_monai.apps.inference import VolumeInferer
from anofpdm_monai.calibration import Calibration, CalibrationError
from anofpdm_monai.data import VolumePreprocessor
from anofpdm_monai.data.datalist import load_datalist
from anofpdm_monai.data.synthetic import make_case, phantom_anatomy
from anofpdm_monai.data.transforms import (
    MIN_NEIGHBOUR_CORRELATION,
    LoadCased,
    distinct_values,
    neighbour_correlation,
)
from anofpdm_monai.io import OutputPathError
from anofpdm_monai.networks import build_diffusion_unet, load_network, save_checkpoint
from anofpdm_monai.settings import AnoFPDMSettings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GOOD = ["good_a", "good_b"]


def _save(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return str(path)


def _sha256(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(text: str) -> None:
    assert text and "\n" not in text.strip(), text


# --------------------------------------------------------------------------------------------------------------------
# fixtures: a random-weight checkpoint and its calibration, two good cases and the bad ones made from them
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("model")
    pre = VolumePreprocessor(modalities=BRATS, image_size=SIZE)
    ckpt = save_checkpoint(root / "model.pt", _tiny_net(), preprocessing=pre.to_dict())
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
    return {"root": root, "checkpoint": ckpt, "calibration": cal.save(root / "calibration.json"), "pre": pre}


def _bad_cases(root: Path, good: dict) -> dict[str, tuple[dict, str]]:
    """case id -> (datalist entry, the text its one-line failure must contain)."""
    images = [root / p for p in good["image"]]
    flair = nib.load(images[0])
    data = np.asarray(flair.dataobj, dtype=np.float32)
    bad = root / "bad"
    bad.mkdir()

    def entry(case: str, first: str | None = None, **extra) -> dict:
        out = {"id": case, "image": [first or str(images[0]), *map(str, images[1:])], **extra}
        return {k: v for k, v in out.items() if v is not None}

    plain = bad / "plain.nii"
    _save(data, plain, flair.affine)
    shutil.copy(plain, bad / "uncompressed.nii.gz")
    (bad / "truncated.nii.gz").write_bytes(images[0].read_bytes()[:400])
    (bad / "text.nii.gz").write_bytes(gzip.compress(b"this is not an image"))
    nan, inf = data.copy(), data.copy()
    nan[3, 3, 3], inf[4, 4, 4] = np.nan, np.inf
    shifted = flair.affine.copy()
    shifted[0, 3] += 7.0
    cases = {
        "missing_file": (entry("missing_file", str(bad / "nowhere.nii.gz")), "file not found: " + str(bad)),
        "truncated_gzip": (entry("truncated_gzip", str(bad / "truncated.nii.gz")), "truncated or corrupt"),
        "not_gzip": (entry("not_gzip", str(bad / "uncompressed.nii.gz")), "uncompressed.nii.gz: it is named .gz but"),
        "not_nifti": (entry("not_nifti", str(bad / "text.nii.gz")), "text.nii.gz: it is not a NIfTI file"),
        "two_d": (entry("two_d", _save(data[..., 0], bad / "2d.nii.gz")), "2d.nii.gz is not a single 3D volume"),
        "four_d": (
            entry("four_d", _save(np.stack([data, data], -1), bad / "4d.nii.gz", flair.affine)),
            "4d.nii.gz is not a single 3D volume",
        ),
        "nan": (entry("nan", _save(nan, bad / "nan.nii.gz", flair.affine)), "nan.nii.gz contains NaN or Inf"),
        "inf": (entry("inf", _save(inf, bad / "inf.nii.gz", flair.affine)), "inf.nii.gz contains NaN or Inf"),
        "empty": (entry("empty", _save(0 * data, bad / "zero.nii.gz", flair.affine)), "zero.nii.gz is empty"),
        "constant": (
            entry("constant", _save(0 * data + 5, bad / "const.nii.gz", flair.affine)),
            "const.nii.gz is constant",
        ),
        "other_shape": (
            entry("other_shape", _save(data[:-2], bad / "short.nii.gz", flair.affine)),
            "all files of a case must share one grid",
        ),
        "other_affine": (
            entry("other_affine", _save(data, bad / "shifted.nii.gz", shifted)),
            "on another grid than " + str(bad / "shifted.nii.gz"),
        ),
        "three_files": ({"id": "three_files", "image": [str(p) for p in images[:3]]}, "3 image files given but 4"),
        "not_a_path": ({"id": "not_a_path", "image": [7, *map(str, images[1:])]}, "must be a file path, got int"),
        "mask_other_grid": (
            entry("mask_other_grid", brain_mask=_save(np.ones((5, 5, 5), np.uint8), bad / "mask5.nii.gz")),
            "mask5.nii.gz has shape (5, 5, 5)",
        ),
        "mask_empty": (
            entry("mask_empty", brain_mask=_save(np.zeros(data.shape, np.uint8), bad / "nomask.nii.gz", flair.affine)),
            "the brain mask is empty",
        ),
        "../unsafe": (entry("../unsafe"), "is not filesystem-safe"),
        "found_unusable": ({"id": "found_unusable", "error": "missing t2 file"}, "missing t2 file"),
    }
    return cases


@pytest.fixture(scope="module")
def matrix(model, tmp_path_factory) -> dict:
    """One library run over the good cases, the bad ones and the warned ones; the input checksums around it."""
    root = tmp_path_factory.mktemp("inputs")
    anatomy = phantom_anatomy((32, 40, 24))
    good = {c: make_case(anatomy, root, c, num_lesions=1, seed=i) for i, c in enumerate(GOOD)}
    bad = _bad_cases(root, good["good_a"])
    images = [str(root / p) for p in good["good_a"]["image"]]
    noise = np.random.default_rng(0).uniform(0, 1000, nib.load(images[0]).shape).astype(np.float32)
    warned = {
        "label_other_grid": {"image": images, "label": _save(np.ones((6, 6, 6)), root / "bad" / "seg6.nii.gz")},
        "label_missing": {"image": images, "label": str(root / "bad" / "no_seg.nii.gz")},
        "noise": {"image": [_save(noise, root / "bad" / "noise.nii.gz", nib.load(images[0]).affine), *images[1:]]},
    }
    entries = [{"id": c, "image": [str(root / p) for p in e["image"]]} for c, e in good.items()]
    entries += [e for e, _ in bad.values()]
    entries += [{"id": c, **e} for c, e in warned.items()]
    entries.append(dict(entries[0]))  # the same id twice
    before = _sha256(root)
    out = root.parent / (root.name + "_out")
    vi = VolumeInferer.from_files(model["checkpoint"], model["calibration"], progress=False)
    logger = logging.getLogger("anofpdm_monai")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        summary = vi.run(entries, out, raise_on_failure=False)
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    return {"summary": summary, "bad": bad, "out": out, "root": root, "before": before, "warnings": warnings}


# --------------------------------------------------------------------------------------------------------------------
# the matrix through the library
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "missing_file",
        "truncated_gzip",
        "not_gzip",
        "not_nifti",
        "two_d",
        "four_d",
        "nan",
        "inf",
        "empty",
        "constant",
        "other_shape",
        "other_affine",
        "three_files",
        "not_a_path",
        "mask_other_grid",
        "mask_empty",
        "../unsafe",
        "found_unusable",
    ],
)
def test_a_bad_case_fails_with_one_line_and_the_others_are_written(matrix, case):
    failed = matrix["summary"]["failed"]
    assert case in failed, sorted(failed)
    _one_line(failed[case])
    assert matrix["bad"][case][1] in failed[case]
    for good in GOOD:  # the others' outputs exist
        for kind in ("anomaly_map.nii.gz", "anomaly_mask.nii.gz", "slices.csv", "provenance.json"):
            assert (matrix["out"] / good / f"{good}_{kind}").is_file()


def test_the_matrix_run_writes_nothing_for_bad_cases_and_modifies_no_input(matrix):
    summary = matrix["summary"]
    assert summary["done"] == [*GOOD, "label_other_grid", "label_missing", "noise"]
    assert set(summary["failed"]) == {*matrix["bad"], "good_a (again)"}
    assert "appears twice" in summary["failed"]["good_a (again)"]
    assert sorted(p.name for p in matrix["out"].iterdir()) == sorted([*summary["done"], "inference_summary.json"]), (
        "a bad case wrote something (or a case wrote outside its folder)"
    )
    assert not (matrix["root"] / "unsafe").exists() and not (matrix["out"].parent / "unsafe").exists()
    assert not [p for p in matrix["out"].rglob(".*")], "temporary files left behind"
    assert _sha256(matrix["root"]) == matrix["before"], "an input file was modified"


@pytest.mark.parametrize(
    "case, text",
    [
        ("label_other_grid", "seg6.nii.gz has shape (6, 6, 6)"),
        ("label_missing", "no_seg.nii.gz"),
        ("noise", "noise.nii.gz does not look like an MRI volume"),
    ],
)
def test_a_questionable_input_is_a_one_line_warning_and_the_case_runs(matrix, case, text):
    lines = [w for w in matrix["warnings"] if f"case {case}:" in w]
    assert len(lines) == 1 and text in lines[0], matrix["warnings"]
    _one_line(lines[0])
    assert (matrix["out"] / case / f"{case}_anomaly_map.nii.gz").is_file()


def test_the_mri_warning_fires_for_the_noise_volume_only(matrix):
    flagged = [w for w in matrix["warnings"] if "does not look like an MRI volume" in w]
    assert len(flagged) == 1 and flagged[0].startswith("case noise:"), flagged


REAL_IMAGES = sorted(
    p
    for p in SHARED_DATA.rglob("*.nii.gz")
    if not any(k in p.name.lower() for k in ("seg", "msk", "mask", "otmulticlass"))
)


@pytest.mark.skipif(not REAL_IMAGES, reason=f"real data absent ({SHARED_DATA})")
def test_the_mri_check_passes_every_real_volume_and_flags_noise():
    """BraTS 2013 (z-scored, non-zero background), BraTS 2021/2023, TCGA, ISLES, a T1 template: r > 0.8, and more
    distinct intensities than a label or mask has."""
    for path in REAL_IMAGES:
        img = LoadCased(keys="image").loader(str(path))
        assert neighbour_correlation(img.as_tensor()) > 0.8, path
        assert distinct_values(img.as_tensor()) is None, path  # not flagged as a label or mask
    rng = np.random.default_rng(0)
    for noise in (rng.uniform(size=(60, 60, 40)), rng.normal(size=(60, 60, 40))):
        assert neighbour_correlation(torch.as_tensor(noise)) < MIN_NEIGHBOUR_CORRELATION


def test_paths_outside_dataset_dir_are_a_warning(tmp_path, caplog):
    datalist = {"modalities": ["t1w"], "training": [], "validation": [], "test": []}
    datalist["test"] = [{"id": "a", "image": ["../../x.nii.gz"]}, {"id": "b", "image": ["b/b.nii.gz"]}]
    with caplog.at_level(logging.WARNING, logger="anofpdm_monai"):
        load_datalist(datalist, tmp_path / "data")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "1 path(s) lead outside dataset_dir" in lines[0] and "../../x.nii.gz" in lines[0]


# --------------------------------------------------------------------------------------------------------------------
# calibration files: every key checked, naming the file and the key
# --------------------------------------------------------------------------------------------------------------------


def _edited(model, tmp_path, edit) -> Path:
    content = json.loads(Path(model["calibration"]).read_text())
    edit(content)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize(
    "edit, text",
    [
        (lambda c: c.update(tau="high"), "key 'tau' must be a finite number"),
        (
            lambda c: (c["settings"].update(health_score="cosine"), c.update(tau=1.5)),
            "key 'tau' must be a number in [-1, 1]",
        ),
        (lambda c: c.update(guidance_scale=-1), "key 'guidance_scale' must be a finite number > 0"),
        (lambda c: c.update(m_max=[0.05]), "key 'm_max' has 1 values for 2 map_channels"),
        (lambda c: c.update(m_max=[0.05, 0.0]), "key 'm_max' must be a non-empty list of finite numbers in (0, 4]"),
        (lambda c: c.update(m_max_joint=None), "key 'm_max_joint'"),
        (lambda c: c.update(map_channels=[0, True]), "key 'map_channels'"),
        (lambda c: c.update(num_healthy=-3), "key 'num_healthy'"),
        (lambda c: c["settings"].update(forward="sideways"), "forward must be one of"),
        (lambda c: c["settings"].update(stride=10), "key 'settings.stride' is 10 but the statistics were computed"),
        (lambda c: c["settings"].update(t_max=200), "key 'settings.t_max' is 200"),
        (lambda c: c["settings"].update(timesteps=[0, 50, 100, 150, 200, 250, 300]), "grid_digest differs"),
        (lambda c: c.pop("tau"), "is missing fields ['tau']"),
    ],
)
def test_a_bad_calibration_key_is_one_line_naming_file_and_key(model, tmp_path, edit, text):
    path = _edited(model, tmp_path, edit)
    with pytest.raises(CalibrationError) as info:
        Calibration.load(path)
    _one_line(str(info.value))
    assert str(path) in str(info.value) and text in str(info.value)


def test_calibration_file_that_is_not_json(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(CalibrationError, match=r"cannot read calibration file .*c\.json"):
        Calibration.load(tmp_path / "c.json")


def test_unknown_calibration_key_is_a_warning(model, tmp_path, caplog):
    path = _edited(model, tmp_path, lambda c: c.update(taux=0.2))
    with caplog.at_level(logging.WARNING, logger="anofpdm_monai"):
        Calibration.load(path)
    assert any(
        "unknown key(s) ['taux'] ignored" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records
    )


def test_map_channels_the_checkpoint_does_not_have_are_refused_before_any_case(model, tmp_path):
    one = VolumePreprocessor(modalities=["t1w"], image_size=SIZE)
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "t1w.pt", build_diffusion_unet(1, "tiny", use_flash_attention=False), preprocessing=one.to_dict()
    )
    cal = Calibration.load(model["calibration"])
    cal.checkpoint_digest, cal.preprocessing = load_network(ckpt)[1]["digest"], one.to_dict()
    cal.map_channels, cal.map_modalities, cal.m_max = [3], ["t1w"], [0.05]
    path = cal.save(tmp_path / "three.json")
    with pytest.raises(CalibrationError) as info:
        VolumeInferer.from_files(ckpt, path, progress=False)
    _one_line(str(info.value))
    assert str(path) in str(info.value) and "map_channels [3] do not exist in a 1-channel checkpoint" in str(info.value)
    cal.map_channels = [0]
    cal.map_modalities = ["flair"]
    path = cal.save(tmp_path / "named.json")
    with pytest.raises(CalibrationError, match=r"map_channels \[0\] are the checkpoint's \['t1w'\], not"):
        VolumeInferer.from_files(ckpt, path, progress=False)


def test_a_calibration_of_another_image_size_is_named(model, tmp_path, caplog):
    path = _edited(model, tmp_path, lambda c: c["preprocessing"].update(image_size=64))
    with caplog.at_level(logging.WARNING, logger="anofpdm_monai"), pytest.raises(CalibrationError, match="recalibrate"):
        VolumeInferer.from_files(model["checkpoint"], path, progress=False)
    assert any("made with image_size 64 but the checkpoint has image_size 32" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------------------------
# arguments and outputs: refused before any work, the argument named (not "recalibrate")
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"guidance_scale": -1}, "guidance_scale must be a finite number > 0, got -1"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number > 0"),
        ({"forward": "foo"}, "forward must be one of ['ddim', 'ddpm'], got 'foo'"),
        ({"stride": 0}, "stride must be >= 1"),
        ({"median_kernel": 0}, "median_kernel must be >= 1"),
    ],
)
def test_a_bad_argument_is_named_not_blamed_on_the_calibration(model, kwargs, text):
    with pytest.raises(ValueError) as info:
        VolumeInferer.from_files(model["checkpoint"], model["calibration"], progress=False, **kwargs)
    assert text in str(info.value) and "recalibrate" not in str(info.value)
    _one_line(str(info.value))


def test_t_max_alone_keeps_the_calibrated_stride(model):
    """README: a partial grid override uses the calibration's other grid field (t_max alone keeps its stride)."""
    vi = VolumeInferer.from_files(model["checkpoint"], model["calibration"], t_max=300, progress=False)
    assert vi.inferer.timesteps == GRID
    assert VolumeInferer.from_files(model["checkpoint"], model["calibration"], t_max=350, progress=False)
    with pytest.raises(CalibrationError, match=r"timesteps .* vs .*\(3 steps\).*recalibrate"):
        VolumeInferer.from_files(model["checkpoint"], model["calibration"], t_max=200, progress=False)
    irregular = AnoFPDMSettings(timesteps=[0, 10, 100, 300])
    with pytest.raises(ValueError, match="t_max alone cannot change the grid .* give stride too, or timesteps"):
        irregular.replace(t_max=200)


def test_an_unwritable_output_is_refused_before_any_case(model, matrix, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    vi = VolumeInferer.from_files(model["checkpoint"], model["calibration"], progress=False)
    calls = []
    vi.network.register_forward_hook(lambda *a: calls.append(1))
    entries = [{"id": "good_a", "image": [str(matrix["root"] / "good_a" / f"good_a_{m}.nii.gz") for m in BRATS]}]
    with pytest.raises(OutputPathError, match=f"output_dir {a_file} is an existing file, not a folder"):
        vi.run(entries, a_file)
    with pytest.raises(OutputPathError, match=f"output_dir {a_file / 'sub'} is not writable"):
        vi.run(entries, a_file / "sub")
    assert not calls


def test_every_stage_checks_its_outputs_first(tmp_path):
    """Calibration, evaluation and the datalist CLI refuse an unwritable output before reading anything (the
    checkpoint and the dataset folder here do not even exist)."""
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    nothing = tmp_path / "none.pt"
    with pytest.raises(OutputPathError, match="calibration file .* is an existing folder"):
        run_calibration(nothing, {}, None, tmp_path, tmp_path / "cache", ["flair"], progress=False)
    with pytest.raises(OutputPathError, match="cache_dir .*taken is an existing file"):
        run_calibration(nothing, {}, None, tmp_path / "c.json", a_file, ["flair"], progress=False)
    with pytest.raises(OutputPathError, match="output_dir .*taken is an existing file"):
        run_evaluation(nothing, {}, None, a_file, tmp_path / "cache", ["flair"])
    assert datalist_cli.main(["brats2021", "--root", str(tmp_path / "no_data"), "--output", str(tmp_path)]) == 2
    assert datalist_cli.main(["brats2021", "--root", str(tmp_path / "no_data"), "--output", str(a_file / "d")]) == 2


def test_the_demo_checks_its_arguments_first(tmp_path, capsys):
    from anofpdm_monai.apps import demo

    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for argv, text in (
        (["--output_dir", str(a_file)], "is an existing file"),
        (["--output_dir", str(tmp_path / "o"), "--stride", "0"], "stride must be >= 1"),
        (["--output_dir", str(tmp_path / "o"), "--train_minutes", "-1"], "--train_minutes must be > 0"),
    ):
        with pytest.raises(SystemExit) as info:
            demo.main(argv)
        assert info.value.code == 2 and text in capsys.readouterr().err
    assert not (tmp_path / "o" / "data").exists()


# --------------------------------------------------------------------------------------------------------------------
# ignite's "resuming from iteration 0, epoch 0" on every run
# --------------------------------------------------------------------------------------------------------------------


def test_ignite_fresh_state_resume_line_is_silenced(tmp_path, caplog):
    from test_engines import _Run

    with caplog.at_level(logging.INFO):
        _Run(tmp_path, max_epochs=1).run()
        fresh = [r.getMessage() for r in caplog.records]
        caplog.clear()
        resumed = _Run(tmp_path, max_epochs=2)
        resumed.run()
        again = [r.getMessage() for r in caplog.records]
    assert resumed.checkpointer.resumed_from is not None
    assert not [m for m in fresh + again if "resuming from iteration 0, epoch 0" in m], fresh + again
    assert [m for m in again if m.startswith("resumed from") and "epoch 1, iteration 2" in m]


# --------------------------------------------------------------------------------------------------------------------
# the bundle command: exit status and one line
# --------------------------------------------------------------------------------------------------------------------


def _bundle(overrides: dict, cwd: Path) -> subprocess.Popen:
    """The inference bundle command, started (several run side by side: most of each run is Python start-up)."""
    files = [str(REPO / "bundles" / "anofpdm_brats21" / "configs" / "dataset.json")]
    files.append(str(REPO / "bundles" / "common" / "configs" / "inference.json"))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files)]
    cmd += [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def bundle_inputs(model, matrix, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bundle")
    entries = [{"id": c, "image": [f"{c}/{c}_{m}.nii.gz" for m in BRATS]} for c in GOOD]
    entries.append({"id": "not_gzip", "image": ["bad/uncompressed.nii.gz", *entries[0]["image"][1:]]})
    datalist = {"modalities": BRATS, "training": [], "validation": [], "test": entries}
    (root / "datalist.json").write_text(json.dumps(datalist))
    common = {
        "dataset_dir": matrix["root"],
        "datalist": root / "datalist.json",
        "checkpoint": model["checkpoint"],
        "calibration": model["calibration"],
        "progress": False,
    }
    return {"root": root, "common": common}


BUNDLE_REFUSALS = {
    "guidance_scale": ({"guidance_scale": -1}, "error: ValueError: guidance_scale must be a finite number > 0, got -1"),
    "output_dir": ({"output_dir": "TAKEN"}, "OutputPathError: output_dir "),
    "calibration_tau": (
        {"calibration": "TAU"},
        "key 'tau' must be a finite number <= 1 (the range of the mse_gap health score), got 'high'",
    ),
}


def test_bundle_could_not_start_exits_2_with_one_line(bundle_inputs):
    root = bundle_inputs["root"]
    (root / "TAKEN").write_text("x")
    tau = json.loads(Path(bundle_inputs["common"]["calibration"]).read_text()) | {"tau": "high"}
    (root / "TAU").write_text(json.dumps(tau))
    procs = {}
    for name, (overrides, _) in BUNDLE_REFUSALS.items():
        overrides = {k: (root / v if v in ("TAKEN", "TAU") else v) for k, v in overrides.items()}
        procs[name] = _bundle({"output_dir": root / f"out_{name}", **bundle_inputs["common"], **overrides}, root)
    for name, proc in procs.items():
        done = _finish(proc)
        assert done.returncode == 2, (name, done.stderr[-3000:])
        line = _error_line(done)
        assert BUNDLE_REFUSALS[name][1] in line, (name, line)
        if name == "output_dir":
            assert line.endswith("TAKEN is an existing file, not a folder"), line
        assert not (root / f"out_{name}" / "inference_summary.json").exists()


def test_bundle_with_a_bad_case_exits_3_and_writes_the_others(bundle_inputs):
    out = bundle_inputs["root"] / "out_cases"
    proc = _finish(_bundle({**bundle_inputs["common"], "output_dir": out}, bundle_inputs["root"]))
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = _error_line(proc)
    assert "1 of 3 case(s) failed: not_gzip:" in line and "not gzip-compressed" in line, line
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["done"] == GOOD and list(summary["failed"]) == ["not_gzip"]


@pytest.mark.parametrize(
    "workflow, workflow_type, key",
    [
        ("train", "train", "output_dir"),
        ("train", "train", "cache_dir"),
        ("calibrate", "infer", "output_dir"),
        ("calibrate", "infer", "cache_dir"),
        ("evaluate", "infer", "evaluation_dir"),
        ("inference", "infer", "output_dir"),
    ],
)
def test_every_bundle_workflow_checks_its_outputs_in_initialize(tmp_path, monkeypatch, workflow, workflow_type, key):
    """Before the checkpoint, the datalist or the data are read (none of them exists here)."""
    from monai.bundle import ConfigWorkflow

    from anofpdm_monai.bundle import config_files

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # initialize installs the one-line hook
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    overrides = {"output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), key: str(a_file)}
    overrides.update(checkpoint=str(tmp_path / "none.pt"), datalist=str(tmp_path / "none.json"))
    wf = ConfigWorkflow(config_file=config_files("anofpdm_brats21", workflow), workflow_type=workflow_type, **overrides)
    with pytest.raises(RuntimeError) as info:  # MONAI's "Failed to evaluate" around it
        wf.initialize()
    cause = root_cause(info.value)
    assert isinstance(cause, OutputPathError) and str(cause) == f"{key} {a_file} is an existing file, not a folder"


@pytest.mark.parametrize(
    "overrides, text",
    [
        ({"guidance_scales": [1.0, -1.0]}, "guidance_scales must be a finite number > 0, got -1.0"),
        ({"forward": "foo"}, "forward must be one of ['ddim', 'ddpm'], got 'foo'"),
        ({"map_modalities": ["dwi"]}, "map modalities ['dwi'] are not among the model's modalities"),
    ],
)
def test_the_calibrate_workflow_checks_its_arguments_before_the_data(model, tmp_path, monkeypatch, overrides, text):
    """Refused in initialize: the datalist (which does not exist here) is never read, no slice cache is built."""
    from monai.bundle import ConfigWorkflow

    from anofpdm_monai.bundle import config_files

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    common = {"output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "device": "cpu"}
    common.update(checkpoint=str(model["checkpoint"]), datalist=str(tmp_path / "none.json"))
    wf = ConfigWorkflow(
        config_file=config_files("anofpdm_brats21", "calibrate"), workflow_type="infer", **common, **overrides
    )
    with pytest.raises(RuntimeError) as info:  # MONAI's "Failed to evaluate" around it
        wf.initialize()
    assert text in str(root_cause(info.value)), str(root_cause(info.value))
    assert not list((tmp_path / "cache").iterdir())
