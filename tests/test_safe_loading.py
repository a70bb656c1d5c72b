"""No code runs from a checkpoint (docs/reliability.md, "Checkpoints"): every loader of the package refuses a crafted
pickle before anything in it executes, the files this package writes (inference and training checkpoints) load with
``torch.load(weights_only=True)``, an old training checkpoint (NumPy RNG state as an ndarray) is refused with the
conversion command, and the conversion, for a trusted file, gives back the same state."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from test_volume_inference import BRATS, GRID, SIZE, _tiny_net

from anofpdm_monai.apps import convert_checkpoint as convert_cli
from anofpdm_monai.calibration import Calibration
from anofpdm_monai.data import VolumePreprocessor
from anofpdm_monai.engines import RNGState, TrainingCheckpointer
from anofpdm_monai.io import torch_save
from anofpdm_monai.networks import (
    CheckpointError,
    UnsafeCheckpointError,
    convert_checkpoint,
    load_checkpoint,
    load_network,
    load_weights,
    save_checkpoint,
)
from anofpdm_monai.networks.classifier import load_classifier
from anofpdm_monai.settings import AnoFPDMSettings

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this object calls ``os.system`` (what a crafted model.pt does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(tmp_path: Path, where: str) -> tuple[Path, Path]:
    """A checkpoint that looks like ours (metadata and weights) with a payload in ``where``."""
    marker = tmp_path / f"ran_{where}"
    real = save_checkpoint(tmp_path / "real.pt", _tiny_net(), preprocessing=VolumePreprocessor(BRATS, SIZE).to_dict())
    content = torch.load(real, weights_only=True)
    if where == "top":
        content["extra"] = _Payload(marker)
    elif where == "metadata":
        content["metadata"]["network"]["note"] = _Payload(marker)
    else:  # inside the state dict, next to the tensors
        content["model"]["evil"] = _Payload(marker)
    path = tmp_path / f"crafted_{where}.pt"
    torch.save(content, path)
    return path, marker


@pytest.mark.parametrize("where", ["top", "metadata", "model"])
def test_every_loader_refuses_a_crafted_checkpoint_and_nothing_runs(tmp_path, where):
    path, marker = _crafted(tmp_path, where)
    # the payload is real: a full unpickle runs it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    loaders = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "load_network": lambda: load_network(path),
        "load_weights": lambda: load_weights(_tiny_net(), path),
        "load_classifier": lambda: load_classifier(path),
    }
    for name, load in loaders.items():
        with pytest.raises(UnsafeCheckpointError) as info:
            load()
        text = str(info.value)
        assert "\n" not in text and str(path) in text, (name, text)
        assert "posix.system" in text or "os.system" in text, (name, text)  # names what it found
        assert "python -m anofpdm_monai.apps.convert_checkpoint --trust" in text, (name, text)
        assert not marker.exists(), name


def test_resuming_training_from_a_crafted_latest_checkpoint_refuses_it(tmp_path):
    marker = tmp_path / "ran_resume"
    torch.save({"model": {"w": _Payload(marker)}, "trainer": {"epoch": 1}}, tmp_path / "checkpoint_latest.pt")
    net = torch.nn.Linear(2, 2)
    handler = TrainingCheckpointer(tmp_path, {"model": net}, final_name=None)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    with pytest.raises(UnsafeCheckpointError):
        engine.run([0], max_epochs=1)
    assert not marker.exists()


def test_the_checkpoints_we_write_load_safely_and_unchanged(tmp_path):
    net = _tiny_net(1)
    path = save_checkpoint(tmp_path / "model.pt", net, ema=_tiny_net(2), preprocessing=VolumePreprocessor(BRATS, SIZE))
    torch.load(path, weights_only=True)  # no error: tensors and plain containers only
    loaded, info = load_network(path, use_ema=False)
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert info["weights"] == "model"


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()  # noqa: NPY002


def test_training_state_with_the_rng_loads_safely_and_restores_the_streams(tmp_path):
    random.seed(3)
    np.random.seed(3)  # noqa: NPY002
    torch.manual_seed(3)
    np.random.randn()  # noqa: NPY002 (a cached Gaussian: the full NumPy state, not just the key)
    rng = RNGState()
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.state_dict()}
    torch_save(state, tmp_path / "checkpoint_latest.pt")
    expected = _draws()
    loaded = load_checkpoint(tmp_path / "checkpoint_latest.pt")  # weights_only
    _draws()
    rng.load_state_dict(loaded["rng"])
    assert _draws() == expected
    optimizer.load_state_dict(loaded["optimizer"])


def _old_training_checkpoint(path: Path) -> dict:
    """As TrainingCheckpointer wrote them before: the NumPy state straight from ``np.random.get_state()``."""
    np.random.seed(11)  # noqa: NPY002
    model = torch.nn.Linear(2, 2).state_dict()  # before the state is taken: its init draws from torch's stream
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    torch.save({"model": model, "rng": state}, path)
    return state


def test_an_old_training_checkpoint_is_refused_with_the_command_and_converts(tmp_path):
    old = tmp_path / "checkpoint_latest.pt"
    _old_training_checkpoint(old)
    digest = hashlib.sha256(old.read_bytes()).hexdigest()
    with pytest.raises(UnsafeCheckpointError, match=r"numpy\._core\.multiarray\._reconstruct|numpy\.core"):
        load_checkpoint(old)
    expected = _draws()
    new = convert_checkpoint(old, tmp_path / "converted.pt")
    assert hashlib.sha256(old.read_bytes()).hexdigest() == digest  # the source is untouched
    _draws()
    RNGState().load_state_dict(load_checkpoint(new)["rng"])
    assert _draws() == expected
    with pytest.raises(CheckpointError, match="is the source file"):
        convert_checkpoint(old, old)


def test_the_convert_command_needs_trust_and_reports_one_line(tmp_path, capsys):
    old = tmp_path / "old.pt"
    _old_training_checkpoint(old)
    with pytest.raises(SystemExit) as info:
        convert_cli.main([str(old), str(tmp_path / "new.pt")])
    assert info.value.code == 2 and "--trust" in capsys.readouterr().err
    assert not (tmp_path / "new.pt").exists()
    assert convert_cli.main(["--trust", str(old), str(tmp_path / "new.pt")]) == 0
    load_checkpoint(tmp_path / "new.pt")
    assert convert_cli.main(["--trust", str(tmp_path / "nowhere.pt"), str(tmp_path / "x.pt")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err


def test_the_inference_bundle_refuses_a_crafted_model_and_runs_nothing(tmp_path):
    path, marker = _crafted(tmp_path, "top")
    pre = VolumePreprocessor(BRATS, SIZE)
    cal = Calibration(
        guidance_scale=2.0,
        m_max=[0.05, 0.05],
        m_max_joint=0.05,
        tau=0.5,
        settings=AnoFPDMSettings(timesteps=GRID, min_component_size=3),
        map_modalities=["flair", "t2"],
        map_channels=[0, 3],
        checkpoint_digest="0" * 16 + "-ema",
        preprocessing=pre.to_dict(),
        datalist="synthetic [validation]",
    ).save(tmp_path / "calibration.json")
    (tmp_path / "cases").mkdir()
    files = [str(REPO / "bundles/anofpdm_brats21/configs/dataset.json")]
    files.append(str(REPO / "bundles/common/configs/inference.json"))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files)]
    cmd += ["--checkpoint", str(path), "--calibration", str(cal), "--input_dir", str(tmp_path / "cases")]
    cmd += ["--output_dir", str(tmp_path / "out"), "--progress", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: UnsafeCheckpointError: checkpoint "), proc.stderr[-3000:]
    assert not marker.exists()


_RANKS_SCRIPT = r"""
import json, random, sys
import numpy as np, torch, torch.distributed as dist
from anofpdm_monai.engines import RNGState
from anofpdm_monai.io import torch_save
from anofpdm_monai.networks import load_checkpoint

dist.init_process_group("gloo")
rank, path = dist.get_rank(), sys.argv[1]
def draws():
    return [random.random(), float(np.random.rand()), float(torch.rand(1))]
random.seed(100 + rank); np.random.seed(100 + rank); torch.manual_seed(100 + rank)
state = RNGState().state_dict()  # a collective: every rank
if rank == 0:
    torch_save({"rng": state}, path)
expected = draws()
dist.barrier()
RNGState().load_state_dict(load_checkpoint(path)["rng"])
restored = draws()
rank0_only = {k: v for k, v in load_checkpoint(path)["rng"].items() if k != "ranks"}
RNGState().load_state_dict(rank0_only)  # an old checkpoint: rank 0's state only
derived = draws()
out = [None] * dist.get_world_size()
dist.all_gather_object(out, {"expected": expected, "restored": restored, "derived": derived})
if rank == 0:
    print("RESULT " + json.dumps(out))
dist.destroy_process_group()
"""


def test_each_rank_restores_its_own_rng_stream_under_gloo(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd + [str(tmp_path / "rng.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r0, r1 = json.loads(line[len("RESULT ") :])
    assert r0["restored"] == r0["expected"] and r1["restored"] == r1["expected"]  # each its own stream
    assert r0["expected"] != r1["expected"]
    # rank 0's state only: rank 0 continues it, rank 1 gets a stream of its own (not rank 0's)
    assert r0["derived"] == r0["expected"] and r1["derived"] != r0["derived"]
