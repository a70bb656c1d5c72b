"""Tests for anofpdm_monai.data.datalist: layouts, patient-level splits, determinism, errors, loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anofpdm_monai.apps.datalist import main
from anofpdm_monai.data.datalist import (
    LAYOUTS,
    SPLITS,
    DatalistError,
    build_datalist,
    datalist_from_folder,
    detect_layout,
    load_datalist,
    split_counts,
    validate_datalist,
    write_datalist,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BRATS2021_CASE = SHARED_DATA / "brats2021" / "BraTS2021_00006"
BRATS2023_CASE = SHARED_DATA / "brats2023" / "BraTS-GLI-00001-000"
BRATS2023_MET = SHARED_DATA / "brats2023" / "BraTS-MET-00110-000"
needs_real_data = pytest.mark.skipif(
    not (BRATS2021_CASE.is_dir() and BRATS2023_CASE.is_dir()),
    reason=f"real MRI test data not found at {SHARED_DATA} (project-internal, absent on user machines)",
)

BRATS2021_MODALITIES = ["flair", "t1", "t1ce", "t2"]
BRATS2023_SPELLING = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}

# ATLAS v2.0 BIDS: (cohort, subject, session, has lesion mask); r001s001 and r002s005 have two sessions each
ATLAS_CASES = [
    ("R001", "sub-r001s001", "ses-1", True),
    ("R001", "sub-r001s001", "ses-2", True),
    ("R001", "sub-r001s002", "ses-1", True),
    ("R002", "sub-r002s005", "ses-1", True),
    ("R002", "sub-r002s005", "ses-2", False),
    ("R002", "sub-r002s007", "ses-1", True),
    ("R003", "sub-r003s001", "ses-1", False),
]
ATLAS_SPACE = "space-MNI152NLin2009aSym"

# (number of patients, split fractions, expected (training, validation, test) counts): largest-remainder rounding
SPLIT_SIZE_CASES = [
    (1, (0.75, 0.05, 0.20), (1, 0, 0)),
    (2, (0.75, 0.05, 0.20), (2, 0, 0)),
    (3, (0.75, 0.05, 0.20), (2, 0, 1)),
    (4, (0.75, 0.05, 0.20), (3, 0, 1)),
    (7, (0.75, 0.05, 0.20), (5, 0, 2)),
    (10, (0.75, 0.05, 0.20), (8, 0, 2)),
    (20, (0.75, 0.05, 0.20), (15, 1, 4)),
    (5, (0.5, 0.25, 0.25), (3, 1, 1)),
    (4, (1 / 3, 1 / 3, 1 / 3), (2, 1, 1)),
    (10, (0.8, 0.1, 0.1), (8, 1, 1)),
    (3, (0.0, 0.0, 1.0), (0, 0, 3)),
]

# (requested modalities, expected canonical modalities, expected BraTS 2023 file spellings)
BRATS2023_MODALITY_CASES = [
    (None, ["flair", "t1", "t1ce", "t2"], ["t2f", "t1n", "t1c", "t2w"]),
    (["flair", "t2"], ["flair", "t2"], ["t2f", "t2w"]),
    (["t2w", "t2f"], ["t2", "flair"], ["t2w", "t2f"]),
    (["T1C", "t1n"], ["t1ce", "t1"], ["t1c", "t1n"]),
]

BAD_SPLITS = [(0.5, 0.5, 0.5), (0.8, 0.2), (1.2, -0.1, -0.1), (0.5, float("nan"), 0.5), ("a", "b", "c")]


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _make_brats2021(root: Path, ids: list[int], with_seg: bool = True) -> Path:
    for i in ids:
        case = f"BraTS2021_{i:05d}"
        for name in BRATS2021_MODALITIES + (["seg"] if with_seg else []):
            _touch(root / case / f"{case}_{name}.nii.gz")
    return root


def _make_brats2023(root: Path, cases: list[str]) -> Path:
    for case in cases:
        for spelling in BRATS2023_SPELLING.values():
            _touch(root / case / f"{case}-{spelling}.nii.gz")
    return root


def _make_atlas(root: Path) -> Path:
    for cohort, subject, session, has_mask in ATLAS_CASES:
        anat = root / "ATLAS_2" / "Training" / cohort / subject / session / "anat"
        prefix = f"{subject}_{session}_{ATLAS_SPACE}"
        _touch(anat / f"{prefix}_T1w.nii.gz")
        if has_mask:
            _touch(anat / f"{prefix}_label-L_desc-T1lesion_mask.nii.gz")
    return root


def _ids(entries: list[dict]) -> list[str]:
    return [entry["id"] for entry in entries]


def _assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ----------------------------------------------------------------------------------------------------------------
# real data (symlinks into ../shared/data)
# ----------------------------------------------------------------------------------------------------------------


@needs_real_data
def test_cli_brats2021_real(tmp_path, capsys):
    root = tmp_path / "BraTS2021_TrainingData"
    root.mkdir()
    (root / BRATS2021_CASE.name).symlink_to(BRATS2021_CASE, target_is_directory=True)  # a symlinked case folder
    for i in (7, 8, 9):  # three more cases made of file symlinks to the same volumes; 00009 has no segmentation
        case = f"BraTS2021_{i:05d}"
        (root / case).mkdir()
        for name in BRATS2021_MODALITIES + (["seg"] if i != 9 else []):
            (root / case / f"{case}_{name}.nii.gz").symlink_to(BRATS2021_CASE / f"BraTS2021_00006_{name}.nii.gz")
    output = tmp_path / "lists" / "brats2021.json"

    assert main(["brats2021", "--root", str(root), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "training: 3, validation: 0, test: 1 (patients: 4)" in printed
    assert str(output) in printed

    datalist = load_datalist(output)
    assert datalist["modalities"] == BRATS2021_MODALITIES
    assert datalist["name"] == "BraTS2021" and datalist["layout"] == "brats2021"
    assert split_counts(datalist) == {"training": 3, "validation": 0, "test": 1}
    entries = {e["id"]: e for split in SPLITS for e in datalist[split]}
    assert sorted(entries) == ["BraTS2021_00006", "BraTS2021_00007", "BraTS2021_00008", "BraTS2021_00009"]
    assert entries["BraTS2021_00006"]["image"] == [
        f"BraTS2021_00006/BraTS2021_00006_{m}.nii.gz" for m in BRATS2021_MODALITIES
    ]
    assert entries["BraTS2021_00006"]["label"] == "BraTS2021_00006/BraTS2021_00006_seg.nii.gz"
    assert "label" not in entries["BraTS2021_00009"]
    # the relative paths resolve against the root to the real volumes
    loaded = load_datalist(output, dataset_dir=root)
    for split in SPLITS:
        for entry in loaded[split]:
            assert all(Path(p).is_file() for p in entry["image"])


@needs_real_data
def test_cli_brats2023_real(tmp_path, capsys):
    root = tmp_path / "BraTS2023"
    root.mkdir()
    (root / BRATS2023_CASE.name).symlink_to(BRATS2023_CASE, target_is_directory=True)
    # a second timepoint of the same patient (-001) and another patient, as file symlinks to the real volumes
    for case in ("BraTS-GLI-00001-001", "BraTS-MET-00002-000"):
        (root / case).mkdir()
        for spelling in BRATS2023_SPELLING.values():
            (root / case / f"{case}-{spelling}.nii.gz").symlink_to(
                BRATS2023_CASE / f"{BRATS2023_CASE.name}-{spelling}.nii.gz"
            )
    output = tmp_path / "brats2023.json"

    argv = ["brats2023", "--root", str(root), "--output", str(output), "--modalities", "t2f", "t2"]
    assert main(argv + ["--split", "0.5", "0", "0.5"]) == 0
    assert "(patients: 2)" in capsys.readouterr().out

    datalist = load_datalist(output)
    assert datalist["modalities"] == ["flair", "t2"]  # canonical names, whichever spelling was asked for
    assert datalist["split_fractions"] == [0.5, 0.0, 0.5]
    assert split_counts(datalist) in (
        {"training": 2, "validation": 0, "test": 1},
        {"training": 1, "validation": 0, "test": 2},
    )
    entries = {e["id"]: (split, e) for split in SPLITS for e in datalist[split]}
    assert entries["BraTS-GLI-00001-000"][0] == entries["BraTS-GLI-00001-001"][0]  # same patient, same split
    entry = entries["BraTS-GLI-00001-000"][1]
    assert entry["image"] == [
        "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2f.nii.gz",
        "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2w.nii.gz",
    ]
    assert "label" not in entry  # this case has no segmentation


@needs_real_data
def test_cli_missing_modality_real(tmp_path, capsys):
    if not BRATS2023_MET.is_dir():
        pytest.skip(f"{BRATS2023_MET} not found")
    # the MET case folder follows the 2023 folder naming but its files do not (flair.nii.gz, t1.nii.gz, ...)
    root = tmp_path / "BraTS2023"
    root.mkdir()
    (root / BRATS2023_MET.name).symlink_to(BRATS2023_MET, target_is_directory=True)
    output = tmp_path / "out.json"
    assert main(["brats2023", "--root", str(root), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "BraTS-MET-00110-000-t2f.nii.gz" in err
    assert not output.exists()


# ----------------------------------------------------------------------------------------------------------------
# synthetic trees (empty placeholder files: the builder only reads names)
# ----------------------------------------------------------------------------------------------------------------


def test_atlas_layout(tmp_path):
    root = _make_atlas(tmp_path / "atlas")
    datalist = build_datalist("atlas2", root, split=(0.6, 0.2, 0.2), seed=3)
    assert datalist["modalities"] == ["t1w"]
    entries = {e["id"]: e for split in SPLITS for e in datalist[split]}
    assert sorted(entries) == sorted(f"{subject}_{session}" for _, subject, session, _ in ATLAS_CASES)
    prefix = f"ATLAS_2/Training/R001/sub-r001s001/ses-2/anat/sub-r001s001_ses-2_{ATLAS_SPACE}"
    assert entries["sub-r001s001_ses-2"]["image"] == [f"{prefix}_T1w.nii.gz"]
    assert entries["sub-r001s001_ses-2"]["label"] == f"{prefix}_label-L_desc-T1lesion_mask.nii.gz"
    assert "label" not in entries["sub-r002s005_ses-2"]
    assert "label" not in entries["sub-r003s001_ses-1"]
    # 5 patients at (0.6, 0.2, 0.2) -> 3, 1, 1 patients
    patients = {split: {e["id"].split("_ses-")[0] for e in datalist[split]} for split in SPLITS}
    assert [len(patients[s]) for s in SPLITS] == [3, 1, 1]
    for split in SPLITS:
        assert _ids(datalist[split]) == sorted(_ids(datalist[split]))


@pytest.mark.parametrize("seed", range(12))
def test_atlas_patient_level_split(tmp_path, seed):
    datalist = build_datalist("atlas2", _make_atlas(tmp_path), split=(0.4, 0.2, 0.4), seed=seed)
    owner: dict[str, str] = {}
    for split in SPLITS:
        for entry in datalist[split]:
            subject = entry["id"].split("_ses-")[0]
            assert owner.setdefault(subject, split) == split, f"{subject} in {owner[subject]} and {split}"
    assert len(owner) == 5
    assert sum(split_counts(datalist).values()) == len(ATLAS_CASES)


def test_determinism(tmp_path):
    root = _make_atlas(tmp_path / "atlas")
    texts = []
    for i, seed in enumerate((0, 0)):
        write_datalist(build_datalist("atlas2", root, seed=seed), tmp_path / f"same{i}.json")
        texts.append((tmp_path / f"same{i}.json").read_bytes())
    assert texts[0] == texts[1]
    # the CLI writes the same bytes as build + write
    assert main(["atlas2", "--root", str(root), "--output", str(tmp_path / "cli.json")]) == 0
    assert (tmp_path / "cli.json").read_bytes() == texts[0]
    # other seeds give other splits (not necessarily every one, but some)
    others = {json.dumps(build_datalist("atlas2", root, seed=s)["test"]) for s in range(1, 8)}
    assert len(others - {json.dumps(json.loads(texts[0])["test"])}) > 0
    assert len(others) > 1


@pytest.mark.parametrize("n, fractions, expected", SPLIT_SIZE_CASES)
def test_largest_remainder_counts(tmp_path, n, fractions, expected):
    root = _make_brats2021(tmp_path, list(range(n)))
    datalist = build_datalist("brats2021", root, split=fractions, seed=1)
    assert tuple(split_counts(datalist).values()) == expected
    assert datalist["split_fractions"] == [float(f) for f in fractions]


def test_brats2021_modality_subset_and_nii(tmp_path):
    root = tmp_path / "brats"
    case = root / "nested" / "BraTS2021_00042"
    for name in ("flair", "t2"):  # only the requested modalities need to exist; .nii is accepted
        _touch(case / f"BraTS2021_00042_{name}.nii")
    datalist = build_datalist("brats2021", root, modalities=["t2", "FLAIR"])
    assert datalist["modalities"] == ["t2", "flair"]
    (entry,) = datalist["training"]
    assert entry == {
        "id": "BraTS2021_00042",
        "image": ["nested/BraTS2021_00042/BraTS2021_00042_t2.nii", "nested/BraTS2021_00042/BraTS2021_00042_flair.nii"],
    }


@pytest.mark.parametrize("requested, canonical, spellings", BRATS2023_MODALITY_CASES)
def test_brats2023_modality_aliases(tmp_path, requested, canonical, spellings):
    case = "BraTS-PED-00012-000"
    root = _make_brats2023(tmp_path, [case])
    _touch(root / case / f"{case}-seg.nii.gz")
    datalist = build_datalist("brats2023", root, modalities=requested)
    assert datalist["modalities"] == canonical
    (entry,) = datalist["training"]
    assert entry["image"] == [f"{case}/{case}-{s}.nii.gz" for s in spellings]
    assert entry["label"] == f"{case}/{case}-seg.nii.gz"


@pytest.mark.parametrize(
    "make, layout",
    [
        (lambda p: _make_brats2021(p, [1, 2]), "brats2021"),
        (lambda p: _make_brats2023(p, ["BraTS-SSA-00002-000"]), "brats2023"),
        (_make_atlas, "atlas2"),
    ],
)
def test_detect_layout_and_from_folder(tmp_path, make, layout):
    root = make(tmp_path / "data")
    assert detect_layout(root) == layout
    datalist = datalist_from_folder(root)
    assert datalist["layout"] == layout
    assert datalist["training"] == [] and datalist["validation"] == []
    reference = build_datalist(layout, root)
    every = sorted((e for split in SPLITS for e in reference[split]), key=lambda e: e["id"])
    assert _ids(datalist["test"]) == _ids(every)
    for entry in datalist["test"]:  # joined onto the root, ready to load
        assert all(Path(p).is_file() for p in entry["image"])
    relative = datalist_from_folder(root, layout=layout, relative=True)
    assert relative["test"] == every


def test_write_datalist_atomic(tmp_path):
    datalist = build_datalist("brats2021", _make_brats2021(tmp_path / "data", [1, 2, 3]))
    target = tmp_path / "a" / "b" / "list.json"
    write_datalist(datalist, target)
    write_datalist(datalist, target)  # overwrite in place
    assert json.loads(target.read_text()) == datalist
    assert sorted(os.listdir(target.parent)) == ["list.json"]  # no temporary file left behind
    with pytest.raises(DatalistError) as error:
        write_datalist({"modalities": ["flair"]}, tmp_path / "bad.json")
    _assert_one_line(error, "bad.json", "training")
    assert not (tmp_path / "bad.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# errors: one line naming the file, folder or key
# ----------------------------------------------------------------------------------------------------------------

VALID_ENTRY = {"id": "case_1", "image": ["case_1/flair.nii.gz", "case_1/t2.nii.gz"], "label": "case_1/seg.nii.gz"}

# (datalist, fragments the message must contain)
INVALID_DATALISTS = [
    ({"modalities": ["flair", "t2"], "training": [], "validation": []}, ["test", "required"]),
    ({"modalities": [], "training": [], "validation": [], "test": []}, ["modalities"]),
    ({"modalities": ["flair", "flair"], "training": [], "validation": [], "test": []}, ["modalities"]),
    (
        {"modalities": ["flair", "t2"], "training": [VALID_ENTRY], "validation": [], "test": [VALID_ENTRY]},
        ["duplicate id", "case_1", "test[0]", "training[0]"],
    ),
    (
        {
            "modalities": ["flair", "t2"],
            "training": [{"id": "c", "image": ["c/flair.nii.gz"]}],
            "validation": [],
            "test": [],
        },
        ["training[0]", "'c'", "1 path", "expected 2"],
    ),
    (
        {"modalities": ["flair"], "training": [], "validation": [{"id": "c", "image": "c/flair.nii.gz"}], "test": []},
        ["validation[0]", "'image'"],
    ),
    (
        {"modalities": ["flair"], "training": [], "validation": [], "test": [{"id": 7, "image": ["x.nii.gz"]}]},
        ["test[0]", "'id'", "non-empty string", "7"],
    ),
    (
        {"modalities": ["flair"], "training": [], "validation": [], "test": [{"id": "", "image": ["x.nii.gz"]}]},
        ["test[0]", "'id'", "non-empty string"],
    ),
    (
        {
            "modalities": ["flair"],
            "training": [{"id": "c", "image": ["x.nii.gz"], "label": 3}],
            "validation": [],
            "test": [],
        },
        ["training[0]", "'label'"],
    ),
    ({"modalities": ["flair"], "training": {}, "validation": [], "test": []}, ["'training'", "list"]),
    ([], ["JSON object"]),
]


@pytest.mark.parametrize("datalist, fragments", INVALID_DATALISTS)
def test_validate_datalist_errors(datalist, fragments):
    with pytest.raises(DatalistError) as error:
        validate_datalist(datalist, source="lists/my.json")
    _assert_one_line(error, "lists/my.json", *fragments)


def test_validate_datalist_leaves_unsafe_ids_to_fail_alone():
    """An id that cannot name output files does not refuse the datalist (docs/reliability.md: a bad case fails alone,
    where it is used; tests/test_inputs.py runs them)."""
    entries = [{"id": i, "image": ["x.nii.gz"]} for i in ("a/b", "café", "ok\n", "x" * 300, "good")]
    datalist = {"modalities": ["flair"], "training": [], "validation": [], "test": entries}
    assert validate_datalist(datalist) is datalist


def test_validate_datalist_accepts_extras():
    datalist = {
        "name": "x",
        "extra": {"anything": 1},
        "modalities": ["flair", "t2"],
        "training": [dict(VALID_ENTRY, brain_mask="case_1/mask.nii.gz", image_label=1)],
        "validation": [],
        "test": [],
    }
    assert validate_datalist(datalist) is datalist


def test_missing_modality_file(tmp_path):
    root = _make_brats2021(tmp_path / "data", [1, 2])
    missing = root / "BraTS2021_00002" / "BraTS2021_00002_t1ce.nii.gz"
    missing.unlink()
    with pytest.raises(DatalistError) as error:
        build_datalist("brats2021", root)
    _assert_one_line(error, str(missing))
    # a subset without the missing modality still builds
    assert len(build_datalist("brats2021", root, modalities=["flair", "t2"])["training"]) == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_or_unrecognised_folder(tmp_path, layout):
    _touch(tmp_path / "notes" / "readme.txt")
    _touch(tmp_path / "BraTS2021_00001_flair.nii.gz")  # a file, not a case folder
    with pytest.raises(DatalistError) as error:
        build_datalist(layout, tmp_path)
    _assert_one_line(error, f"no {layout} cases under {tmp_path}", "expected")
    with pytest.raises(DatalistError) as error:
        detect_layout(tmp_path)
    _assert_one_line(error, str(tmp_path))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_root(tmp_path, layout):
    with pytest.raises(DatalistError) as error:
        build_datalist(layout, tmp_path / "nowhere")
    _assert_one_line(error, str(tmp_path / "nowhere"), "not a directory")


def test_unknown_layout_and_modality(tmp_path):
    with pytest.raises(DatalistError) as error:
        build_datalist("brats2019", tmp_path)
    _assert_one_line(error, "brats2019", *LAYOUTS)
    with pytest.raises(DatalistError) as error:
        datalist_from_folder(tmp_path, layout="brats2019")
    _assert_one_line(error, "brats2019")
    root = _make_brats2021(tmp_path / "data", [1])
    with pytest.raises(DatalistError) as error:
        build_datalist("brats2021", root, modalities=["flair", "dwi"])
    _assert_one_line(error, "'dwi'", *BRATS2021_MODALITIES)
    with pytest.raises(DatalistError) as error:
        build_datalist("brats2021", root, modalities=["flair", "FLAIR"])
    _assert_one_line(error, "twice")


def test_ambiguous_layout(tmp_path):
    _make_brats2021(tmp_path / "a", [1])
    _make_brats2023(tmp_path / "b", ["BraTS-GLI-00003-000"])
    with pytest.raises(DatalistError) as error:
        detect_layout(tmp_path)
    _assert_one_line(error, str(tmp_path), "brats2021", "brats2023")


def test_duplicate_case_folders(tmp_path):
    _make_brats2021(tmp_path / "train", [5])
    _make_brats2021(tmp_path / "copy", [5])
    with pytest.raises(DatalistError) as error:
        build_datalist("brats2021", tmp_path)
    _assert_one_line(error, "BraTS2021_00005", str(tmp_path / "copy"), str(tmp_path / "train"))


@pytest.mark.parametrize("split", BAD_SPLITS)
def test_bad_split_fractions(tmp_path, split):
    root = _make_brats2021(tmp_path, [1, 2])
    with pytest.raises(DatalistError) as error:
        build_datalist("brats2021", root, split=split)
    _assert_one_line(error, "split fractions")


def test_cli_errors(tmp_path, capsys):
    root = _make_brats2021(tmp_path / "data", [1])
    output = tmp_path / "out.json"
    cases = [
        (["brats2020", "--root", str(root)], "brats2020"),
        (["brats2021", "--root", str(root), "--split", "0.5", "0.5", "0.5"], "split fractions"),
        (["atlas2", "--root", str(root)], f"no atlas2 cases under {root}"),
    ]
    for argv, fragment in cases:
        assert main(argv + ["--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err
    assert not output.exists()


def test_cli_module_entry_point(tmp_path):
    root = _make_brats2021(tmp_path / "data", [1, 2])
    output = tmp_path / "out.json"
    command = [sys.executable, "-W", "error::RuntimeWarning", "-m", "anofpdm_monai.apps.datalist", "brats2021"]
    result = subprocess.run(
        command + ["--root", str(root), "--output", str(output), "--seed", "4"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "(patients: 2)" in result.stdout
    assert load_datalist(output)["seed"] == 4


@pytest.mark.parametrize("content", ["", "{not json", '{"modalities": ["flair"]}', "\xff\xfe"])
def test_load_invalid_file(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DatalistError) as error:
        load_datalist(path)
    _assert_one_line(error, str(path))


def test_load_missing_file(tmp_path):
    with pytest.raises(DatalistError) as error:
        load_datalist(tmp_path / "absent.json")
    _assert_one_line(error, str(tmp_path / "absent.json"))


# ----------------------------------------------------------------------------------------------------------------
# loading: path joining and split filtering
# ----------------------------------------------------------------------------------------------------------------

LOAD_DATALIST = {
    "name": "toy",
    "modalities": ["flair", "t2"],
    "training": [
        {
            "id": "a",
            "image": ["a/flair.nii.gz", "/abs/a_t2.nii.gz"],
            "label": "a/seg.nii.gz",
            "brain_mask": "/abs/a_mask.nii.gz",
        }
    ],
    "validation": [{"id": "b", "image": ["b/flair.nii.gz", "b/t2.nii.gz"]}],
    "test": [{"id": "c", "image": ["c/flair.nii.gz", "c/t2.nii.gz"], "brain_mask": "c/mask.nii.gz"}],
}

# (splits argument, split keys kept)
LOAD_SPLIT_CASES = [
    (None, ["training", "validation", "test"]),
    ("test", ["test"]),
    (["training", "validation"], ["training", "validation"]),
    (("validation",), ["validation"]),
]


@pytest.mark.parametrize("splits, kept", LOAD_SPLIT_CASES)
def test_load_datalist_join_and_filter(tmp_path, splits, kept):
    path = tmp_path / "toy.json"
    write_datalist(LOAD_DATALIST, path)
    dataset = tmp_path / "dataset"
    loaded = load_datalist(path, dataset_dir=dataset, splits=splits)
    assert [s for s in SPLITS if s in loaded] == kept
    assert loaded["name"] == "toy" and loaded["modalities"] == ["flair", "t2"]
    expected = {
        "a": {
            "image": [str(dataset / "a/flair.nii.gz"), "/abs/a_t2.nii.gz"],
            "label": str(dataset / "a/seg.nii.gz"),
            "brain_mask": "/abs/a_mask.nii.gz",
        },
        "b": {"image": [str(dataset / "b/flair.nii.gz"), str(dataset / "b/t2.nii.gz")]},
        "c": {
            "image": [str(dataset / "c/flair.nii.gz"), str(dataset / "c/t2.nii.gz")],
            "brain_mask": str(dataset / "c/mask.nii.gz"),
        },
    }
    for split in kept:
        for entry in loaded[split]:
            assert {k: v for k, v in entry.items() if k != "id"} == expected[entry["id"]]
    assert split_counts(loaded) == {s: 1 for s in kept}
    # the source dict and the file are untouched
    assert load_datalist(path) == LOAD_DATALIST
    assert LOAD_DATALIST["training"][0]["image"][0] == "a/flair.nii.gz"


def test_load_datalist_without_dataset_dir_keeps_paths(tmp_path):
    path = tmp_path / "toy.json"
    write_datalist(LOAD_DATALIST, path)
    loaded = load_datalist(path)
    assert loaded == LOAD_DATALIST and loaded is not LOAD_DATALIST


def test_load_datalist_unknown_split(tmp_path):
    path = tmp_path / "toy.json"
    write_datalist(LOAD_DATALIST, path)
    with pytest.raises(DatalistError) as error:
        load_datalist(path, splits=["train"])
    _assert_one_line(error, str(path), "'train'")
