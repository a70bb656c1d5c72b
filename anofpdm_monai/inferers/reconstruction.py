"""Reconstruction-based sampling used by the baselines and by the training-time reconstruction previews.

All loops run over explicit ``(t, t_next)`` pairs of our own grid with float64 schedule coefficients (see
:mod:`.schedule`), calling the class-conditioned network as ``network(x, timesteps=t, class_labels=y)``. The DDIM
decoding can also be guided by a noise-conditioned classifier (``classifier(x, timesteps=t)`` -> logits), as in
Dhariwal & Nichol's guided DDIM used by Wolleb et al.: ``eps_hat = eps - s sqrt(1 - abar_t) grad_x log p(y | x_t)``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from ..networks.unet import HEALTHY, NULL
from ..schedule import NoiseSchedule, classifier_free_guidance
from .forward_process import plain_tensor
from .noise import Generators, draw_noise

__all__ = [
    "reconstruction_grid",
    "guided_eps",
    "classifier_log_prob_gradient",
    "classifier_guided_eps",
    "ddim_encode",
    "ddim_decode",
    "ddpm_decode",
]


def reconstruction_grid(t_end: int, num_steps: int | None = None) -> list[int]:
    """Ascending grid from 0 to ``t_end`` (inclusive) with ``num_steps`` intervals (default: every step)."""
    if t_end < 0:
        raise ValueError(f"t_end must be >= 0, got {t_end}")
    if t_end == 0:
        return [0]
    n = t_end if num_steps is None else max(1, min(int(num_steps), t_end))
    grid = torch.linspace(0, t_end, n + 1, dtype=torch.float64).round().long().unique().tolist()
    return [int(t) for t in grid]


def guided_eps(
    network: Callable[..., torch.Tensor],
    x_t: torch.Tensor,
    t: int,
    label: int,
    guidance_scale: float | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Epsilon at step ``t`` under ``label``; with a guidance scale w, the classifier-free combination
    ``(1 + w) eps(label) - w eps(null)`` from one batched call."""
    B = x_t.shape[0]
    amp = torch.autocast(device_type=x_t.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with amp:
        if guidance_scale is None or label == NULL:
            t_b = torch.full((B,), t, device=x_t.device, dtype=torch.long)
            y = torch.full((B,), label, device=x_t.device, dtype=torch.long)
            return network(x_t, timesteps=t_b, class_labels=y).float()
        t_b = torch.full((2 * B,), t, device=x_t.device, dtype=torch.long)
        y = torch.cat([torch.full((B,), label, device=x_t.device), torch.full((B,), NULL, device=x_t.device)]).long()
        eps = network(torch.cat([x_t, x_t]), timesteps=t_b, class_labels=y).float()
    return classifier_free_guidance(eps[:B], eps[B:], guidance_scale)


def classifier_log_prob_gradient(
    classifier: Callable[..., torch.Tensor],
    x_t: torch.Tensor,
    t: int,
    label: int = HEALTHY,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``grad_x log p(label | x_t, t)`` of a classifier returning logits, one gradient per sample (the samples of a
    batch do not interact in the classifier, so the gradient of the summed log-probabilities is per sample)."""
    amp = torch.autocast(device_type=x_t.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with torch.enable_grad():
        x = x_t.detach().to(NoiseSchedule.working_dtype(x_t)).requires_grad_(True)
        t_b = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        with amp:
            logits = classifier(x, timesteps=t_b)
        log_prob = torch.log_softmax(logits.to(x.dtype), dim=-1)[:, label]
        (grad,) = torch.autograd.grad(log_prob.sum(), x)
    return grad


def classifier_guided_eps(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    schedule: NoiseSchedule,
    classifier: Callable[..., torch.Tensor],
    scale: float,
    label: int = HEALTHY,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The classifier-guided noise ``eps - scale sqrt(1 - abar_t) grad_x log p(label | x_t, t)`` (Dhariwal & Nichol,
    guided DDIM; the score of ``p(x_t) p(label | x_t)^scale``)."""
    grad = classifier_log_prob_gradient(classifier, x_t, t, label, autocast_dtype)
    return eps - float(scale) * schedule.sqrt_one_minus_alpha_bar(t, x_t) * grad


@torch.no_grad()
def ddim_encode(
    network: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    grid: list[int],
    label: int = NULL,
    clip: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion of clean images ``x0`` up to ``grid[-1]``: each move uses the prediction at the
    current step (``x_{t_{k+1}} = sqrt(abar) x0hat + sqrt(1 - abar) eps(x_{t_k}, t_k)``), starting from x0 at
    ``grid[0]`` treated as step 0."""
    x = plain_tensor(x0).float()
    for t, t_next in zip(grid[:-1], grid[1:]):
        eps = guided_eps(network, x, t, label, None, autocast_dtype)
        x0_hat = schedule.predict_x0(x, t, eps, clip=clip)
        x = schedule.ddim_move(x0_hat, eps, t_next)
    return x


@torch.no_grad()
def ddim_decode(
    network: Callable[..., torch.Tensor],
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    grid: list[int],
    label: int = NULL,
    guidance_scale: float | None = None,
    clip: bool = True,
    autocast_dtype: torch.dtype | None = None,
    classifier: Callable[..., torch.Tensor] | None = None,
    classifier_scale: float = 0.0,
    classifier_label: int = HEALTHY,
) -> torch.Tensor:
    """Deterministic DDIM decoding from step ``grid[-1]`` down the grid; returns the x0 prediction at ``grid[0]``.

    Args:
        label: class label of the decoder (``HEALTHY`` for healthy-guided reconstruction, ``NULL`` unguided).
        guidance_scale: classifier-free guidance w for ``label`` (None: plain conditional/unconditional).
        classifier: a noise-conditioned classifier; every noise prediction (the last one at ``grid[0]`` too) is
            then guided toward ``classifier_label`` with scale ``classifier_scale`` (:func:`classifier_guided_eps`).
    """

    def noise(x: torch.Tensor, t: int) -> torch.Tensor:
        eps = guided_eps(network, x, t, label, guidance_scale, autocast_dtype)
        if classifier is None:
            return eps
        return classifier_guided_eps(
            eps, x, t, schedule, classifier, classifier_scale, classifier_label, autocast_dtype
        )

    x = plain_tensor(x_t).float()
    steps = list(reversed(grid))
    x0_hat = x
    for t, t_prev in zip(steps[:-1], steps[1:]):
        eps = noise(x, t)
        x0_hat = schedule.predict_x0(x, t, eps, clip=clip)
        x = schedule.ddim_move(x0_hat, eps, t_prev)
    eps = noise(x, steps[-1])
    return schedule.predict_x0(x, steps[-1], eps, clip=clip)


@torch.no_grad()
def ddpm_decode(
    network: Callable[..., torch.Tensor],
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    grid: list[int],
    label: int = NULL,
    guidance_scale: float | None = None,
    clip: bool = True,
    generator: Generators = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling from step ``grid[-1]`` down the grid (respaced when the grid skips steps; every
    step when it is ``0..t``), with the "fixed small" posterior variance; returns the final x0. ``generator``: one
    for the batch, or one per slice (:func:`~anofpdm_monai.inferers.noise.draw_noise`)."""
    x = plain_tensor(x_t).float()
    steps = list(reversed(grid)) + [-1]
    for t, t_prev in zip(steps[:-1], steps[1:]):
        eps = guided_eps(network, x, t, label, guidance_scale, autocast_dtype)
        x0_hat = schedule.predict_x0(x, t, eps, clip=clip)
        mean, std = schedule.ddpm_posterior(x0_hat, x, t, t_prev)
        x = mean if t_prev < 0 else mean + std * draw_noise(x.shape, generator, x.device, x.dtype)
    return x
