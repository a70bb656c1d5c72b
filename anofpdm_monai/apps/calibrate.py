"""Calibration from Python: a trained checkpoint + a datalist split with slice labels -> the calibration file.

The same MONAI pieces as ``calibrate.json``: a ``SupervisedEvaluator`` over the validation slices with
:class:`~anofpdm_monai.calibration.CalibrationInferer` and :class:`~anofpdm_monai.calibration.CalibrationHandler`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from torch.utils.data import DataLoader

from ..calibration import Calibration, CalibrationError, CalibrationHandler, CalibrationInferer
from ..data import SliceDataset
from ..engines.prepare_batch import SliceLabelPrepareBatch
from ..inferers.anofpdm import AnoFPDMInferer
from ..io import ensure_writable_dir, ensure_writable_file
from ..networks import load_network
from ..settings import DEFAULT_GUIDANCE_CANDIDATES, DEFAULT_TOLERANCE, AnoFPDMSettings

__all__ = ["map_channels_of", "run_calibration"]


def map_channels_of(map_modalities: Sequence[str], modalities: Sequence[str]) -> list[int]:
    """Channel indices of the map modalities among the model's; one-line error for an unknown one."""
    missing = [m for m in map_modalities if m not in modalities]
    if missing:
        raise CalibrationError(f"map modalities {missing} are not among the model's modalities {list(modalities)}")
    return [list(modalities).index(m) for m in map_modalities]


def run_calibration(
    checkpoint: str | os.PathLike,
    datalist: str | os.PathLike | Mapping[str, Any],
    dataset_dir: str | os.PathLike | None,
    output_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    map_modalities: Sequence[str],
    settings: AnoFPDMSettings | None = None,
    guidance_scales: Sequence[float] = DEFAULT_GUIDANCE_CANDIDATES,
    tolerance: float = DEFAULT_TOLERANCE,
    split: str = "validation",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    use_ema: bool = True,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> Calibration:
    """Calibrate a trained checkpoint on a datalist split with slice labels, and write the calibration file.

    The network architecture, preprocessing and noise schedule come from the checkpoint; ``settings`` (or single
    AnoFPDM options such as ``t_max=300, stride=20``, ``precision="bf16"``) are what the inference must then use.

    Returns:
        the :class:`Calibration` (also written to ``output_path``).
    """
    device = torch.device(device)
    ensure_writable_file(output_path, "calibration file")  # before any work
    ensure_writable_dir(cache_dir, "cache_dir")
    network, info = load_network(checkpoint, use_ema=use_ema, map_location="cpu")
    if not info.get("preprocessing"):
        raise CalibrationError(f"checkpoint {checkpoint} records no preprocessing; train with the bundle")
    channels = map_channels_of(map_modalities, info["preprocessing"]["modalities"])
    dataset = SliceDataset.from_datalist(
        datalist, dataset_dir, split, cache_dir, info["preprocessing"], progress=progress, require_labels=True
    )
    inferer = AnoFPDMInferer(
        settings,
        map_channels=channels,
        scheduler=info["schedule"],
        seed=seed,
        **options,
    )
    stats_inferer = CalibrationInferer(inferer, guidance_scales)
    handler = CalibrationHandler(
        stats_inferer,
        output_path,
        map_modalities,
        info,
        tolerance,
        datalist=f"{datalist if not isinstance(datalist, Mapping) else '<in-memory datalist>'} [{split}]",
    )
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0),
        network=network.to(device),
        prepare_batch=SliceLabelPrepareBatch(),
        inferer=stats_inferer,
        decollate=False,
        val_handlers=[handler],
    )
    evaluator.run()
    assert handler.calibration is not None
    return handler.calibration
