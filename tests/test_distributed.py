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
from anofpdm_monai.distributed import ShardedBatchSampler, shard_cases
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


def _inference_options(setup: dict) -> dict:
    """The common options inference.json has (it reads volumes directly: no slice cache, no --cache_dir)."""
    return {k: v for k, v in setup["common"].items() if k != "cache_dir"}


def test_inference_is_the_same_under_torchrun(setup):
    outs = {}
    for mode, distributed in (("single", False), ("torchrun", True)):
        out = setup["root"] / f"inference_{mode}"
        overrides = {**_inference_options(setup), "calibration": setup["calibrations"]["single"], "output_dir": out}
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
    overrides = {
        **_inference_options(setup),
        "calibration": setup["calibrations"]["single"],
        "output_dir": out,
        "batch_size": 2,
    }
    proc = subprocess.Popen(
        _cmd("inference", overrides, True),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + TIMEOUT
    try:
        while not list(out.glob("[!.]*/*_provenance.json")):
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
    finished = sorted(p.parent.name for p in out.glob("[!.]*/*_provenance.json"))
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
    overrides = {
        **_inference_options(setup),
        "datalist": path,
        "calibration": setup["calibrations"]["single"],
        "output_dir": out,
    }
    proc = subprocess.run(
        _cmd("inference", overrides, True), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode != 0
    summary = json.loads((out / "inference_summary.json").read_text())
    assert list(summary["failed"]) == ["broken_case"] and "missing_t1w.nii.gz" in summary["failed"]["broken_case"]
    assert sorted(summary["done"]) == sorted(e["id"] for e in datalist["test"][1:])
    for case in summary["done"]:
        assert (out / case / f"{case}_anomaly_mask.nii.gz").is_file()


# ---------------------------------------------------------------------------------------------------------------
# the distributed helpers on 2 real gloo ranks: timeouts, rank-0 work, cases on demand, the shared slice cache,
# rank-0 handlers by name, RNG state per rank. One torchrun launch runs every scenario below (this file is the
# worker: ``torchrun tests/test_distributed.py <launch> <folder>``) and each rank writes what it saw as JSON.
# ---------------------------------------------------------------------------------------------------------------
def _scenario_run_on_rank0(work: Path, rank: int) -> dict:
    from anofpdm_monai.distributed import run_on_rank0

    out: dict = {}
    start = time.monotonic()
    value = run_on_rank0(lambda: (time.sleep(3.0), 42)[1], "busy", timeout_s=1.0, poll_s=0.05)
    out["busy"] = {"value": value, "waited": time.monotonic() - start}

    def boom():
        raise ValueError("boom on rank 0")

    try:
        run_on_rank0(boom, "failing", timeout_s=30.0, poll_s=0.05)
        out["failing"] = "no error"
    except (ValueError, RuntimeError) as exc:
        out["failing"] = f"{type(exc).__name__}: {exc}"
    # rank 0 never runs this one: rank 1 must give up after the timeout without a heartbeat
    if rank == 1:
        start = time.monotonic()
        try:
            run_on_rank0(lambda: None, "absent", timeout_s=1.0, poll_s=0.05)
            out["absent"] = "no error"
        except TimeoutError as exc:
            out["absent"] = {"error": str(exc), "waited": time.monotonic() - start}
    return out


def _scenario_claim(work: Path, rank: int) -> dict:
    from anofpdm_monai.distributed import claim

    got = []
    for item in claim(range(12), "items"):
        got.append(item)
        time.sleep(0.4 if rank == 0 else 0.02)  # rank 0's items are slow: rank 1 takes more of them
    return {"items": got}


def _scenario_cache(work: Path, rank: int) -> dict:
    from anofpdm_monai.data import CacheBuildError, SliceCache, VolumePreprocessor

    entries = json.loads((work / "cache_entries.json").read_text())
    built: list[str] = []
    original = VolumePreprocessor.__call__

    def counting(self, entry):
        built.append(str(entry["id"]))
        return original(self, entry)

    VolumePreprocessor.__call__ = counting
    try:
        cache = SliceCache(work / "cache", {"modalities": ["t1w"], "image_size": 16})
        try:
            cache.build(entries, progress=False, num_workers=2)
            first_error = None
        except CacheBuildError as exc:
            first_error = exc.failures
        table = cache.build(entries, progress=False, on_error="skip", num_workers=2)
    finally:
        VolumePreprocessor.__call__ = original
    return {
        "built": built,
        "failures": first_error,
        "cases": list(dict.fromkeys(table["case_id"])),
        "rows": len(table),
        "image_sum": float(sum(cache.arrays(c)["image"].astype(np.float64).sum() for c in table["case_id"].unique())),
    }


def _scenario_handlers(work: Path, rank: int) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(BUNDLE, "train", "multi_gpu_train"))
    overrides = json.loads((work / "train_overrides.json").read_text())
    for k, v in overrides.items():
        parser[k] = v
    # a user appends a handler of their own: it must run on every rank, the rank-0 ones only on rank 0
    parser["train#handlers"] = [*parser["train#handlers"], {"_target_": "ignite.handlers.TerminateOnNan"}]
    train = parser.get_parsed_content("train#trainer#train_handlers")
    val = parser.get_parsed_content("validate#evaluator#val_handlers")
    return {"train": [type(h).__name__ for h in train], "validate": [type(h).__name__ for h in val]}


def _scenario_rng(work: Path, rank: int) -> dict:
    import random

    import torch.distributed as dist

    from anofpdm_monai.engines import RNGState

    def draws() -> list[float]:
        return [random.random(), float(np.random.rand()), float(torch.rand(1))]  # noqa: NPY002

    random.seed(100 + rank)
    np.random.seed(100 + rank)  # noqa: NPY002
    torch.manual_seed(100 + rank)
    draws()
    state = RNGState().state_dict()  # a collective: every rank's streams
    path = work / "rng.pt"
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    expected = draws()  # what an uninterrupted run draws next on this rank
    random.seed(7)
    np.random.seed(7)  # noqa: NPY002
    torch.manual_seed(7)
    RNGState().load_state_dict(torch.load(path, weights_only=True))
    resumed = draws()
    # a checkpoint with rank 0's streams only (another world size): rank 0 resumes, rank 1 gets a stream of its own
    single = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "ranks"}
    RNGState().load_state_dict(single)
    return {"expected": expected, "resumed": resumed, "from_single": draws()}


def _scenario_timeout(work: Path, rank: int) -> dict:
    import torch.distributed as dist

    if rank == 1:  # never joins the barrier; exits after rank 0 should have given up
        time.sleep(12.0)
        return {}
    start = time.monotonic()
    try:
        dist.barrier()
        return {"error": None, "waited": time.monotonic() - start}
    except RuntimeError as exc:
        return {"error": str(exc)[:300], "waited": time.monotonic() - start}


LAUNCHES = {  # launch -> (dist_timeout, scenarios in order)
    "helpers": (120, ["run_on_rank0", "claim", "cache", "handlers", "rng"]),
    "timeout": (3, ["timeout"]),
}


def _worker(launch: str, work: Path) -> None:
    import torch.distributed as dist

    from anofpdm_monai.distributed import init_process_group, timeout_seconds

    timeout, scenarios = LAUNCHES[launch]
    init_process_group(timeout)
    rank = dist.get_rank()
    results: dict = {"timeout_seconds": timeout_seconds()}
    for name in scenarios:
        try:
            results[name] = globals()[f"_scenario_{name}"](work, rank)
        except Exception:  # noqa: BLE001 (reported to the test that checks this scenario)
            import traceback

            results[name] = {"crashed": traceback.format_exc()[-3000:]}
        if launch != "timeout":
            dist.barrier()
    (work / f"{launch}_rank{rank}.json").write_text(json.dumps(results))
    if launch != "timeout":
        dist.destroy_process_group()


def _launch(launch: str, work: Path) -> list[dict]:
    cmd = [*TORCHRUN, str(Path(__file__).resolve()), launch, str(work)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    files = [work / f"{launch}_rank{r}.json" for r in range(2)]
    assert all(f.is_file() for f in files), (proc.stdout + proc.stderr)[-6000:]
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def helpers(tmp_path_factory) -> list[dict]:
    work = tmp_path_factory.mktemp("helpers")
    data = work / "data"
    anatomy = phantom_anatomy((16, 16, 8), spacing=12.0)
    dl = make_dataset(data, anatomy, {"training": 5, "validation": 2, "test": 0}, ["t1w"], lesion_fraction=0.6)
    entries = [
        {"id": e["id"], "image": [str(data / p) for p in e["image"]], "label": str(data / e["label"])}
        for e in dl["training"]
    ]
    entries.insert(2, {"id": "broken", "image": [str(data / "broken" / "missing_t1w.nii.gz")]})
    (work / "cache_entries.json").write_text(json.dumps(entries))
    write_datalist(dl, work / "datalist.json")
    overrides = {
        "dataset_dir": str(data),
        "datalist": str(work / "datalist.json"),
        "output_dir": str(work / "train_out"),
        "cache_dir": str(work / "train_cache"),
        "image_size": 16,
        "network_size": "tiny",
        "num_workers": 0,
        "progress": False,
    }
    (work / "train_overrides.json").write_text(json.dumps(overrides))
    return _launch("helpers", work)


def _ok(results: list[dict], name: str) -> list[dict]:
    for r in results:
        assert "crashed" not in r[name], r[name].get("crashed") if isinstance(r[name], dict) else r[name]
    return [r[name] for r in results]


def test_dist_timeout_reaches_init_process_group(monkeypatch):
    """Every multi_gpu config has ``dist_timeout`` and hands it to ``init_process_group`` as its timeout."""
    from datetime import timedelta

    import torch.distributed as dist
    from monai.bundle import ConfigParser

    from anofpdm_monai import distributed

    calls: list[dict] = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    for workflow in ("train", "calibrate", "inference", "evaluate"):
        calls.clear()
        monkeypatch.setattr(distributed, "_timeout_s", None)
        parser = ConfigParser()
        parser.read_config(config_files(BUNDLE, workflow, f"multi_gpu_{workflow}"))
        assert parser["dist_timeout"] == distributed.DEFAULT_TIMEOUT_S, workflow
        parser["dist_timeout"] = 77
        inits = [i for i, e in enumerate(parser["initialize"]) if "init_process_group" in e]
        assert len(inits) == 1, workflow
        assert parser.get_parsed_content(f"initialize#{inits[0]}") is True
        assert calls == [{"backend": "gloo", "timeout": timedelta(seconds=77)}], workflow
        assert distributed.timeout_seconds() == 77.0
    # the backend follows the device: nccl on GPU machines, gloo on CPU
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.init_process_group(60) is True
    assert calls == [{"backend": "nccl", "timeout": timedelta(seconds=60)}]
    for bad in (0, -5, "60", True, float("nan")):
        with pytest.raises(ValueError, match="dist_timeout"):
            distributed.init_process_group(bad)


def test_dist_timeout_bounds_a_collective(tmp_path):
    """A rank stuck outside a barrier: the other gives up after dist_timeout (3 s), not torch's 10 or 30 minutes."""
    rank0, _ = _launch("timeout", tmp_path)
    assert rank0["timeout_seconds"] == 3.0
    result = rank0["timeout"]
    assert result["error"] is not None and 2.5 < result["waited"] < 11.0, result


def test_rank0_work_is_waited_for_outside_collectives(helpers):
    rank0, rank1 = _ok(helpers, "run_on_rank0")
    # rank 0 worked 3 s, three times the 1 s timeout: rank 1 waited on the heartbeat instead of giving up
    assert rank0["busy"]["value"] == 42 and rank1["busy"]["value"] is None
    assert rank1["busy"]["waited"] >= 2.5
    assert rank0["failing"] == "ValueError: boom on rank 0"
    assert rank1["failing"].startswith("RuntimeError: failing failed on rank 0: boom on rank 0")
    assert "no sign of life from rank 0" in rank1["absent"]["error"] and 0.9 < rank1["absent"]["waited"] < 10


def test_claimed_items_go_to_one_rank_each(helpers):
    rank0, rank1 = (r["items"] for r in _ok(helpers, "claim"))
    assert sorted(rank0 + rank1) == list(range(12))
    assert len(rank1) > len(rank0)  # the faster rank took more


def test_two_ranks_share_the_slice_cache_and_build_each_case_once(helpers):
    rank0, rank1 = _ok(helpers, "cache")
    first0 = [c for c in rank0["built"] if c != "broken"]
    first1 = [c for c in rank1["built"] if c != "broken"]
    good = rank0["cases"]
    assert len(good) == 5 and rank0["cases"] == rank1["cases"]
    # every good case preprocessed exactly once in all, by one rank or the other; the broken one retried by its rank
    assert sorted(first0 + first1) == sorted(good)
    assert first0 and first1  # both ranks worked
    assert rank0["built"].count("broken") + rank1["built"].count("broken") == 2
    assert rank0["built"].count("broken") in (0, 2)
    # both ranks report the failure of the case only one of them built, and read the same slices
    assert rank0["failures"] == rank1["failures"] and list(rank0["failures"]) == ["broken"]
    assert "missing_t1w.nii.gz" in rank0["failures"]["broken"]
    assert rank0["rows"] == rank1["rows"] > 0 and rank0["image_sum"] == rank1["image_sum"]


def test_rank0_handlers_by_name_keep_a_user_handler_on_every_rank(helpers):
    rank0, rank1 = _ok(helpers, "handlers")
    common = ["EMAHandler", "ValidationHandler", "TimeBudget", "TrainingCheckpointer"]
    rank0_only = ["ReconstructionSaver", "StatsHandler", "TensorBoardStatsHandler", "ProgressBar"]
    assert rank0["train"] == [*common, *rank0_only, "TerminateOnNan"]
    assert rank1["train"] == [*common, "TerminateOnNan"]
    assert rank0["validate"] == [
        "ClassifierFreePrepareBatch",
        "ResumeLogFilter",
        "StatsHandler",
        "TensorBoardStatsHandler",
    ]
    assert rank1["validate"] == ["ClassifierFreePrepareBatch", "ResumeLogFilter"]


def test_rng_state_is_restored_per_rank(helpers):
    rank0, rank1 = _ok(helpers, "rng")
    for r in (rank0, rank1):
        assert r["resumed"] == r["expected"]  # each rank continues its own streams
    assert rank0["expected"] != rank1["expected"]
    # from a checkpoint with rank 0's streams only: rank 0 resumes, rank 1 draws something else
    assert rank0["from_single"] == rank0["expected"]
    assert rank1["from_single"] != rank0["expected"] and rank1["from_single"] != rank1["expected"]


if __name__ == "__main__":  # a torchrun worker of the tests above
    _worker(sys.argv[1], Path(sys.argv[2]))
