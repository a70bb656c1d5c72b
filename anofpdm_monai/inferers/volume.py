"""From NIfTI volumes to anomaly maps and masks on the input volume's own grid.

Per case, :class:`VolumeInferer` writes ``<output_dir>/<case_id>/``:

- ``<case_id>_anomaly_map.nii.gz`` (float32): the median-filtered AnoFPDM map (the one the mask thresholds);
- ``<case_id>_anomaly_mask.nii.gz`` (uint8): the post-processed mask, empty on slices classified healthy;
- ``<case_id>_slices.csv``: per slice index, t_e, M, c, predicted label, threshold;
- ``<case_id>_provenance.json``: the checkpoint digest and calibration that made them (a rerun recomputes a case
  made by another checkpoint or calibration).

All three are on the input file's grid and affine: the resize, square padding and RAS reorientation are undone
with MONAI's ``Invertd``; slices outside the brain range are zero. Slices of a volume are batched; every file is
written atomically; a failing case is reported and the others finish; a rerun skips finished cases.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data.preprocessing import VolumePreprocessor
from ..utils import atomic_path
from .anofpdm import AnoFPDMInferer

__all__ = ["VolumeInferer", "CaseResult", "inferer_from_calibration", "write_nifti_like", "InferenceFailures"]

logger = logging.getLogger(__name__)


class InferenceFailures(RuntimeError):
    """Raised at the end of a run in which some cases failed (the others were written)."""


@dataclass
class CaseResult:
    """Outputs of one case on the input grid: ``anomaly_map`` float32 and ``mask`` uint8 arrays of the input's
    spatial shape, the reference NIfTI (affine and header source), and the per-slice ``table``."""

    case_id: str
    anomaly_map: np.ndarray
    mask: np.ndarray
    reference: nib.Nifti1Image
    table: pd.DataFrame


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


def inferer_from_calibration(calibration: Any, **overrides: Any) -> AnoFPDMInferer:
    """An :class:`AnoFPDMInferer` configured by a :class:`~anofpdm_monai.calibration.Calibration`.

    ``overrides`` may set inference-only options (``aggregation``, ``median_kernel``, ``min_component_size``,
    ``seed``, ``autocast_dtype``, ``progress``); options the calibration depends on must match it (checked by the
    caller with ``Calibration.check``).
    """
    kwargs = {
        "guidance_scale": calibration.guidance_scale,
        "map_channels": calibration.map_channels,
        "timesteps": calibration.timesteps,
        "forward": calibration.forward,
        "reference": calibration.reference,
        "divergence": calibration.divergence,
        "end_step": calibration.end_step,
        "m_max": calibration.m_max if calibration.end_step == "per_modality" else [calibration.m_max_joint],
        "tau": calibration.tau,
        "quantile_range": calibration.quantile_range,
        "median_kernel": calibration.median_kernel,
        "min_component_size": calibration.min_component_size,
    }
    kwargs.update(overrides)
    return AnoFPDMInferer(**kwargs)


class VolumeInferer:
    """Run AnoFPDM over whole NIfTI volumes and write maps, masks and slice tables in the input geometry.

    Args:
        network: the epsilon network.
        inferer: a calibrated :class:`AnoFPDMInferer`.
        preprocessor: the preprocessing the network was trained with.
        map_modalities: names of the map modalities (for the CSV columns).
        batch_size: slices per network batch.
        device: where to run the network.
        progress: progress bars.
        overwrite: recompute cases whose outputs exist.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: AnoFPDMInferer,
        preprocessor: VolumePreprocessor,
        map_modalities: Sequence[str] | None = None,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        progress: bool = True,
        overwrite: bool = False,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.inferer = inferer
        self.preprocessor = preprocessor
        self.map_modalities = (
            list(map_modalities) if map_modalities else [preprocessor.modalities[c] for c in inferer.map_channels]
        )
        self.batch_size = int(batch_size)
        self.progress = progress
        self.overwrite = overwrite
        #: what made the outputs (set by :meth:`from_files`): stored per case, and a rerun skips a finished case
        #: only when it matches, so outputs of another checkpoint or calibration are recomputed
        self.provenance: dict[str, Any] | None = None

    @classmethod
    def from_files(
        cls,
        checkpoint: str | os.PathLike,
        calibration: str | os.PathLike,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        guidance_scale: float | None = None,
        t_max: int | None = None,
        stride: int | None = None,
        timesteps: Sequence[int] | None = None,
        forward: str | None = None,
        amp: bool = False,
        use_ema: bool = True,
        progress: bool = True,
        overwrite: bool = False,
        **inferer_overrides: Any,
    ) -> VolumeInferer:
        """Load a checkpoint and its calibration file, check that they belong together and to the requested
        setting (w, step grid, forward mode: None means "as calibrated"), and build the volume inferer."""
        from ..calibration import Calibration
        from ..networks import load_network
        from .schedule import make_step_grid

        device = torch.device(device)
        network, info = load_network(checkpoint, use_ema=use_ema, map_location="cpu")
        if not info.get("preprocessing"):
            raise ValueError(f"checkpoint {checkpoint} records no preprocessing; train with the bundle")
        cal = Calibration.load(calibration)
        grid = None
        if timesteps is not None or t_max is not None or stride is not None:
            grid = make_step_grid(
                t_max if t_max is not None else cal.timesteps[-1], stride if stride is not None else 1, timesteps
            )
        cal.check(
            source=f"calibration {calibration}",
            checkpoint_digest=info["digest"],
            timesteps=grid,
            forward=forward,
            guidance_scale=guidance_scale,
            preprocessing=dict(info["preprocessing"]),
            # forward-process options the calibration depends on, when given as inferer overrides
            **{k: inferer_overrides.get(k) for k in ("reference", "divergence", "end_step", "map_channels")},
        )
        if amp and device.type == "cuda":
            inferer_overrides.setdefault("autocast_dtype", torch.bfloat16)
        inferer = inferer_from_calibration(cal, **inferer_overrides)
        preprocessor = VolumePreprocessor.from_dict(info["preprocessing"])
        volume_inferer = cls(
            network, inferer, preprocessor, cal.map_modalities, batch_size, device, progress, overwrite
        )
        volume_inferer.provenance = {
            "checkpoint_digest": info["digest"],
            "calibration": {k: v for k, v in cal.to_dict().items() if k != "created"},
            "overrides": {k: repr(v) for k, v in sorted(inferer_overrides.items()) if k != "progress"},
        }
        return volume_inferer

    # ------------------------------------------------------------------ one case
    def output_paths(self, output_dir: str | os.PathLike, case_id: str) -> dict[str, Path]:
        folder = Path(output_dir) / case_id
        return {
            "map": folder / f"{case_id}_anomaly_map.nii.gz",
            "mask": folder / f"{case_id}_anomaly_mask.nii.gz",
            "slices": folder / f"{case_id}_slices.csv",
            "provenance": folder / f"{case_id}_provenance.json",
        }

    def is_finished(self, output_dir: str | os.PathLike, case_id: str) -> bool:
        """All outputs exist and were made with this checkpoint and calibration."""
        paths = self.output_paths(output_dir, case_id)
        if not all(p.is_file() for p in paths.values()):
            return False
        if self.provenance is None:
            return True
        try:
            return json.loads(paths["provenance"].read_text()) == json.loads(json.dumps(self.provenance))
        except (OSError, ValueError):
            return False

    @torch.no_grad()
    def predict_case(self, entry: Mapping[str, Any]) -> CaseResult:
        """Preprocess one case, run AnoFPDM on its brain-bearing slices in batches, and map the results back."""
        case_id = str(entry["id"])
        data = self.preprocessor(entry)
        arrays = self.preprocessor.slices(data)
        size, depth = self.preprocessor.image_size, int(data["image"].shape[-1])
        map_vol = torch.zeros(1, size, size, depth)
        mask_vol = torch.zeros(1, size, size, depth)
        rows: list[dict[str, Any]] = []
        n = len(arrays.table)
        bar = tqdm(total=n, desc=case_id, unit="slice", leave=False, disable=not self.progress)
        for start in range(0, n, self.batch_size):
            x = torch.from_numpy(arrays.image[start : start + self.batch_size]).to(self.device)
            out = self.inferer(x, self.network)
            # a tensor copy: pandas may hand out a read-only array, which torch indexing warns about
            idx = torch.as_tensor(
                arrays.table["slice_index"].to_numpy(dtype=np.int64, copy=True)[start : start + x.shape[0]]
            )
            map_vol[0, :, :, idx] = out.filtered_map.float().cpu().permute(1, 2, 0)
            mask_vol[0, :, :, idx] = out.mask.float().cpu().permute(1, 2, 0)
            m = out.divergence.amax(dim=1).cpu()  # (B, Cm)
            t_e = out.end_step.cpu()
            for b in range(x.shape[0]):
                row = arrays.table.iloc[start + b]
                record: dict[str, Any] = {
                    "index": int(row["source_index"]),
                    "ras_index": int(row["slice_index"]),
                }
                for j, name in enumerate(self.map_modalities):
                    record[f"t_e_{name}"] = int(t_e[b, j if t_e.shape[1] > 1 else 0])
                    record[f"M_{name}"] = float(m[b, j])
                record["c"] = float(out.cosine[b])
                record["pred_label"] = int(out.pred_label[b])
                record["threshold"] = float(out.threshold[b])
                record["mask_pixels"] = int(out.mask[b].sum())
                if arrays.has_label:
                    record["label"] = int(row["label"])
                rows.append(record)
            bar.update(x.shape[0])
        bar.close()
        reference = nib.load(entry["image"][0] if not isinstance(entry["image"], str) else entry["image"])
        map_in = self.preprocessor.invert(map_vol, data, interpolate=True)[0].numpy().astype(np.float32)
        mask_in = (self.preprocessor.invert(mask_vol, data, interpolate=True)[0].numpy() >= 0.5).astype(np.uint8)
        return CaseResult(case_id, map_in, mask_in, reference, pd.DataFrame(rows))

    def write_case(self, result: CaseResult, output_dir: str | os.PathLike) -> dict[str, Path]:
        paths = self.output_paths(output_dir, result.case_id)
        with atomic_path(paths["slices"]) as tmp:
            result.table.to_csv(tmp, index=False)
        write_nifti_like(result.anomaly_map, result.reference, paths["map"])
        write_nifti_like(result.mask, result.reference, paths["mask"])
        with atomic_path(paths["provenance"]) as tmp:  # written last: marks the case finished
            tmp.write_text(json.dumps(self.provenance or {}, indent=1, default=str))
        return paths

    # ------------------------------------------------------------------ many cases
    def run_datalist(
        self, datalist: Mapping[str, Any], output_dir: str | os.PathLike, split: str = "test", **kwargs: Any
    ) -> dict[str, Any]:
        """Check that the datalist's modalities are the model's, then :meth:`run` on ``datalist[split]``
        (entries with absolute paths, e.g. from ``load_datalist(..., dataset_dir=...)``)."""
        self.preprocessor.check_modalities(datalist.get("modalities", []), source="datalist")
        if split not in datalist:
            raise KeyError(
                f"datalist has no split '{split}' (has {[k for k in datalist if isinstance(datalist[k], list)]})"
            )
        return self.run(datalist[split], output_dir, **kwargs)

    def run(
        self, entries: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, raise_on_failure: bool = True
    ) -> dict[str, Any]:
        """Process every case; skip finished ones; report failures at the end.

        Returns:
            summary dict (``done``, ``skipped``, ``failed`` {case: reason}, ``output_dir``), also written to
            ``<output_dir>/inference_summary.json``.

        Raises:
            InferenceFailures: after all cases were attempted, if any failed and ``raise_on_failure``.
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        done, skipped, failed = [], [], {}
        start = time.time()
        for entry in tqdm(entries, desc="cases", unit="case", disable=not self.progress):
            case_id = str(entry.get("id", "<case>"))
            if not self.overwrite and self.is_finished(output_dir, case_id):
                skipped.append(case_id)
                continue
            try:
                self.write_case(self.predict_case(entry), output_dir)
                done.append(case_id)
            except Exception as exc:  # one bad case must not lose the others
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                failed[case_id] = reason
                logger.error("case %s failed: %s", case_id, reason)
        summary = {
            "output_dir": str(output_dir),
            "done": done,
            "skipped": skipped,
            "failed": failed,
            "seconds": round(time.time() - start, 1),
        }
        with atomic_path(output_dir / "inference_summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        logger.info(
            "inference: %d done, %d skipped (already finished), %d failed; outputs in %s",
            len(done),
            len(skipped),
            len(failed),
            output_dir,
        )
        if failed and raise_on_failure:
            detail = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:5])
            raise InferenceFailures(f"{len(failed)} of {len(entries)} case(s) failed: {detail}")
        return summary
