"""benchmarks/gpu_check.py, the one-command GPU check, in its CPU smoke mode: every part runs (training, resumption,
the shipped bundle commands as subprocesses, torchrun ones with gloo, the inferer against the official call pattern,
volume inference of a synthetic case, bf16 against fp32 on the checkpoint the bundle trained) and reports finite
figures, so the script cannot rot while no GPU is lent; and how a failing or hanging command becomes its row."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = {"a train", "b resume", "c bundle", "d inferer", "e volume", "f precision"}
# the shipped commands the bundle part runs, one row each, in this order
BUNDLE_ROWS = [
    "train.json, 1 process",
    "train.json + multi_gpu_train.json, torchrun 1 process, gloo",
    "calibrate.json",
    "inference.json, 1 process",
    "inference.json + multi_gpu_inference.json, torchrun 1 process, gloo",
]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _numbers(figures: dict) -> list[float]:
    return [float(v) for v in figures.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["rows"]
    assert {r["part"] for r in rows} == PARTS
    for r in rows:
        assert r["status"] == "ok", r
        numbers = _numbers(r["figures"])
        assert numbers and all(math.isfinite(v) for v in numbers), r
    by_item = {r["item"]: r["figures"] for r in rows}
    train = next(f for item, f in by_item.items() if "batch" in item and "loss_first" in f)
    assert train["loss_last"] < train["loss_first"] and train["slices_per_s"] > 0
    resume = next(r["figures"] for r in rows if r["part"] == "b resume")
    assert resume["max_abs_weight_diff"] <= 1e-5 < resume["weights_moved_after_save"]
    inferer = [r["figures"] for r in rows if r["part"] == "d inferer" and "evals_per_slice" in r["figures"]]
    official = next(f for f in inferer if f["evals_per_slice"] == 4 * f["grid_steps"] - 1)
    ours_stride1 = max((f for f in inferer if f is not official), key=lambda f: f["grid_steps"])
    assert ours_stride1["evals_per_slice"] == 2 * ours_stride1["grid_steps"] == 2 * official["grid_steps"]
    agreement = next(r["figures"] for r in rows if "map_pearson_r" in r["figures"])
    assert agreement["map_pearson_r"] > 0.99
    volume = next(r["figures"] for r in rows if r["part"] == "e volume")
    assert 0 < volume["brain_slices"] <= volume["axial_slices"]
    # every shipped bundle command ran, as its own row with its own wall time
    bundle = [r for r in rows if r["part"] == "c bundle"]
    assert len(bundle) == len(BUNDLE_ROWS)
    for r, start in zip(bundle, BUNDLE_ROWS):
        assert r["item"].startswith(start), (r["item"], start)
        assert "monai.bundle run --config_file" in r["command"] and r["figures"]["exit_status"] == 0
        assert ("torch.distributed.run --standalone --nproc_per_node=1" in r["command"]) == ("torchrun" in start)
        assert r["seconds"] == r["figures"]["wall_s"] > 0
    assert all(b["figures"]["iterations"] > 0 for b in bundle[:2])
    assert bundle[2]["figures"]["guidance_scale"] > 0
    assert bundle[3]["figures"]["cases_done"] == bundle[4]["figures"]["cases_done"] == 1
    assert bundle[4]["figures"]["max_abs_diff_vs_inference"] == 0.0  # 1 torchrun process = 1 plain process
    assert len(list(tmp_path.glob("bundle_*_log.txt"))) == len(BUNDLE_ROWS)
    precision = next(r for r in rows if r["part"] == "f precision")
    assert "bundle-trained checkpoint" in precision["item"] and "calibration" in precision["item"]
    assert 0.9 <= precision["figures"]["mask_dice"] <= 1.0 and precision["figures"]["rel_mt_diff"] >= 0
    # the table printed and written
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| part | check | status | figures | s |" in table and "FAILED" not in table
    assert table.count("| ok |") == len(rows)


def test_failed_and_timed_out_commands_become_failed_rows(tmp_path):
    """A command's non-zero exit gives its status and the line naming its error (the workflows' ``error: ...``);
    one past its limit is killed with its whole process group."""
    gc = _gpu_check()
    env = dict(os.environ)
    script = "import sys; print('some log'); print('error: ValueError: bad', file=sys.stderr); sys.exit(2)"
    fail = [sys.executable, "-c", script]
    res = gc.run_command(fail, env, 60, tmp_path / "fail_log.txt")
    assert res["rc"] == 2 and res["why"] == "exit 2: error: ValueError: bad"
    assert "error: ValueError: bad" in (tmp_path / "fail_log.txt").read_text()
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    res = gc.run_command(slow, env, 1, tmp_path / "slow_log.txt")
    assert res["why"].startswith("timed out after 1 s") and res["wall"] < 30
    ok = gc.run_command([sys.executable, "-c", "print('fine')"], env, 60, tmp_path / "ok_log.txt")
    assert ok["rc"] == 0 and ok["why"] == ""


def test_error_line():
    gc = _gpu_check()
    assert (
        gc.error_line("noise\nerror: CheckpointError: no file\n(run again ...)\n") == "error: CheckpointError: no file"
    )
    traceback = "Traceback (most recent call last):\n  File x\nKeyError: 'k'\n"
    assert gc.error_line(traceback) == "KeyError: 'k'"
    torchrun = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n  exitcode  : 2 (pid: 1)\n"
    assert gc.error_line(torchrun).endswith("ChildFailedError: worker exit status 2, no error line from it")
    assert gc.error_line("") == ""
