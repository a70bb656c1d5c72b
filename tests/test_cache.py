# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""Tests of anofpdm_monai.data.cache: SliceCache (build, reuse, invalidation, failures, atomic writes) and
SliceDataset (items, DataLoader workers, datalist entry point)."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from anofpdm_monai.data import (
    SLICE_TABLE_COLUMNS,
    CacheBuildError,
    SliceCache,
    SliceDataset,
    VolumePreprocessor,
)
from anofpdm_monai.data import cache as cache_module
from anofpdm_monai.data.synthetic import make_case, make_dataset, phantom_anatomy

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = SHARED_DATA / "tiny" / "BraTS2021_00006_3mm"
needs_tiny = pytest.mark.skipif(
    not TINY.is_dir(), reason=f"real MRI test data not found at {TINY} (project-internal, absent on user machines)"
)

MODALITIES = ["flair", "t2"]
SIZE = 16
PARAMS = {"modalities": MODALITIES, "image_size": SIZE}
ANATOMY = phantom_anatomy((24, 28, 20), spacing=8.0)
# float16 rounding of values in [-1, 1]: half a unit in the last place at [0.5, 1) is 2 ** -12
FLOAT16_ATOL = 2.0**-12 + 1e-7


def _absolute(entry: dict, root: Path) -> dict:
    out = {"id": entry["id"], "image": [str(root / p) for p in entry["image"]]}
    if entry.get("label"):
        out["label"] = str(root / entry["label"])
    return out


def _synthetic_cases(root: Path, lesions=(1, 1, 0), labelled=(True, True, True)) -> list[dict]:
    """Small synthetic cases (24 x 28 x 20 voxels), absolute paths; ``lesions[i] == 0`` makes a healthy subject."""
    entries = []
    for i, (num, has_label) in enumerate(zip(lesions, labelled)):
        e = make_case(
            ANATOMY,
            root,
            f"case{i}",
            modalities=MODALITIES,
            num_lesions=num,
            seed=10 + i,
            orientation="LPS" if i % 2 else "RAS",
            label_name="{case}_seg.nii.gz" if has_label else None,
        )
        entries.append(_absolute(e, root))
    return entries


def _tiny_entries() -> list[dict]:
    mods = ["flair", "t1", "t1ce", "t2"]
    return [
        {
            "id": "BraTS2021_00006_3mm",
            "image": [str(TINY / f"BraTS2021_00006_{m}.nii.gz") for m in mods],
            "label": str(TINY / "BraTS2021_00006_seg.nii.gz"),
        }
    ]


@pytest.fixture
def count_preprocessing(monkeypatch):
    """Count VolumePreprocessor calls per case id (the expensive step a cache hit must skip)."""
    calls: list[str] = []
    original = VolumePreprocessor.__call__

    def counting(self, entry):
        calls.append(str(entry["id"]))
        return original(self, entry)

    monkeypatch.setattr(VolumePreprocessor, "__call__", counting)
    return calls


def _case_files(cache: SliceCache) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted((cache.root / "cases").rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# cached slices == direct preprocessing
# ---------------------------------------------------------------------------------------------------------------
SOURCE_CASES = [
    pytest.param("synthetic", PARAMS, id="synthetic"),
    pytest.param("tiny", {"modalities": ["flair", "t1", "t1ce", "t2"], "image_size": 32}, id="tiny", marks=needs_tiny),
]


@pytest.mark.parametrize("source, params", SOURCE_CASES)
def test_cache_equals_direct_preprocessing(tmp_path, source, params):
    entries = _synthetic_cases(tmp_path / "data") if source == "synthetic" else _tiny_entries()
    cache = SliceCache(tmp_path / "cache", params)
    table = cache.build(entries, progress=False)
    assert list(table.columns) == list(SLICE_TABLE_COLUMNS)
    pre = VolumePreprocessor(**params)
    start = 0
    for entry in entries:
        direct = pre.slices(pre(entry))
        arrays = cache.arrays(entry["id"])
        assert arrays["image"].dtype == np.float16 and arrays["label"].dtype == np.uint8
        assert isinstance(arrays["image"], np.memmap)
        np.testing.assert_allclose(arrays["image"].astype(np.float32), direct.image, atol=FLOAT16_ATOL, rtol=0)
        np.testing.assert_array_equal(arrays["label"], direct.label)
        np.testing.assert_array_equal(arrays["brain"], direct.brain)
        rows = table.iloc[start : start + len(direct.table)].reset_index(drop=True)
        pd.testing.assert_frame_equal(rows, direct.table, check_dtype=False)
        start += len(direct.table)
        # the dataset serves exactly these slices
        ds = SliceDataset(cache, cache.table([entry["id"]]))
        for i in (0, len(ds) // 2, len(ds) - 1):
            np.testing.assert_allclose(ds[i]["image"].numpy(), direct.image[i], atol=FLOAT16_ATOL, rtol=0)
            np.testing.assert_array_equal(ds[i]["label"][0].numpy(), direct.label[i])
    assert start == len(table)
    assert table["label"].sum() > 0  # some lesion slices, so the label checks above are not vacuous


# ---------------------------------------------------------------------------------------------------------------
# reuse and invalidation
# ---------------------------------------------------------------------------------------------------------------
def test_second_build_reuses_cache(tmp_path, monkeypatch):
    entries = _synthetic_cases(tmp_path / "data")
    cache = SliceCache(tmp_path / "cache", VolumePreprocessor(**PARAMS))
    first = cache.build(entries, progress=False)
    files = _case_files(cache)
    assert len(files) == 5 * len(entries)  # image, label, brain, slices.csv, meta.json per case

    def fail(self, entry):
        raise AssertionError(f"case {entry['id']} was preprocessed again")

    monkeypatch.setattr(VolumePreprocessor, "__call__", fail)
    again = SliceCache(tmp_path / "cache", PARAMS)  # a new object with the same parameters, given as a dict
    assert again.root == cache.root
    assert all(again.is_current(e) for e in entries)
    second = again.build(entries, progress=False)
    pd.testing.assert_frame_equal(first, second)
    assert _case_files(again) == files  # nothing rewritten


SOURCE_CHANGES = ["touch", "rewrite_label"]


@pytest.mark.parametrize("change", SOURCE_CHANGES)
def test_rebuild_when_a_source_file_changes(tmp_path, count_preprocessing, change):
    entries = _synthetic_cases(tmp_path / "data")
    cache = SliceCache(tmp_path / "cache", PARAMS)
    before = cache.build(entries, progress=False)
    assert sorted(count_preprocessing) == ["case0", "case1", "case2"]
    count_preprocessing.clear()
    target = entries[0]
    assert before.loc[before["case_id"] == "case0", "label"].sum() > 0
    if change == "touch":
        st = os.stat(target["image"][1])
        os.utime(target["image"][1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    else:  # the same file name now holds an empty segmentation
        seg = nib.load(target["label"])
        nib.save(nib.Nifti1Image(np.zeros(seg.shape, dtype=np.uint8), seg.affine), target["label"])
    assert not cache.is_current(target) and cache.is_current(entries[1])
    after = cache.build(entries, progress=False)
    assert count_preprocessing == ["case0"]
    rows = after["case_id"] == "case0"
    if change == "touch":
        pd.testing.assert_frame_equal(after, before)
    else:
        assert (after.loc[rows, "label"] == 0).all() and (after.loc[rows, "lesion_area"] == 0).all()
        assert not cache.arrays("case0")["label"].any()
        pd.testing.assert_frame_equal(after[~rows], before[~rows])


# parameter changes that must give another cache folder
PARAM_CHANGES = [
    {"image_size": 24},
    {"percentile": 95.0},
    {"scaling": "volume"},
    {"square_pad": False},
    {"min_brain_pixels": 30},
]


@pytest.mark.parametrize("change", PARAM_CHANGES)
def test_rebuild_when_preprocessing_changes(tmp_path, count_preprocessing, change):
    entries = _synthetic_cases(tmp_path / "data")[:1]
    first = SliceCache(tmp_path / "cache", PARAMS)
    first.build(entries, progress=False)
    second = SliceCache(tmp_path / "cache", {**PARAMS, **change})
    assert second.digest != first.digest and second.root != first.root
    assert not second.is_current(entries[0])
    second.build(entries, progress=False)
    assert count_preprocessing == ["case0", "case0"]
    assert first.is_current(entries[0]) and second.is_current(entries[0])  # both versions kept side by side
    a, b = first.arrays("case0")["image"], second.arrays("case0")["image"]
    size = change.get("image_size", SIZE)
    assert b.shape[1:] == (2, size, size)
    if a.shape == b.shape:
        assert not np.array_equal(a, b) or change == {"min_brain_pixels": 30}
    if "min_brain_pixels" in change:  # fewer edge slices kept
        assert len(second.table(["case0"])) < len(first.table(["case0"]))


def test_same_parameters_same_digest(tmp_path):
    a = SliceCache(tmp_path, VolumePreprocessor(**PARAMS))
    b = SliceCache(tmp_path, VolumePreprocessor.from_dict(VolumePreprocessor(**PARAMS).to_dict()))
    assert a.digest == b.digest and len(a.digest) == 12


# ---------------------------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------------------------
def _break(entry: dict, kind: str) -> str:
    """Damage one file of the entry; return its path."""
    path = entry["image"][1]
    if kind == "missing":
        os.remove(path)
    elif kind == "garbage":
        Path(path).write_bytes(b"\x00garbage, not gzip" * 50)
    elif kind == "constant":
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.full(img.shape, 7, dtype=np.int16), img.affine), path)
    else:
        raise AssertionError(kind)
    return path


BAD_KINDS = [("missing", "not found"), ("garbage", "cannot read"), ("constant", "constant")]


@pytest.mark.parametrize("kind, text", BAD_KINDS)
def test_bad_case_among_good_ones(tmp_path, count_preprocessing, kind, text):
    entries = _synthetic_cases(tmp_path / "data")
    bad_path = _break(entries[1], kind)
    cache = SliceCache(tmp_path / "cache", PARAMS)
    with pytest.raises(CacheBuildError) as info:
        cache.build(entries, progress=False)
    failures = info.value.failures
    assert list(failures) == ["case1"]
    assert text in failures["case1"] and bad_path in failures["case1"] and "\n" not in failures["case1"]
    assert "case1" in str(info.value) and bad_path in str(info.value)
    assert sorted(count_preprocessing) == ["case0", "case1", "case2"]  # the bad case did not stop the others
    assert cache.is_current(entries[0]) and cache.is_current(entries[2]) and not cache.is_current(entries[1])
    assert not cache.case_dir("case1").exists()

    count_preprocessing.clear()
    table = cache.build(entries, progress=False, on_error="skip")
    assert count_preprocessing == ["case1"]  # retried; the good ones come from the cache
    assert list(dict.fromkeys(table["case_id"])) == ["case0", "case2"]
    ds = SliceDataset(cache, table)
    assert {ds[i]["case_id"] for i in range(len(ds))} == {"case0", "case2"}


def test_build_argument_errors(tmp_path):
    entries = _synthetic_cases(tmp_path / "data", lesions=(1,), labelled=(True,))
    cache = SliceCache(tmp_path / "cache", PARAMS)
    with pytest.raises(ValueError, match="on_error"):
        cache.build(entries, on_error="ignore")
    with pytest.raises(ValueError, match="duplicate case ids"):
        cache.build(entries + entries, progress=False)
    with pytest.raises(KeyError, match="not in the slice cache"):
        cache.table(["nope"])


def test_atomic_write_leaves_no_temporary_folders(tmp_path, monkeypatch):
    entries = _synthetic_cases(tmp_path / "data")
    cache = SliceCache(tmp_path / "cache", PARAMS)
    cache.build(entries, progress=False)
    cases_dir = cache.root / "cases"
    assert sorted(p.name for p in cases_dir.iterdir()) == ["case0", "case1", "case2"]
    old_files = _case_files(cache)

    # a rebuild of case0 that dies while writing: the previous version stays whole, no temporary folder remains
    st = os.stat(entries[0]["label"])
    os.utime(entries[0]["label"], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    real_save = np.save

    def failing_save(file, arr, *args, **kwargs):
        if str(file).endswith("brain.npy"):
            raise OSError("No space left on device")
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(cache_module.np, "save", failing_save)
    with pytest.raises(CacheBuildError, match="No space left"):
        cache.build(entries, progress=False)
    assert sorted(p.name for p in cases_dir.iterdir()) == ["case0", "case1", "case2"]
    assert _case_files(cache) == old_files
    assert not cache.is_current(entries[0])

    monkeypatch.setattr(cache_module.np, "save", real_save)
    cache.build(entries, progress=False)
    assert sorted(p.name for p in cases_dir.iterdir()) == ["case0", "case1", "case2"]
    assert cache.is_current(entries[0])


def test_write_race_with_another_process(tmp_path, monkeypatch):
    """Several processes (e.g. DDP ranks) building one cache: losing the final rename is not a failure."""
    entries = _synthetic_cases(tmp_path / "data")[:1]
    ours, theirs = SliceCache(tmp_path / "cache", PARAMS), SliceCache(tmp_path / "cache", PARAMS)
    real_replace = os.replace
    raced = []

    def racing_replace(src, dst):
        if not raced and Path(dst) == ours.case_dir("case0"):
            raced.append(src)
            monkeypatch.setattr(os, "replace", real_replace)
            theirs.build(entries, progress=False)  # the other process renames its copy into place first
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", racing_replace)
    table = ours.build(entries, progress=False)
    assert raced
    pd.testing.assert_frame_equal(table, theirs.table(["case0"]))
    assert [p.name for p in (ours.root / "cases").iterdir()] == ["case0"]  # no temporary folder left behind
    assert ours.is_current(entries[0])
    assert len(ours.arrays("case0")["image"]) == len(table)


def test_source_changed_during_preprocessing_stays_out_of_date(tmp_path, monkeypatch):
    entries = _synthetic_cases(tmp_path / "data")[:1]
    original = VolumePreprocessor.__call__

    def preprocess_then_edit(self, entry):
        out = original(self, entry)
        st = os.stat(entry["label"])  # the label is edited while the case is being preprocessed
        os.utime(entry["label"], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        return out

    monkeypatch.setattr(VolumePreprocessor, "__call__", preprocess_then_edit)
    cache = SliceCache(tmp_path / "cache", PARAMS)
    cache.build(entries, progress=False)
    assert not cache.is_current(entries[0])  # the cached arrays predate the edit: rebuild next time


def test_single_modality_path_object(tmp_path):
    entry = _synthetic_cases(tmp_path / "data", lesions=(1,), labelled=(True,))[0]
    entry = {"id": "one", "image": Path(entry["image"][0]), "label": Path(entry["label"])}
    cache = SliceCache(tmp_path / "cache", {"modalities": ["flair"], "image_size": SIZE})
    table = cache.build([entry], progress=False)
    assert cache.is_current(entry) and len(table) > 0
    assert cache.arrays("one")["image"].shape[1:] == (1, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------------------------
# SliceDataset
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path) -> SliceDataset:
    # case0, case1 with a lesion, case2 healthy, case3 without a label file
    entries = _synthetic_cases(tmp_path / "data", lesions=(1, 2, 0, 1), labelled=(True, True, True, False))
    cache = SliceCache(tmp_path / "cache", PARAMS)
    return SliceDataset(cache, cache.build(entries, progress=False))


def test_slice_dataset_items(dataset):
    table = dataset.table
    assert len(dataset) == len(table) > 0
    labelled = table["case_id"] != "case3"
    assert set(table.loc[labelled, "label"]) == {0, 1}
    assert (table.loc[table["case_id"] == "case2", "label"] == 0).all()
    assert (table.loc[~labelled, "label"] == -1).all()
    np.testing.assert_array_equal(dataset.slice_labels, table["label"].to_numpy())
    for i in range(len(dataset)):
        item = dataset[i]
        assert set(item) == {"image", "label", "brain", "class_label", "case_id", "slice_index", "source_index"}
        assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == (2, SIZE, SIZE)
        assert item["label"].dtype == torch.float32 and tuple(item["label"].shape) == (1, SIZE, SIZE)
        assert item["brain"].dtype == torch.float32 and tuple(item["brain"].shape) == (1, SIZE, SIZE)
        assert item["class_label"].dtype == torch.int64 and item["class_label"].ndim == 0
        assert isinstance(item["case_id"], str) and isinstance(item["slice_index"], int)
        assert isinstance(item["source_index"], int)
        assert float(item["image"].min()) >= -1.0 and float(item["image"].max()) <= 1.0
        assert set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0}
        lesion_pixels = int(item["label"].sum())
        assert lesion_pixels == int(table["lesion_area"].iloc[i])
        assert int(item["brain"].sum()) == int(table["brain_area"].iloc[i])
        if item["case_id"] == "case3":
            assert int(item["class_label"]) == 0 and lesion_pixels == 0
        else:
            assert int(item["class_label"]) == int(lesion_pixels > 0) == int(table["label"].iloc[i])
        assert item["slice_index"] == int(table["slice_index"].iloc[i])
    # LPS files (case1, case3) flip only the in-plane axes: the axial index is the file's own
    np.testing.assert_array_equal(table["source_index"], table["slice_index"])


def test_slice_dataset_transform(dataset):
    ds = SliceDataset(dataset.cache, dataset.table, transform=lambda d: {**d, "image": d["image"] * 0 + 3})
    assert float(ds[0]["image"].max()) == 3.0


def test_slice_dataset_pickles(dataset):
    dataset[0]  # opens the memory maps
    assert dataset.cache._arrays
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.cache._arrays == {}
    for i in (0, len(dataset) - 1):
        np.testing.assert_array_equal(clone[i]["image"].numpy(), dataset[i]["image"].numpy())


# 'fork' is the Linux default; 'spawn' (macOS, Windows) sends the dataset to each worker pickled, and costs a few
# seconds of imports per worker
WORKER_CONTEXTS = ["fork", pytest.param("spawn", marks=pytest.mark.slow)]


@pytest.mark.parametrize("context", WORKER_CONTEXTS)
def test_dataloader_with_two_workers(dataset, context):
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2, multiprocessing_context=context)
    seen = {}
    for batch in loader:
        assert batch["image"].shape[1:] == (2, SIZE, SIZE) and batch["class_label"].dtype == torch.int64
        for j, (case, k) in enumerate(zip(batch["case_id"], batch["slice_index"].tolist())):
            seen[(case, k)] = (batch["image"][j], int(batch["class_label"][j]))
    expected = {(c, int(k)) for c, k in zip(dataset.table["case_id"], dataset.table["slice_index"])}
    assert set(seen) == expected
    for i in (0, len(dataset) // 2):
        item = dataset[i]
        image, label = seen[(item["case_id"], item["slice_index"])]
        np.testing.assert_array_equal(image.numpy(), item["image"].numpy())
        assert label == int(item["class_label"])


# ---------------------------------------------------------------------------------------------------------------
# datalist entry point
# ---------------------------------------------------------------------------------------------------------------
def test_from_datalist(tmp_path):
    root = tmp_path / "data"
    datalist = make_dataset(
        root, ANATOMY, splits={"training": 3, "validation": 1, "test": 0}, modalities=MODALITIES, seed=3
    )
    ds = SliceDataset.from_datalist(datalist, root, "training", tmp_path / "cache", PARAMS, progress=False)
    assert list(dict.fromkeys(ds.table["case_id"])) == [e["id"] for e in datalist["training"]]
    both = SliceDataset.from_datalist(
        datalist, root, ["training", "validation"], tmp_path / "cache", PARAMS, progress=False
    )
    assert len(both) > len(ds)
    with pytest.raises(ValueError, match="modalities"):
        SliceDataset.from_datalist(
            datalist, root, "training", tmp_path / "cache", {**PARAMS, "modalities": ["t2", "flair"]}, progress=False
        )
    datalist["training"][0].pop("label")
    with pytest.raises(ValueError, match="without a label"):
        SliceDataset.from_datalist(
            datalist, root, "training", tmp_path / "cache", PARAMS, progress=False, require_labels=True
        )


# ---------------------------------------------------------------------------------------------------------------
# parallel builds and bounded open files
# ---------------------------------------------------------------------------------------------------------------
def _cached_arrays(cache: SliceCache, case_ids) -> dict:
    return {(c, k): np.array(v) for c in case_ids for k, v in cache.arrays(c).items()}


def test_thread_pool_build_equals_serial_build(tmp_path, monkeypatch, count_preprocessing):
    # cases of different shapes: a transform keeping per-call state (SquarePad's size) shared by the threads could
    # pad one case to another's size, so each thread has a preprocessor of its own (checked below; the race itself
    # is too narrow to reproduce reliably)
    entries = _synthetic_cases(tmp_path / "data", lesions=(1, 0, 2, 1), labelled=(True,) * 4)
    for i, shape in enumerate([(30, 18, 12), (14, 26, 16), (22, 22, 10), (12, 30, 14)]):
        e = make_case(
            phantom_anatomy(shape, spacing=8.0), tmp_path / "data", f"shape{i}", modalities=MODALITIES, seed=i
        )
        entries.append(_absolute(e, tmp_path / "data"))
    serial = SliceCache(tmp_path / "serial", PARAMS)
    table = serial.build(entries, progress=False, num_workers=1)
    assert sorted(count_preprocessing) == sorted(e["id"] for e in entries)
    count_preprocessing.clear()
    pooled = SliceCache(tmp_path / "pooled", PARAMS)
    counting = VolumePreprocessor.__call__
    users: dict[int, set[int]] = {}

    def recording(self, entry):
        users.setdefault(id(self), set()).add(threading.get_ident())
        return counting(self, entry)

    monkeypatch.setattr(VolumePreprocessor, "__call__", recording)
    pd.testing.assert_frame_equal(pooled.build(entries, progress=False, num_workers=4), table)
    assert id(pooled.preprocessor) not in users and all(len(threads) == 1 for threads in users.values())
    assert sorted(count_preprocessing) == sorted(e["id"] for e in entries)  # each case once
    ids = [e["id"] for e in entries]
    a, b = _cached_arrays(serial, ids), _cached_arrays(pooled, ids)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_thread_pool_build_reports_failures_like_a_serial_one(tmp_path):
    entries = _synthetic_cases(tmp_path / "data", lesions=(1, 1, 0, 1), labelled=(True,) * 4)
    _break(entries[1], "garbage")
    _break(entries[3], "missing")
    cache = SliceCache(tmp_path / "cache", PARAMS)
    with pytest.raises(CacheBuildError) as info:
        cache.build(entries, progress=False, num_workers=3)
    assert list(info.value.failures) == ["case1", "case3"]  # in datalist order, whichever thread finished first
    assert cache.is_current(entries[0]) and cache.is_current(entries[2])


def test_unexpected_error_in_a_worker_thread_propagates(tmp_path, monkeypatch):
    entries = _synthetic_cases(tmp_path / "data")

    def bug(self, entry):
        raise AssertionError(f"a bug while preprocessing {entry['id']}")

    monkeypatch.setattr(VolumePreprocessor, "__call__", bug)
    with pytest.raises(AssertionError, match="a bug while preprocessing"):
        SliceCache(tmp_path / "cache", PARAMS).build(entries, progress=False, num_workers=2)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_open_memory_maps_are_bounded(tmp_path):
    entries = _synthetic_cases(tmp_path / "data", lesions=(1, 0, 1, 1, 0), labelled=(True,) * 5)
    SliceCache(tmp_path / "cache", PARAMS).build(entries, progress=False)
    cache = SliceCache(tmp_path / "cache", PARAMS, max_open_cases=2)
    ds = SliceDataset(cache, cache.table([e["id"] for e in entries]))
    before = _open_fds()
    reference = [ds[i]["image"].clone() for i in range(len(ds))]
    assert len(cache._arrays) == 2
    assert _open_fds() - before <= 3 * 2  # three maps per open case, whatever the number of cases
    for i in reversed(range(len(ds))):  # reopened on use, same content
        np.testing.assert_array_equal(ds[i]["image"].numpy(), reference[i].numpy())
    cases = list(dict.fromkeys(ds.table["case_id"]))
    assert list(cache._arrays) == [cases[1], cases[0]]  # the two most recently used, the latest last
    with pytest.raises(ValueError, match="max_open_cases"):
        SliceCache(tmp_path / "cache", PARAMS, max_open_cases=0)
    clone = pickle.loads(pickle.dumps(cache))  # as DataLoader workers under 'spawn' get it
    assert clone.max_open_cases == 2 and not clone._arrays
    np.testing.assert_array_equal(clone.arrays(cases[4])["image"], cache.arrays(cases[4])["image"])
