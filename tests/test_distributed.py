"""Calibration, inference and evaluation under ``torchrun`` (2 CPU processes, gloo) give the same calibration file,
the same NIfTI outputs and the same metrics table as one process, for an odd number of cases; a rank killed mid-run
loses nothing that was finished, and the rerun completes only what is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anofpdm_monai.bundle import config_files
from anofpdm_monai.data import VolumePreprocessor
from anofpdm_monai.data.datalist import write_datalist
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy
from anofpdm_monai.engines.distributed import ShardedBatchSampler, shard_cases
from anofpdm_monai.networks import build_diffusion_unet, save_checkpoint
from anofpdm_monai.schedule import NoiseSchedule

REPO = Path(__file__).resolve().parents[1]
BUNDLE = "anofpdm_atlas"  # one channel (T1w): the fastest
TIMEOUT = 300
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_sharded_batches_cover_every_batch_once_and_interleave_back():
    for n, bs, world in [(10, 3, 2), (7, 2, 3), (4, 8, 2), (9, 3, 3)]:
        shards = [list(ShardedBatchSampler(n, bs, rank, world)) for rank in range(world)]
        single = list(ShardedBatchSampler(n, bs, 0, 1))
        assert ShardedBatchSampler.interleave(shards) == single
        assert sorted(i for s in shards for b in s for i in b) == list(range(n))
    cases = [f"c{i}" for i in range(5)]
    parts = [shard_cases(cases, r, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == cases and {len(p) for p in parts} == {2, 3}
    assert shard_cases([], 1, 2) == [] and shard_cases(["a"], 1, 2) == [] and shard_cases(["a"], 0, 2) == ["a"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _cmd(workflow: str, overrides: dict, distributed: bool) -> list[str]:
    workflows = (workflow, f"multi_gpu_{workflow}") if distributed else (workflow,)
    args = [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
    prefix = TORCHRUN if distributed else [sys.executable]
    return [*prefix, "-m", "monai.bundle", "run", "--config_file", str(config_files(BUNDLE, *workflows)), *args]


def _run(workflow: str, overrides: dict, distributed: bool) -> str:
    proc = subprocess.run(
        _cmd(workflow, overrides, distributed), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    data = root / "data"
    dl = make_dataset(
        data, phantom_anatomy((32, 40, 24), spacing=6.0), {"validation": 2, "test": 3}, ["t1w"], lesion_fraction=0.7
    )
    datalist = root / "datalist.json"
    write_datalist(dl, datalist)
    torch.manual_seed(0)
    net = build_diffusion_unet(in_channels=1, size="tiny")
    with torch.no_grad():  # a fresh network predicts zero noise for every label; perturb it so that labels differ
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpoint = save_checkpoint(
        root / "model.pt",
        net,
        preprocessing=VolumePreprocessor(["t1w"], image_size=32).to_dict(),
        schedule=NoiseSchedule(),
    )
    common = {
        "dataset_dir": data,
        "datalist": datalist,
        "cache_dir": root / "cache",
        "checkpoint": checkpoint,
        "batch_size": 6,
        "progress": False,
    }
    calibrations = {}
    for mode, distributed in (("single", False), ("torchrun", True)):
        path = root / f"calibration_{mode}.json"
        overrides = {**common, "output_dir": root, "calibration_file": path, "t_max": 200, "stride": 50}
        _run("calibrate", {**overrides, "guidance_scales": "[1.0,3.0]", "min_component_size": 2}, distributed)
        calibrations[mode] = path
    return {"root": root, "common": common, "calibrations": calibrations}


def _without_created(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("created")
    return data


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.rglob("*.nii.gz"))}


def test_calibration_is_the_same_under_torchrun(setup):
    single, multi = (_without_created(setup["calibrations"][m]) for m in ("single", "torchrun"))
    assert single["num_healthy"] + single["num_unhealthy"] > 6  # more than one batch: the batches were shared
    assert single == multi


def test_inference_is_the_same_under_torchrun(setup):
    outs = {}
    for mode, distributed in (("single", False), ("torchrun", True)):
        out = setup["root"] / f"inference_{mode}"
        overrides = {**setup["common"], "calibration": setup["calibrations"]["single"], "output_dir": out}
        _run("inference", overrides, distributed)
        outs[mode] = out
    summaries = [json.loads((outs[m] / "inference_summary.json").read_text()) for m in ("single", "torchrun")]
    assert sorted(summaries[0]["done"]) == sorted(summaries[1]["done"]) and len(summaries[0]["done"]) == 3
    a, b = _arrays(outs["single"]), _arrays(outs["torchrun"])
    assert sorted(a) == sorted(b) and len(a) == 6
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_evaluation_table_is_the_same_under_torchrun(setup):
    tables = {}
    for mode, distributed in (("single", False), ("torchrun", True)):
        out = setup["root"] / f"evaluation_{mode}"
        overrides = {
            **setup["common"],
            "calibration": setup["calibrations"]["single"],
            "output_dir": setup["root"],
            "evaluation_dir": out,
            "methods": "['anofpdm','anofpdm_ddpm','intensity']",
            "seeds": "[0]",
        }
        _run("evaluate", overrides, distributed)
        tables[mode] = out
    for name in ("metrics.csv", "summary.json", "summary.md", "tuning.json"):
        assert (tables["single"] / name).read_text() == (tables["torchrun"] / name).read_text(), name


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_killed_rank_then_rerun_completes_only_what_is_missing(setup):
    out = setup["root"] / "inference_killed"
    # small batches: a case takes many network calls, so the kill lands while cases are still running
    overrides = {**setup["common"], "calibration": setup["calibrations"]["single"], "output_dir": out, "batch_size": 2}
    proc = subprocess.Popen(
        _cmd("inference", overrides, True),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + TIMEOUT
    try:
        while not list(out.glob("*/*_provenance.json")):
            assert proc.poll() is None, "the run ended before a case was finished"
            assert time.time() < deadline
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert workers, "no worker process found"
        os.kill(workers[-1], signal.SIGKILL)  # one rank dies mid-run
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = sorted(p.parent.name for p in out.glob("*/*_provenance.json"))
    assert 1 <= len(finished) <= 2, finished
    (out / finished[0] / f".{finished[0]}_anomaly_map.nii.gz.x1y2z3.nii.gz").write_bytes(b"half")  # as a kill leaves
    _run("inference", overrides, True)
    summary = json.loads((out / "inference_summary.json").read_text())
    assert sorted(summary["skipped"]) == finished
    assert sorted(summary["done"] + summary["skipped"]) == sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(summary["done"] + summary["skipped"]) == 3 and not summary["failed"]
    assert not [p for p in out.rglob(".*") if p.is_file()], "temporary files left behind"
    single = setup["root"] / "inference_single_batch2"  # the same batch size: the forward noise is drawn per batch
    _run("inference", {**overrides, "output_dir": single}, False)
    reference = _arrays(single)
    again = _arrays(out)
    assert sorted(again) == sorted(reference)
    for name in again:
        np.testing.assert_array_equal(again[name], reference[name], err_msg=name)


def test_a_failing_case_on_one_rank_does_not_stop_the_others(setup, tmp_path):
    datalist = json.loads(Path(setup["common"]["datalist"]).read_text())
    bad = dict(datalist["test"][0], id="broken_case", image=["broken_case/missing_t1w.nii.gz"])
    datalist["test"] = [bad, *datalist["test"]]  # 4 cases: rank 0 gets the broken one and another
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    out = tmp_path / "out"
    overrides = {**setup["common"], "datalist": path, "calibration": setup["calibrations"]["single"], "output_dir": out}
    proc = subprocess.run(
        _cmd("inference", overrides, True), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode != 0
    summary = json.loads((out / "inference_summary.json").read_text())
    assert list(summary["failed"]) == ["broken_case"] and "missing_t1w.nii.gz" in summary["failed"]["broken_case"]
    assert sorted(summary["done"]) == sorted(e["id"] for e in datalist["test"][1:])
    for case in summary["done"]:
        assert (out / case / f"{case}_anomaly_mask.nii.gz").is_file()
