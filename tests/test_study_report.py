"""benchmarks/study_report.py: the step-by-step divergence table on curves whose answer is known by construction, and
the real-MRI study's fold bookkeeping (training budget on rerun)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import real_study  # noqa: E402
import study_report  # noqa: E402


def _frame() -> pd.DataFrame:
    """Four healthy and four tumour slices on the grid 0, 10, ..., 50. Every slice's M_t grows as (1 + t); tumour
    slices carry an extra bump at t = 20 (x3 there) and nothing elsewhere. Two slices of each class are central."""
    steps = np.arange(0, 60, 10)
    rows = []
    for i in range(8):
        tumour = i >= 4
        for t in steps:
            m_t = (1.0 + t) * (1.0 + 0.01 * (i % 4))  # slice-specific scale, same order in both classes
            if tumour and t == 20:
                m_t *= 3.0
            rows.append({"method": "anofpdm", "t": t, "m_t": m_t, "y": int(tumour), "central": i % 4 < 2})
    return pd.DataFrame(rows)


def test_divergence_by_step_finds_the_bump_and_the_shared_growth():
    table = study_report.divergence_by_step(_frame(), points=5).set_index("t")
    assert list(table.index) == [10, 20, 30, 40, 50]  # step 0 is left out, the last step is kept
    # at the bump every tumour slice is above every healthy one; elsewhere the within-class scales interleave
    assert table.loc[20, "auroc_all"] == pytest.approx(1.0)
    assert table.loc[20, "auroc_central"] == pytest.approx(1.0)
    assert table.loc[20, "ratio"] == pytest.approx(3.0)
    for t in (10, 30, 40, 50):
        assert table.loc[t, "ratio"] == pytest.approx(1.0)
        assert table.loc[t, "auroc_all"] == pytest.approx(0.5)
    # the healthy median grows as 1 + t times the median of the scales 1.00 .. 1.03
    assert table.loc[50, "healthy_median"] == pytest.approx(51 * 1.015)


def test_the_training_budget_is_the_folds_total(tmp_path, monkeypatch):
    """A rerun with the same budget does not train again; a larger budget trains only the difference."""
    calls: list[dict] = []
    monkeypatch.setattr(real_study, "run_bundle", lambda config, **kw: calls.append({"config": config, **kw}))
    data = tmp_path / "data"
    data.mkdir()
    cases = [{"id": f"case{i}", "modalities": {"flair": f"c{i}.nii.gz"}, "label": f"s{i}.nii.gz"} for i in range(6)]
    (data / "manifest.json").write_text(json.dumps({"cases": cases}))
    out = tmp_path / "out"
    base = ["--data", str(data), "--output", str(out), "--only-folds", "0", "--stages", "train"]
    timings = out / "fold0" / "timings.json"

    assert real_study.main([*base, "--train-minutes", "2"]) == 0
    assert len(calls) == 1 and calls[0]["config"] == "train" and calls[0]["time_limit"] == 120
    spent = json.loads(timings.read_text())["train_s"]
    timings.write_text(json.dumps({"train_s": spent + 120.0}))  # as if the run had used its 2 minutes

    assert real_study.main([*base, "--train-minutes", "2"]) == 0
    assert len(calls) == 1  # spent: no second run
    assert real_study.main([*base, "--train-minutes", "5"]) == 0
    assert len(calls) == 2
    assert calls[1]["time_limit"] == pytest.approx(300 - spent - 120.0, abs=1.0)


def test_folds_are_by_patient_and_the_calibration_patient_is_not_trained_on():
    """``brats_2013_pat0003_1`` (BraTS 2013/2015) and ``Brats18_2013_3_1`` (BraTS 2018) are one patient: one fold,
    and never one in training while the other calibrates or tests."""
    assert real_study.patient_of("brats_2013_pat0003_1") == real_study.patient_of("Brats18_2013_3_1")
    assert real_study.patient_of("Brats18_2013_11_1") != real_study.patient_of("brats_2013_pat0003_1")
    assert real_study.patient_of("BraTS2021_00006") == "BraTS2021_00006"
    ids = ["brats_2013_pat0003_1", "Brats18_2013_3_1", "brats_2013_pat0004_1", "Brats18_CBICA_ABM_1"]
    ids += ["Brats18_TCIA01_201_1", "BraTS2021_00006", "TCGA-DU-7294", "BraTS-MET-00110-000"]
    folds = real_study.deal_folds(ids, 5)
    assert sorted(c for f in folds for c in f) == sorted(ids)
    (home,) = [f for f in folds if "Brats18_2013_3_1" in f]
    assert "brats_2013_pat0003_1" in home
    entries = [{"id": i, "image": [f"{i}.nii.gz"], "label": f"{i}_seg.nii.gz"} for i in ids]
    for k in range(5):
        datalist = real_study.fold_datalist(entries, folds, k, ["flair"])
        held = {e["id"] for e in datalist["test"] + datalist["validation"]}
        trained = {real_study.patient_of(e["id"]) for e in datalist["training"]}
        assert not trained & {real_study.patient_of(i) for i in held}, k
    with pytest.raises(ValueError, match="patients"):
        real_study.deal_folds(["Brats18_2013_3_1", "brats_2013_pat0003_1"], 2)
