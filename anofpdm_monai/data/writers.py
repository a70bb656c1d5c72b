"""Writers of the inference outputs, on the input volume's own grid (docs/method.md §1).

A case's outputs are one unit, the folder ``<output_dir>/<case_id>/``:

- ``<case_id>_anomaly_map.nii.gz`` (float32): the median-filtered AnoFPDM map (the one the mask thresholds);
- ``<case_id>_anomaly_mask.nii.gz`` (uint8): the post-processed mask, empty on slices classified healthy;
- ``<case_id>_slices.csv``: one row per brain-bearing slice: ``index`` (along the input file's axial axis),
  ``ras_index``, ``t_e_<modality>`` and ``M_<modality>`` per map modality, ``health_<score>`` (the slice health score
  the calibration's tau thresholds, e.g. ``health_mse_gap``: ``pred_label`` is 1 where it is <= tau), ``pred_label``,
  ``cosine`` (the papers' c, reported whatever the health score), ``threshold`` (the map threshold of Algorithm 1),
  ``mask_pixels`` (at model resolution) and ``label`` when the case has one;
- ``<case_id>_provenance.json``: ``made_with`` (checkpoint digest, calibration, settings, seed, overrides, software
  version: what the run was), ``inputs`` (path, size, mtime_ns and sha256 of every input file) and ``outputs`` (size
  and sha256 of the three other files).

:class:`SaveCaseOutputsd`, the MONAI transform at the end of the inference post-processing, writes the four files
into a temporary folder (``<output_dir>/.<case_id>.tmp-XXXXXXXX/``) that replaces the case folder as one unit
(:func:`~anofpdm_monai.io.atomic_folder`): a kill at any instant leaves the old complete case or the new complete
case, and a failed case leaves no file. A rerun skips a case only when its folder is intact (each output matches the
size and sha256 in its provenance), was made with the same ``made_with`` and from inputs of the same content
(:func:`why_not_finished`); any other case is recomputed, and the log says why. :func:`split_finished` decides this
while holding the output folder's lock, after resolving what killed runs left there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.transforms import MapTransform

from ..io import atomic_folder, atomic_path, file_record, output_lock, recover_folder_swaps, remove_stale_temporaries
from ..io import sha256_file as _sha256
from .datalist import case_id_problem

__all__ = [
    "write_nifti_like",
    "case_output_paths",
    "input_record",
    "why_not_finished",
    "is_case_finished",
    "split_finished",
    "SaveCaseOutputsd",
    "OUTPUTS_FORMAT",
    "NOT_RUN_YET",
]

logger = logging.getLogger(__name__)

#: the ``format`` of a case's provenance file
OUTPUTS_FORMAT = "anofpdm_monai case outputs 2"
#: :func:`why_not_finished` of a case that has no output folder
NOT_RUN_YET = "not run yet"

_SUFFIXES = {
    "map": "_anomaly_map.nii.gz",
    "mask": "_anomaly_mask.nii.gz",
    "slices": "_slices.csv",
    "provenance": "_provenance.json",
}
# the longest name made from a case id: ``<id>_anomaly_mask.nii.gz``; the hidden swap folders add 14 characters
_LONGEST_SUFFIX = max(max(len(v) for v in _SUFFIXES.values()), len(".") + len(".tmp-12345678"))


def write_nifti_like(
    array: np.ndarray, reference: nib.spatialimages.SpatialImage, path: str | os.PathLike, atomic: bool = True
) -> Path:
    """Write ``array`` with the reference image's affine (qform and sform codes, zooms, units); atomically unless
    ``atomic`` is False (a file inside a folder that is itself swapped into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tuple(array.shape) != tuple(reference.shape[:3]):
        raise ValueError(f"{path.name}: array shape {array.shape} does not match the input grid {reference.shape[:3]}")
    img = nib.Nifti1Image(np.asarray(array), reference.affine)
    ref_hdr = reference.header
    qform, qcode = reference.get_qform(coded=True)
    sform, scode = reference.get_sform(coded=True)
    # keep each code as it is, 0 included (BraTS files have qform_code 0 and sform_code 2): an uncoded form gets the
    # reference affine as its matrix but stays uncoded, so readers pick the same form as for the input
    img.set_qform(qform if qform is not None else reference.affine, code=int(qcode))
    img.set_sform(sform if sform is not None else reference.affine, code=int(scode))
    if hasattr(ref_hdr, "get_xyzt_units"):
        img.header.set_xyzt_units(*ref_hdr.get_xyzt_units())
    if not atomic:
        nib.save(img, path)
        return path
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
    return path


def _case_files(folder: Path, case_id: str) -> dict[str, Path]:
    return {key: folder / f"{case_id}{suffix}" for key, suffix in _SUFFIXES.items()}


def case_output_paths(output_dir: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """The four output files of a case (in ``<output_dir>/<case_id>/``)."""
    return _case_files(Path(output_dir) / case_id, case_id)


def _input_files(entry: Mapping[str, Any]) -> dict[str, list[str]]:
    image = entry.get("image")
    images = [image] if isinstance(image, (str, os.PathLike)) else list(image or [])
    files = {"image": [str(f) for f in images]}
    for key in ("label", "brain_mask"):
        if entry.get(key):
            files[key] = [str(entry[key])]
    return files


def input_record(entry: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every input file of a datalist entry (``image`` files in order, ``label``, ``brain_mask``) with its absolute
    path, size, mtime_ns and sha256 (size and sha256 None for a file that cannot be read)."""
    record: dict[str, list[dict[str, Any]]] = {}
    for role, files in _input_files(entry).items():
        record[role] = []
        for f in files:
            try:
                info = file_record(f)
            except OSError:
                info = {"size": None, "mtime_ns": None, "sha256": None}
            record[role].append({"file": os.path.abspath(f), **info})
    return record


def _input_change(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """What differs between two :func:`input_record` (content only: a file touched or moved with the same content is
    the same input), or None."""
    for role in sorted(set(stored) | set(current)):
        before, now = stored.get(role), current.get(role)
        if not before:
            return f"input changed: {role} added"
        if not now:
            return f"input changed: {role} removed"
        if len(before) != len(now):
            return f"input changed: {len(now)} {role} file(s), were {len(before)}"
        for i, (a, b) in enumerate(zip(before, now)):
            if (a.get("size"), a.get("sha256")) != (b.get("size"), b.get("sha256")):
                what = f"{role}[{i}]" if role == "image" else role
                how = "cannot be read" if b.get("sha256") is None else "content differs"
                return f"input changed: {what} {b.get('file')} ({how})"
    return None


def _as_json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(before: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for key in list(before) + [k for k in now if k not in before]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in now:
                out.append(f"{name} not set now")
            elif key not in before:
                out.append(f"{name} not recorded before")
            else:
                out += _differences(before[key], now[key], name)
        return out
    return [] if before == now else [f"{prefix or 'provenance'} {_short(before)} -> {_short(now)}"]


def why_not_finished(
    output_dir: str | os.PathLike,
    case_id: str,
    provenance: Mapping[str, Any] | None = None,
    entry: Mapping[str, Any] | None = None,
) -> str | None:
    """None when the case's outputs are finished, else why not (one line; :data:`NOT_RUN_YET` without a folder).

    Finished means: the provenance file is readable and of this format; the map, mask and slice table have the size
    and sha256 it records (a truncated or replaced file is not finished); it was made with ``provenance`` (None: any);
    and, with ``entry``, from input files of the same content as the entry's now.
    """
    paths = case_output_paths(output_dir, case_id)
    if not paths["provenance"].parent.is_dir():
        return NOT_RUN_YET
    try:
        stored = json.loads(paths["provenance"].read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"outputs incomplete ({paths['provenance'].name} missing)"
    except (OSError, ValueError) as exc:
        return f"{paths['provenance'].name} cannot be read ({type(exc).__name__})"
    if not isinstance(stored, dict) or stored.get("format") != OUTPUTS_FORMAT:
        return "outputs of an earlier version (no digests of the outputs)"
    if stored.get("case_id") != case_id:
        return f"{paths['provenance'].name} belongs to case {stored.get('case_id')!r}"
    outputs = stored.get("outputs") or {}
    for key in ("map", "mask", "slices"):
        path, expected = paths[key], outputs.get(key)
        if not isinstance(expected, dict):
            return f"outputs incomplete ({path.name} not recorded)"
        try:
            size = path.stat().st_size
        except OSError:
            return f"outputs incomplete ({path.name} missing)"
        if size != expected.get("size") or _sha256(path) != expected.get("sha256"):
            return f"outputs damaged ({path.name} is not the file its provenance records)"
    if provenance is not None:
        differences = _differences(stored.get("made_with"), _as_json(provenance))
        if differences:
            more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
            return "made with another setting: " + "; ".join(differences[:3]) + more
    if entry is not None:
        change = _input_change(stored.get("inputs") or {}, input_record(entry))
        if change:
            return change
    return None


def is_case_finished(
    output_dir: str | os.PathLike,
    case_id: str,
    provenance: Mapping[str, Any] | None = None,
    entry: Mapping[str, Any] | None = None,
) -> bool:
    """All outputs of the case are intact and were made with ``provenance`` (None: any) from ``entry``'s inputs
    (None: not checked); see :func:`why_not_finished`."""
    return why_not_finished(output_dir, case_id, provenance, entry) is None


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def split_finished(
    entries: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> tuple[list[Mapping[str, Any]], list[str]]:
    """``(entries still to process, ids of finished cases skipped)``.

    Runs while holding the lock of ``output_dir`` (taken for the call unless this process holds it, e.g. for the
    whole run): first what killed runs left is resolved (temporary case folders removed, a case folder renamed aside
    put back, temporary files in the case folders removed); then each case is skipped when :func:`why_not_finished`
    finds it finished, or else recomputed with a log line saying why.

    Raises:
        OutputPathError: another run holds the lock of ``output_dir``.
    """
    output_dir = Path(output_dir)
    todo, skipped, seen = [], [], set()
    with output_lock(output_dir):
        for action in recover_folder_swaps(output_dir):
            logger.info("%s: %s", output_dir, action)
        longest = _name_max(output_dir) - _LONGEST_SUFFIX
        for entry in entries:
            case_id = str(entry.get("id", "<case>"))
            if entry.get(
                "error"
            ):  # an unusable case (its id may not even be a safe folder name): reported, not touched
                todo.append(entry)
                continue
            problem = case_id_problem(entry.get("id"))  # files outside output_dir, names too long: refused, per case
            if problem:
                todo.append({"id": case_id, "error": problem})
                continue
            if len(case_id.encode()) > longest:  # a file system with shorter names than the usual 255 bytes
                reason = f"case id {case_id[:40]}... is too long here ({len(case_id)} characters; at most {longest})"
                todo.append({"id": case_id, "error": reason})
                continue
            if case_id in seen:  # its outputs would replace the first one's
                reason = f"case id {case_id!r} appears twice; the second is not run"
                todo.append({"id": f"{case_id} (again)", "error": reason})
                continue
            seen.add(case_id)
            remove_stale_temporaries(case_output_paths(output_dir, case_id).values())
            why = None if overwrite else why_not_finished(output_dir, case_id, provenance, entry)
            if overwrite:
                todo.append(entry)
            elif why is None:
                skipped.append(case_id)
            else:
                if why != NOT_RUN_YET:
                    logger.info("case %s: recomputed: %s", case_id, why)
                todo.append(entry)
    return todo, skipped


def _reference_image(data: Mapping[Hashable, Any]) -> nib.Nifti1Image:
    """The input file whose grid the outputs take (the first modality, ``reference_file``)."""
    source = data.get("reference_file")
    if isinstance(source, (list, tuple)):
        source = source[0]
    if not source:
        raise ValueError("the case carries no reference_file to take the output grid from")
    return nib.load(str(source))


class SaveCaseOutputsd(MapTransform):
    """Write one case's map, mask, slice table and provenance in the input geometry, as one unit.

    The files are written into a temporary folder next to the case folder, the provenance last (with the size and
    sha256 of the three others), and the folder then replaces ``<output_dir>/<case_id>/``
    (:func:`~anofpdm_monai.io.atomic_folder`); when anything fails the temporary folder is removed and an existing
    case folder is untouched.

    Expects the inverted ``map_key`` and ``mask_key`` arrays (1, *input shape), ``reference_file`` (the input file
    whose header the outputs copy), ``input_record`` (:func:`input_record` of the case's files, as JSON text, taken
    by :class:`~anofpdm_monai.engines.CaseDataset` before loading them), the per-slice statistics of
    :class:`~anofpdm_monai.inferers.AnoFPDMVolumeInferer` (``kept``, ``end_step``, ``divergence_max``, ``health``,
    ``cosine``, ``pred_label``, ``threshold``, ``mask_pixels``; along the RAS axial axis at model resolution), and
    ``source_index`` (RAS slice -> input file slice).

    Args:
        output_dir: the output folder (one sub-folder per case).
        map_modalities: names of the map modalities (CSV columns).
        provenance: what made the outputs (stored per case as ``made_with``; compared on rerun).
        map_key, mask_key, label_key: keys of the data dict.
        health_score: name of the health score the inferer thresholds (the ``health_<name>`` column); default:
            ``provenance["settings"]["health_score"]``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        map_modalities: Sequence[str],
        provenance: Mapping[str, Any] | None = None,
        map_key: str = "anomaly_map",
        mask_key: str = "anomaly_mask",
        label_key: str = "slice_label",
        health_score: str | None = None,
    ) -> None:
        super().__init__(keys=[map_key, mask_key])
        self.output_dir = Path(output_dir)
        self.map_modalities = [str(m) for m in map_modalities]
        self.provenance = _as_json(dict(provenance or {}))
        self.map_key, self.mask_key, self.label_key = map_key, mask_key, label_key
        settings = self.provenance.get("settings")
        if health_score is None and isinstance(settings, dict):
            health_score = settings.get("health_score")
        self.health_score = str(health_score) if health_score else None

    @property
    def health_column(self) -> str:
        return f"health_{self.health_score}" if self.health_score else "health"

    def _health(self, data: Mapping[Hashable, Any]) -> Any:
        health = data.get("health")
        if health is None and self.health_score == "cosine":
            health = data["cosine"]  # the cosine is the score thresholded
        if health is None:
            logger.warning(
                "case %s: the inferer returned no 'health' scores; %s has no %s column",
                data.get("id"),
                f"{data.get('id')}_slices.csv",
                self.health_column,
            )
        return health

    def slice_table(self, data: Mapping[Hashable, Any]) -> pd.DataFrame:
        """One row per brain-bearing slice: input-file index, RAS index, t_e and M per map modality, the thresholded
        health score, label, cosine, map threshold and mask pixels (at model resolution)."""
        kept = np.nonzero(np.asarray(torch.as_tensor(data["kept"]).cpu()).astype(bool))[0]
        t_e = torch.as_tensor(data["end_step"]).cpu()
        m = torch.as_tensor(data["divergence_max"]).cpu()
        source_index = np.asarray(data["source_index"])
        label = data.get(self.label_key)
        health = self._health(data)
        rows = []
        for k in kept:
            record: dict[str, Any] = {"index": int(source_index[k]), "ras_index": int(k)}
            for j, name in enumerate(self.map_modalities):
                record[f"t_e_{name}"] = int(t_e[k, j if t_e.shape[1] > 1 else 0])
                record[f"M_{name}"] = float(m[k, j])
            if health is not None:
                record[self.health_column] = float(health[k])
            record["pred_label"] = int(data["pred_label"][k])
            record["cosine"] = float(data["cosine"][k])
            record["threshold"] = float(data["threshold"][k])
            record["mask_pixels"] = int(data["mask_pixels"][k])
            if label is not None:
                record["label"] = int(label[k])
            rows.append(record)
        return pd.DataFrame(rows)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case_id = str(d["id"])
        inputs = d.get("input_record")
        if inputs is None:
            raise ValueError(
                f"case {case_id} carries no input_record (load cases with anofpdm_monai.engines.CaseDataset)"
            )
        inputs = json.loads(inputs) if isinstance(inputs, str) else _as_json(inputs)
        reference = _reference_image(d)
        amap = torch.as_tensor(d[self.map_key])[0].detach().cpu().numpy().astype(np.float32)
        mask = torch.as_tensor(d[self.mask_key])[0].detach().cpu().numpy().astype(np.uint8)
        table = self.slice_table(d)
        final = case_output_paths(self.output_dir, case_id)
        with atomic_folder(final["provenance"].parent) as tmp:
            files = _case_files(tmp, case_id)
            table.to_csv(files["slices"], index=False)
            write_nifti_like(amap, reference, files["map"], atomic=False)
            write_nifti_like(mask, reference, files["mask"], atomic=False)
            outputs = {}
            for key in ("map", "mask", "slices"):
                digest = file_record(files[key])
                outputs[key] = {"file": files[key].name, "size": digest["size"], "sha256": digest["sha256"]}
            document = {
                "format": OUTPUTS_FORMAT,
                "case_id": case_id,
                "made_with": self.provenance,
                "inputs": inputs,
                "outputs": outputs,
            }
            files["provenance"].write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
        d["output_files"] = {k: str(v) for k, v in final.items()}
        return d
