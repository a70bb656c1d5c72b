"""Baselines of the papers' Table 1, all run from the same trained class-conditioned checkpoint.

- ``anoddpm``: AnoDDPM with Gaussian noise: noise the slice to a fixed t, DDPM ancestral denoising with the null
  label (Wyatt et al. 2022);
- ``ddim``: unguided DDIM: DDIM inversion to t with the null label, DDIM decoding with the null label;
- ``ddim_cfg``: DDIM with classifier-free guidance (Sanchez et al. 2022): DDIM inversion with the null label,
  decoding with healthy guidance w;
- ``ddim_clf``: DDIM with classifier guidance (Wolleb et al. 2022): DDIM inversion with the null label, decoding
  with the null label guided toward "healthy" by a separately trained noise-conditioned classifier
  (:class:`~anofpdm_monai.networks.AnoFPDMClassifier`) with scale s;
- ``intensity``: the intensity floor: the map is one channel's intensity (e.g. FLAIR, where tumours and oedema are
  bright), which every learned method must beat.

The anomaly map of a reconstruction method is the squared difference between input and reconstruction, averaged
over the map modalities. All methods share AnoFPDM's post-processing (5x5 median filter, components of <= 40 px
removed). Their noise level and threshold are tuned on the validation split WITH pixel labels, as in the papers
(:func:`anofpdm_monai.evaluation.tune_threshold`); AnoFPDM itself uses only its image-level calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from monai.inferers import Inferer

from ..networks.unet import HEALTHY, NULL
from ..postprocessing import binarize_map
from ..schedule import NoiseSchedule
from ..settings import DEFAULT_GUIDANCE_SCALE
from .forward_process import plain_tensor
from .noise import draw_noise, resolve_noise_keys, slice_generators, slice_noise_keys
from .output import BatchOutput
from .reconstruction import ddim_decode, ddim_encode, ddpm_decode, reconstruction_grid

__all__ = [
    "BASELINE_METHODS",
    "DEFAULT_CLASSIFIER_SCALE",
    "DEFAULT_CLASSIFIER_SCALES",
    "BaselineOutput",
    "ReconstructionInferer",
    "IntensityInferer",
]

BASELINE_METHODS = ("anoddpm", "ddim", "ddim_cfg", "ddim_clf", "intensity")
RECONSTRUCTION_METHODS = ("anoddpm", "ddim", "ddim_cfg", "ddim_clf")

#: classifier-guidance scale s of ``ddim_clf`` when none is tuned (the official code's value at 128 x 128), and the
#: candidates the evaluation tunes it from
DEFAULT_CLASSIFIER_SCALE = 100.0
DEFAULT_CLASSIFIER_SCALES = (10.0, 50.0, 100.0)


@dataclass(eq=False)
class BaselineOutput(BatchOutput):
    """Per-slice baseline results: ``anomaly_map`` (B, H, W), ``filtered_map`` (median-filtered), ``mask`` (B, H, W)
    bool, ``pred_label`` (B,) 1 when the mask is not empty, and the ``reconstruction`` (B, C, H, W) if any; also a
    mapping of those fields (:class:`~anofpdm_monai.inferers.output.BatchOutput`)."""

    anomaly_map: torch.Tensor
    filtered_map: torch.Tensor
    mask: torch.Tensor
    pred_label: torch.Tensor
    reconstruction: torch.Tensor | None = None


class ReconstructionInferer(Inferer):
    """Reconstruction-based anomaly maps: AnoDDPM, DDIM, DDIM with classifier-free guidance and DDIM with classifier
    guidance.

    Args:
        method: ``"anoddpm"``, ``"ddim"``, ``"ddim_cfg"`` or ``"ddim_clf"``.
        noise_level: t the slice is noised or inverted to.
        num_steps: sampling steps between 0 and t (None: every step, as the original methods).
        guidance_scale: w of the healthy guidance (``ddim_cfg`` only).
        classifier: the noise-conditioned healthy/unhealthy classifier (``ddim_clf`` only, required there).
        classifier_scale: s of the classifier guidance (``ddim_clf`` only).
        map_channels: channels averaged into the map.
        threshold: map threshold (tuned on validation data); None gives maps only (empty masks).
        median_kernel: median filter size; min_component_size: components of at most this size are removed.
        schedule: diffusion schedule (default: linear, T = 1000).
        seed: seed of the noise (AnoDDPM), drawn per slice from (seed, case, slice) keys as AnoFPDM's
            (:mod:`~anofpdm_monai.inferers.noise`; ``noise_keys`` of the call, else the batch positions); None: the
            global RNG.
        autocast_dtype: e.g. ``torch.bfloat16`` on GPU.

    The network gets plain tensors (a ``MetaTensor`` input is used without its metadata).
    """

    def __init__(
        self,
        method: str,
        noise_level: int,
        num_steps: int | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        classifier: nn.Module | None = None,
        classifier_scale: float = DEFAULT_CLASSIFIER_SCALE,
        map_channels: Sequence[int] = (0,),
        threshold: float | None = None,
        median_kernel: int = 5,
        min_component_size: int = 40,
        schedule: NoiseSchedule | None = None,
        seed: int | None = 0,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if method not in RECONSTRUCTION_METHODS:
            raise ValueError(f"method must be one of {list(RECONSTRUCTION_METHODS)}, got {method!r}")
        if method == "ddim_clf" and classifier is None:
            raise ValueError("method 'ddim_clf' needs a classifier")
        if not classifier_scale >= 0:
            raise ValueError(f"classifier_scale must be >= 0, got {classifier_scale}")
        self.schedule = schedule or NoiseSchedule()
        if not 0 < int(noise_level) < self.schedule.num_train_timesteps:
            raise ValueError(f"noise_level must be in (0, {self.schedule.num_train_timesteps}), got {noise_level}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.method = method
        self.noise_level = int(noise_level)
        self.num_steps = num_steps
        self.guidance_scale = float(guidance_scale)
        self.classifier = classifier
        self.classifier_scale = float(classifier_scale)
        self.map_channels = [int(c) for c in map_channels]
        self.threshold = threshold
        self.median_kernel = median_kernel
        self.min_component_size = min_component_size
        self.seed = seed
        self.autocast_dtype = autocast_dtype

    def noise_keys(
        self, case_ids: str | Sequence[str] | None, slice_indices: Sequence[int] | torch.Tensor
    ) -> list[int] | None:
        """The noise keys of slices with this inferer's seed (as :meth:`AnoFPDMInferer.noise_keys`)."""
        return slice_noise_keys(self.seed, case_ids, slice_indices)

    @torch.no_grad()
    def invert(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor:
        """The DDIM inversion of ``inputs`` to the noise level with the null label (the DDIM methods; the same for
        ``ddim``, ``ddim_cfg`` and ``ddim_clf`` at one noise level and step count, so that it can be shared)."""
        if self.method == "anoddpm":
            raise ValueError("anoddpm noises its input; it has no DDIM inversion")
        grid = reconstruction_grid(self.noise_level, self.num_steps)
        x0 = plain_tensor(inputs).float()
        return ddim_encode(network, x0, self.schedule, grid, label=NULL, autocast_dtype=self.autocast_dtype)

    @torch.no_grad()
    def reconstruct(
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        inverted: torch.Tensor | None = None,
        noise_keys: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The reconstruction of ``inputs`` (B, C, H, W) in [-1, 1]; ``inverted``: their :meth:`invert` when
        already computed; ``noise_keys``: the slices' noise keys (AnoDDPM; :meth:`noise_keys`)."""
        grid = reconstruction_grid(self.noise_level, self.num_steps)
        x0 = plain_tensor(inputs).float()
        amp = self.autocast_dtype
        if self.method == "anoddpm":
            gen = None
            if self.seed is not None or noise_keys is not None:
                gen = slice_generators(resolve_noise_keys(self.seed, x0.shape[0], noise_keys), x0.device)
            noise = draw_noise(x0.shape, gen, x0.device, x0.dtype)
            x_t = self.schedule.q_sample(x0, grid[-1], noise)
            return ddpm_decode(network, x_t, self.schedule, grid, label=NULL, generator=gen, autocast_dtype=amp)
        x_t = self.invert(x0, network) if inverted is None else inverted
        if self.method == "ddim":
            return ddim_decode(network, x_t, self.schedule, grid, label=NULL, autocast_dtype=amp)
        if self.method == "ddim_clf":
            return ddim_decode(
                network,
                x_t,
                self.schedule,
                grid,
                label=NULL,
                autocast_dtype=amp,
                classifier=self.classifier,
                classifier_scale=self.classifier_scale,
                classifier_label=HEALTHY,
            )
        return ddim_decode(
            network, x_t, self.schedule, grid, label=HEALTHY, guidance_scale=self.guidance_scale, autocast_dtype=amp
        )

    def anomaly_map(self, inputs: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Squared difference averaged over the map channels: (B, H, W)."""
        diff = (inputs.float()[:, self.map_channels] - reconstruction[:, self.map_channels]) ** 2
        return diff.mean(dim=1)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        *args: Any,
        inverted: torch.Tensor | None = None,
        noise_keys: Sequence[int] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaselineOutput:
        inputs = plain_tensor(inputs)
        modules = [m for m in (network, self.classifier) if m is not None]
        was_training = [getattr(m, "training", False) for m in modules]
        for m in modules:
            m.eval()
        try:
            recon = self.reconstruct(inputs, network, inverted, noise_keys)
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)
        return _finish(
            self.anomaly_map(inputs, recon), self.threshold, self.median_kernel, self.min_component_size, recon
        )


class IntensityInferer(Inferer):
    """The intensity floor: the anomaly map is channel ``channel`` rescaled from [-1, 1] to [0, 1] (``polarity
    "bright"``, e.g. FLAIR for tumours), or its inverse inside the head (``"dark"``, e.g. T1w for stroke lesions;
    background pixels at -1 get 0).

    Args:
        channel: index of the channel.
        threshold: map threshold (tuned on validation data); None gives maps only.
        median_kernel, min_component_size: the shared post-processing.
        polarity: ``"bright"`` or ``"dark"``.
    """

    def __init__(
        self,
        channel: int = 0,
        threshold: float | None = None,
        median_kernel: int = 5,
        min_component_size: int = 40,
        polarity: str = "bright",
    ) -> None:
        super().__init__()
        if polarity not in ("bright", "dark"):
            raise ValueError(f"polarity must be 'bright' or 'dark', got {polarity!r}")
        self.polarity = polarity
        self.channel = int(channel)
        self.threshold = threshold
        self.median_kernel = median_kernel
        self.min_component_size = min_component_size

    def __call__(
        self, inputs: torch.Tensor, network: nn.Module | None = None, *args: Any, **kwargs: Any
    ) -> BaselineOutput:  # type: ignore[override]
        """The maps of ``inputs``; other arguments (``noise_keys``, ...) are accepted and unused."""
        x = plain_tensor(inputs).float()[:, self.channel]
        amap = (x + 1.0) / 2.0 if self.polarity == "bright" else torch.where(x > -1.0 + 1e-3, (1.0 - x) / 2.0, 0.0)
        return _finish(amap, self.threshold, self.median_kernel, self.min_component_size, None)


def _finish(
    amap: torch.Tensor, threshold: float | None, median_kernel: int, min_size: int, recon: torch.Tensor | None
) -> BaselineOutput:
    thr = float("inf") if threshold is None else float(threshold)
    filtered, mask = binarize_map(amap, thr, median_kernel, min_size)
    pred = mask.flatten(1).any(dim=1).long()
    return BaselineOutput(anomaly_map=amap, filtered_map=filtered, mask=mask, pred_label=pred, reconstruction=recon)
