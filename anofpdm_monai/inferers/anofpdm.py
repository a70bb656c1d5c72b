"""The AnoFPDM inferer: anomaly maps from the forward process of a classifier-free-guided diffusion model.

For a batch of slices x0, over an ascending step grid t_0 < ... < t_K (see DESIGN.md section 2):

1. noised input x_t: DDPM forward (fresh noise per step) or DDIM forward (deterministic inversion that reuses the
   null prediction of the previous step);
2. one batched network call for [healthy, null] labels: e_h, e_n; guided e_g = (1 + w) e_h - w e_n; clipped x0
   predictions x0_h (guided) and x0_ref (null, or healthy with w = 0 as the official code);
3. sub-anomaly map S_t = (x0_h - x0)^2 on the map modalities;
4. divergence M_t per map modality: ``v2`` mean (x0_h - x0_ref)^2, ``v1`` mean |(x0_h - x0)^2 - (x0_ref - x0)^2|;
5. end step t_e = argmax_t M_t (per modality or of the modality mean), anomaly map H = mean of S_t over the grid
   steps t <= t_e (inclusive) or S_{t_e} alone, averaged over map modalities;
6. cosine c between the MSE curves of x0_h and x0_ref over all grid steps; unhealthy iff c <= tau;
7. threshold: the Algorithm 1 quantile of H (per modality, averaged);
8. 5x5 median filter, ``map >= threshold``, components of <= 40 pixels removed; healthy slices get an empty mask.

Everything is streamed: running sums, running argmax and a snapshot of the sum at the best step, so memory does
not grow with the number of steps. All candidate guidance scales are evaluated from the same network outputs
(x0_h is linear in w before clipping), which is what makes calibration a single pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import Inferer
from tqdm.auto import tqdm

from ..networks.unet import HEALTHY, NULL
from .postprocess import batch_quantile, binarize_map, quantile_level
from .schedule import NoiseSchedule, make_step_grid

__all__ = ["ForwardProcessResult", "AnoFPDMOutput", "AnoFPDMInferer", "run_forward_process"]

FORWARD_MODES = ("ddim", "ddpm")
REFERENCES = ("null", "healthy")
DIVERGENCES = ("v2", "v1")
END_STEPS = ("per_modality", "joint")
AGGREGATIONS = ("mean", "last")


@dataclass
class ForwardProcessResult:
    """Streamed statistics of one forward process, for W guidance scales and B slices.

    Attributes:
        timesteps: (K,) the step grid.
        guidance_scales: (W,) the guidance scales evaluated.
        divergence: (W, B, K, Cm) M_t per map modality.
        mse_guided: (W, B, K) mean over map modalities and pixels of (x0_h - x0)^2.
        mse_reference: (B, K) the same for the reference prediction x0_ref.
        end_index: (W, B, Cm) grid index of argmax_t M_t per modality (first maximum).
        end_index_joint: (W, B) grid index of argmax_t of the modality-mean of M_t.
        map_sum, map_last: (W, B, Cm, H, W) sum of S_t over grid steps up to the per-modality end step, and
            S_t at that step; ``None`` when maps were not requested.
        map_sum_joint, map_last_joint: the same at the joint end step.
    """

    timesteps: torch.Tensor
    guidance_scales: torch.Tensor
    divergence: torch.Tensor
    mse_guided: torch.Tensor
    mse_reference: torch.Tensor
    end_index: torch.Tensor
    end_index_joint: torch.Tensor
    map_sum: torch.Tensor | None = None
    map_last: torch.Tensor | None = None
    map_sum_joint: torch.Tensor | None = None
    map_last_joint: torch.Tensor | None = None

    def cosine(self, eps: float = 1e-6) -> torch.Tensor:
        """(W, B) cosine similarity of the guided and reference MSE curves over all grid steps."""
        ref = self.mse_reference[None].expand_as(self.mse_guided)
        return F.cosine_similarity(self.mse_guided, ref, dim=-1, eps=eps)

    def anomaly_maps(self, end_step: str = "per_modality", aggregation: str = "mean") -> torch.Tensor:
        """(W, B, Cm, H, W) per-modality anomaly maps H_m for the chosen end-step mode and aggregation."""
        if self.map_sum is None:
            raise ValueError("this forward process was run without maps (need_maps=False)")
        if end_step == "per_modality":
            total, last, count = self.map_sum, self.map_last, self.end_index + 1
        else:
            total, last = self.map_sum_joint, self.map_last_joint
            count = (self.end_index_joint + 1)[..., None].expand_as(self.end_index)
        if aggregation == "last":
            return last
        return total / count[..., None, None].to(total.dtype)

    def divergence_max(self, end_step: str = "per_modality") -> torch.Tensor:
        """M = max_t M_t: (W, B, Cm) per modality, or (W, B, 1) of the modality mean for ``joint``."""
        if end_step == "per_modality":
            return self.divergence.amax(dim=2)
        return self.divergence.mean(dim=-1).amax(dim=2)[..., None]

    def end_steps(self, end_step: str = "per_modality") -> torch.Tensor:
        """t_e in diffusion steps: (W, B, Cm) per modality, or (W, B, 1) for ``joint``."""
        index = self.end_index if end_step == "per_modality" else self.end_index_joint[..., None]
        return self.timesteps.to(index.device)[index]

    def select(self, w_index: int) -> ForwardProcessResult:
        """The result for one guidance scale (keeps a W axis of size 1)."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("timesteps", "mse_reference") or v is None:
                values[f.name] = v
            else:
                values[f.name] = v[w_index : w_index + 1]
        return ForwardProcessResult(**values)


@dataclass
class AnoFPDMOutput:
    """Per-slice results of :class:`AnoFPDMInferer` for a batch of B slices (K grid steps, Cm map modalities).

    Attributes:
        anomaly_map: (B, H, W) H, averaged over map modalities (before the median filter).
        filtered_map: (B, H, W) the median-filtered map the mask is thresholded on.
        mask: (B, H, W) bool, empty for slices classified healthy (the "mixed" setting).
        mask_ungated: (B, H, W) bool, the mask before health gating (the "unhealthy" setting).
        end_step: (B, Cm) t_e per map modality, or (B, 1) for the joint end step.
        divergence: (B, K, Cm) M_t curves.
        mse_guided: (B, K) MSE_h curve; mse_reference: (B, K) MSE_ref curve.
        cosine: (B,) c.
        pred_label: (B,) 1 unhealthy (c <= tau), 0 healthy; all 1 when no tau is set.
        quantile: (B, Cm) or (B, 1) Algorithm 1 levels q; threshold: (B,) the threshold on the map.
        timesteps: (K,) the step grid.
        guidance_scale: the w used.
    """

    anomaly_map: torch.Tensor
    filtered_map: torch.Tensor
    mask: torch.Tensor
    mask_ungated: torch.Tensor
    end_step: torch.Tensor
    divergence: torch.Tensor
    mse_guided: torch.Tensor
    mse_reference: torch.Tensor
    cosine: torch.Tensor
    pred_label: torch.Tensor
    quantile: torch.Tensor
    threshold: torch.Tensor
    timesteps: torch.Tensor
    guidance_scale: float


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


@torch.no_grad()
def run_forward_process(
    network: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    guidance_scales: Sequence[float] | torch.Tensor,
    map_channels: Sequence[int],
    forward: str = "ddim",
    reference: str = "null",
    divergence: str = "v2",
    clip: bool = True,
    need_maps: bool = True,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> ForwardProcessResult:
    """Run the forward process once and stream every statistic AnoFPDM needs, for several w at once.

    Args:
        network: epsilon network called as ``network(x, timesteps=t, class_labels=y)``.
        x0: (B, C, H, W) clean slices in [-1, 1].
        schedule: float64 schedule.
        timesteps: ascending step grid.
        guidance_scales: candidate w (>= 0); all share the same network outputs.
        map_channels: indices of the map modalities in C.
        forward: ``"ddim"`` or ``"ddpm"``.
        reference: ``"null"`` (paper) or ``"healthy"`` (official code: e_h with w = 0).
        divergence: ``"v2"`` or ``"v1"``.
        clip: clip x0 predictions to [-1, 1].
        need_maps: accumulate the anomaly maps (calibration only needs the curves).
        generator: random generator for the forward noise.
        autocast_dtype: run the network under ``torch.autocast`` with this dtype (e.g. bf16 on GPU); all other
            arithmetic stays in float32 with float64 schedule coefficients.
        progress: show a progress bar over the steps.

    Returns:
        :class:`ForwardProcessResult`.
    """
    _check_choice("forward", forward, FORWARD_MODES)
    _check_choice("reference", reference, REFERENCES)
    _check_choice("divergence", divergence, DIVERGENCES)
    grid = make_step_grid(timesteps=timesteps, num_train_timesteps=schedule.num_train_timesteps)
    ws = torch.as_tensor(guidance_scales, dtype=torch.float32, device=x0.device).reshape(-1)
    if ws.numel() == 0 or not bool(torch.isfinite(ws).all()) or bool((ws < 0).any()):
        raise ValueError(f"guidance scales must be non-empty, finite and >= 0, got {ws.tolist()}")
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (B, C, H, W), got shape {tuple(x0.shape)}")
    channels = list(map_channels)
    if not channels or min(channels) < 0 or max(channels) >= x0.shape[1]:
        raise ValueError(f"map_channels {channels} out of range for {x0.shape[1]} input channels")

    x0 = x0.float()
    B = x0.shape[0]
    W, K, Cm = ws.numel(), len(grid), len(channels)
    device = x0.device
    x0_map = x0[:, channels]  # (B, Cm, H, W)
    w_view = ws.view(W, 1, 1, 1, 1)
    labels = torch.cat(
        [
            torch.full((B,), HEALTHY, device=device, dtype=torch.long),
            torch.full((B,), NULL, device=device, dtype=torch.long),
        ]
    )

    div = torch.zeros(W, B, K, Cm, device=device)
    mse_g = torch.zeros(W, B, K, device=device)
    mse_r = torch.zeros(B, K, device=device)
    best = torch.full((W, B, Cm), -torch.inf, device=device)
    best_j = torch.full((W, B), -torch.inf, device=device)
    end_index = torch.zeros(W, B, Cm, dtype=torch.long, device=device)
    end_index_j = torch.zeros(W, B, dtype=torch.long, device=device)
    maps_shape = (W, B, Cm, *x0.shape[2:])
    if need_maps:
        running = torch.zeros(maps_shape, device=device)
        snap_sum, snap_last = torch.zeros(maps_shape, device=device), torch.zeros(maps_shape, device=device)
        snap_sum_j, snap_last_j = torch.zeros(maps_shape, device=device), torch.zeros(maps_shape, device=device)

    amp = torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (clipped x0 of null, eps of null) at the previous step
    for k, t in enumerate(tqdm(grid, desc="forward process", leave=False, disable=not progress)):
        if forward == "ddpm" or prev is None:
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            x_t = schedule.q_sample(x0, t, noise)
        else:
            x_t = schedule.ddim_move(prev[0], prev[1], t)
        t_batch = torch.full((2 * B,), t, device=device, dtype=torch.long)
        with amp:
            eps = network(torch.cat([x_t, x_t]), timesteps=t_batch, class_labels=labels)
        eps = eps.float()
        e_h, e_n = eps[:B], eps[B:]
        x0_n = schedule.predict_x0(x_t, t, e_n, clip=clip)
        prev = (x0_n, e_n)

        e_h_m, e_n_m, x_t_m = e_h[:, channels], e_n[:, channels], x_t[:, channels]
        e_g = (1.0 + w_view) * e_h_m[None] - w_view * e_n_m[None]  # (W, B, Cm, H, W)
        x0_g = schedule.predict_x0(x_t_m[None].expand_as(e_g), t, e_g, clip=clip)
        x0_ref = x0_n[:, channels] if reference == "null" else schedule.predict_x0(x_t_m, t, e_h_m, clip=clip)

        sq_g = (x0_g - x0_map[None]) ** 2  # S_t, (W, B, Cm, H, W)
        sq_r = (x0_ref - x0_map) ** 2  # (B, Cm, H, W)
        if divergence == "v2":
            m_t = ((x0_g - x0_ref[None]) ** 2).mean(dim=(-2, -1))
        else:
            m_t = (sq_g - sq_r[None]).abs().mean(dim=(-2, -1))
        div[:, :, k] = m_t
        mse_g[:, :, k] = sq_g.mean(dim=(-3, -2, -1))
        mse_r[:, k] = sq_r.mean(dim=(-3, -2, -1))

        improved = m_t > best  # strict: the first maximum wins
        best = torch.where(improved, m_t, best)
        end_index = torch.where(improved, torch.full_like(end_index, k), end_index)
        m_joint = m_t.mean(dim=-1)
        improved_j = m_joint > best_j
        best_j = torch.where(improved_j, m_joint, best_j)
        end_index_j = torch.where(improved_j, torch.full_like(end_index_j, k), end_index_j)
        if need_maps:
            running += sq_g
            sel = improved[..., None, None]
            snap_sum = torch.where(sel, running, snap_sum)
            snap_last = torch.where(sel, sq_g, snap_last)
            sel_j = improved_j[..., None, None, None]
            snap_sum_j = torch.where(sel_j, running, snap_sum_j)
            snap_last_j = torch.where(sel_j, sq_g, snap_last_j)

    return ForwardProcessResult(
        timesteps=torch.as_tensor(grid, dtype=torch.long),
        guidance_scales=ws.cpu(),
        divergence=div,
        mse_guided=mse_g,
        mse_reference=mse_r,
        end_index=end_index,
        end_index_joint=end_index_j,
        map_sum=snap_sum if need_maps else None,
        map_last=snap_last if need_maps else None,
        map_sum_joint=snap_sum_j if need_maps else None,
        map_last_joint=snap_last_j if need_maps else None,
    )


class AnoFPDMInferer(Inferer):
    """MONAI ``Inferer`` for AnoFPDM anomaly segmentation of 2D slices.

    Args:
        scheduler: a MONAI scheduler (its betas define the schedule) or a :class:`NoiseSchedule`; default: the
            papers' linear schedule with T = 1000.
        guidance_scale: w.
        map_channels: indices of the map modalities (BraTS FLAIR and T2: ``(0, 3)``).
        t_max: last step of the grid; the official code visits 0..599.
        stride: grid spacing; 1 is the official grid.
        timesteps: explicit grid instead of ``t_max``/``stride``.
        forward: ``"ddim"`` (deterministic, the papers' best) or ``"ddpm"``.
        reference: ``"null"`` (paper) or ``"healthy"`` (official code).
        divergence: ``"v2"`` (extended paper, official code) or ``"v1"`` (conference paper).
        end_step: ``"per_modality"`` (official code) or ``"joint"`` (paper eq. 6).
        aggregation: ``"mean"`` over steps t <= t_e, or ``"last"`` (S_{t_e} only, the ablation).
        m_max: calibrated M_max, one per map modality (or one value for ``joint``); None disables Algorithm 1
            (the threshold then comes from ``threshold``).
        tau: calibrated cosine threshold; None classifies every slice as unhealthy.
        quantile_range: (a, b) of Algorithm 1.
        threshold: a fixed map threshold, used only when ``m_max`` is None.
        median_kernel: median filter size.
        min_component_size: components of at most this many pixels are removed.
        clip: clip x0 predictions to [-1, 1].
        seed: seed of the forward noise (DDPM forward, and the first DDIM step); None uses the global RNG.
        autocast_dtype: e.g. ``torch.bfloat16`` on GPU.
        progress: progress bar over the steps.
    """

    def __init__(
        self,
        scheduler: Any = None,
        guidance_scale: float = 2.0,
        map_channels: Sequence[int] = (0,),
        t_max: int = 599,
        stride: int = 1,
        timesteps: Sequence[int] | None = None,
        forward: str = "ddim",
        reference: str = "null",
        divergence: str = "v2",
        end_step: str = "per_modality",
        aggregation: str = "mean",
        m_max: Sequence[float] | float | None = None,
        tau: float | None = None,
        quantile_range: Sequence[float] = (0.90, 0.98),
        threshold: float | None = None,
        median_kernel: int = 5,
        min_component_size: int = 40,
        clip: bool = True,
        seed: int | None = 0,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if scheduler is None:
            self.schedule = NoiseSchedule()
        elif isinstance(scheduler, NoiseSchedule):
            self.schedule = scheduler
        else:
            self.schedule = NoiseSchedule.from_scheduler(scheduler)
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be finite and >= 0, got {guidance_scale}")
        self.guidance_scale = float(guidance_scale)
        self.map_channels = [int(c) for c in map_channels]
        self.timesteps = make_step_grid(t_max, stride, timesteps, self.schedule.num_train_timesteps)
        self.forward = _check_choice("forward", forward, FORWARD_MODES)
        self.reference = _check_choice("reference", reference, REFERENCES)
        self.divergence = _check_choice("divergence", divergence, DIVERGENCES)
        self.end_step = _check_choice("end_step", end_step, END_STEPS)
        self.aggregation = _check_choice("aggregation", aggregation, AGGREGATIONS)
        self.m_max = None if m_max is None else torch.as_tensor(m_max, dtype=torch.float64).reshape(-1)
        if self.m_max is not None:
            expected = 1 if end_step == "joint" else len(self.map_channels)
            if self.m_max.numel() != expected:
                raise ValueError(
                    f"m_max needs {expected} value(s) for end_step={end_step!r}, got {self.m_max.tolist()}"
                )
            if not bool(torch.isfinite(self.m_max).all()) or bool((self.m_max <= 0).any()):
                raise ValueError(f"m_max must be finite and > 0, got {self.m_max.tolist()}")
        if tau is not None and not math.isfinite(tau):
            raise ValueError(f"tau must be finite, got {tau}")
        self.tau = None if tau is None else float(tau)
        self.quantile_range = (float(quantile_range[0]), float(quantile_range[1]))
        if not 0.0 <= self.quantile_range[0] <= self.quantile_range[1] <= 1.0:
            raise ValueError(f"quantile_range must satisfy 0 <= a <= b <= 1, got {self.quantile_range}")
        self.threshold = threshold
        self.median_kernel = int(median_kernel)
        self.min_component_size = int(min_component_size)
        self.clip = clip
        self.seed = seed
        self.autocast_dtype = autocast_dtype
        self.progress = progress

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))

    def forward_process(
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        guidance_scales: Sequence[float] | None = None,
        need_maps: bool = True,
    ) -> ForwardProcessResult:
        """Run :func:`run_forward_process` with this inferer's settings (several w at once if given)."""
        ws = [self.guidance_scale] if guidance_scales is None else list(guidance_scales)
        return run_forward_process(
            network,
            inputs,
            self.schedule,
            self.timesteps,
            ws,
            self.map_channels,
            forward=self.forward,
            reference=self.reference,
            divergence=self.divergence,
            clip=self.clip,
            need_maps=need_maps,
            generator=self._generator(inputs.device),
            autocast_dtype=self.autocast_dtype,
            progress=self.progress,
        )

    def postprocess(self, result: ForwardProcessResult, w_index: int = 0) -> AnoFPDMOutput:
        """Turn streamed statistics into maps, health labels, thresholds and masks for one guidance scale."""
        r = result.select(w_index)
        maps_m = r.anomaly_maps(self.end_step, self.aggregation)[0]  # (B, Cm, H, W)
        anomaly_map = maps_m.mean(dim=1)
        cosine = r.cosine()[0]
        pred = torch.ones_like(cosine, dtype=torch.long) if self.tau is None else (cosine <= self.tau).long()
        if self.m_max is not None:
            m = r.divergence_max(self.end_step)[0]  # (B, Cm) or (B, 1)
            q = quantile_level(m, self.m_max.to(m.device), *self.quantile_range)
            if self.end_step == "per_modality":
                per_mod = torch.stack([batch_quantile(maps_m[:, j], q[:, j]) for j in range(maps_m.shape[1])], 1)
                threshold = per_mod.mean(dim=1)
            else:
                threshold = batch_quantile(anomaly_map, q[:, 0])
        elif self.threshold is not None:
            q = torch.full((anomaly_map.shape[0], 1), float("nan"), dtype=torch.float64)
            threshold = torch.full((anomaly_map.shape[0],), float(self.threshold), device=anomaly_map.device)
        else:
            raise ValueError("AnoFPDMInferer needs m_max (calibration) or a fixed threshold to produce masks")
        filtered, mask_ungated = binarize_map(anomaly_map, threshold, self.median_kernel, self.min_component_size)
        mask = mask_ungated & pred.bool()[:, None, None]
        return AnoFPDMOutput(
            anomaly_map=anomaly_map,
            filtered_map=filtered,
            mask=mask,
            mask_ungated=mask_ungated,
            end_step=r.end_steps(self.end_step)[0],
            divergence=r.divergence[0],
            mse_guided=r.mse_guided[0],
            mse_reference=r.mse_reference,
            cosine=cosine,
            pred_label=pred,
            quantile=q,
            threshold=threshold,
            timesteps=r.timesteps,
            guidance_scale=float(r.guidance_scales[0]),
        )

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> AnoFPDMOutput:  # type: ignore[override]
        """AnoFPDM on a batch of slices.

        Args:
            inputs: (B, C, H, W) slices in [-1, 1].
            network: the class-conditioned epsilon network.

        Returns:
            :class:`AnoFPDMOutput`.
        """
        was_training = getattr(network, "training", False)
        if hasattr(network, "eval"):
            network.eval()
        try:
            result = self.forward_process(inputs, network, need_maps=True)
        finally:
            if was_training:
                network.train()
        return self.postprocess(result)
