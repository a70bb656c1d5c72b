"""``python -m anofpdm_monai.apps.export_bundle``: a trained checkpoint and its calibration as a self-contained MONAI
model-zoo folder. A tiny model is trained and calibrated on synthetic data by the bundle workflows (as in
test_bundle_workflows.py), exported, and the exported folder, copied alone into an empty folder, is run with
``python -m monai.bundle run --config_file configs/inference.json`` without access to the repository's bundles/
(an audit hook logs every file the run opens); its outputs equal the repository bundle's. Also: the metadata against
the offline schema, ``verify_net_in_out``, large_files.yml hashes, recalibration with the exported calibrate.json, a
real case through the exported bundle, and the refusals (a mismatched pair, a non-empty output folder)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import SMALL_TRAIN
from monai.bundle import ConfigParser, ConfigWorkflow

from anofpdm_monai import __version__
from anofpdm_monai.apps.export_bundle import main
from anofpdm_monai.bundle import config_files
from anofpdm_monai.calibration import Calibration
from anofpdm_monai.data.datalist import write_datalist
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "bundles" / "meta_schema.json"
TINY_CASE = REPO.parent / "shared" / "data" / "tiny" / "BraTS2021_00006_3mm"
BUNDLE = "anofpdm_brats21"
MODALITIES = ["flair", "t1", "t1ce", "t2"]
GRID = {"t_max": 200, "stride": 50, "min_component_size": 2, "median_kernel": 3}
CASE = "BraTS2021_90003"  # a synthetic test case under a BraTS 2021 name, so that --input_dir finds it
RUN_TIMEOUT = 300


def _run_workflow(files, workflow_type: str, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(config_file=files, workflow_type=workflow_type, **overrides)
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    return wf


def _brats_case(source: Path, folder: Path, case: str, stem: str) -> Path:
    """``folder/<case>/<case>_<modality>.nii.gz`` (and ``_seg``) copied from ``source/<stem>_*.nii.gz``."""
    (folder / case).mkdir(parents=True)
    for suffix in [*MODALITIES, "seg"]:
        shutil.copyfile(source / f"{stem}_{suffix}.nii.gz", folder / case / f"{case}_{suffix}.nii.gz")
    return folder


def _calibrate(files, root: Path, checkpoint: Path, calibration: Path, common: dict, **overrides) -> None:
    _run_workflow(
        files,
        "infer",
        checkpoint=str(checkpoint),
        output_dir=str(root),
        calibration_file=str(calibration),
        guidance_scales=[1.0, 3.0],
        device="cpu",
        progress=False,
        **common,
        **GRID,
        **overrides,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A tiny model trained and calibrated by the bundle workflows on synthetic data, exported."""
    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    dl = make_dataset(
        data, phantom_anatomy((32, 40, 24), spacing=6.0), {"training": 2, "validation": 1, "test": 1}, MODALITIES
    )
    datalist = root / "datalist.json"
    write_datalist(dl, datalist)
    common = {"dataset_dir": str(data), "datalist": str(datalist), "cache_dir": str(root / "cache")}
    _run_workflow(config_files(BUNDLE, "train"), "train", output_dir=str(root / "model"), **common, **SMALL_TRAIN)
    checkpoint, calibration = root / "model" / "model.pt", root / "calibration.json"
    _calibrate(config_files(BUNDLE, "calibrate"), root, checkpoint, calibration, common)
    out = root / "exported"
    args = ["--checkpoint", str(checkpoint), "--calibration", str(calibration), "--bundle", BUNDLE]
    assert main([*args, "--output_dir", str(out)]) == 0
    test_case = Path(dl["test"][0]["label"]).name.removesuffix("_seg.nii.gz")
    inputs = _brats_case(data / test_case, root / "input", CASE, test_case)
    return {"root": root, "out": out, "checkpoint": checkpoint, "calibration": calibration, "common": common,
            "inputs": inputs, "args": args}  # fmt: skip


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.rglob("*.nii.gz"))}


def _sitecustomize(folder: Path) -> Path:
    """A ``sitecustomize`` that logs every file or folder opened under ``$WATCHED`` (``os.pathsep``-separated) to
    ``$ACCESS_LOG``; os.write does not raise audit events, so the hook does not see itself."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import os, sys\n"
        "_ROOTS = [r for r in os.environ['WATCHED'].split(os.pathsep) if r]\n"
        "_FD = os.open(os.environ['ACCESS_LOG'], os.O_WRONLY | os.O_CREAT | os.O_APPEND)\n"
        "def _hook(event, args):\n"
        "    if event not in ('open', 'os.listdir', 'os.scandir', 'glob.glob') or not args:\n"
        "        return\n"
        "    path = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else None\n"
        "    if path is None:\n"
        "        return\n"
        "    full = os.path.abspath(path)\n"
        "    if any(full == r or full.startswith(r + os.sep) for r in _ROOTS):\n"
        "        os.write(_FD, (full + '\\n').encode())\n"
        "sys.addaudithook(_hook)\n"
    )
    return folder


def test_exported_folder_is_a_model_zoo_bundle(exported):
    out = exported["out"]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "LICENSE",
        *(f"configs/{n}" for n in ("calibrate.json", "evaluate.json", "inference.json", "logging.conf")),
        "configs/metadata.json",
        "docs/README.md",
        "large_files.yml",
        "models/calibration.json",
        "models/model.pt",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary folder left"
    assert (out / "models" / "model.pt").read_bytes() == exported["checkpoint"].read_bytes()
    assert (out / "models" / "calibration.json").read_bytes() == exported["calibration"].read_bytes()
    for name in ("inference", "calibrate", "evaluate"):
        text = (out / "configs" / f"{name}.json").read_text()
        config = json.loads(text)
        assert config["bundle_root"] == "." and config["checkpoint"] == "$@bundle_root + '/models/model.pt'"
        assert str(REPO) not in text and "bundle.bundle_root(" not in text and "/../" not in text
        # one merged config: the dataset's keys and the workflow's, as MONAI merges the list
        assert config["modalities"] == MODALITIES and config["map_modalities"] == ["flair", "t2"]
        assert set(ConfigParser.load_config_files(config_files(BUNDLE, name))) == set(config)
    for name in ("inference", "evaluate"):
        parser = ConfigParser()
        parser.read_config(str(out / "configs" / f"{name}.json"))
        assert parser.get_parsed_content("calibration") == "./models/calibration.json"

    meta = json.loads((out / "configs" / "metadata.json").read_text())
    digest = Calibration.load(exported["calibration"]).checkpoint_digest
    assert meta["version"] == f"0.2.0+{digest[:8]}" and digest in meta["changelog"][meta["version"]]
    assert meta["required_packages_version"]["anofpdm-monai"] == __version__
    assert meta["monai_version"] and meta["pytorch_version"] == torch.__version__
    assert "optional_packages_version" not in meta  # MONAI would replace required_packages_version with it
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == [32, 32] and image["num_channels"] == 4
    assert meta["network_data_format"]["inputs"]["timesteps"]["value_range"] == [0, 999]

    readme = (out / "docs" / "README.md").read_text()
    record = Calibration.load(exported["calibration"])
    assert "python -m monai.bundle run --config_file configs/inference.json --input_dir" in readme
    assert f"| w* (guidance scale) | {record.guidance_scale:.6g} |" in readme and "tau" in readme
    assert "| epoch | 1 |" in readme and digest in readme


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_metadata_and_network_verify(exported):
    """MONAI's own checks: verify_metadata against the schema (offline: the repository's copy, no download) and
    verify_net_in_out on the exported network with its extra forward arguments."""
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata, verify_net_in_out

    out = exported["out"]
    verify_metadata(meta_file=str(out / "configs" / "metadata.json"), filepath=str(SCHEMA))
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(out / "configs" / "metadata.json"),
        config_file=str(out / "configs" / "inference.json"),
        device="cpu",
        bundle_root=str(out),
        extra_forward_args={"timesteps": torch.tensor([10]), "class_labels": torch.tensor([0])},
    )


def test_large_files_hashes_match(exported):
    out = exported["out"]
    text = (out / "large_files.yml").read_text()
    entries = re.findall(r'- path: "([^"]+)"\n\s+url: ""\n\s+hash_val: "([0-9a-f]{64})"\n\s+hash_type: "sha256"', text)
    assert [p for p, _ in entries] == ["models/model.pt", "models/calibration.json"] and text.startswith("large_files:")
    for path, digest in entries:
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digest, path
    try:
        import yaml  # noqa: F401  (MONAI reads large_files.yml with pyyaml)
    except ImportError:
        return
    from monai.bundle import download_large_files

    download_large_files(bundle_path=str(out))  # files present: MONAI checks their hashes instead of downloading


def test_exported_bundle_runs_alone_and_equals_the_repository_bundle(exported, tmp_path):
    """The exported folder alone, in an empty folder, run by the zoo command inside it; the repository's bundles/
    and data_lists/ are neither on PYTHONPATH nor opened; the outputs are those of the repository bundle."""
    folder = tmp_path / "bundle"
    shutil.copytree(exported["out"], folder)
    log = tmp_path / "access.log"
    watched = [str(REPO / "bundles"), str(REPO / "data_lists"), str(folder.resolve())]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        PYTHONPATH=str(_sitecustomize(tmp_path / "hook")),
        WATCHED=os.pathsep.join(watched),
        ACCESS_LOG=str(log),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    out_exported = tmp_path / "out_exported"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--input_dir", str(exported["inputs"]), "--output_dir", str(out_exported), "--device", "cpu"]
    cmd += ["--progress", "false"]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    opened = set(log.read_text().split())
    assert str(folder.resolve() / "models" / "model.pt") in opened, "the audit hook saw nothing"
    assert str(folder.resolve() / "configs" / "metadata.json") in opened
    assert not [p for p in opened if not p.startswith(str(folder.resolve()))], "the run read the repository"

    out_repo = tmp_path / "out_repository"
    _run_workflow(
        config_files(BUNDLE, "inference"),
        "infer",
        checkpoint=str(exported["checkpoint"]),
        calibration=str(exported["calibration"]),
        input_dir=str(exported["inputs"]),
        output_dir=str(out_repo),
        device="cpu",
        progress=False,
    )
    a, b = _arrays(out_exported), _arrays(out_repo)
    assert sorted(a) == sorted(b) == [f"{CASE}_anomaly_map.nii.gz", f"{CASE}_anomaly_mask.nii.gz"]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in (f"{CASE}_slices.csv", f"{CASE}_provenance.json"):
        assert (out_exported / CASE / name).read_text() == (out_repo / CASE / name).read_text(), name


def test_exported_calibrate_config_reproduces_the_calibration(exported, tmp_path):
    """configs/calibrate.json of the export, on the same validation data with the same grid, gives the shipped
    constants again (written into its own output folder, not over models/calibration.json)."""
    out = exported["out"]
    calibration = tmp_path / "recalibrated.json"
    overrides = {"bundle_root": str(out)}
    _calibrate(str(out / "configs" / "calibrate.json"), tmp_path, out / "models" / "model.pt", calibration,
               exported["common"], **overrides)  # fmt: skip
    again, shipped = Calibration.load(calibration), Calibration.load(out / "models" / "calibration.json")
    assert {k: v for k, v in again.without_created().items() if k != "datalist"} == {
        k: v for k, v in shipped.without_created().items() if k != "datalist"
    }
    assert (out / "models" / "calibration.json").read_bytes() == exported["calibration"].read_bytes()


@pytest.mark.skipif(not TINY_CASE.is_dir(), reason=f"real test data absent ({TINY_CASE})")
def test_real_case_through_the_exported_bundle(exported, tmp_path):
    """A real BraTS 2021 case (4 modalities, strided to 45 x 59 x 46) through the exported inference config: maps
    and masks on the case's own grid."""
    case = "BraTS2021_00006"
    inputs = _brats_case(TINY_CASE, tmp_path / "input", case, case)
    out = tmp_path / "out"
    _run_workflow(
        str(exported["out"] / "configs" / "inference.json"),
        "infer",
        bundle_root=str(exported["out"]),
        input_dir=str(inputs),
        output_dir=str(out),
        device="cpu",
        progress=False,
    )
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["done"] == [case] and not summary["failed"]
    reference = nib.load(TINY_CASE / f"{case}_flair.nii.gz")
    for kind in ("map", "mask"):
        image = nib.load(out / case / f"{case}_anomaly_{kind}.nii.gz")
        assert image.shape == reference.shape and np.allclose(image.affine, reference.affine)
        assert np.isfinite(np.asarray(image.dataobj)).all()


def test_a_mismatched_calibration_is_refused(exported, tmp_path, capsys):
    """A calibration made for another checkpoint (one weight changed) is refused by the library's own check, in one
    line naming the calibration file, before anything is written."""
    content = torch.load(exported["checkpoint"], weights_only=True)
    name = next(iter(content["ema"]))
    content["ema"][name] = content["ema"][name] + 1e-3
    other = tmp_path / "other.pt"
    torch.save(content, other)
    out = tmp_path / "exported"
    calibration = ["--calibration", str(exported["calibration"])]
    assert main(["--checkpoint", str(other), *calibration, "--bundle", BUNDLE, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert str(exported["calibration"]) in err and "checkpoint_digest" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]


def test_output_folder_rules(exported, tmp_path, capsys):
    """A non-empty output folder is refused unless --overwrite true (then replaced as one unit); a folder holding an
    input, an unknown bundle and a bad flag are refused; every refusal is one line with status 2."""
    out = tmp_path / "exported"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = [*exported["args"], "--output_dir", str(out)]
    assert main(args) == 2
    assert "is not empty (--overwrite true" in capsys.readouterr().err and (out / "old.txt").exists()
    assert main([*args, "--overwrite", "true", "--version", "1.0.0"]) == 0
    assert not (out / "old.txt").exists() and (out / "models" / "model.pt").is_file()
    assert json.loads((out / "configs" / "metadata.json").read_text())["version"] == "1.0.0"

    holder = ["--output_dir", str(exported["checkpoint"].parent), "--overwrite", "true"]
    assert main([*exported["args"], *holder]) == 2
    assert "holds --checkpoint" in capsys.readouterr().err and exported["checkpoint"].is_file()
    unknown = [*exported["args"][:-1], "no_such_bundle", "--output_dir", str(tmp_path / "x")]
    assert main(unknown) == 2
    assert "unknown --bundle 'no_such_bundle'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    atlas = [*exported["args"][:-1], "anofpdm_atlas", "--output_dir", str(tmp_path / "x")]
    assert main(atlas) == 2
    assert "not among bundle anofpdm_atlas's ['t1w']" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exc:
        main([*args, "--overwrite", "maybe"])
    assert exc.value.code == 2
