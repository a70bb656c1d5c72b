"""AnoFPDM on whole volumes: a MONAI ``Inferer`` that cuts a preprocessed (1, C, S, S, D) case into its
brain-bearing axial slices, runs the slice inferer on them in batches and puts the per-slice results back along
the axial axis (docs/method.md §1, §3-4).

It returns the raw anomaly map H and each slice's statistics and Algorithm 1 threshold; median filtering,
thresholding, component removal and health gating are the inference bundle's ``postprocessing`` transforms
(:mod:`anofpdm_monai.postprocessing`), so they can be swapped in the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer

from ..data.preprocessing import brain_slice_range
from .anofpdm import AnoFPDMInferer
from .forward_process import plain_tensor

__all__ = ["AnoFPDMVolumeInferer"]


class AnoFPDMVolumeInferer(Inferer):
    """Run :class:`AnoFPDMInferer` over the brain-bearing axial slices of a volume.

    Args:
        inferer: the (calibrated) slice inferer.
        batch_size: slices per network batch (the slices of a case are batched in axial order).
        min_brain_pixels: a slice bears brain when its brain mask has more pixels than this (the preprocessing's
            ``min_brain_pixels``); the kept range runs from the first to the last such slice.

    Called with ``inputs`` (1, C, S, S, D), the network, ``brain`` (1, 1, S, S, D) and optionally ``case_id`` (the
    datalist id): slice ``d`` draws its forward noise from the key of (the slice inferer's seed, ``case_id``, ``d``)
    (:mod:`~anofpdm_monai.inferers.noise`), so the results do not depend on ``batch_size``; without ``case_id`` the
    case is anonymous (the key of ``d`` alone). The network gets plain tensors: a ``MetaTensor`` input is used
    without its metadata (the batch keeps it, for ``Invertd``), and the outputs are plain tensors.

    Returns:
        dict of batch-first tensors: ``anomaly_map`` (1, 1, S, S, D) H (zero outside the kept range),
        ``threshold`` (1, D) (+inf outside), ``pred_label`` (1, D), ``kept`` (1, D), ``health`` (1, D) (the
        settings' health score, the one ``pred_label`` thresholds with tau; NaN outside), ``cosine`` (1, D),
        ``end_step`` (1, D, Cm or 1), ``divergence_max`` (1, D, Cm).
    """

    def __init__(self, inferer: AnoFPDMInferer, batch_size: int = 64, min_brain_pixels: int = 0) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.inferer = inferer
        self.batch_size = int(batch_size)
        self.min_brain_pixels = int(min_brain_pixels)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Any,
        *args: Any,
        brain: torch.Tensor | None = None,
        case_id: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        x = plain_tensor(torch.as_tensor(inputs))
        if x.ndim != 5 or x.shape[0] != 1:
            raise ValueError(f"expected one preprocessed case (1, C, S, S, D), got shape {tuple(x.shape)}")
        if brain is None:
            raise ValueError("AnoFPDMVolumeInferer needs the case's brain mask (brain=...)")
        if case_id is not None and not isinstance(case_id, str):  # a collated batch of one case
            (case_id,) = case_id
        brain_vol = plain_tensor(torch.as_tensor(brain)).reshape(x.shape[2:]).detach().cpu() > 0.5
        keep = brain_slice_range(brain_vol, self.min_brain_pixels)
        depth = x.shape[-1]
        s = self.inferer.settings
        cm = len(self.inferer.map_channels)
        ce = cm if s.end_step == "per_modality" else 1
        amap = torch.zeros(x.shape[2], x.shape[3], depth)
        threshold = torch.full((depth,), float("inf"))
        pred = torch.zeros(depth, dtype=torch.long)
        cosine = torch.full((depth,), float("nan"))
        health = torch.full((depth,), float("nan"))
        end_step = torch.zeros(depth, ce, dtype=torch.long)
        m_max = torch.zeros(depth, cm)
        slices = x[0][..., keep].permute(3, 0, 1, 2).float()  # (N, C, S, S)
        for start in range(0, slices.shape[0], self.batch_size):
            batch = slices[start : start + self.batch_size].contiguous()
            idx = torch.as_tensor(keep[start : start + batch.shape[0]])
            keys = self.inferer.noise_keys(case_id, idx)
            result = self.inferer.run(batch, network, noise_keys=keys)
            th = self.inferer.thresholds(result)
            amap[..., idx] = th.anomaly_map.float().cpu().permute(1, 2, 0)
            threshold[idx] = th.threshold.float().cpu()
            pred[idx] = th.pred_label.cpu()
            cosine[idx] = th.cosine.float().cpu()
            health[idx] = th.health.float().cpu()
            end_step[idx] = result.end_steps(s.end_step)[0].cpu()
            m_max[idx] = result.divergence[0].amax(dim=1).float().cpu()
        kept = torch.zeros(depth, dtype=torch.bool)
        kept[torch.as_tensor(keep)] = True
        return {
            "anomaly_map": amap[None, None],
            "threshold": threshold[None],
            "pred_label": pred[None],
            "kept": kept[None],
            "health": health[None],
            "cosine": cosine[None],
            "end_step": end_step[None],
            "divergence_max": m_max[None],
        }
