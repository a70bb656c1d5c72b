"""Volume inference from Python: NIfTI volumes in, anomaly maps and masks out on each input's own grid.

:class:`VolumeInferer` assembles the same MONAI components as the inference bundle (``inference.json``): a
:class:`~anofpdm_monai.engines.CaseDataset` through the volume preprocessing, a
:class:`~anofpdm_monai.engines.CaseEvaluator` with the :class:`~anofpdm_monai.inferers.AnoFPDMVolumeInferer`, the
post-processing Compose of :func:`default_postprocessing` (median filter, per-slice threshold, small components,
health gating, ``Invertd`` back to the input grid, :class:`~anofpdm_monai.data.writers.SaveCaseOutputsd`) and the
:class:`~anofpdm_monai.engines.InferenceSummary` handler. A failing case is reported and the others finish.

A run holds the output folder's lock (:class:`~anofpdm_monai.io.OutputLock`; a second run on the same folder stops at
start with ``OutputPathError: output_dir X is in use by another run (pid N on host)``). Each case's outputs are one
unit (:mod:`anofpdm_monai.data.writers`); a rerun skips a case only when its outputs are intact and were made with
the same provenance (:func:`inference_provenance`: checkpoint, calibration, settings, seed, overrides, software
version) from inputs of the same content, and recomputes any other, saying why in the log. Under ``torchrun``
(``multi_gpu_inference.json``) rank 0 takes the lock and decides which cases to run (:func:`pending_cases`); every
rank then writes its shard of them.
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
from ..distributed import rank_and_world
from ..engines.inference import CaseDataset, CaseEvaluator, InferenceSummary, VolumePrepareBatch
from ..inferers.anofpdm import AnoFPDMInferer
from ..inferers.volume import AnoFPDMVolumeInferer
from ..io import OutputPathError, acquire_output_lock, ensure_writable_dir, first_line, output_lock
from ..networks import load_network
from ..postprocessing import (
    HealthGated,
    MedianFilterSlicesd,
    RemoveSmallComponentsSlicesd,
    ThresholdSlicesd,
    mask_pixels_per_slice,
)
from ..settings import AnoFPDMSettings

__all__ = [
    "VolumeInferer",
    "default_postprocessing",
    "inference_provenance",
    "inferer_provenance",
    "cases_for_inference",
    "pending_cases",
]

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
            SaveCaseOutputsd(
                output_dir=output_dir,
                map_modalities=map_modalities,
                provenance=provenance,
                health_score=settings.health_score,
            ),
        ]
    )


_NOT_RESULTS = ("progress", "seed")  # overrides that do not change results, or are recorded on their own


def _software() -> dict[str, str]:
    from .. import __version__

    return {"anofpdm_monai": __version__}


def inference_provenance(
    model_info: Mapping[str, Any],
    calibration: Calibration,
    settings: AnoFPDMSettings,
    overrides: Mapping[str, Any] | None = None,
    seed: int | None = 0,
) -> dict[str, Any]:
    """What made a case's outputs, i.e. everything their values depend on besides the input files: the checkpoint's
    digest, the calibration, the settings, the seed of the forward noise, the inferer overrides and the package
    version (the numeric mode is the settings' ``precision``). Stored with each case as ``made_with``; a rerun skips
    a finished case only when it matches (``batch_size`` is not in it: a slice's forward noise depends on the seed,
    the case and the slice only)."""
    return {
        "checkpoint_digest": model_info["digest"],
        "calibration": calibration.without_created(),
        "settings": settings.to_dict(),
        "seed": None if seed is None else int(seed),
        "overrides": {k: repr(v) for k, v in sorted((overrides or {}).items()) if k not in _NOT_RESULTS},
        "software": _software(),
    }


def inferer_provenance(inferer: AnoFPDMInferer) -> dict[str, Any]:
    """The provenance of a :class:`VolumeInferer` built without :meth:`VolumeInferer.from_files`: the inferer's
    settings, constants and seed (the network is not recorded: it has no file to take a digest of)."""

    def listed(x: Any) -> Any:
        return None if x is None else torch.as_tensor(x).tolist()

    return {
        "network": "not recorded (VolumeInferer built without from_files)",
        "inferer": {
            "settings": inferer.settings.to_dict(),
            "guidance_scale": inferer.guidance_scale,
            "map_channels": list(inferer.map_channels),
            "m_max": listed(inferer.m_max),
            "tau": inferer.tau,
            "threshold": inferer.threshold,
            "baseline_curve": listed(inferer.baseline_curve),
            "schedule": inferer.schedule.to_dict(),
        },
        "seed": inferer.seed,
        "software": _software(),
    }


def pending_cases(
    cases: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The bundle's ``pending``: take the lock of ``output_dir`` for the rest of the run (released by the
    :class:`~anofpdm_monai.engines.InferenceSummary` handler once the summary is written, or when the process ends),
    then :func:`~anofpdm_monai.data.writers.split_finished`.

    Under ``torchrun`` only rank 0 takes the lock and splits; every rank gets rank 0's answer (so all ranks shard the
    same list) or raises its error.

    Raises:
        OutputPathError: another run holds the lock of ``output_dir`` (on every rank).
    """
    rank, world = rank_and_world()
    message: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            acquire_output_lock(output_dir)
            message[0] = ("ok", split_finished(cases, output_dir, provenance, overwrite))
        except Exception as exc:
            error = exc
            message[0] = ("error", type(exc).__name__, first_line(exc))
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0][0] == "error":
        _, kind, text = message[0]
        if kind == OutputPathError.__name__:
            raise OutputPathError(text)
        raise RuntimeError(f"rank 0 could not list the cases to run: {kind}: {text}")
    return message[0][1]


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
        #: what made the outputs (set by :meth:`from_files`; None: :func:`inferer_provenance`): stored per case
        #: with the inferer's seed (:meth:`run_provenance`), and a rerun skips a finished case only when it matches,
        #: so outputs of another checkpoint, calibration or seed are recomputed
        self.provenance: dict[str, Any] | None = None

    @classmethod
    def from_files(
        cls,
        checkpoint: str | os.PathLike,
        calibration: str | os.PathLike,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        guidance_scale: float | None = None,
        use_ema: bool = True,
        progress: bool = True,
        overwrite: bool = False,
        **options: Any,
    ) -> VolumeInferer:
        """Load a checkpoint and its calibration file, check that they belong together and to the requested
        setting (w and any AnoFPDM option such as ``t_max``, ``stride``, ``forward``, ``precision``: None means "as
        calibrated"), and build the volume inferer."""
        device = torch.device(device)
        network, info = load_network(checkpoint, use_ema=use_ema, map_location="cpu")
        if not info.get("preprocessing"):
            raise ValueError(f"checkpoint {checkpoint} records no preprocessing; train with the bundle")
        cal = Calibration.load(calibration)
        settings_options, rest = AnoFPDMSettings.split_kwargs(options)
        settings = cal.inference_settings(
            f"calibration {calibration}", info, guidance_scale=guidance_scale, **settings_options
        )
        map_channels = rest.pop("map_channels", None)
        if map_channels is not None:
            cal.check(source=f"calibration {calibration}", map_channels=map_channels)
        inferer = AnoFPDMInferer.from_calibration(cal, scheduler=info["schedule"], settings=settings, **rest)
        volume_inferer = cls(
            network,
            inferer,
            VolumePreprocessor.from_dict(info["preprocessing"], source=f"preprocessing of checkpoint {checkpoint}"),
            cal.map_modalities,
            batch_size,
            device,
            progress,
            overwrite,
        )
        volume_inferer.provenance = inference_provenance(info, cal, settings, rest, seed=inferer.seed)
        return volume_inferer

    def run_provenance(self) -> dict[str, Any]:
        """What the outputs of a run now are made with: :attr:`provenance` (or :func:`inferer_provenance`) with the
        inferer's current seed."""
        base = dict(self.provenance) if self.provenance is not None else inferer_provenance(self.inferer)
        base["seed"] = self.inferer.seed
        return base

    # ------------------------------------------------------------------ the MONAI pieces
    def postprocessing(self, output_dir: str | os.PathLike, provenance: Mapping[str, Any] | None = None) -> Compose:
        return default_postprocessing(
            self.preprocessor.transform,
            output_dir,
            self.map_modalities,
            self.inferer.settings,
            self.run_provenance() if provenance is None else provenance,
        )

    def evaluator(
        self,
        entries: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        provenance: Mapping[str, Any] | None = None,
    ) -> CaseEvaluator:
        """The case evaluator over ``entries`` (all of them: skipping finished cases is :meth:`run`'s job)."""
        dataset = CaseDataset(entries, transform=self.preprocessor.transform)
        loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
        return CaseEvaluator(
            device=self.device,
            val_data_loader=loader,
            network=self.network,
            prepare_batch=VolumePrepareBatch(),
            inferer=self.volume_inferer,
            postprocessing=self.postprocessing(output_dir, provenance),
            decollate=True,
        )

    # ------------------------------------------------------------------ runs
    def run(
        self, entries: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, raise_on_failure: bool = True
    ) -> dict[str, Any]:
        """Process every case; skip finished ones; report failures at the end. The output folder's lock is held
        throughout.

        Returns:
            summary dict (``done``, ``skipped``, ``failed`` {case: reason}, ``output_dir``), also written to
            ``<output_dir>/inference_summary.json``.

        Raises:
            OutputPathError: ``output_dir`` cannot be written, or another run is using it (before any case runs).
            InferenceFailures: after all cases were attempted, if any failed and ``raise_on_failure``.
        """
        ensure_writable_dir(output_dir, "output_dir")
        provenance = self.run_provenance()
        with output_lock(output_dir):
            todo, skipped = split_finished(entries, output_dir, provenance, self.overwrite)
            evaluator = self.evaluator(todo, output_dir, provenance)
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
