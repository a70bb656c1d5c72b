"""Datalists: which MRI cases exist, which files hold their modalities, and how patients are split.

A datalist is one JSON file in the MONAI decathlon style::

    {
      "name": "BraTS2021", "layout": "brats2021", "seed": 0, "split_fractions": [0.75, 0.05, 0.2],
      "modalities": ["flair", "t1", "t1ce", "t2"],
      "training": [{"id": "BraTS2021_00000",
                    "image": ["BraTS2021_00000/BraTS2021_00000_flair.nii.gz", "..."],
                    "label": "BraTS2021_00000/BraTS2021_00000_seg.nii.gz"}],
      "validation": [],
      "test": []
    }

``modalities`` orders the channels; each entry's ``image`` holds one path per modality in that order, relative to
a dataset root (POSIX separators). ``label`` (anomaly = ``label > 0``) and ``brain_mask`` are optional. Entry ids
are unique strings; an id that is not filesystem-safe (:func:`case_id_problem`: letters, digits, ``_ . + -``, no
leading dot, at most :data:`MAX_CASE_ID_LENGTH` characters) does not refuse the datalist: that case fails alone
where it is used, before any of its files is read. Only ``modalities``, ``training``, ``validation`` and ``test``
are required.

:func:`build_datalist` scans a dataset folder (BraTS 2021, BraTS 2023 or ATLAS v2.0 BIDS) and splits it at the
patient level, deterministically for a seed; :func:`load_datalist` reads one back, joined onto a dataset folder.
Command line::

    python -m anofpdm_monai.apps.datalist brats2021 --root /data/BraTS2021 --output data_lists/brats2021.json

MONAI's ``load_decathlon_datalist`` is not used: it requires ``image`` to be a path string per entry and has no
notion of modality order, patient-level splits or one-line errors.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import write_text

logger = logging.getLogger(__name__)

__all__ = [
    "DatalistError",
    "LAYOUTS",
    "SPLITS",
    "build_datalist",
    "case_id_problem",
    "is_safe_case_id",
    "MAX_CASE_ID_LENGTH",
    "MAX_DATALIST_BYTES",
    "write_datalist",
    "patient_id",
    "validate_datalist",
    "load_datalist",
    "detect_layout",
    "datalist_from_folder",
    "split_counts",
]

LAYOUTS = ("brats2021", "brats2023", "atlas2")
"""Dataset folder layouts that :func:`build_datalist` understands."""

SPLITS = ("training", "validation", "test")
"""The split keys of a datalist, in the order of ``split_fractions``."""

_REQUIRED_KEYS = ("modalities",) + SPLITS
_PATH_KEYS = ("label", "brain_mask")
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")  # always fullmatch: "$" would let a trailing newline pass
_NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: the file-name limit of common filesystems (ext4, XFS, APFS, NTFS: 255 bytes)
_NAME_MAX = 255
#: the longest name a case's id starts: ``<id>_anomaly_mask.nii.gz`` written through its temporary name
#: ``.<id>_anomaly_mask.nii.gz.<8 random characters>.nii.gz`` (anofpdm_monai/io.py ``atomic_path``)
_LONGEST_NAME = "." + "_anomaly_mask.nii.gz" + "." + "x" * 8 + ".nii.gz"
MAX_CASE_ID_LENGTH = _NAME_MAX - len(_LONGEST_NAME)
"""The longest case id (characters = bytes: ids are ASCII) whose output file names fit the 255-byte limit."""
MAX_DATALIST_BYTES = 64 * 2**20
"""A datalist file larger than this is refused as the wrong file (64 MB: ~200 000 BraTS entries; BraTS 2021 has
1251)."""


def case_id_problem(case_id: Any) -> str | None:
    """Why a case id cannot name a case's folder and output files (one line), or None when it can.

    A usable id is a string of letters, digits and ``_ . + -`` (ASCII; no leading dot, no whitespace or newline) of
    at most :data:`MAX_CASE_ID_LENGTH` characters, so that ``<id>_anomaly_mask.nii.gz`` and its temporary name fit
    the 255-byte file-name limit.
    """
    if not isinstance(case_id, str) or not case_id:
        return f"case id {case_id!r} must be a non-empty string"
    if not _SAFE_ID.fullmatch(case_id):
        return f"case id {case_id!r} is not filesystem-safe (letters, digits, '_', '.', '+', '-'; no leading '.')"
    if len(case_id) > MAX_CASE_ID_LENGTH:
        return (
            f"case id {case_id[:40]}... is {len(case_id)} characters long: its output file names "
            f"(<id>_anomaly_mask.nii.gz and its temporary name) would exceed the {_NAME_MAX}-byte file-name limit "
            f"(at most {MAX_CASE_ID_LENGTH})"
        )
    return None


def is_safe_case_id(case_id: Any) -> bool:
    """A case id usable as a folder and file name prefix (:func:`case_id_problem` finds nothing)."""
    return case_id_problem(case_id) is None


_DATASET_NAMES = {"brats2021": "BraTS2021", "brats2023": "BraTS2023", "atlas2": "ATLAS2"}

# canonical modality name -> the spelling used in that layout's file names, in default channel order
_FILE_MODALITIES = {
    "brats2021": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
    "brats2023": {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"},
    "atlas2": {"t1w": "T1w"},
}

# matched with fullmatch (a "$" would accept a folder name with a trailing newline); a name that matches only once
# stripped of surrounding whitespace is still taken as a case folder, to be reported as unusable
_CASE_DIR = {
    "brats2021": re.compile(r"BraTS2021_\d+"),
    "brats2023": re.compile(r"BraTS-[A-Za-z]+-\d+-\d+"),
}

_EXPECTED = {
    "brats2021": "BraTS2021_xxxxx/BraTS2021_xxxxx_flair.nii.gz ...",
    "brats2023": "BraTS-GLI-xxxxx-xxx/BraTS-GLI-xxxxx-xxx-t2f.nii.gz ...",
    "atlas2": "sub-*/ses-*/anat/sub-*_ses-*_T1w.nii.gz",
}

_ATLAS_LESION_SUFFIX = "_label-L_desc-T1lesion_mask"


class DatalistError(ValueError):
    """A datalist or dataset folder that cannot be used; the message is one line naming the file, folder or key."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


# ----------------------------------------------------------------------------------------------------------------
# validation, reading and writing
# ----------------------------------------------------------------------------------------------------------------


def validate_datalist(datalist: dict, source: str = "<datalist>") -> dict:
    """Check the structure of a datalist.

    Checks the required keys (``modalities``, ``training``, ``validation``, ``test``), that ``modalities`` is a
    non-empty list of distinct names, that every entry has a non-empty string ``id`` unique across all splits, an
    ``image`` list with one non-empty path per modality, and non-empty string ``label`` / ``brain_mask`` where
    present. Files are not checked for existence. Extra top-level and entry keys are allowed. An id that is not
    filesystem-safe (:func:`case_id_problem`) is not refused here: that case fails alone where it is used.

    Args:
        datalist: the datalist dictionary.
        source: how to name the datalist in error messages (usually its file path).

    Returns:
        ``datalist`` itself, unchanged.

    Raises:
        DatalistError: on the first problem found, naming ``source`` and the key at fault.
    """
    if not isinstance(datalist, dict):
        raise DatalistError(f"{source}: expected a JSON object at the top level, got {type(datalist).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in datalist]
    if missing:
        raise DatalistError(f"{source}: missing required key(s) {missing} (required: {list(_REQUIRED_KEYS)})")
    modalities = datalist["modalities"]
    if (
        not isinstance(modalities, list)
        or not modalities
        or not all(isinstance(m, str) and m for m in modalities)
        or len(set(modalities)) != len(modalities)
    ):
        raise DatalistError(f"{source}: 'modalities' must be a non-empty list of distinct names, got {modalities!r}")
    seen: dict[str, str] = {}
    for split in SPLITS:
        entries = datalist[split]
        if not isinstance(entries, list):
            raise DatalistError(f"{source}: '{split}' must be a list of entries, got {type(entries).__name__}")
        for index, entry in enumerate(entries):
            where = f"{source}: {split}[{index}]"
            if not isinstance(entry, dict):
                raise DatalistError(f"{where}: expected an object with 'id' and 'image', got {type(entry).__name__}")
            case_id = entry.get("id")
            if not isinstance(case_id, str) or not case_id:
                raise DatalistError(f"{where}: 'id' must be a non-empty string, got {case_id!r}")
            where = f"{where} ('{case_id}')"
            if case_id in seen:
                raise DatalistError(f"{where}: duplicate id, already used in {seen[case_id]}")
            seen[case_id] = f"{split}[{index}]"
            image = entry.get("image")
            if not isinstance(image, list) or not all(isinstance(p, str) and p for p in image):
                raise DatalistError(f"{where}: 'image' must be a list of file paths, one per modality, got {image!r}")
            if len(image) != len(modalities):
                raise DatalistError(
                    f"{where}: 'image' has {len(image)} path(s), expected {len(modalities)} "
                    f"(one per modality in {modalities})"
                )
            for key in _PATH_KEYS:
                if key in entry and not (isinstance(entry[key], str) and entry[key]):
                    raise DatalistError(f"{where}: '{key}' must be a file path, got {entry[key]!r}")
    return datalist


def write_datalist(datalist: dict, path: str | os.PathLike) -> None:
    """Validate a datalist and write it as JSON (indent 2), atomically.

    The JSON goes to a temporary file in the destination folder, which then replaces ``path`` (``os.replace``),
    so readers never see a partial file. Parent folders are created. The same datalist always gives the same bytes.

    Args:
        datalist: the datalist dictionary (see :func:`validate_datalist`).
        path: destination JSON file.

    Raises:
        DatalistError: if the datalist is invalid, not JSON-serialisable, or the file cannot be written.
    """
    path = Path(path).expanduser()
    validate_datalist(datalist, source=str(path))
    try:
        text = json.dumps(datalist, indent=2, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as e:
        raise DatalistError(f"{path}: datalist is not JSON-serialisable: {e}") from e
    try:
        write_text(path, text)
    except OSError as e:
        raise DatalistError(f"cannot write datalist {path}: {e}") from e


def _join(dataset_dir: Path, file: str) -> str:
    return file if os.path.isabs(file) else str(dataset_dir / file)


def _as_splits(splits: str | Sequence[str], source: str) -> list[str]:
    names = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in names if s not in SPLITS]
    if unknown:
        raise DatalistError(f"{source}: unknown split(s) {unknown}, expected some of {list(SPLITS)}")
    return names


def load_datalist(
    path: str | os.PathLike | Mapping,
    dataset_dir: str | os.PathLike | None = None,
    splits: str | Sequence[str] | None = None,
) -> dict:
    """Read and validate a datalist JSON file.

    Args:
        path: the datalist JSON file, or an already loaded datalist dict.
        dataset_dir: if given, every relative ``image`` path, ``label`` and ``brain_mask`` is joined onto this folder
            (absolute paths are kept as they are). Files are not checked for existence here.
        splits: if given (one split name or several of ``training``, ``validation``, ``test``), only those split
            lists are kept; the other split keys are removed from the result.

    Returns:
        a new dictionary (the file's content, deep-copied and transformed as above).

    Raises:
        DatalistError: if the file cannot be read, is not valid JSON, fails :func:`validate_datalist`, or a split
            name is unknown.
    """
    if isinstance(path, Mapping):
        datalist, path = dict(path), "<datalist>"
    else:
        path = Path(path).expanduser()
        try:
            datalist = json.loads(_read_bounded(path).decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatalistError(f"cannot read datalist {path}: {e}") from e
    validate_datalist(datalist, source=str(path))
    datalist = copy.deepcopy(datalist)
    if splits is not None:
        keep = _as_splits(splits, str(path))
        for split in SPLITS:
            if split not in keep:
                del datalist[split]
    if dataset_dir is not None:
        root = Path(dataset_dir).expanduser()
        real_root = os.path.realpath(root)
        outside = []
        for split in SPLITS:
            for entry in datalist.get(split, []):
                files = [*entry["image"], *(entry[k] for k in _PATH_KEYS if k in entry)]
                outside += [p for p in files if _escapes(_join(root, p), real_root)]
                entry["image"] = [_join(root, p) for p in entry["image"]]
                for key in _PATH_KEYS:
                    if key in entry:
                        entry[key] = _join(root, entry[key])
        if outside:
            logger.warning(
                "datalist %s: %d path(s) lead outside dataset_dir %s (e.g. %s); they are read from there",
                path,
                len(outside),
                root,
                outside[0],
            )
    return datalist


def _read_bounded(path: Path, limit: int = MAX_DATALIST_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; :class:`DatalistError` (one line) for a device, a
    pipe, a folder (``--datalist /dev/zero`` would otherwise be read until memory runs out) or a larger file."""
    info = path.stat()  # follows symlinks; OSError (missing, no permission) is reported by the caller
    if not stat.S_ISREG(info.st_mode):
        raise DatalistError(f"datalist {path} is not a regular file (a folder, device or pipe): give a JSON file")
    if info.st_size > limit:
        raise DatalistError(
            f"datalist {path} is {info.st_size / 2**20:.0f} MB, over the {limit / 2**20:.0f} MB limit of a "
            "datalist: is it the right file?"
        )
    with open(path, "rb") as f:
        content = f.read(limit + 1)
    if len(content) > limit:  # grew after the size check
        raise DatalistError(f"datalist {path} is over the {limit / 2**20:.0f} MB limit of a datalist")
    return content


def _escapes(path: str, real_root: str) -> bool:
    """A path (already joined onto the dataset folder) that resolves outside it: ``../x.nii.gz``, an absolute
    path elsewhere, or a symlink whose target lies elsewhere."""
    real = os.path.realpath(path)
    try:
        return os.path.commonpath([real, real_root]) != real_root
    except ValueError:  # another drive
        return True


def split_counts(datalist: dict) -> dict[str, int]:
    """Number of entries per split.

    Args:
        datalist: a datalist dictionary; splits it does not hold (e.g. filtered out by :func:`load_datalist`) are
            left out of the result.

    Returns:
        ``{"training": n, "validation": n, "test": n}`` for the splits present, in that order.
    """
    return {split: len(datalist[split]) for split in SPLITS if split in datalist}


# ----------------------------------------------------------------------------------------------------------------
# scanning dataset folders
# ----------------------------------------------------------------------------------------------------------------


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise DatalistError(f"unknown dataset layout {layout!r}, expected one of {list(LAYOUTS)}")


def _check_root(root: str | os.PathLike, layout: str | None = None) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        what = f"{layout} dataset root" if layout else "dataset root"
        raise DatalistError(f"{what} {path} does not exist or is not a directory")
    return path


def _walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` following symlinked folders (visiting each real folder once) and skipping hidden folders.

    Callers may prune ``dirnames`` in place, as with ``os.walk``.
    """
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(dirpath), dirnames, sorted(filenames)


def _find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists first, else None."""
    for suffix in _NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _candidates(layout: str, root: Path) -> list[tuple[str, Path]]:
    """Cases under ``root`` recognised by name alone: ``(case id, BraTS case folder or ATLAS T1w file)``."""
    found: list[tuple[str, Path]] = []
    if layout in _CASE_DIR:
        pattern = _CASE_DIR[layout]
        for dirpath, dirnames, _ in _walk(root):
            cases = [d for d in dirnames if pattern.fullmatch(d) or pattern.fullmatch(d.strip())]
            found.extend((d, dirpath / d) for d in cases)
            dirnames[:] = [d for d in dirnames if d not in cases]  # do not descend into case folders
        return found
    for dirpath, _, filenames in _walk(root):
        if not (dirpath.name == "anat" and dirpath.parent.name.startswith("ses-")):
            continue
        subject, session = dirpath.parent.parent.name, dirpath.parent.name
        if not subject.startswith("sub-"):
            continue
        for name in filenames:
            if not name.startswith("._") and any(name.endswith(f"_T1w{s}") for s in _NIFTI_SUFFIXES):
                found.append((f"{subject}_{session}", dirpath / name))
    return found


def _file_stem(layout: str, case_id: str, file_modality: str) -> str:
    separator = "_" if layout == "brats2021" else "-"
    return f"{case_id}{separator}{file_modality}"


def patient_id(layout: str, case_id: str) -> str:
    """The patient a case belongs to: BraTS 2023 drops the timepoint suffix, ATLAS keeps the ``sub-*`` part."""
    if layout == "brats2023":
        return case_id.rsplit("-", 1)[0]
    if layout == "atlas2":
        return case_id.split("_ses-", 1)[0]
    return case_id


def _resolve_modalities(layout: str, modalities: Sequence[str] | str | None) -> list[str]:
    """Canonical modality names for ``layout``, in the requested order (default: all, in the layout's order)."""
    available = _FILE_MODALITIES[layout]
    if modalities is None:
        return list(available)
    if isinstance(modalities, str):
        modalities = [modalities]
    aliases = {name.lower(): name for name in available}
    aliases.update({spelling.lower(): name for name, spelling in available.items()})
    resolved: list[str] = []
    for name in modalities:
        canonical = aliases.get(str(name).lower())
        if canonical is None:
            spellings = sorted(set(available) | set(available.values()), key=str.lower)
            raise DatalistError(f"unknown {layout} modality {name!r}, expected some of {spellings}")
        if canonical in resolved:
            raise DatalistError(f"modality {name!r} requested twice in {list(modalities)}")
        resolved.append(canonical)
    if not resolved:
        raise DatalistError(f"no modalities requested, expected some of {list(available)}")
    return resolved


def _scan(
    layout: str,
    root: str | os.PathLike,
    modalities: Sequence[str] | str | None,
    problems: dict[str, str] | None = None,
) -> tuple[list[str], list]:
    """Find every case of ``layout`` under ``root``.

    Args:
        problems: when given, a case that cannot be used (a missing modality file, an id that is not
            filesystem-safe, an ATLAS session folder without a T1w image) is recorded here (id -> one-line reason)
            and left out, instead of raising :class:`DatalistError` for the whole folder.

    Returns:
        the canonical modality names and a list of ``(patient id, entry)`` sorted by entry id, with entry paths
        relative to ``root`` (POSIX).
    """
    _check_layout(layout)
    names = _resolve_modalities(layout, modalities)
    root = _check_root(root, layout)
    spellings = _FILE_MODALITIES[layout]

    def rel(file: Path) -> str:
        return file.relative_to(root).as_posix()

    cases: list[tuple[str, dict]] = []
    origin: dict[str, Path] = {}

    def unusable(case_id: str, reason: str) -> None:
        if problems is None:
            raise DatalistError(reason)
        problems[case_id] = reason

    if layout == "atlas2" and problems is not None:
        sessions = (a for a in root.rglob("anat") if a.parent.name.startswith("ses-"))
        for anat in sorted(a for a in sessions if a.is_dir() and a.parent.parent.name.startswith("sub-")):
            if not any(f.name.endswith(tuple(f"_T1w{x}" for x in _NIFTI_SUFFIXES)) for f in anat.iterdir()):
                case_id = f"{anat.parent.parent.name}_{anat.parent.name}"
                unusable(case_id, f"no T1w image (*_T1w.nii.gz) in ATLAS session folder {anat}")
    for case_id, location in _candidates(layout, root):
        if case_id in origin:
            raise DatalistError(f"case id {case_id} found twice under {root}: {origin[case_id]} and {location}")
        origin[case_id] = location
        problem = case_id_problem(case_id)
        if problem:
            unusable(case_id, f"{problem} (from {str(location)!r})")
            continue
        if layout == "atlas2":
            files = [location]
            prefix = location.name[: location.name.rindex("_T1w")]
            label = _find_nifti(location.parent, f"{prefix}{_ATLAS_LESION_SUFFIX}")
        else:
            files = []
            for name in names:
                stem = _file_stem(layout, case_id, spellings[name])
                file = _find_nifti(location, stem)
                if file is None:
                    unusable(
                        case_id,
                        f"missing {name} file {location / stem}.nii.gz (or .nii) in {layout} case folder {location}",
                    )
                    break
                files.append(file)
            if len(files) < len(names):
                continue
            label = _find_nifti(location, _file_stem(layout, case_id, "seg"))
        entry: dict[str, Any] = {"id": case_id, "image": [rel(f) for f in files]}
        if label is not None:
            entry["label"] = rel(label)
        cases.append((patient_id(layout, case_id), entry))
    if not cases and not problems:
        raise DatalistError(f"no {layout} cases under {root} (expected {_EXPECTED[layout]})")
    cases.sort(key=lambda c: c[1]["id"])
    return names, cases


def _check_fractions(split: Sequence[float]) -> list[float]:
    try:
        fractions = [float(f) for f in split]
    except (TypeError, ValueError) as e:
        raise DatalistError(f"split fractions must be 3 numbers (training, validation, test), got {split!r}") from e
    if (
        len(fractions) != 3
        or not all(math.isfinite(f) and f >= 0 for f in fractions)
        or abs(sum(fractions) - 1.0) > 1e-6
    ):
        raise DatalistError(
            f"split fractions must be 3 non-negative numbers (training, validation, test) summing to 1, got {split!r}"
        )
    return fractions


def _split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions`` to integers summing to ``n`` (ties go to the earlier split)."""
    quotas = [n * f for f in fractions]
    sizes = [math.floor(q + 1e-9) for q in quotas]
    remainders = [round(q - s, 9) for q, s in zip(quotas, sizes)]
    order = sorted(range(len(quotas)), key=lambda i: (-remainders[i], i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


# ----------------------------------------------------------------------------------------------------------------
# public builders
# ----------------------------------------------------------------------------------------------------------------


def build_datalist(
    layout: str,
    root: str | os.PathLike,
    split: Sequence[float] = (0.75, 0.05, 0.20),
    seed: int = 0,
    modalities: Sequence[str] | None = None,
) -> dict:
    """Scan a dataset folder and split its cases into training, validation and test, by patient.

    Layouts (file contents are never read, only names):

    - ``brats2021``: folders ``BraTS2021_xxxxx/`` (at any depth) holding ``BraTS2021_xxxxx_{flair,t1,t1ce,t2}``
      and optionally ``_seg`` files (``.nii.gz`` or ``.nii``). Modalities ``flair, t1, t1ce, t2``.
    - ``brats2023``: folders ``BraTS-XXX-xxxxx-yyy/`` (GLI, MET, MEN, PED, SSA, ...) holding
      ``BraTS-XXX-xxxxx-yyy-{t2f,t1n,t1c,t2w}`` and optionally ``-seg`` files. Stored under the canonical names
      ``flair, t1, t1ce, t2`` so models trained on 2021 data apply; ``modalities`` accepts either spelling.
      The patient is ``BraTS-XXX-xxxxx`` (``yyy`` is the timepoint).
    - ``atlas2``: ATLAS v2.0 BIDS, ``**/sub-*/ses-*/anat/*_T1w.nii.gz`` with the lesion mask
      ``*_label-L_desc-T1lesion_mask.nii.gz`` of the same prefix beside it. Modality ``t1w``; id
      ``sub-*_ses-*``; the patient is the ``sub-*`` part.

    A case without a segmentation gets no ``label`` key. The split shuffles the sorted patient ids with
    ``random.Random(seed)`` and cuts them by ``split`` with largest-remainder rounding; all cases of a patient go
    to the same split, and entries in each split are sorted by id. The result depends only on the file names under
    ``root`` and the arguments.

    Args:
        layout: one of :data:`LAYOUTS`.
        root: the dataset folder; entry paths are relative to it.
        split: training, validation and test fractions of the patients (non-negative, summing to 1).
        seed: seed of the patient shuffle.
        modalities: a subset or reordering of the layout's modalities (default: all, in the order above).

    Returns:
        the datalist dictionary (keys ``name``, ``layout``, ``seed``, ``split_fractions``, ``modalities``,
        ``training``, ``validation``, ``test``).

    Raises:
        DatalistError: unknown layout or modality, bad fractions, missing root, no case found, a case folder
            missing a requested modality file, or a case id found twice.
    """
    _check_layout(layout)
    fractions = _check_fractions(split)
    names, cases = _scan(layout, root, modalities)
    patients = sorted({patient for patient, _ in cases})
    random.Random(int(seed)).shuffle(patients)
    sizes = _split_sizes(len(patients), fractions)
    assignment: dict[str, str] = {}
    start = 0
    for split_name, size in zip(SPLITS, sizes):
        assignment.update(dict.fromkeys(patients[start : start + size], split_name))
        start += size
    datalist: dict[str, Any] = {
        "name": _DATASET_NAMES[layout],
        "layout": layout,
        "seed": int(seed),
        "split_fractions": fractions,
        "modalities": names,
    }
    for split_name in SPLITS:
        datalist[split_name] = [entry for patient, entry in cases if assignment[patient] == split_name]
    return validate_datalist(datalist, source=f"{layout} datalist of {root}")


def detect_layout(root: str | os.PathLike) -> str:
    """Which of :data:`LAYOUTS` a dataset folder follows, judged from folder and file names.

    Args:
        root: the dataset folder.

    Returns:
        the layout name.

    Raises:
        DatalistError: if ``root`` is not a directory, or holds cases of no layout or of several.
    """
    path = _check_root(root)
    found = [layout for layout in LAYOUTS if _candidates(layout, path)]
    if not found:
        expected = "; ".join(f"{layout}: {_EXPECTED[layout]}" for layout in LAYOUTS)
        raise DatalistError(f"no recognised dataset layout under {path} (expected {expected})")
    if len(found) > 1:
        raise DatalistError(f"cases of several layouts {found} under {path}: pass the layout explicitly")
    return found[0]


def datalist_from_folder(
    root: str | os.PathLike,
    modalities: Sequence[str] | None = None,
    layout: str | None = None,
    relative: bool = False,
    report_unusable: bool = False,
) -> dict:
    """A datalist of every case in a folder, all in ``test``: for inference without a datalist file.

    Args:
        root: the dataset folder.
        modalities: a subset or reordering of the layout's modalities (default: all).
        layout: one of :data:`LAYOUTS`; detected with :func:`detect_layout` when None.
        relative: keep paths relative to ``root`` (the datalist file format) instead of joining them onto ``root``
            (ready to load, as :func:`load_datalist` with ``dataset_dir=root`` gives).
        report_unusable: list the cases that cannot be used (missing modality, unsafe id, ATLAS session without T1w)
            under ``"unusable"`` (id -> one-line reason) instead of refusing the whole folder.

    Returns:
        a datalist with empty ``training`` and ``validation`` and every case, sorted by id, in ``test``.

    Raises:
        DatalistError: as :func:`detect_layout` and :func:`build_datalist`.
    """
    layout = detect_layout(root) if layout is None else layout
    problems: dict[str, str] | None = {} if report_unusable else None
    names, cases = _scan(layout, root, modalities, problems)
    entries = [entry for _, entry in cases]
    if not relative:
        base = Path(root).expanduser()
        for entry in entries:
            entry["image"] = [_join(base, p) for p in entry["image"]]
            for key in _PATH_KEYS:
                if key in entry:
                    entry[key] = _join(base, entry[key])
    datalist = {
        "name": _DATASET_NAMES[layout],
        "layout": layout,
        "modalities": names,
        "training": [],
        "validation": [],
        "test": entries,
    }
    validate_datalist(datalist, source=f"{layout} datalist of {root}")
    if problems is not None:
        datalist["unusable"] = dict(sorted(problems.items()))
    return datalist
