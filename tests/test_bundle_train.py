"""Bundle tests in the model-zoo manner: the real ``train.json`` (and ``multi_gpu_train.json``) of each bundle run
through ``python -m monai.bundle run`` on tiny real data and on synthetic volumes, with a small network and a few
iterations; resumption compared against an uninterrupted run; metadata checked against the shipped schema."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anofpdm_monai.bundle import config_files
from anofpdm_monai.data import SliceDataset, VolumePreprocessor
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy
from anofpdm_monai.networks import load_network

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = BUNDLES / "meta_schema.json"
TINY_CASE = REPO.parent / "shared" / "data" / "tiny" / "BraTS2021_00006_3mm"
BRATS_MODALITIES = ["flair", "t1", "t1ce", "t2"]

# overrides that make every run small: 32x32 slices, the tiny network, a few iterations, no worker processes
SMALL = {
    "image_size": 32,
    "network_size": "tiny",
    "batch_size": 8,
    "val_batch_size": 16,
    "num_workers": 0,
    "progress": False,
}
IMAGE_SIZE = SMALL["image_size"]

# (bundle, modalities) of the synthetic-data runs
SYNTHETIC_CASES = [
    ("anofpdm_brats21", BRATS_MODALITIES),
    ("anofpdm_atlas", ["t1w"]),
]

RUN_TIMEOUT = 300


def _env() -> dict[str, str]:
    """The package importable from any folder (as once installed), one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _config(bundle: str, *workflows: str) -> str:
    """The ``--config_file`` value of a workflow: the dataset's file merged with the shared workflow config(s)."""
    return str(config_files(bundle, *(workflows or ("train",))))


def _file(bundle: str, name: str) -> str:
    return str(BUNDLES / bundle / "configs" / name)


def _args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", str(v)]
    return out


def _bundle_cmd(config_file: str, overrides: dict, launcher: list[str] | None = None) -> list[str]:
    prefix = launcher or [sys.executable]
    return [*prefix, "-m", "monai.bundle", "run", "--config_file", config_file, *_args(overrides)]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, output: str) -> None:
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{output[-6000:]}"


def _run(cmd: list[str], cwd: Path | str = REPO) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    output = proc.stdout + proc.stderr
    _check(proc, output)
    return output


def _run_parallel(cmds: list[list[str]], cwd: Path | str = REPO) -> list[str]:
    """Run independent commands at the same time (the machine has 2 cores; each run uses 1 thread)."""
    procs = [
        subprocess.Popen(c, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in cmds
    ]
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=RUN_TIMEOUT)
        _check(p, out)
        outputs.append(out)
    return outputs


def _scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def _write_datalist(path: Path, datalist: dict) -> Path:
    path.write_text(json.dumps(datalist, indent=1))
    return path


def _warm_cache(datalist: Path, dataset_dir: Path, cache_dir: Path, modalities: list[str]) -> int:
    """Build the slice cache the runs will use (same preprocessing parameters as the config), so that parallel runs
    never build it concurrently. Returns the number of training slices."""
    pre = VolumePreprocessor(modalities=modalities, image_size=IMAGE_SIZE)
    val = SliceDataset.from_datalist(datalist, dataset_dir, "validation", cache_dir, pre, progress=False)
    train = SliceDataset.from_datalist(datalist, dataset_dir, "training", cache_dir, pre, progress=False)
    assert len(val) > 0
    return len(train)


def _check_outputs(out: Path, modalities: list[str], epochs: int, train_slices: int, batch_size: int = 8) -> None:
    """The files a finished training run leaves, and their content."""
    iterations = epochs * math.ceil(train_slices / batch_size)
    assert (out / "checkpoint_latest.pt").is_file()
    assert (out / f"checkpoint_epoch={epochs}.pt").is_file()
    latest = torch.load(out / "checkpoint_latest.pt", map_location="cpu", weights_only=True)
    assert {"model", "ema", "optimizer", "trainer", "rng", "prepare_batch", "metadata"} <= set(latest)
    assert latest["trainer"]["iteration"] == iterations
    net, info = load_network(out / "model.pt")
    assert info["preprocessing"]["modalities"] == modalities
    assert info["preprocessing"]["image_size"] == IMAGE_SIZE
    assert info["network"]["in_channels"] == len(modalities) and info["network"]["channels"] == [16, 32]
    assert info["network"]["dropout"] == pytest.approx(0.1)
    x = torch.zeros(2, len(modalities), IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        y = net(x, torch.tensor([10, 500]), class_labels=torch.tensor([0, 2]))
    assert y.shape == x.shape and torch.isfinite(y).all()
    scalars = _scalars(out / "logs")
    assert len(scalars["train_loss"]) == iterations
    assert all(0.0 < v < 10.0 for v in scalars["train_loss"])
    assert len(scalars["val_mse"]) == epochs and all(0.0 < v < 10.0 for v in scalars["val_mse"])


def _check_preview(out: Path, epoch: int) -> None:
    png = out / "previews" / f"reconstruction_epoch={epoch}.png"
    assert png.is_file(), sorted(p.name for p in out.rglob("*"))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, dict]:
    """Synthetic datasets (4-channel BraTS-like and 1-channel T1w) with warm slice caches."""
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for bundle, modalities in SYNTHETIC_CASES:
        data_dir = root / bundle / "data"
        anatomy = phantom_anatomy(shape=(32, 40, 24), spacing=6.0)
        dl = make_dataset(data_dir, anatomy, splits={"training": 2, "validation": 1}, modalities=modalities)
        datalist = _write_datalist(root / bundle / "datalist.json", dl)
        cache = root / bundle / "cache"
        slices = _warm_cache(datalist, data_dir, cache, modalities)
        out[bundle] = {"dataset_dir": data_dir, "datalist": datalist, "cache_dir": cache, "train_slices": slices}
    return out


def _data_overrides(info: dict) -> dict:
    return {"dataset_dir": info["dataset_dir"], "datalist": info["datalist"], "cache_dir": info["cache_dir"]}


# ------------------------------------------------------------------------------------------------------------- runs


@pytest.mark.skipif(not TINY_CASE.is_dir(), reason=f"real test data absent ({TINY_CASE})")
def test_train_on_tiny_real_data(tmp_path):
    case = TINY_CASE.name
    entry = {
        "image": [f"{case}/BraTS2021_00006_{m}.nii.gz" for m in BRATS_MODALITIES],
        "label": f"{case}/BraTS2021_00006_seg.nii.gz",
    }
    # unique ids: the one real case is listed for training and for validation under two names
    dl = {"modalities": BRATS_MODALITIES, "training": [{"id": "tiny_train", **entry}], "validation": [], "test": []}
    dl["validation"] = [{"id": "tiny_val", **entry}]
    datalist = _write_datalist(tmp_path / "datalist.json", dl)
    slices = _warm_cache(datalist, TINY_CASE.parent, tmp_path / "cache", BRATS_MODALITIES)
    out = tmp_path / "out"
    overrides = {
        **SMALL,
        "dataset_dir": TINY_CASE.parent,
        "datalist": datalist,
        "cache_dir": tmp_path / "cache",
        "output_dir": out,
        "num_epochs": 1,
        "preview_interval": 1,
    }
    log = _run(_bundle_cmd(_config("anofpdm_brats21"), overrides))
    assert "Engine run finished" in log
    _check_outputs(out, BRATS_MODALITIES, epochs=1, train_slices=slices)
    _check_preview(out, 1)


@pytest.mark.parametrize("bundle,modalities", SYNTHETIC_CASES)
def test_train_on_synthetic_volumes(synthetic, tmp_path, bundle, modalities):
    info = synthetic[bundle]
    out = tmp_path / "out"
    overrides = {**SMALL, **_data_overrides(info), "output_dir": out, "num_epochs": 1, "preview_interval": 1}
    _run(_bundle_cmd(_config(bundle), overrides))
    _check_outputs(out, modalities, epochs=1, train_slices=info["train_slices"])
    _check_preview(out, 1)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_matches_uninterrupted_run(synthetic, tmp_path):
    info = synthetic["anofpdm_brats21"]
    # an EMA with a momentum warm-up: its scheduler's position must survive the interruption too
    warmup = {"ema_warmup_iters": 20, "ema_decay": 0.5}  # momentum 0.1 warming up to 0.5
    base = {**SMALL, **_data_overrides(info), **warmup, "preview_interval": 1, "batch_size": 16}
    full, split = tmp_path / "full", tmp_path / "split"
    # the uninterrupted 2-epoch run and the first epoch of the interrupted one, side by side
    _run_parallel(
        [
            _bundle_cmd(_config("anofpdm_brats21"), {**base, "output_dir": full, "num_epochs": 2}),
            _bundle_cmd(_config("anofpdm_brats21"), {**base, "output_dir": split, "num_epochs": 1}),
        ]
    )
    assert _state(split / "checkpoint_latest.pt")["trainer"]["iteration"] > 0
    log = _run(_bundle_cmd(_config("anofpdm_brats21"), {**base, "output_dir": split, "num_epochs": 2}))
    assert "resumed from" in log
    a, b = _state(full / "checkpoint_latest.pt"), _state(split / "checkpoint_latest.pt")
    per_epoch = math.ceil(info["train_slices"] / 16)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 2 * per_epoch
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            torch.testing.assert_close(b[key][k], a[key][k], atol=1e-6, rtol=0, msg=f"{key}.{k}")
    # the runs did train: the weights moved away from the first epoch's
    first = _state(split / "checkpoint_epoch=1.pt")
    assert any(not torch.equal(first["model"][k], a["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert int(sa[i]["step"]) == int(sb[i]["step"]) == 2 * per_epoch
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[i][k], sa[i][k], atol=1e-6, rtol=0)
    assert torch.equal(a["prepare_batch"]["generator"], b["prepare_batch"]["generator"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    ma, mb = _state(full / "model.pt"), _state(split / "model.pt")
    assert ma["iteration"] == mb["iteration"] == 2 * per_epoch


def test_sigkill_after_the_first_checkpoint_then_resume_equals_an_uninterrupted_run(synthetic, tmp_path):
    """A training process killed with SIGKILL once its first checkpoint exists, then run again with the same command,
    ends with the raw and EMA weights of an uninterrupted run and leaves no temporary file (a kill in the middle of a
    checkpoint write leaves one; the rerun removes it)."""
    info = synthetic["anofpdm_atlas"]
    epochs = 5
    base = {**SMALL, **_data_overrides(info), "ema_warmup_iters": 10, "ema_decay": 0.5, "num_epochs": epochs}
    base.update(preview_interval=0, val_interval=100)
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = _bundle_cmd(_config("anofpdm_atlas"), {**base, "output_dir": killed})
    victim = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reference = subprocess.Popen(
        _bundle_cmd(_config("anofpdm_atlas"), {**base, "output_dir": full}),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + RUN_TIMEOUT
    while not (killed / "checkpoint_epoch=1.pt").is_file() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model.pt").exists()
    _check(reference, reference.communicate(timeout=RUN_TIMEOUT)[0])
    (killed / ".checkpoint_epoch=2.pt.x1y2z3").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves
    log = _run(cmd)
    assert "resumed from" in log and "Engine run resuming from iteration 0, epoch 0" not in log
    assert not [p.name for p in killed.rglob(".*")], "temporary files left behind"
    a, b = _state(full / "checkpoint_latest.pt"), _state(killed / "checkpoint_latest.pt")
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == epochs * b["trainer"]["epoch_length"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            torch.testing.assert_close(b[key][k], a[key][k], atol=1e-6, rtol=0, msg=f"{key}.{k}")
    assert a["ema_state"] == b["ema_state"]  # the EMA warm-up position
    ma, mb = _state(full / "model.pt"), _state(killed / "model.pt")
    assert ma["iteration"] == mb["iteration"]


def test_two_process_torchrun_on_cpu(synthetic, tmp_path):
    """Data-parallel training with 2 CPU processes (gloo); a time budget stops both ranks after the same iteration."""
    info = synthetic["anofpdm_brats21"]
    out = tmp_path / "out"
    files = _config("anofpdm_brats21", "train", "multi_gpu_train")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    overrides = {**SMALL, **_data_overrides(info), "output_dir": out, "num_epochs": 1000, "time_limit": 4}
    log = _run(_bundle_cmd(files, overrides, launcher=launcher))
    assert "time budget of 4 s reached" in log
    final = _state(out / "model.pt")
    latest = _state(out / "checkpoint_latest.pt")
    # each rank sees half of the training slices per epoch
    per_rank = math.ceil(info["train_slices"] / 2)
    per_epoch = math.ceil(per_rank / SMALL["batch_size"])
    assert 0 < final["iteration"] == latest["trainer"]["iteration"] < 1000 * per_epoch
    assert latest["trainer"]["epoch_length"] == per_epoch
    net, meta = load_network(out / "model.pt")
    assert meta["network"]["in_channels"] == 4
    assert not any(k.startswith("module.") for k in final["model"])  # saved unwrapped from DistributedDataParallel
    numbered = sorted(out.glob("checkpoint_epoch=*.pt"))
    assert 1 <= len(numbered) <= 2  # n_saved = 2: older epochs pruned


def test_runs_from_another_working_directory(synthetic, tmp_path):
    """No ``bundle_root`` given, relative output folder, ``--device cpu`` as a plain string."""
    info = synthetic["anofpdm_brats21"]
    overrides = {**SMALL, **_data_overrides(info), "output_dir": "run_out", "num_epochs": 1, "device": "cpu"}
    _run(_bundle_cmd(_config("anofpdm_brats21"), overrides), cwd=tmp_path)
    assert (tmp_path / "run_out" / "model.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_out"]  # nothing else written in the working folder
    _check_outputs(tmp_path / "run_out", BRATS_MODALITIES, epochs=1, train_slices=info["train_slices"])


# ------------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("bundle,modalities", SYNTHETIC_CASES)
def test_config_defaults_and_overridable_keys(bundle, modalities, tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(bundle, "train"))
    assert Path(parser.get_parsed_content("bundle_root")) == BUNDLES / bundle
    assert parser["modalities"] == modalities
    assert parser["network_size"] == "paper" and parser["image_size"] == 128
    assert parser["p_uncond"] == pytest.approx(0.1) and parser["num_train_timesteps"] == 1000
    assert parser["learning_rate"] == pytest.approx(1e-4) and parser["ema_decay"] == pytest.approx(0.9999)
    parser.update(
        {
            "bundle_root": str(tmp_path),
            "dataset_dir": str(tmp_path / "data"),
            "datalist": str(tmp_path / "dl.json"),
            "output_dir": str(tmp_path / "out"),
            "device": "cpu",
            "network_size": "small",
        }
    )
    parser.parse()
    assert parser.get_parsed_content("cache_dir") == str(tmp_path) + "/cache"
    net = parser.get_parsed_content("network_def")
    assert net.config["in_channels"] == len(modalities)
    assert net.config["channels"] == [32, 64, 96, 128] and net.config["dropout"] == pytest.approx(0.1)
    assert parser.get_parsed_content("amp") is False
    scheduler = parser.get_parsed_content("scheduler")
    assert scheduler.num_train_timesteps == 1000
    torch.testing.assert_close(scheduler.betas[[0, -1]], torch.tensor([1e-4, 0.02]))
    optimizer = parser.get_parsed_content("optimizer")
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["lr"] == pytest.approx(1e-4)
    assert parser.get_parsed_content("ema").momentum == pytest.approx(1e-4)
    # every component targets this library, MONAI, ignite or torch: nothing from the bundle folder
    targets = json.dumps([json.loads(Path(f).read_text()) for f in config_files(bundle, "train")])
    assert "scripts" not in targets


def test_multi_gpu_config_selects_backend_by_device():
    config = json.loads(Path(config_files("anofpdm_brats21", "multi_gpu_train")[-1]).read_text())
    init = " ".join(config["initialize"])
    # the backend follows the device inside init_process_group (nccl with CUDA, gloo without: test_distributed)
    assert "anofpdm_monai.distributed.init_process_group(@dist_timeout)" in init
    assert config["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert config["train::sampler"]["_target_"] == "DistributedSampler"
    # one shared file for every dataset
    assert (
        config_files("anofpdm_atlas", "multi_gpu_train")[-1] == config_files("anofpdm_brats21", "multi_gpu_train")[-1]
    )


# ----------------------------------------------------------------------------------------------------- metadata


def _metadata(bundle: str) -> dict:
    return json.loads(Path(_file(bundle, "metadata.json")).read_text())


@pytest.mark.parametrize("bundle,modalities", SYNTHETIC_CASES)
def test_metadata_content(bundle, modalities):
    meta = _metadata(bundle)
    assert meta["version"] in meta["changelog"]
    inputs = meta["network_data_format"]["inputs"]
    assert set(inputs) == {"image", "timesteps", "class_labels"}  # the extra forward arguments are described
    assert inputs["image"]["num_channels"] == len(modalities)
    assert len(inputs["image"]["channel_def"]) == len(modalities)
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == len(modalities)
    assert inputs["class_labels"]["value_range"] == [0, 2] and inputs["timesteps"]["value_range"] == [0, 999]
    import einops
    import monai

    assert meta["monai_version"] == monai.__version__
    assert meta["required_packages_version"]["einops"] == einops.__version__
    layout = BUNDLES / bundle
    for rel in ("configs/dataset.json", "configs/metadata.json", "configs/logging.conf", "docs/README.md"):
        assert (layout / rel).is_file(), rel
    assert (layout / "LICENSE").is_file() and "Apache" in (layout / "LICENSE").read_text()
    assert (layout / "models").is_dir()


@pytest.mark.parametrize("bundle,modalities", SYNTHETIC_CASES)
def test_metadata_survives_monai_meta_parsing(bundle, modalities):
    """MONAI's meta reader renames the deprecated ``optional_packages_version`` onto ``required_packages_version``,
    replacing the latter: the package list MONAI sees must be the one the file states."""
    import warnings

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a deprecated-name warning fails the test
        parser.read_meta(_file(bundle, "metadata.json"))
    assert (
        parser.get_parsed_content("_meta_::required_packages_version") == _metadata(bundle)["required_packages_version"]
    )
    assert "pytorch-ignite" in parser.get_parsed_content("_meta_::required_packages_version")


def test_schema_is_valid_draft7():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft7Validator.check_schema(json.loads(SCHEMA.read_text()))


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_verify_metadata_offline(tmp_path):
    """``python -m monai.bundle verify_metadata`` with the shipped schema: no download, both bundles pass."""
    pytest.importorskip("jsonschema")
    cmds = [
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", meta, "--filepath", str(SCHEMA)]
        for meta in (_file("anofpdm_brats21", "metadata.json"), _file("anofpdm_atlas", "metadata.json"))
    ]
    for out in _run_parallel(cmds, cwd=tmp_path):
        assert "skipped downloading" in out and "metadata is verified with no error" in out


@pytest.mark.filterwarnings("ignore:No hash value provided")
@pytest.mark.parametrize("field", ["copyright", "numpy_version", "network_data_format"])
def test_verify_metadata_refuses_a_missing_mandatory_field(tmp_path, field):
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    broken = _metadata("anofpdm_brats21")
    del broken[field]
    broken_file = tmp_path / "metadata.json"
    broken_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=f"'{field}' is a required property"):
        verify_metadata(meta_file=str(broken_file), filepath=str(SCHEMA))


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_verify_metadata_refuses_an_incomplete_tensor_format(tmp_path):
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    broken = _metadata("anofpdm_atlas")
    del broken["network_data_format"]["inputs"]["class_labels"]["is_patch_data"]
    broken_file = tmp_path / "metadata.json"
    broken_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'is_patch_data' is a required property"):
        verify_metadata(meta_file=str(broken_file), filepath=str(SCHEMA))
