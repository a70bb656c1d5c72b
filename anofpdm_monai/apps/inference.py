"""Volume inference from Python: NIfTI volumes in, anomaly maps and masks out on each input's own grid.

:class:`VolumeInferer` assembles the same MONAI components as the inference bundle (``inference.json``): a
:class:`~anofpdm_monai.engines.CaseDataset` through the volume preprocessing, a
:class:`~anofpdm_monai.engines.CaseEvaluator` with the :class:`~anofpdm_monai.inferers.AnoFPDMVolumeInferer`, the
post-processing Compose of :func:`default_postprocessing` (median filter, per-slice threshold, small components,
health gating, ``Invertd`` back to the input grid, :class:`~anofpdm_monai.data.writers.SaveCaseOutputsd`) and the
:class:`~anofpdm_monai.engines.InferenceSummary` handler. A failing case is reported and the others finish; a rerun
skips finished cases made with the same checkpoint and calibration.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import DataLoader
from monai.transforms import AsDiscreted, Compose, EnsureTyped, FlattenSubKeysd, Invertd, Lambdad

from ..calibration import Calibration
from ..data.datalist import datalist_from_folder, load_datalist
from ..data.preprocessing import VolumePreprocessor
from ..data.writers import SaveCaseOutputsd, split_finished
from ..engines.inference import CaseDataset, CaseEvaluator, InferenceSummary, VolumePrepareBatch
from ..inferers.anofpdm import AnoFPDMInferer
from ..inferers.volume import AnoFPDMVolumeInferer
from ..io import ensure_writable_dir
from ..networks import load_network
from ..postprocessing import (
    HealthGated,
    MedianFilterSlicesd,
    RemoveSmallComponentsSlicesd,
    ThresholdSlicesd,
    mask_pixels_per_slice,
)
from ..settings import AnoFPDMSettings

__all__ = ["VolumeInferer", "default_postprocessing", "inference_provenance", "cases_for_inference"]

logger = logging.getLogger(__name__)


def default_postprocessing(
    preprocessing: Compose,
    output_dir: str | os.PathLike,
    map_modalities: Sequence[str],
    settings: AnoFPDMSettings,
    provenance: Mapping[str, Any] | None = None,
) -> Compose:
    """The post-processing of volume inference (written out the same way in ``inference.json``)."""
    return Compose(
        [
            FlattenSubKeysd(keys="pred", delete_keys=True),
            MedianFilterSlicesd(keys="anomaly_map", kernel_size=settings.median_kernel),
            ThresholdSlicesd(keys="anomaly_map", threshold_key="threshold", output_key="anomaly_mask"),
            RemoveSmallComponentsSlicesd(keys="anomaly_mask", max_size=settings.min_component_size),
            HealthGated(keys="anomaly_mask", label_key="pred_label"),
            Lambdad(keys="anomaly_mask", func=mask_pixels_per_slice, overwrite="mask_pixels"),
            EnsureTyped(keys=["anomaly_map", "anomaly_mask"], dtype=torch.float32, track_meta=True),
            Invertd(
                keys=["anomaly_map", "anomaly_mask"],
                transform=preprocessing,
                orig_keys="image",
                nearest_interp=False,
                to_tensor=True,
            ),
            AsDiscreted(keys="anomaly_mask", threshold=0.5),
            SaveCaseOutputsd(output_dir=output_dir, map_modalities=map_modalities, provenance=provenance),
        ]
    )


def inference_provenance(
    model_info: Mapping[str, Any],
    calibration: Calibration,
    settings: AnoFPDMSettings,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What made a case's outputs (stored with them; a rerun skips a finished case only when it matches)."""
    return {
        "checkpoint_digest": model_info["digest"],
        "calibration": calibration.without_created(),
        "settings": settings.to_dict(),
        "overrides": {k: repr(v) for k, v in sorted((overrides or {}).items()) if k != "progress"},
    }


def cases_for_inference(
    preprocessor: VolumePreprocessor,
    input_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | Mapping[str, Any] | None = None,
    dataset_dir: str | os.PathLike | None = None,
    split: str = "test",
) -> list[dict[str, Any]]:
    """The cases to run: every case of ``input_dir`` (found by its layout; a case folder that cannot be used becomes
    an entry with an ``error``, reported as a failed case), else ``datalist[split]`` after checking that the
    datalist's modalities are the model's."""
    if input_dir:
        folder = datalist_from_folder(input_dir, modalities=preprocessor.modalities, report_unusable=True)
        failed = [{"id": case, "error": reason} for case, reason in folder["unusable"].items()]
        return sorted([*folder["test"], *failed], key=lambda e: str(e["id"]))
    if datalist is None:
        raise ValueError("give input_dir or a datalist")
    content = load_datalist(datalist, dataset_dir, None) if not isinstance(datalist, Mapping) else datalist
    preprocessor.check_modalities(content.get("modalities", []), source="datalist")
    if split not in content:
        raise KeyError(f"datalist has no split '{split}' (has {[k for k in content if isinstance(content[k], list)]})")
    return list(content[split])


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
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.inferer = inferer
        self.volume_inferer = AnoFPDMVolumeInferer(inferer, batch_size, preprocessor.min_brain_pixels)
        self.preprocessor = preprocessor
        self.map_modalities = (
            list(map_modalities) if map_modalities else [preprocessor.modalities[c] for c in inferer.map_channels]
        )
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
        amp: bool = False,
        use_ema: bool = True,
        progress: bool = True,
        overwrite: bool = False,
        **options: Any,
    ) -> VolumeInferer:
        """Load a checkpoint and its calibration file, check that they belong together and to the requested
        setting (w and any AnoFPDM option such as ``t_max``, ``stride``, ``forward``: None means "as calibrated"),
        and build the volume inferer."""
        device = torch.device(device)
        network, info = load_network(checkpoint, use_ema=use_ema, map_location="cpu")
        if not info.get("preprocessing"):
            raise ValueError(f"checkpoint {checkpoint} records no preprocessing; train with the bundle")
        cal = Calibration.load(calibration)
        settings_options, rest = AnoFPDMSettings.split_kwargs(options)
        settings = cal.inference_settings(
            f"calibration {calibration}", info, guidance_scale=guidance_scale, **settings_options
        )
        extra: dict[str, Any] = {}
        if amp and device.type == "cuda":
            extra["autocast_dtype"] = torch.bfloat16
        rest = {**extra, **rest}
        map_channels = rest.pop("map_channels", None)
        if map_channels is not None:
            cal.check(source=f"calibration {calibration}", map_channels=map_channels)
        inferer = AnoFPDMInferer.from_calibration(cal, scheduler=info["schedule"], settings=settings, **rest)
        volume_inferer = cls(
            network,
            inferer,
            VolumePreprocessor.from_dict(info["preprocessing"]),
            cal.map_modalities,
            batch_size,
            device,
            progress,
            overwrite,
        )
        volume_inferer.provenance = inference_provenance(info, cal, settings, rest)
        return volume_inferer

    # ------------------------------------------------------------------ the MONAI pieces
    def postprocessing(self, output_dir: str | os.PathLike) -> Compose:
        return default_postprocessing(
            self.preprocessor.transform, output_dir, self.map_modalities, self.inferer.settings, self.provenance
        )

    def evaluator(self, entries: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> CaseEvaluator:
        """The case evaluator over ``entries`` (all of them: skipping finished cases is :meth:`run`'s job)."""
        dataset = CaseDataset(entries, transform=self.preprocessor.transform)
        loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
        return CaseEvaluator(
            device=self.device,
            val_data_loader=loader,
            network=self.network,
            prepare_batch=VolumePrepareBatch(),
            inferer=self.volume_inferer,
            postprocessing=self.postprocessing(output_dir),
            decollate=True,
        )

    # ------------------------------------------------------------------ runs
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
        ensure_writable_dir(output_dir, "output_dir")
        todo, skipped = split_finished(entries, output_dir, self.provenance, self.overwrite)
        evaluator = self.evaluator(todo, output_dir)
        summary = InferenceSummary(output_dir, skipped, raise_on_failure)
        summary.attach(evaluator)
        evaluator.run()
        return summary.summary

    def run_datalist(
        self, datalist: Mapping[str, Any], output_dir: str | os.PathLike, split: str = "test", **kwargs: Any
    ) -> dict[str, Any]:
        """Check that the datalist's modalities are the model's, then :meth:`run` on ``datalist[split]``
        (entries with absolute paths, e.g. from ``load_datalist(..., dataset_dir=...)``)."""
        return self.run(cases_for_inference(self.preprocessor, datalist=datalist, split=split), output_dir, **kwargs)
