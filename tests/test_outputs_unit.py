"""A case's inference outputs are one unit (issue 21, item 2; anofpdm_monai/data/writers.py, anofpdm_monai/io.py).

A killed rerun leaves the old complete case (or the new one), never a mix; a truncated or edited output is not
"finished"; a changed input file or another seed is recomputed, and the log says why; a second run on the same
output folder stops at start with one line; a failed case leaves no file; ``slices.csv`` has the health score that
is thresholded. Kills are real: a subprocess ends with ``os._exit`` in the middle of writing, so no clean-up runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import test_volume_inference as volume_tests
import torch
from test_volume_inference import REPO, SIZE, _absolute, _inferer, _tiny_net

from anofpdm_monai.apps.inference import VolumeInferer
from anofpdm_monai.data import VolumePreprocessor
from anofpdm_monai.data.synthetic import make_case, phantom_anatomy
from anofpdm_monai.data.writers import (
    NOT_RUN_YET,
    OUTPUTS_FORMAT,
    SaveCaseOutputsd,
    case_output_paths,
    input_record,
    is_case_finished,
    why_not_finished,
)
from anofpdm_monai.engines import InferenceFailures
from anofpdm_monai.io import (
    OutputPathError,
    acquire_output_lock,
    atomic_folder,
    file_record,
    holds_output_lock,
    output_lock,
    recover_folder_swaps,
    release_output_lock,
)

TIMEOUT = 300

# the fixtures of test_volume_inference: synthetic cases (RAS, LPS, healthy) and a tiny checkpoint with its calibration
cases = volume_tests.cases
model_files = volume_tests.model_files


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def _stored(out: Path, case: str) -> dict:
    return json.loads(case_output_paths(out, case)["provenance"].read_text())


def _own_case(root: Path, case: str = "case_own", seed: int = 3) -> dict:
    """A case with its own files (the module's cases are shared by other tests and must not be edited)."""
    anatomy = phantom_anatomy((32, 40, 24))
    entry = make_case(anatomy, root, case, num_lesions=1, lesion_radius=5.0, seed=seed, noise=0.0, deformation=1.0)
    return _absolute(entry, root)


def _vi(seed: int = 0, **kwargs) -> VolumeInferer:
    vi = VolumeInferer(_tiny_net(), _inferer(**kwargs), VolumePreprocessor(image_size=SIZE), progress=False)
    vi.inferer.seed = seed
    return vi


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


_KILLED_RUN = textwrap.dedent(
    """
    import json, os, sys
    import anofpdm_monai.data.writers as writers
    from anofpdm_monai.apps.inference import VolumeInferer

    args = json.loads(sys.argv[1])
    if args["die"] == "after_first_file":  # the slice table is written, the map is not: killed
        def dying(*a, **k):
            os._exit(9)
        writers.write_nifti_like = dying
    elif args["die"] == "between_renames":  # the old case folder is renamed aside, the new one not in yet: killed
        rename = os.rename
        def dying_rename(src, dst):
            rename(src, dst)
            if ".old-" in os.path.basename(str(dst)):
                os._exit(9)
        os.rename = dying_rename
    vi = VolumeInferer.from_files(args["checkpoint"], args["calibration"], progress=False, **args["options"])
    vi.run(args["entries"], args["output_dir"])
    """
)


def _killed_run(model_files, entry: dict, out: Path, die: str, **options) -> None:
    args = {
        "checkpoint": str(model_files["checkpoint"]),
        "calibration": str(model_files["calibration"]),
        "entries": [entry],
        "output_dir": str(out),
        "die": die,
        "options": options,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, json.dumps(args)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 9, (proc.stdout + proc.stderr)[-3000:]


# --------------------------------------------------------------------------------------------------------------------
# a killed rerun with another setting: the old case stays whole, the next run resolves it
# --------------------------------------------------------------------------------------------------------------------


def test_a_killed_rerun_leaves_the_old_case_whole(model_files, cases, tmp_path, caplog):
    entry, case = cases["RAS"], cases["RAS"]["id"]
    out = tmp_path / "out"
    old_setting = VolumeInferer.from_files(
        model_files["checkpoint"], model_files["calibration"], progress=False, median_kernel=3
    )
    assert old_setting.run([entry], out)["done"] == [case]
    old = _snapshot(out / case)
    assert sorted(old) == sorted(p.name for p in case_output_paths(out, case).values())

    # killed after the first file of a rerun made with another setting: the case folder is the old one, byte for byte
    _killed_run(model_files, entry, out, "after_first_file", median_kernel=5)
    assert _snapshot(out / case) == old
    assert is_case_finished(out, case, old_setting.run_provenance(), entry)
    leftovers = [p for p in out.iterdir() if p.name.startswith(f".{case}.tmp-")]
    assert len(leftovers) == 1 and [p.name for p in leftovers[0].iterdir()] == [f"{case}_slices.csv"]

    # killed between the two renames of the swap: the old folder is aside, the new complete one not yet in
    _killed_run(model_files, entry, out, "between_renames", median_kernel=5)
    assert not (out / case).exists()
    aside = [p for p in out.iterdir() if p.name.startswith(f".{case}.old-")]
    assert len(aside) == 1 and _snapshot(aside[0]) == old

    # the next run with the old setting puts the old case back and skips it: nothing recomputed, nothing left over
    net_calls = []
    old_setting.network.register_forward_hook(lambda *a: net_calls.append(1))
    with caplog.at_level(logging.INFO, logger="anofpdm_monai"):
        summary = old_setting.run([entry], out)
    assert summary["skipped"] == [case] and summary["done"] == [] and not net_calls
    assert _snapshot(out / case) == old
    assert f"put {case} back in place" in _messages(caplog)
    assert _hidden(out) == []

    # a run with the new setting recomputes it, says why, and leaves one consistent case
    new_setting = VolumeInferer.from_files(
        model_files["checkpoint"], model_files["calibration"], progress=False, median_kernel=5
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="anofpdm_monai"):
        assert new_setting.run([entry], out)["done"] == [case]
    assert f"case {case}: recomputed: made with another setting: settings.median_kernel 3 -> 5" in _messages(caplog)
    stored = _stored(out, case)
    assert stored["made_with"]["settings"]["median_kernel"] == 5
    assert is_case_finished(out, case, new_setting.run_provenance(), entry)
    assert not is_case_finished(out, case, old_setting.run_provenance(), entry)
    new = _snapshot(out / case)
    assert new[f"{case}_anomaly_map.nii.gz"] != old[f"{case}_anomaly_map.nii.gz"]
    assert _hidden(out) == []


# --------------------------------------------------------------------------------------------------------------------
# the skip test checks integrity, the inputs and the seed
# --------------------------------------------------------------------------------------------------------------------


def test_a_truncated_or_edited_output_is_not_finished(cases, tmp_path, caplog):
    entry, case = cases["RAS"], cases["RAS"]["id"]
    vi = _vi()
    vi.run([entry], tmp_path)
    paths = case_output_paths(tmp_path, case)
    prov = vi.run_provenance()
    assert why_not_finished(tmp_path, case, prov, entry) is None

    full = paths["map"].read_bytes()
    paths["map"].write_bytes(full[: len(full) // 2])  # a truncated map (nibabel may even read its header)
    assert "outputs damaged" in why_not_finished(tmp_path, case, prov, entry)
    with caplog.at_level(logging.INFO, logger="anofpdm_monai"):
        assert vi.run([entry], tmp_path)["done"] == [case]
    assert f"case {case}: recomputed: outputs damaged ({case}_anomaly_map.nii.gz" in _messages(caplog)
    assert paths["map"].read_bytes() == full  # recomputed: the same result again
    assert is_case_finished(tmp_path, case, prov, entry)

    table = bytearray(paths["slices"].read_bytes())
    last_digit = max(i for i, b in enumerate(table) if chr(b).isdigit())
    table[last_digit] = ord("1") if table[last_digit] != ord("1") else ord("2")  # one digit edited: the same size
    paths["slices"].write_bytes(bytes(table))
    assert "outputs damaged" in why_not_finished(tmp_path, case, prov, entry)
    vi.run([entry], tmp_path)
    paths["mask"].unlink()
    assert why_not_finished(tmp_path, case, prov, entry) == f"outputs incomplete ({case}_anomaly_mask.nii.gz missing)"
    paths["provenance"].unlink()
    assert "provenance.json missing" in why_not_finished(tmp_path, case, prov, entry)
    shutil.rmtree(paths["map"].parent)
    assert why_not_finished(tmp_path, case, prov, entry) == NOT_RUN_YET


def test_a_changed_input_file_is_recomputed(tmp_path, caplog):
    entry = _own_case(tmp_path / "data")
    case = entry["id"]
    out = tmp_path / "out"
    vi = _vi()
    vi.run([entry], out)
    stored = _stored(out, case)
    assert [r["file"] for r in stored["inputs"]["image"]] == entry["image"]
    assert stored["inputs"]["label"][0]["file"] == entry["label"]
    for record, path in zip(stored["inputs"]["image"], entry["image"]):
        assert {k: record[k] for k in ("size", "mtime_ns", "sha256")} == file_record(path)

    # touched (a new mtime), same content: the same input
    flair = Path(entry["image"][0])
    os.utime(flair, ns=(1_000_000_000, 1_000_000_000))
    assert vi.run([entry], out)["skipped"] == [case]

    # another image under the same name: recomputed, and the log says which file changed
    other = _own_case(tmp_path / "other", "case_other", seed=8)
    shutil.copyfile(other["image"][0], flair)
    with caplog.at_level(logging.INFO, logger="anofpdm_monai"):
        assert vi.run([entry], out)["done"] == [case]
    assert f"case {case}: recomputed: input changed: image[0] {flair} (content differs)" in _messages(caplog)
    assert _stored(out, case)["inputs"]["image"][0]["sha256"] == file_record(other["image"][0])["sha256"]
    assert vi.run([entry], out)["skipped"] == [case]

    # the label given no more (the slice table loses its label column): recomputed too
    without_label = {k: v for k, v in entry.items() if k != "label"}
    assert why_not_finished(out, case, vi.run_provenance(), without_label) == "input changed: label removed"
    assert vi.run([without_label], out)["done"] == [case]
    assert "label" not in pd.read_csv(case_output_paths(out, case)["slices"]).columns


def test_another_seed_is_recomputed(cases, tmp_path, caplog):
    entry, case = cases["RAS"], cases["RAS"]["id"]
    vi = _vi(seed=0, forward="ddpm")  # DDPM forward: every step draws noise, so the seed shows in the map
    vi.run([entry], tmp_path)
    map_seed0 = case_output_paths(tmp_path, case)["map"].read_bytes()
    assert _stored(tmp_path, case)["made_with"]["seed"] == 0
    assert vi.run([entry], tmp_path)["skipped"] == [case]
    vi.inferer.seed = 1
    with caplog.at_level(logging.INFO, logger="anofpdm_monai"):
        assert vi.run([entry], tmp_path)["done"] == [case]
    assert f"case {case}: recomputed: made with another setting: seed 0 -> 1" in _messages(caplog)
    assert _stored(tmp_path, case)["made_with"]["seed"] == 1
    assert case_output_paths(tmp_path, case)["map"].read_bytes() != map_seed0


# --------------------------------------------------------------------------------------------------------------------
# one run per output folder
# --------------------------------------------------------------------------------------------------------------------


def _lock_holder(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from anofpdm_monai.io import acquire_output_lock; "
        "acquire_output_lock(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_the_same_output_dir_stops_at_start(cases, tmp_path):
    entry, case = cases["RAS"], cases["RAS"]["id"]
    out = tmp_path / "out"
    out.mkdir()
    writing = out / f".{case}.tmp-abcd1234"  # the first run's case being written
    writing.mkdir()
    (writing / f"{case}_slices.csv").write_text("index\n")
    holder = _lock_holder(out)
    try:
        vi = _vi()
        with pytest.raises(OutputPathError) as info:
            vi.run([entry], out)
        message = str(info.value)
        assert "\n" not in message
        assert f"output_dir {out} is in use by another run (pid {holder.pid} on {socket.gethostname()})" in message
        assert writing.is_dir(), "the refused run removed the other run's temporary folder"
        assert sorted(p.name for p in out.iterdir()) == sorted([".lock", writing.name])
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its lock file stays, the kernel drops the lock
        holder.wait(timeout=TIMEOUT)
    assert (out / ".lock").is_file()
    summary = vi.run([entry], out)
    assert summary["done"] == [case] and not summary["failed"]
    assert sorted(p.name for p in out.iterdir()) == [case, "inference_summary.json"]  # lock file and leftovers gone


def test_output_lock_in_one_process():
    """Taken once per folder and process; ``output_lock`` keeps a lock held before it; released: the file goes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        lock = acquire_output_lock(folder)
        assert holds_output_lock(folder) and (folder / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
        assert acquire_output_lock(folder) is lock
        with output_lock(folder) as inner:
            assert inner is lock
        assert holds_output_lock(folder)  # held before the block: still held
        assert release_output_lock(folder) and not (folder / ".lock").exists()
        assert not release_output_lock(folder)
        with output_lock(folder):
            assert holds_output_lock(folder)
        assert not holds_output_lock(folder) and not (folder / ".lock").exists()


_RANK = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    rank, init, out, cases = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
    from anofpdm_monai.apps.inference import pending_cases
    from anofpdm_monai.io import holds_output_lock, release_output_lock
    try:
        todo, skipped = pending_cases(cases, out, {"seed": 0}, False)
        result = {"todo": [e["id"] for e in todo], "skipped": skipped, "holds": holds_output_lock(out)}
    except Exception as exc:
        result = {"error": type(exc).__name__ + ": " + str(exc)}
    dist.barrier()
    release_output_lock(out)
    print(json.dumps(result), flush=True)
    dist.barrier()  # both answers are out: leave without gloo's teardown, which can abort at exit under load
    import os
    os._exit(0)
    """
)


def _two_ranks(tmp_path: Path, out: Path, cases: list[dict], tag: str) -> list[dict]:
    init = tmp_path / f"init_{tag}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(rank), str(init), str(out), json.dumps(cases)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def _finished_by_hand(out: Path, entry: dict, made_with: dict) -> None:
    """A case folder as SaveCaseOutputsd writes it, with stand-in content."""
    case = entry["id"]
    paths = case_output_paths(out, case)
    paths["map"].parent.mkdir(parents=True)
    outputs = {}
    for key in ("map", "mask", "slices"):
        paths[key].write_bytes(f"{key} of {case}".encode())
        digest = file_record(paths[key])
        outputs[key] = {"file": paths[key].name, "size": digest["size"], "sha256": digest["sha256"]}
    document = {"format": OUTPUTS_FORMAT, "case_id": case, "made_with": made_with, "outputs": outputs}
    paths["provenance"].write_text(json.dumps({**document, "inputs": input_record(entry)}))


def test_pending_cases_under_two_gloo_ranks(tmp_path):
    """Rank 0 takes the lock, cleans up and splits; both ranks get its answer (so they shard the same list); with the
    folder in use by another run both ranks raise the one-line error (none waits forever)."""
    image = tmp_path / "img.nii.gz"
    image.write_bytes(b"an input")
    cases = [{"id": f"c{i}", "image": [str(image)]} for i in range(3)]
    out = tmp_path / "out"
    out.mkdir()
    _finished_by_hand(out, cases[1], {"seed": 0})
    (out / ".c2.tmp-abcd1234").mkdir()  # a killed run's leftover
    first, second = _two_ranks(tmp_path, out, cases, "a")
    assert first == {"todo": ["c0", "c2"], "skipped": ["c1"], "holds": True}
    assert second == {"todo": ["c0", "c2"], "skipped": ["c1"], "holds": False}
    assert not (out / ".c2.tmp-abcd1234").exists() and not (out / ".lock").exists()

    with output_lock(out):  # another run (this process) uses the folder
        results = _two_ranks(tmp_path, out, cases, "b")
    for result in results:
        assert result["error"].startswith(
            f"OutputPathError: output_dir {out} is in use by another run (pid {os.getpid()}"
        )


# --------------------------------------------------------------------------------------------------------------------
# a failed case leaves no file
# --------------------------------------------------------------------------------------------------------------------


def test_a_failed_case_leaves_no_file(cases, tmp_path, monkeypatch):
    entry, case = cases["RAS"], cases["RAS"]["id"]
    out = tmp_path / "out"
    vi = _vi(seed=0)
    vi.run([entry], out)
    old = _snapshot(out / case)
    old_provenance = vi.run_provenance()

    def broken_save(img, filename):  # disk full while writing the map, after the slice table
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", broken_save)
    vi.inferer.seed = 1
    fresh = dict(cases["LPS"], id="case_fresh")
    with pytest.raises(InferenceFailures, match="No space left on device"):
        vi.run([entry, fresh], out)
    monkeypatch.undo()
    summary = json.loads((out / "inference_summary.json").read_text())
    assert sorted(summary["failed"]) == [case, "case_fresh"] and summary["done"] == []
    assert sorted(p.name for p in out.iterdir()) == [case, "inference_summary.json"]  # nothing of case_fresh
    assert _snapshot(out / case) == old and is_case_finished(out, case, old_provenance, entry)  # the old case, whole

    long_id = "x" * 240
    summary = vi.run([dict(entry, id=long_id)], out, raise_on_failure=False)
    reason = summary["failed"][long_id]
    assert f"case id {long_id[:40]}... is 240 characters long" in reason and "\n" not in reason
    assert sorted(p.name for p in out.iterdir()) == [case, "inference_summary.json"]


# --------------------------------------------------------------------------------------------------------------------
# slices.csv: the health score that is thresholded
# --------------------------------------------------------------------------------------------------------------------


def _slice_data(health: torch.Tensor | None) -> dict:
    depth = 5
    data = {
        "id": "c",
        "kept": torch.tensor([False, True, True, True, False]),
        "end_step": torch.arange(depth * 2).reshape(depth, 2),
        "divergence_max": torch.rand(depth, 2),
        "cosine": torch.tensor([float("nan"), 0.9, 0.2, 0.7, float("nan")]),
        "pred_label": torch.tensor([0, 0, 1, 1, 0]),
        "threshold": torch.rand(depth),
        "mask_pixels": torch.tensor([0, 0, 12, 3, 0]),
        "source_index": np.arange(depth)[::-1].copy(),
    }
    if health is not None:
        data["health"] = health
    return data


def test_slice_table_writes_the_thresholded_health_score(tmp_path, caplog):
    health = torch.tensor([float("nan"), -0.01, -0.30, -0.20, float("nan")])
    writer = SaveCaseOutputsd(tmp_path, ["flair", "t2"], provenance={"settings": {"health_score": "mse_gap"}})
    table = writer.slice_table(_slice_data(health))
    assert list(table.columns) == [
        "index",
        "ras_index",
        "t_e_flair",
        "M_flair",
        "t_e_t2",
        "M_t2",
        "health_mse_gap",
        "pred_label",
        "cosine",
        "threshold",
        "mask_pixels",
    ]
    np.testing.assert_allclose(table["health_mse_gap"], [-0.01, -0.30, -0.20], rtol=1e-6)
    np.testing.assert_allclose(table["cosine"], [0.9, 0.2, 0.7], rtol=1e-6)
    assert table["index"].tolist() == [3, 2, 1] and table["ras_index"].tolist() == [1, 2, 3]

    # the cosine as health score: the column says so; an explicit name wins over the provenance's
    provenance = {"settings": {"health_score": "mse_gap"}}
    cosine_writer = SaveCaseOutputsd(tmp_path, ["flair", "t2"], health_score="cosine", provenance=provenance)
    table = cosine_writer.slice_table(_slice_data(None))
    assert "health_mse_gap" not in table.columns
    np.testing.assert_allclose(table["health_cosine"], table["cosine"])

    # an inferer that returns no health score: no column made up, and a warning
    with caplog.at_level(logging.WARNING):
        table = writer.slice_table(_slice_data(None))
    assert "health_mse_gap" not in table.columns and "c_slices.csv has no health_mse_gap column" in caplog.text


def test_slices_csv_health_matches_the_predicted_label(model_files, cases, tmp_path):
    entry, case = cases["RAS"], cases["RAS"]["id"]
    vi = VolumeInferer.from_files(model_files["checkpoint"], model_files["calibration"], progress=False)
    assert vi.inferer.settings.health_score == "mse_gap"
    vi.run([entry], tmp_path)
    table = pd.read_csv(case_output_paths(tmp_path, case)["slices"])
    assert "c" not in table.columns and table["cosine"].between(-1, 1).all()
    if "health_mse_gap" not in table.columns:
        pytest.skip("AnoFPDMVolumeInferer returns no 'health' yet (inferers/volume.py; see the issue 21 item 2 report)")
    assert not np.allclose(table["health_mse_gap"], table["cosine"])
    # a tau between the slices' scores: both labels occur, and a slice is unhealthy exactly where health <= tau
    vi.inferer.tau = float(table["health_mse_gap"].median())
    vi.overwrite = True
    vi.run([entry], tmp_path)
    table = pd.read_csv(case_output_paths(tmp_path, case)["slices"])
    assert set(table["pred_label"]) == {0, 1}
    assert ((table["health_mse_gap"] <= vi.inferer.tau) == (table["pred_label"] == 1)).all()


# --------------------------------------------------------------------------------------------------------------------
# the folder swap and what a kill leaves
# --------------------------------------------------------------------------------------------------------------------


def test_folder_swap_and_its_recovery(tmp_path):
    target = tmp_path / "case"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert [p.name for p in tmp_path.iterdir()] == ["case"] and (target / "a.txt").read_text() == "first"
    assert target.stat().st_mode & 0o777 != 0o700
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced as a whole
    with pytest.raises(RuntimeError, match="failed"), atomic_folder(target) as tmp:
        (tmp / "c.txt").write_text("third")
        raise RuntimeError("failed")
    assert [p.name for p in tmp_path.iterdir()] == ["case"] and sorted(p.name for p in target.iterdir()) == ["b.txt"]

    # what kills leave: the old folder renamed aside with the new one not in (put back), a temporary folder and an
    # old folder whose replacement is in (removed); a hidden folder of another kind is not touched
    (tmp_path / "case").rename(tmp_path / ".case.old-abcd1234")
    (tmp_path / ".case.tmp-efgh5678").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / ".other.old-ijkl9012").mkdir()
    (tmp_path / ".other.old-ijkl9012" / "x").write_text("x")
    (tmp_path / ".hidden").mkdir()
    actions = recover_folder_swaps(tmp_path)
    assert len(actions) == 3 and "put case back in place (a run was killed while replacing it)" in actions
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "case", "other"]
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is an existing file, not a folder"), atomic_folder(tmp_path / "file"):
        pass


# --------------------------------------------------------------------------------------------------------------------
# the inference bundle: --seed and a concurrent run
# --------------------------------------------------------------------------------------------------------------------


def _bundle(overrides: dict, cwd: Path) -> subprocess.CompletedProcess:
    files = [str(REPO / "bundles" / "anofpdm_brats21" / "configs" / "dataset.json")]
    files.append(str(REPO / "bundles" / "common" / "configs" / "inference.json"))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files)]
    cmd += [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def test_bundle_seed_is_in_the_provenance_and_a_concurrent_run_stops(model_files, tmp_path):
    folder = tmp_path / "BraTS2021_Training_Data"
    case = "BraTS2021_00001"
    make_case(phantom_anatomy((32, 40, 24)), folder, case, num_lesions=1, file_pattern="{case}_{modality}.nii.gz")
    out = tmp_path / "out"
    base = {
        "input_dir": folder,
        "checkpoint": model_files["checkpoint"],
        "calibration": model_files["calibration"],
        "output_dir": out,
        "progress": False,
    }
    proc = _bundle({**base, "seed": 0}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _stored(out, case)["made_with"]["seed"] == 0
    assert sorted(p.name for p in out.iterdir()) == [case, "inference_summary.json"]  # the lock file is gone

    with output_lock(out):
        started = time.time()
        proc = _bundle({**base, "seed": 1}, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: OutputPathError: output_dir {out} is in use by another run (pid {os.getpid()} on " in proc.stderr
    assert "Traceback" not in proc.stderr and time.time() - started < TIMEOUT

    proc = _bundle({**base, "seed": 1}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"case {case}: recomputed: made with another setting: seed 0 -> 1" in proc.stdout + proc.stderr
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["done"] == [case] and summary["skipped"] == []
    assert _stored(out, case)["made_with"]["seed"] == 1
