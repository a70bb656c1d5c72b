"""The AnoFPDM inferer: a MONAI ``Inferer`` that turns the streamed forward process into maps, health labels,
per-slice thresholds and masks (docs/method.md §3-5).

It holds an :class:`~anofpdm_monai.settings.AnoFPDMSettings`, the schedule, and the calibrated constants (w, M_max,
tau); the forward process itself is :func:`~anofpdm_monai.inferers.forward_process.run_forward_process` and the
post-processing functions are in :mod:`anofpdm_monai.postprocessing`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from monai.inferers import Inferer

from ..postprocessing import batch_quantile, binarize_map, quantile_level
from ..schedule import NoiseSchedule
from ..settings import DEFAULT_GUIDANCE_SCALE, AnoFPDMSettings
from .forward_process import ForwardProcessResult, plain_tensor, run_forward_process
from .health import health_score, is_unhealthy
from .noise import Generators, PositionalGenerators, resolve_noise_keys, slice_generators, slice_noise_keys
from .output import BatchOutput

__all__ = ["AnoFPDMOutput", "AnoFPDMInferer", "SliceThresholds"]


@dataclass(eq=False)
class AnoFPDMOutput(BatchOutput):
    """Per-slice results of :class:`AnoFPDMInferer` for a batch of B slices (K grid steps, Cm map modalities).

    Also a mapping of the fields (:class:`~anofpdm_monai.inferers.output.BatchOutput`), each with the batch first
    (maps and masks channel-first as (B, 1, H, W), ``timesteps`` as (B, K), ``guidance_scale`` as (B,)), so
    ``decollate_batch`` gives one dictionary per slice.

    Attributes:
        anomaly_map: (B, H, W) H, averaged over map modalities (before the median filter).
        filtered_map: (B, H, W) the median-filtered map the mask is thresholded on.
        mask: (B, H, W) bool, empty for slices classified healthy (the "mixed" setting).
        mask_ungated: (B, H, W) bool, the mask before health gating (the "unhealthy" setting).
        end_step: (B, Cm) t_e per map modality, or (B, 1) for the joint end step.
        divergence: (B, K, Cm) M_t curves.
        mse_guided: (B, K) MSE_h curve; mse_reference: (B, K) MSE_ref curve.
        cosine: (B,) c (reported whatever the health score).
        pred_label: (B,) 1 unhealthy (health <= tau), 0 healthy; all 1 when no tau is set.
        quantile: (B, Cm) or (B, 1) Algorithm 1 levels q; threshold: (B,) the threshold on the map.
        timesteps: (K,) the step grid.
        guidance_scale: the w used.
        health: (B,) the settings' health score (``health_score``, ``mse_gap`` by default; low = unhealthy).
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
    health: torch.Tensor | None = None

    _shared = ("timesteps", "guidance_scale")


@dataclass
class SliceThresholds:
    """Health labels and Algorithm 1 thresholds of a batch of slices, before any map post-processing.

    Attributes:
        anomaly_map: (B, H, W) H averaged over map modalities.
        cosine: (B,) c; pred_label: (B,) 1 unhealthy (health <= tau), 0 healthy.
        quantile: (B, Cm) or (B, 1) Algorithm 1 levels (NaN with a fixed threshold); threshold: (B,).
        health: (B,) the settings' health score (low = unhealthy).
    """

    anomaly_map: torch.Tensor
    cosine: torch.Tensor
    pred_label: torch.Tensor
    quantile: torch.Tensor
    threshold: torch.Tensor
    health: torch.Tensor | None = None


class AnoFPDMInferer(Inferer):
    """MONAI ``Inferer`` for AnoFPDM anomaly segmentation of 2D slices.

    Args:
        settings: the AnoFPDM options (default :class:`~anofpdm_monai.settings.AnoFPDMSettings()`); single options
            may also be given as keyword arguments (``t_max=300, forward="ddpm"``), which override ``settings``.
        guidance_scale: w; None: the settings' ``fixed_guidance_scale`` if set, else ``DEFAULT_GUIDANCE_SCALE`` (2).
        map_channels: indices of the map modalities (BraTS FLAIR and T2: ``(0, 3)``).
        m_max: calibrated M_max, one per map modality (or one value for ``end_step="joint"``); None disables
            Algorithm 1 (the threshold then comes from ``threshold``).
        tau: calibrated threshold of the settings' health score (``health_score``, ``mse_gap`` by default); None
            classifies every slice as unhealthy.
        threshold: a fixed map threshold, used only when ``m_max`` is None.
        baseline_curve: the calibrated (K, Cm) median M_t of healthy slices; required by
            ``divergence_baseline="healthy"`` (from the calibration: :meth:`from_calibration`).
        scheduler: the model's schedule, a :class:`~anofpdm_monai.schedule.NoiseSchedule` or a MONAI scheduler;
            default: the papers' linear schedule with T = 1000 (use the one recorded in the checkpoint).
        seed: seed of the forward noise (DDPM forward, and the first DDIM step). Each slice's noise comes from its
            own generator, keyed by (seed, case, slice) (:mod:`~anofpdm_monai.inferers.noise`): pass ``noise_keys``
            (:meth:`noise_keys` of the slices' case ids and axial indices) and a slice's results do not depend on the
            batch it is in; without them a batch is taken as slices 0 .. B-1 of an anonymous case. None: the
            global RNG, one draw for the whole batch.
        progress: progress bar over the steps.

    The numeric mode of the network calls is the settings' ``precision`` (``precision="bf16"`` as an option):
    :attr:`autocast_dtype` follows it.
    """

    def __init__(
        self,
        settings: AnoFPDMSettings | None = None,
        guidance_scale: float | None = None,
        map_channels: Sequence[int] = (0,),
        m_max: Sequence[float] | float | None = None,
        tau: float | None = None,
        threshold: float | None = None,
        baseline_curve: Sequence[Sequence[float]] | torch.Tensor | None = None,
        scheduler: Any = None,
        seed: int | None = 0,
        progress: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        self.settings = (settings or AnoFPDMSettings()).replace(**options)
        if scheduler is None:
            self.schedule = NoiseSchedule()
        elif isinstance(scheduler, NoiseSchedule):
            self.schedule = scheduler
        else:
            self.schedule = NoiseSchedule.from_scheduler(scheduler)
        if guidance_scale is None:
            fixed = self.settings.fixed_guidance_scale
            guidance_scale = DEFAULT_GUIDANCE_SCALE if fixed is None else fixed
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be finite and >= 0, got {guidance_scale}")
        self.guidance_scale = float(guidance_scale)
        self.map_channels = [int(c) for c in map_channels]
        self.timesteps = self.settings.grid(self.schedule.num_train_timesteps)
        #: the steps the statistics are measured at (all of :attr:`timesteps` unless ``measure_every`` > 1)
        self.measured_timesteps = self.settings.measured_grid(self.schedule.num_train_timesteps)
        self.m_max = None if m_max is None else torch.as_tensor(m_max, dtype=torch.float64).reshape(-1)
        if self.m_max is not None:
            expected = 1 if self.settings.end_step == "joint" else len(self.map_channels)
            if self.m_max.numel() != expected:
                raise ValueError(
                    f"m_max needs {expected} value(s) for end_step={self.settings.end_step!r}, "
                    f"got {self.m_max.tolist()}"
                )
            if not bool(torch.isfinite(self.m_max).all()) or bool((self.m_max <= 0).any()):
                raise ValueError(f"m_max must be finite and > 0, got {self.m_max.tolist()}")
        if tau is not None and not math.isfinite(tau):
            raise ValueError(f"tau must be finite, got {tau}")
        self.tau = None if tau is None else float(tau)
        self.threshold = threshold
        self.baseline_curve = None
        if baseline_curve is not None:
            curve = torch.as_tensor(baseline_curve, dtype=torch.float64)
            if tuple(curve.shape) != (len(self.measured_timesteps), len(self.map_channels)):
                raise ValueError(
                    f"baseline_curve must be (measured grid steps, map channels) = "
                    f"{(len(self.measured_timesteps), len(self.map_channels))}, got {tuple(curve.shape)}"
                )
            self.baseline_curve = curve
        self.seed = seed
        self.progress = progress

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the network calls: the settings' ``precision`` (None for fp32)."""
        return self.settings.autocast_dtype

    @classmethod
    def from_calibration(
        cls, calibration: Any, scheduler: Any = None, settings: AnoFPDMSettings | None = None, **overrides: Any
    ) -> AnoFPDMInferer:
        """The inferer a :class:`~anofpdm_monai.calibration.Calibration` describes (with ``settings`` instead of the
        calibration's own when given, e.g. after ``check_inference_setting``).

        ``overrides`` may set inference-only options (``aggregation``, ``median_kernel``, ``min_component_size``,
        ``m_max``/``threshold``, ``seed``, ``progress``); options the calibrated constants depend
        on must match the calibration (checked by the caller with ``Calibration.check``).
        """
        settings_overrides, rest = AnoFPDMSettings.split_kwargs(overrides)
        settings = (settings or calibration.settings).replace(**settings_overrides)
        kwargs: dict[str, Any] = {
            "guidance_scale": calibration.guidance_scale,
            "map_channels": calibration.map_channels,
            "m_max": calibration.m_max_for(settings.end_step),
            "tau": calibration.tau,
            "baseline_curve": calibration.baseline_curve,
        }
        kwargs.update(rest)
        return cls(settings, scheduler=scheduler, **kwargs)

    # the settings read as attributes (``inferer.forward``, ``inferer.quantile_range``, ...)
    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings")
        if settings is not None and name in AnoFPDMSettings.__dataclass_fields__:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def noise_keys(
        self, case_ids: str | Sequence[str] | None, slice_indices: Sequence[int] | torch.Tensor
    ) -> list[int] | None:
        """The noise keys of slices (one case id for all, or one per slice; RAS axial indices) with this
        inferer's seed; None without a seed."""
        return slice_noise_keys(self.seed, case_ids, slice_indices)

    def _generators(self, inputs: torch.Tensor, noise_keys: Sequence[int] | torch.Tensor | None = None) -> Generators:
        """One generator per slice on the inputs' device (keys: ``noise_keys``, else the batch positions); None
        without a seed and keys (the global RNG)."""
        if self.seed is None and noise_keys is None:
            return None
        return slice_generators(resolve_noise_keys(self.seed, inputs.shape[0], noise_keys), inputs.device)

    def _generator(self, device: torch.device) -> PositionalGenerators | None:
        """The generators :meth:`forward_process` uses for a batch without ``noise_keys``, continued over several
        calls (benchmarks/bench_grid.py runs the DDPM forward process one step at a time with them)."""
        return None if self.seed is None else PositionalGenerators(self.seed, device)

    def forward_process(
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        guidance_scales: Sequence[float] | None = None,
        need_maps: bool = True,
        relative: bool = True,
        noise_keys: Sequence[int] | torch.Tensor | None = None,
    ) -> ForwardProcessResult:
        """Run :func:`run_forward_process` with this inferer's settings (several w at once if given).

        With ``divergence_baseline="healthy"`` M_t is divided by the calibrated ``baseline_curve``; ``relative=False``
        gives the raw M_t instead (the calibration pass, which computes the curve). ``noise_keys``: one key per slice
        (:meth:`noise_keys`), else the slices' positions in the batch.

        The network gets plain tensors (a ``MetaTensor`` input is used without its metadata)."""
        inputs = plain_tensor(inputs)
        ws = [self.guidance_scale] if guidance_scales is None else list(guidance_scales)
        s = self.settings
        baseline = None
        if relative and s.divergence_baseline == "healthy":
            if self.baseline_curve is None:
                raise ValueError(
                    "divergence_baseline='healthy' needs the calibrated baseline_curve (a calibration made with that "
                    "setting: AnoFPDMInferer.from_calibration)"
                )
            baseline = self.baseline_curve
        return run_forward_process(
            network,
            inputs,
            self.schedule,
            self.timesteps,
            ws,
            self.map_channels,
            forward=s.forward,
            reference=s.reference,
            divergence=s.divergence,
            clip=s.clip,
            need_maps=need_maps,
            generator=self._generators(inputs, noise_keys),
            autocast_dtype=self.autocast_dtype,
            progress=self.progress,
            baseline_curve=baseline,
            end_inclusive=s.end_step_inclusive,
            inversion_eps=s.inversion_eps,
            inversion_timing=s.inversion_timing,
            measure_every=s.measure_every,
        )

    def thresholds(self, result: ForwardProcessResult, w_index: int = 0) -> SliceThresholds:
        """The map H, the health label and the Algorithm 1 threshold of each slice, for one guidance scale."""
        s = self.settings
        r = result.select(w_index)
        maps_m = r.anomaly_maps(s.end_step, s.aggregation)[0]  # (B, Cm, H, W)
        anomaly_map = maps_m.mean(dim=1)
        cosine = r.cosine()[0]
        health = health_score(r, s.health_score)[0]
        pred = torch.ones_like(health, dtype=torch.long) if self.tau is None else is_unhealthy(health, self.tau).long()
        if self.m_max is not None:
            m = r.divergence_max(s.end_step)[0]  # (B, Cm) or (B, 1)
            q = quantile_level(m, self.m_max.to(m.device), *s.quantile_range)
            if s.end_step == "per_modality":
                per_mod = torch.stack([batch_quantile(maps_m[:, j], q[:, j]) for j in range(maps_m.shape[1])], 1)
                threshold = per_mod.mean(dim=1)
            else:
                threshold = batch_quantile(anomaly_map, q[:, 0])
        elif self.threshold is not None:
            q = torch.full((anomaly_map.shape[0], 1), float("nan"), dtype=torch.float64)
            threshold = torch.full((anomaly_map.shape[0],), float(self.threshold), device=anomaly_map.device)
        else:
            raise ValueError("AnoFPDMInferer needs m_max (calibration) or a fixed threshold to produce masks")
        return SliceThresholds(anomaly_map, cosine, pred, q, threshold, health=health)

    def postprocess(self, result: ForwardProcessResult, w_index: int = 0) -> AnoFPDMOutput:
        """Turn streamed statistics into maps, health labels, thresholds and masks for one guidance scale."""
        s = self.settings
        r = result.select(w_index)
        th = self.thresholds(result, w_index)
        filtered, mask_ungated = binarize_map(th.anomaly_map, th.threshold, s.median_kernel, s.min_component_size)
        mask = mask_ungated & th.pred_label.bool()[:, None, None]
        return AnoFPDMOutput(
            anomaly_map=th.anomaly_map,
            filtered_map=filtered,
            mask=mask,
            mask_ungated=mask_ungated,
            end_step=r.end_steps(s.end_step)[0],
            divergence=r.divergence[0],
            mse_guided=r.mse_guided[0],
            mse_reference=r.mse_reference,
            cosine=th.cosine,
            pred_label=th.pred_label,
            quantile=th.quantile,
            threshold=th.threshold,
            timesteps=r.timesteps,
            guidance_scale=float(r.guidance_scales[0]),
            health=th.health,
        )

    def run(
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        need_maps: bool = True,
        noise_keys: Sequence[int] | torch.Tensor | None = None,
    ) -> ForwardProcessResult:
        """The forward process with the network in eval mode (its mode is restored afterwards)."""
        was_training = getattr(network, "training", False)
        if hasattr(network, "eval"):
            network.eval()
        try:
            return self.forward_process(inputs, network, need_maps=need_maps, noise_keys=noise_keys)
        finally:
            if was_training:
                network.train()

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        *args: Any,
        noise_keys: Sequence[int] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> AnoFPDMOutput:
        """AnoFPDM on a batch of slices.

        Args:
            inputs: (B, C, H, W) slices in [-1, 1].
            network: the class-conditioned epsilon network.
            noise_keys: (B,) the slices' noise keys (:meth:`noise_keys`); None: their positions in the batch.

        Returns:
            :class:`AnoFPDMOutput`.
        """
        return self.postprocess(self.run(inputs, network, noise_keys=noise_keys))
