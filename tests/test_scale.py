"""A BraTS-sized dataset must not exhaust file descriptors: 300 cached cases are read (every slice, the ground truth
the evaluation reads, the per-case result store) in a subprocess whose open-file limit (160) is far below the three
memory maps per case the slice cache used to keep open (900) or one open ``.npz`` per case (300)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = 300
FD_LIMIT = 160
SIZE = 8

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc and RLIMIT_NOFILE")


def _write_cache(root: Path) -> list[str]:
    """CASES cases straight into the slice cache (no NIfTI, no preprocessing: what is tested is reading them)."""
    from anofpdm_monai.data import SLICE_TABLE_COLUMNS, SliceCache
    from anofpdm_monai.data.preprocessing import SliceArrays

    cache = SliceCache(root / "cache", {"modalities": ["t1w"], "image_size": SIZE})
    rng = np.random.default_rng(0)
    ids = []
    for i in range(CASES):
        case, n = f"case{i:04d}", 2 + i % 3
        label = (rng.random((n, SIZE, SIZE)) > 0.9).astype(np.uint8)
        table = pd.DataFrame(
            {
                "case_id": case,
                "row": np.arange(n),
                "slice_index": np.arange(n),
                "source_index": np.arange(n),
                "label": label.reshape(n, -1).any(1).astype(np.int64),
                "lesion_area": label.reshape(n, -1).sum(1),
                "brain_area": np.full(n, SIZE * SIZE),
            },
            columns=list(SLICE_TABLE_COLUMNS),
        )
        image = np.full((n, 1, SIZE, SIZE), i / CASES, dtype=np.float32)
        arrays = SliceArrays(image=image, label=label, brain=np.ones_like(label), table=table)
        cache.write_case({"id": case, "image": [str(root / "absent.nii.gz")]}, arrays)
        ids.append(case)
    return ids


def _child(root: Path) -> dict:
    """Under the lowered limit: every slice, the evaluation's ground truth, 300 results saved and loaded."""
    import resource

    from anofpdm_monai.data import SliceCache, SliceDataset
    from anofpdm_monai.evaluation.runner import Evaluator
    from anofpdm_monai.evaluation.store import ResultStore

    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    ids = json.loads((root / "ids.json").read_text())
    fds = [len(os.listdir("/proc/self/fd"))]
    cache = SliceCache(root / "cache", {"modalities": ["t1w"], "image_size": SIZE})
    ds = SliceDataset(cache, cache.table(ids))
    means = [float(ds[i]["image"].mean()) for i in range(len(ds))]
    fds.append(len(os.listdir("/proc/self/fd")))
    truth = Evaluator._ground_truth(ds)
    fds.append(len(os.listdir("/proc/self/fd")))
    store = ResultStore(root / "results")
    for case in ids:
        n = len(cache.table([case]))
        store.save("m", 0, case, "s", map=np.full((n, SIZE, SIZE), float(case[4:]), np.float32), pred_label=np.ones(n))
    loaded = store.load("m", 0, ids)
    fds.append(len(os.listdir("/proc/self/fd")))
    return {
        "slices": len(ds),
        "means": means,
        "truth_label": int(truth["label"].sum()),
        "table_lesions": int(ds.table["lesion_area"].sum()),
        "map_rows": loaded["map"].shape[0],
        "map_case_values": [float(v) for v in loaded["map"][:, 0, 0]],
        "case_rows": ds.table["case_id"].str[4:].astype(float).tolist(),
        "fds": fds,
        "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def test_300_cached_cases_under_a_low_open_file_limit(tmp_path):
    ids = _write_cache(tmp_path)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = json.loads((tmp_path / "child.json").read_text())
    assert out["limit"] == FD_LIMIT < 3 * CASES
    assert out["slices"] == sum(2 + i % 3 for i in range(CASES))
    expected = np.repeat([i / CASES for i in range(CASES)], [2 + i % 3 for i in range(CASES)])
    np.testing.assert_allclose(out["means"], expected, atol=1e-3)  # float16 in the cache
    assert out["truth_label"] == out["table_lesions"] > 0
    assert out["map_rows"] == out["slices"] and out["map_case_values"] == out["case_rows"]
    assert max(out["fds"]) - out["fds"][0] <= 3 * 32 + 8  # the slice cache's bound (32 cases) and a few more


if __name__ == "__main__":  # the subprocess of the test above
    work = Path(sys.argv[1])
    (work / "child.json").write_text(json.dumps(_child(work)))
