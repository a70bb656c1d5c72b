"""The README's main command, ``python -m anofpdm_monai.apps.demo``, end to end at toy size: every stage runs (each
bundle call passes the option check), the maps come back on the input grid, and the tables and figure exist."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nilearn")


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = ["--output_dir", str(out), "--train_iterations", "4", "--subjects", "2", "1", "1", "--image_size", "16"]
    args += ["--network_size", "tiny", "--t_max", "40", "--stride", "20", "--template_mm", "6"]
    run = subprocess.run(
        [sys.executable, "-m", "anofpdm_monai.apps.demo", *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "error:" not in run.stderr

    datalist = json.loads((out / "data" / "datalist.json").read_text())
    (case,) = datalist["test"]
    image = nib.load(out / "data" / case["image"][0])
    for kind in ("map", "mask"):
        written = nib.load(out / "inference" / case["id"] / f"{case['id']}_anomaly_{kind}.nii.gz")
        assert written.shape == image.shape
        np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)
    mask = np.asarray(nib.load(out / "inference" / case["id"] / f"{case['id']}_anomaly_mask.nii.gz").dataobj)
    assert set(np.unique(mask)) <= {0, 1}

    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert {"anofpdm", "anofpdm_last", "intensity"} <= set(summary["methods"])
    assert summary["num_test_slices"] > 0
    assert (out / "demo_figure.png").stat().st_size > 0
    assert "Done in" in run.stdout
    # the trainer stopped at the iteration count, not the time cap
    latest = out / "model" / "checkpoint_latest.pt"
    assert torch.load(latest, map_location="cpu", weights_only=True)["trainer"]["iteration"] == 4
