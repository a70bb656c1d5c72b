"""The calibration pass as MONAI engine pieces: an ``Inferer`` that yields the statistics of all candidate guidance
scales from one forward process, and an ignite handler that accumulates them over the validation slices and
writes the calibration file when the evaluator completes (docs/method.md §6).

``calibrate.json`` is a ``SupervisedEvaluator`` over the validation slices with :class:`CalibrationInferer` as its
inferer and :class:`CalibrationHandler` among its handlers; :func:`collect_statistics` runs the same pieces in a
plain loop for library users.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer
from monai.utils import CommonKeys
from tqdm.auto import tqdm

from ..distributed import ShardedBatchSampler, gather_objects, rank_and_world
from ..inferers.anofpdm import AnoFPDMInferer
from ..inferers.health import health_score
from ..settings import DEFAULT_GUIDANCE_CANDIDATES, DEFAULT_TOLERANCE, check_guidance_scale
from .algorithm import CalibrationStatistics, calibrate_from_statistics
from .record import Calibration, CalibrationError

__all__ = [
    "CalibrationInferer",
    "StatisticsAccumulator",
    "CalibrationHandler",
    "collect_statistics",
    "make_calibration",
]

logger = logging.getLogger(__name__)


class CalibrationInferer(Inferer):
    """MONAI ``Inferer``: the calibration statistics of a batch of slices for every candidate w at once.

    Args:
        inferer: the AnoFPDM inferer whose settings (grid, forward mode, ...) are calibrated.
        guidance_scales: candidate w; when the settings fix w (``fixed_guidance_scale``, the official preset) that
            w alone is the candidate, whatever is given here.

    Called with the slices, the network and optionally their ``case_id`` (one per slice, or one for all) and
    ``slice_index`` (RAS axial indices; :class:`~anofpdm_monai.engines.SliceLabelPrepareBatch` passes both): each
    slice's forward noise then comes from its (seed, case, slice) key, so the statistics do not depend on the batch
    size or the number of ranks; without them from the slices' positions in the batch. ``noise_keys`` gives the keys
    directly.

    Returns (when called):
        dict with ``divergence_max`` (W, B, Cm), ``divergence_max_joint`` (W, B) and ``score`` (W, B), the health
        score of the inferer's settings (``health_score``, ``mse_gap`` by default); with
        ``divergence_baseline="healthy"`` also the raw M_t curves ``divergence`` (W, B, K, Cm), from which the
        calibration takes the healthy baseline.
    """

    def __init__(self, inferer: AnoFPDMInferer, guidance_scales: Sequence[float] = DEFAULT_GUIDANCE_CANDIDATES) -> None:
        super().__init__()
        self.inferer = inferer
        fixed = inferer.settings.fixed_guidance_scale
        if fixed is not None:
            given = [float(w) for w in guidance_scales]
            if given != [fixed]:
                logger.info("the settings fix w = %g: candidates %s not searched", fixed, given)
            guidance_scales = [fixed]
        self.guidance_scales = [check_guidance_scale(w, "guidance_scales") for w in guidance_scales]
        if not self.guidance_scales:
            raise CalibrationError("no guidance scale candidates")

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Any,
        *args: Any,
        case_id: str | Sequence[str] | None = None,
        slice_index: Sequence[int] | torch.Tensor | None = None,
        noise_keys: Sequence[int] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        if noise_keys is None and slice_index is not None:
            noise_keys = self.inferer.noise_keys(case_id, slice_index)
        result = self.inferer.forward_process(
            inputs,
            network,
            guidance_scales=self.guidance_scales,
            need_maps=False,
            relative=False,
            noise_keys=noise_keys,
        )
        out = {
            "divergence_max": result.divergence_max("per_modality").cpu(),
            "divergence_max_joint": result.divergence_max("joint")[..., 0].cpu(),
            "score": health_score(result, self.inferer.settings.health_score).cpu(),
        }
        if self.inferer.settings.divergence_baseline == "healthy":
            out["divergence"] = result.divergence.cpu()
        return out


class StatisticsAccumulator:
    """Collects :class:`CalibrationInferer` outputs and slice labels batch by batch."""

    def __init__(self, guidance_scales: Sequence[float]) -> None:
        self.guidance_scales = [float(w) for w in guidance_scales]
        self.reset()

    def reset(self) -> None:
        self._parts: dict[str, list[torch.Tensor]] = {"div": [], "div_j": [], "score": [], "labels": [], "curves": []}

    def update(self, output: Mapping[str, torch.Tensor], labels: Any) -> None:
        if "divergence" in output:
            self._parts["curves"].append(torch.as_tensor(output["divergence"]).cpu())
        self._parts["div"].append(torch.as_tensor(output["divergence_max"]).cpu())
        self._parts["div_j"].append(torch.as_tensor(output["divergence_max_joint"]).cpu())
        self._parts["score"].append(torch.as_tensor(output["score"]).cpu())
        self._parts["labels"].append(torch.as_tensor(labels).reshape(-1).cpu())

    def gathered(self) -> StatisticsAccumulator:
        """The accumulator of every rank's batches in the single-process batch order (itself in one process); the
        ranks must have drawn their batches from a :class:`~anofpdm_monai.distributed.ShardedBatchSampler`."""
        per_rank = gather_objects(self._parts)
        merged = StatisticsAccumulator(self.guidance_scales)
        merged._parts = {k: ShardedBatchSampler.interleave([p[k] for p in per_rank]) for k in self._parts}
        return merged

    def statistics(self) -> CalibrationStatistics:
        if not self._parts["labels"]:
            raise CalibrationError("no validation slices to calibrate on")
        return CalibrationStatistics(
            guidance_scales=np.asarray(self.guidance_scales, dtype=np.float64),
            divergence_max=torch.cat(self._parts["div"], dim=1).numpy(),
            divergence_max_joint=torch.cat(self._parts["div_j"], dim=1).numpy(),
            score=torch.cat(self._parts["score"], dim=1).numpy(),
            labels=torch.cat(self._parts["labels"]).numpy(),
            divergence=torch.cat(self._parts["curves"], dim=1).numpy() if self._parts["curves"] else None,
        )


@torch.no_grad()
def collect_statistics(
    network: torch.nn.Module,
    inferer: AnoFPDMInferer,
    batches: Iterable[Mapping[str, Any]],
    guidance_scales: Sequence[float],
    device: torch.device | str = "cpu",
    progress: bool = True,
    total: int | None = None,
) -> CalibrationStatistics:
    """One pass of network calls over the validation batches (dicts with ``image`` and ``class_label``, and
    ``case_id`` and ``slice_index`` for per-slice noise keys, as :class:`~anofpdm_monai.data.SliceDataset` gives), for
    all candidate w at once (the settings' ``fixed_guidance_scale`` alone when they fix w)."""
    network.eval()
    stats_inferer = CalibrationInferer(inferer, guidance_scales)
    acc = StatisticsAccumulator(stats_inferer.guidance_scales)
    for batch in tqdm(batches, desc="calibration pass", unit="batch", total=total, disable=not progress):
        x = torch.as_tensor(batch["image"]).to(device)
        ids = {"case_id": batch.get("case_id"), "slice_index": batch.get("slice_index")}
        acc.update(stats_inferer(x, network, **ids), batch["class_label"])
    return acc.statistics()


class CalibrationHandler:
    """Ignite handler of the calibration evaluator: accumulates the statistics of every iteration
    (``output[PRED]`` from :class:`CalibrationInferer`, ``output[LABEL]`` the slice labels) and, when the
    evaluator completes, computes w*, M_max and tau and writes the calibration file.

    Under ``torchrun`` each rank evaluates its share of the batches (``ShardedBatchSampler``); the statistics of
    all ranks are gathered in the single-process order, every rank computes the same calibration, and rank 0
    writes the file.

    Args:
        inferer: the :class:`CalibrationInferer` of the evaluator (its settings and candidates are recorded).
        output_path: the calibration JSON file.
        map_modalities: names of the map modalities.
        model_info: the checkpoint's metadata from :func:`~anofpdm_monai.networks.load_network` (digest,
            preprocessing, schedule).
        tolerance: the w* tolerance.
        datalist: description of the validation data, recorded.
    """

    def __init__(
        self,
        inferer: CalibrationInferer,
        output_path: str | os.PathLike,
        map_modalities: Sequence[str],
        model_info: Mapping[str, Any] | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        datalist: str = "",
    ) -> None:
        self.inferer = inferer
        self.output_path = Path(output_path)
        self.map_modalities = [str(m) for m in map_modalities]
        self.model_info = dict(model_info or {})
        self.tolerance = float(tolerance)
        self.datalist = str(datalist)
        self.accumulator = StatisticsAccumulator(inferer.guidance_scales)
        self.calibration: Calibration | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.accumulator.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output
        self.accumulator.update(output[CommonKeys.PRED], output[CommonKeys.LABEL])

    def completed(self, engine: Engine | None = None) -> Calibration:
        self.calibration = make_calibration(
            self.accumulator.gathered().statistics(),
            self.inferer.inferer,
            self.map_modalities,
            self.model_info,
            self.tolerance,
            self.datalist,
        )
        if rank_and_world()[0] != 0:
            return self.calibration
        self.calibration.save(self.output_path)
        logger.info(
            "calibration written to %s: w* = %g, tau = %.4f, M_max = %s (validation accuracy %.3f)",
            self.output_path,
            self.calibration.guidance_scale,
            self.calibration.tau,
            [round(v, 6) for v in self.calibration.m_max],
            max(c["accuracy"] for c in self.calibration.candidates),
        )
        return self.calibration


def make_calibration(
    stats: CalibrationStatistics,
    inferer: AnoFPDMInferer,
    map_modalities: Sequence[str],
    model_info: Mapping[str, Any] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    datalist: str = "",
) -> Calibration:
    """The :class:`Calibration` record of validation statistics gathered with ``inferer``'s settings (on the seeded
    subset of slices of its ``calibration_subset``, if set)."""
    info = dict(model_info or {})
    s = inferer.settings
    result = calibrate_from_statistics(
        stats,
        tolerance=tolerance,
        divergence_baseline=s.divergence_baseline,
        subset=s.calibration_subset,
        subset_seed=s.calibration_subset_seed,
    )
    return Calibration(
        settings=inferer.settings.with_grid(inferer.schedule.num_train_timesteps),
        map_modalities=list(map_modalities),
        map_channels=list(inferer.map_channels),
        checkpoint_digest=str(info.get("digest", "")),
        preprocessing=dict(info["preprocessing"]) if info.get("preprocessing") else None,
        schedule=inferer.schedule.to_dict(),
        datalist=datalist,
        tolerance=tolerance,
        **result,
    )
