"""Writers of the inference outputs, on the input volume's own grid (docs/method.md §1).

Per case, ``<output_dir>/<case_id>/`` receives:

- ``<case_id>_anomaly_map.nii.gz`` (float32): the median-filtered AnoFPDM map (the one the mask thresholds);
- ``<case_id>_anomaly_mask.nii.gz`` (uint8): the post-processed mask, empty on slices classified healthy;
- ``<case_id>_slices.csv``: per slice index, t_e, M, c, predicted label, threshold;
- ``<case_id>_provenance.json``: what made them (checkpoint digest, calibration, overrides), written last: a rerun
  skips a case only when all four exist and the provenance matches.

:class:`SaveCaseOutputsd` is the MONAI transform that writes them at the end of the inference post-processing; every
file is written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.transforms import MapTransform

from ..io import atomic_path, remove_stale_temporaries, write_json
from .datalist import is_safe_case_id

__all__ = ["write_nifti_like", "case_output_paths", "is_case_finished", "split_finished", "SaveCaseOutputsd"]


def write_nifti_like(array: np.ndarray, reference: nib.spatialimages.SpatialImage, path: str | os.PathLike) -> Path:
    """Write ``array`` with the reference image's affine (qform and sform codes, zooms, units), atomically."""
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
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
    return path


def case_output_paths(output_dir: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """The four output files of a case."""
    folder = Path(output_dir) / case_id
    return {
        "map": folder / f"{case_id}_anomaly_map.nii.gz",
        "mask": folder / f"{case_id}_anomaly_mask.nii.gz",
        "slices": folder / f"{case_id}_slices.csv",
        "provenance": folder / f"{case_id}_provenance.json",
    }


def is_case_finished(output_dir: str | os.PathLike, case_id: str, provenance: Mapping[str, Any] | None = None) -> bool:
    """All outputs of the case exist and were made with ``provenance`` (None: any)."""
    paths = case_output_paths(output_dir, case_id)
    if not all(p.is_file() for p in paths.values()):
        return False
    if provenance is None:
        return True
    try:
        return json.loads(paths["provenance"].read_text()) == json.loads(json.dumps(provenance, default=str))
    except (OSError, ValueError):
        return False


def split_finished(
    entries: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> tuple[list[Mapping[str, Any]], list[str]]:
    """``(entries still to process, ids of finished cases skipped)``; temporary files a killed run left in the
    cases' folders are removed on the way."""
    todo, skipped, seen = [], [], set()
    for entry in entries:
        case_id = str(entry.get("id", "<case>"))
        if entry.get("error"):  # an unusable case (its id may not even be a safe folder name): reported, not touched
            todo.append(entry)
            continue
        if not is_safe_case_id(entry.get("id")):  # it would name files outside output_dir: refused, per case
            reason = f"case id {entry.get('id')!r} is not filesystem-safe (letters, digits, '_', '.', '+', '-')"
            todo.append({"id": case_id, "error": reason})
            continue
        if case_id in seen:  # its outputs would replace the first one's
            reason = f"case id {case_id!r} appears twice; the second is not run"
            todo.append({"id": f"{case_id} (again)", "error": reason})
            continue
        seen.add(case_id)
        remove_stale_temporaries(case_output_paths(output_dir, case_id).values())
        if not overwrite and is_case_finished(output_dir, case_id, provenance):
            skipped.append(case_id)
        else:
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
    """Write one case's map, mask, slice table and provenance (last) in the input geometry, atomically.

    Expects the inverted ``map_key`` and ``mask_key`` arrays (1, *input shape), ``reference_file`` (the input file
    whose header the outputs copy), the per-slice statistics of
    :class:`~anofpdm_monai.inferers.AnoFPDMVolumeInferer` (``kept``, ``end_step``, ``divergence_max``, ``cosine``,
    ``pred_label``, ``threshold``, ``mask_pixels``; along the RAS axial axis at model resolution), and ``source_index``
    (RAS slice -> input file slice).

    Args:
        output_dir: the output folder (one sub-folder per case).
        map_modalities: names of the map modalities (CSV columns).
        provenance: what made the outputs (stored per case; compared on rerun).
        map_key, mask_key, label_key: keys of the data dict.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        map_modalities: Sequence[str],
        provenance: Mapping[str, Any] | None = None,
        map_key: str = "anomaly_map",
        mask_key: str = "anomaly_mask",
        label_key: str = "slice_label",
    ) -> None:
        super().__init__(keys=[map_key, mask_key])
        self.output_dir = Path(output_dir)
        self.map_modalities = [str(m) for m in map_modalities]
        self.provenance = dict(provenance or {})
        self.map_key, self.mask_key, self.label_key = map_key, mask_key, label_key

    def slice_table(self, data: Mapping[Hashable, Any]) -> pd.DataFrame:
        """One row per brain-bearing slice: input-file index, RAS index, t_e and M per map modality, c, label,
        threshold and mask pixels (at model resolution)."""
        kept = np.nonzero(np.asarray(torch.as_tensor(data["kept"]).cpu()).astype(bool))[0]
        t_e = torch.as_tensor(data["end_step"]).cpu()
        m = torch.as_tensor(data["divergence_max"]).cpu()
        source_index = np.asarray(data["source_index"])
        label = data.get(self.label_key)
        rows = []
        for k in kept:
            record: dict[str, Any] = {"index": int(source_index[k]), "ras_index": int(k)}
            for j, name in enumerate(self.map_modalities):
                record[f"t_e_{name}"] = int(t_e[k, j if t_e.shape[1] > 1 else 0])
                record[f"M_{name}"] = float(m[k, j])
            record["c"] = float(data["cosine"][k])
            record["pred_label"] = int(data["pred_label"][k])
            record["threshold"] = float(data["threshold"][k])
            record["mask_pixels"] = int(data["mask_pixels"][k])
            if label is not None:
                record["label"] = int(label[k])
            rows.append(record)
        return pd.DataFrame(rows)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case_id = str(d["id"])
        paths = case_output_paths(self.output_dir, case_id)
        reference = _reference_image(d)
        amap = torch.as_tensor(d[self.map_key])[0].detach().cpu().numpy().astype(np.float32)
        mask = torch.as_tensor(d[self.mask_key])[0].detach().cpu().numpy().astype(np.uint8)
        with atomic_path(paths["slices"]) as tmp:
            self.slice_table(d).to_csv(tmp, index=False)
        write_nifti_like(amap, reference, paths["map"])
        write_nifti_like(mask, reference, paths["mask"])
        write_json(paths["provenance"], self.provenance, indent=1)  # written last: marks the case finished
        d["output_files"] = {k: str(v) for k, v in paths.items()}
        return d
