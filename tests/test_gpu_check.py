"""benchmarks/gpu_check.py, the one-command GPU check, in its CPU smoke mode: every part runs (training, resumption,
the training bundle under torchrun with gloo, the inferer against the official call pattern, volume inference of a
synthetic case) and reports finite figures, so the script cannot rot while no GPU is lent."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = {"a train", "b resume", "c bundle", "d inferer", "e volume"}


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
    # the table printed and written
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| part | check | status | figures | s |" in table and "FAILED" not in table
    assert table.count("| ok |") == len(rows)
