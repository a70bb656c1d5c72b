"""The bundles as MONAI workflows: train -> calibrate -> inference in process through ``ConfigWorkflow`` for both
datasets, with MONAI's property checks (train and infer workflow types), the noise schedule carried from the
training config through the checkpoint to calibration and inference, the bundle's inference equal to the Python
``VolumeInferer`` byte for byte, its written-out preprocessing equal to ``VolumePreprocessor.transform``, and a
post-processing step swapped by a JSON file only (docs/architecture.md)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import SMALL_TRAIN as BASE_TRAIN
from monai.bundle import ConfigParser, ConfigWorkflow

from anofpdm_monai.apps.inference import VolumeInferer
from anofpdm_monai.bundle import config_files
from anofpdm_monai.calibration import Calibration
from anofpdm_monai.data import VolumePreprocessor
from anofpdm_monai.data.datalist import load_datalist, write_datalist
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy
from anofpdm_monai.networks import load_network
from anofpdm_monai.schedule import NoiseSchedule
from anofpdm_monai.settings import AnoFPDMSettings

BUNDLES = [("anofpdm_brats21", ["flair", "t1", "t1ce", "t2"]), ("anofpdm_atlas", ["t1w"])]
# a schedule unlike the default one: every later stage must use it
SCHEDULE = {"num_train_timesteps": 400, "beta_end": 0.025}
SMALL_TRAIN = {
    **BASE_TRAIN,
    "num_train_timesteps": SCHEDULE["num_train_timesteps"],
    "noise_schedule::beta_end": SCHEDULE["beta_end"],
}
GRID = {"t_max": 200, "stride": 50, "min_component_size": 2, "median_kernel": 3}


def _workflow(bundle: str, workflow: str, workflow_type: str, extra: list[str] | None = None, **overrides):
    files = config_files(bundle, workflow) + list(extra or [])
    wf = ConfigWorkflow(config_file=files, workflow_type=workflow_type, **{k: v for k, v in overrides.items()})
    wf.initialize()
    return wf


def _run(wf: ConfigWorkflow) -> None:
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()


@pytest.fixture(scope="module", params=BUNDLES, ids=[b for b, _ in BUNDLES])
def trained(request, tmp_path_factory) -> dict:
    """Synthetic data, a model trained by the bundle's train workflow with a non-default schedule, and its
    calibration made by the calibrate workflow."""
    bundle, modalities = request.param
    root = tmp_path_factory.mktemp(bundle)
    data = root / "data"
    dl = make_dataset(
        data, phantom_anatomy((32, 40, 24), spacing=6.0), {"training": 2, "validation": 1, "test": 2}, modalities
    )
    datalist = root / "datalist.json"
    write_datalist(dl, datalist)
    common = {"dataset_dir": str(data), "datalist": str(datalist), "cache_dir": str(root / "cache")}
    train = _workflow(bundle, "train", "train", output_dir=str(root / "model"), **common, **SMALL_TRAIN)
    _run(train)
    checkpoint = root / "model" / "model.pt"
    calibration = root / "calibration.json"
    cal = _workflow(
        bundle,
        "calibrate",
        "infer",
        checkpoint=str(checkpoint),
        output_dir=str(root),
        calibration_file=str(calibration),
        guidance_scales=[1.0, 3.0],
        device="cpu",
        progress=False,
        **common,
        **GRID,
    )
    _run(cal)
    return {"bundle": bundle, "root": root, "common": common, "checkpoint": checkpoint, "calibration": calibration}


def _infer(trained: dict, output_dir: Path, extra: list[str] | None = None) -> ConfigWorkflow:
    wf = _workflow(
        trained["bundle"],
        "inference",
        "infer",
        extra=extra,
        checkpoint=str(trained["checkpoint"]),
        calibration=str(trained["calibration"]),
        output_dir=str(output_dir),
        device="cpu",
        progress=False,
        **trained["common"],
    )
    _run(wf)
    return wf


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.rglob("*.nii.gz"))}


def test_schedule_travels_from_training_to_inference(trained):
    """The training config's schedule is recorded in the checkpoint and used by calibration and inference (a
    default ``NoiseSchedule()`` used to be rebuilt after training)."""
    expected = NoiseSchedule(SCHEDULE["num_train_timesteps"], beta_end=SCHEDULE["beta_end"])
    _, info = load_network(trained["checkpoint"])
    assert info["schedule"] == expected
    assert Calibration.load(trained["calibration"]).schedule == expected.to_dict()
    wf = _infer(trained, trained["root"] / "schedule_check")
    assert wf.parser.get_parsed_content("anofpdm").schedule == expected
    assert wf.parser.get_parsed_content("inferer").inferer.timesteps == [0, 50, 100, 150, 200]


def test_bundle_inference_equals_python_volume_inferer(trained):
    out_bundle = trained["root"] / "infer_bundle"
    _infer(trained, out_bundle)
    summary = json.loads((out_bundle / "inference_summary.json").read_text())
    assert len(summary["done"]) == 2 and not summary["failed"]
    entries = load_datalist(trained["common"]["datalist"], trained["common"]["dataset_dir"], "test")["test"]
    out_python = trained["root"] / "infer_python"
    VolumeInferer.from_files(trained["checkpoint"], trained["calibration"], progress=False).run(entries, out_python)
    a, b = _arrays(out_bundle), _arrays(out_python)
    assert sorted(a) == sorted(b) and len(a) == 4
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for case in summary["done"]:  # the provenance is the same, so either run skips the other's finished cases
        prov = [json.loads((o / case / f"{case}_provenance.json").read_text()) for o in (out_bundle, out_python)]
        assert prov[0] == prov[1]


def _calibrate_then_infer(trained, tmp_path, name: str, **options) -> tuple[Calibration, ConfigWorkflow]:
    """calibrate.json with ``options`` into ``<name>.json``, then inference.json with that calibration: both cases
    written. Returns the calibration record and the inference workflow."""
    calibration = tmp_path / f"{name}.json"
    cal = _workflow(
        trained["bundle"],
        "calibrate",
        "infer",
        checkpoint=str(trained["checkpoint"]),
        output_dir=str(tmp_path),
        calibration_file=str(calibration),
        guidance_scales=[1.0, 3.0],
        device="cpu",
        progress=False,
        **trained["common"],
        **options,
    )
    _run(cal)
    record = Calibration.load(calibration)
    wf = _workflow(
        trained["bundle"],
        "inference",
        "infer",
        checkpoint=str(trained["checkpoint"]),
        calibration=str(calibration),
        output_dir=str(tmp_path / f"infer_{name}"),
        device="cpu",
        progress=False,
        **trained["common"],
    )
    _run(wf)
    summary = json.loads((tmp_path / f"infer_{name}" / "inference_summary.json").read_text())
    assert len(summary["done"]) == 2 and not summary["failed"]
    return record, wf


def test_official_preset_through_the_bundles(trained, tmp_path):
    """``--preset official`` calibrates with the dataset's official variant (an explicit grid still wins), single
    options change it (a command-line ``"false"`` is a flag), and inference runs with the calibration's settings."""
    official = {"anofpdm_brats21": ("brats", "mean", 2.0), "anofpdm_atlas": ("atlas", "last", 30.0)}
    dataset, aggregation, w = official[trained["bundle"]]
    options = dict(preset="official", inversion_eps="raw", end_step_inclusive="true", **GRID)
    record, wf = _calibrate_then_infer(trained, tmp_path, "calibration_official", **options)
    expected = AnoFPDMSettings.preset("official", dataset).replace(inversion_eps="raw", end_step_inclusive=True, **GRID)
    assert record.settings == expected.with_grid(SCHEDULE["num_train_timesteps"])
    assert record.settings.aggregation == aggregation and record.settings.reference == "healthy"
    assert record.guidance_scale == w and [c["guidance_scale"] for c in record.candidates] == [w]
    assert record.settings.health_score == "cosine" and record.settings.inversion_timing == "official"
    assert record.subset == {"size": record.num_healthy + record.num_unhealthy, "of": record.subset["of"], "seed": 0}
    assert wf.parser.get_parsed_content("settings") == record.settings


def test_measure_every_through_the_bundles(trained, tmp_path):
    """``--measure_every 2`` on calibrate.json is recorded in the calibration (its grid is the full one, the measured
    steps every second one), and inference runs with it and writes every case."""
    options = {**GRID, "stride": 25, "measure_every": 2}  # 0, 25, ..., 200: 9 steps, measured at 0, 50, ..., 200
    record, wf = _calibrate_then_infer(trained, tmp_path, "calibration_sparse", **options)
    assert record.settings.measure_every == 2 and list(record.timesteps) == list(range(0, 201, 25))
    assert record.settings.measured_grid(SCHEDULE["num_train_timesteps"]) == list(range(0, 201, 50))
    assert wf.parser.get_parsed_content("settings") == record.settings


def test_json_override_swaps_a_postprocessing_step(trained, tmp_path):
    """Replacing the median filter by MONAI's ``Identityd`` in a JSON file gives the unfiltered map, exactly what the
    library gives with ``median_kernel=1``."""
    override = tmp_path / "no_median.json"
    override.write_text(json.dumps({"postprocessing::transforms::1": {"_target_": "Identityd", "keys": "anomaly_map"}}))
    out_json = tmp_path / "json"
    wf = _infer(trained, out_json, extra=[str(override)])
    assert type(wf.parser.get_parsed_content("postprocessing").transforms[1]).__name__ == "Identityd"
    entries = load_datalist(trained["common"]["datalist"], trained["common"]["dataset_dir"], "test")["test"]
    out_lib = tmp_path / "lib"
    vi = VolumeInferer.from_files(trained["checkpoint"], trained["calibration"], progress=False, median_kernel=1)
    vi.run(entries, out_lib)
    a, b = _arrays(out_json), _arrays(out_lib)
    maps = [n for n in a if n.endswith("_anomaly_map.nii.gz")]
    assert len(maps) == 2
    for name in maps:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    _infer(trained, tmp_path / "default")
    filtered = _arrays(tmp_path / "default")
    assert any(not np.array_equal(filtered[n], a[n]) for n in maps), "the override changed nothing"


def _is_simple(v) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_is_simple(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _simple(obj) -> dict:
    return {k: v for k, v in vars(obj).items() if k != "keys" and _is_simple(v)}


def _describe(transform) -> tuple:
    """A transform's class, keys and every simple parameter, its inner array transform's too."""
    params = _simple(transform)
    for name, inner in vars(transform).items():
        if hasattr(inner, "__dict__") and type(inner).__module__.startswith(("monai", "anofpdm_monai")):
            params[name] = _simple(inner)
    return (
        type(transform).__name__,
        tuple(getattr(transform, "keys", ())),
        json.dumps(params, sort_keys=True, default=str),
    )


@pytest.mark.parametrize("square_pad", [True, False])
def test_written_out_preprocessing_equals_the_library_chain(square_pad, tmp_path):
    """inference.json spells the preprocessing out as MONAI transforms; it must stay the chain the model was
    trained with (VolumePreprocessor.transform), for every recorded parameter."""
    scaling = "slice" if square_pad else "volume"
    pre = VolumePreprocessor(["flair", "t2"], image_size=48, percentile=98.0, square_pad=square_pad, scaling=scaling)
    parser = ConfigParser()
    parser.read_config(config_files("anofpdm_brats21", "inference"))
    parser["preprocessor"] = pre
    bundle_chain = [t for t in parser.get_parsed_content("preprocessing").transforms if type(t).__name__ != "Identityd"]
    assert [_describe(t) for t in bundle_chain] == [_describe(t) for t in pre.transform.transforms]


def test_max_iterations_stops_training_and_holds_on_resume(trained, tmp_path):
    """train.json's max_iterations: the run stops after exactly that many iterations in all, and rerunning the
    command (resume) trains no more."""
    options = {**SMALL_TRAIN, "num_epochs": 50, "batch_size": 4, "max_iterations": 3}
    for _ in range(2):
        wf = _workflow(trained["bundle"], "train", "train", output_dir=str(tmp_path), **trained["common"], **options)
        wf.run()
        trainer = wf.parser.get_parsed_content("train::trainer")
        wf.finalize()
        assert trainer.state.iteration == 3
        latest = torch.load(tmp_path / "checkpoint_latest.pt", map_location="cpu", weights_only=True)
        assert latest["trainer"]["iteration"] == 3
