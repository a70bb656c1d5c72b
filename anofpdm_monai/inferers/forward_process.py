"""The AnoFPDM forward process, streamed (docs/method.md §3).

For a batch of slices x0 and an ascending step grid t_0 < ... < t_K, :func:`run_forward_process` noises the input
(DDPM: fresh noise per step; DDIM: deterministic inversion reusing the null prediction of the previous step, or, with
``inversion_timing="official"``, the official code's extra null call per step), makes one batched network call per
step for the healthy and null labels, and streams everything AnoFPDM needs for several guidance scales at once: M_t
curves, both MSE curves, the running argmax t_e and the sums of S_t up to it. Memory does not grow with the number of
steps. The guided x0 prediction is linear in w before clipping, so every candidate w is evaluated from the same
network outputs, which is what makes calibration a single pass.

This module is pure tensor arithmetic over a network callable: no thresholds, no post-processing, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from monai.utils import convert_to_tensor
from tqdm.auto import tqdm

from ..networks.unet import HEALTHY, NULL
from ..schedule import NoiseSchedule, classifier_free_guidance, make_step_grid
from ..settings import DIVERGENCES, FORWARD_MODES, INVERSION_EPS, INVERSION_TIMINGS, REFERENCES, check_choice
from .noise import Generators, draw_noise

__all__ = ["ForwardProcessResult", "run_forward_process", "plain_tensor"]


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a plain ``torch.Tensor`` (a MONAI ``MetaTensor`` without its metadata, sharing its memory): every op
    on a ``MetaTensor`` pays for the metadata handling of ``__torch_function__``, which the network and the forward
    process do not need (the caller keeps the ``MetaTensor`` for ``Invertd`` and the writers)."""
    return x if type(x) is torch.Tensor else convert_to_tensor(x, track_meta=False)


@dataclass
class ForwardProcessResult:
    """Streamed statistics of one forward process, for W guidance scales and B slices.

    Attributes:
        timesteps: (K,) the step grid.
        guidance_scales: (W,) the guidance scales evaluated.
        divergence: (W, B, K, Cm) M_t per map modality (relative to the healthy baseline when one was given).
        mse_guided: (W, B, K) mean over map modalities and pixels of (x0_h - x0)^2.
        mse_reference: (B, K) the same for the reference prediction x0_ref.
        end_index: (W, B, Cm) grid index of argmax_t M_t per modality (first maximum).
        end_index_joint: (W, B) grid index of argmax_t of the modality-mean of M_t.
        map_sum, map_last: (W, B, Cm, H, W) sum of S_t over the grid steps up to the per-modality end step, and
            S_t at the last of those steps; ``None`` when maps were not requested. The steps end at t_e, or just
            before it with ``end_inclusive=False`` (S at the first step when t_e is the first step).
        map_sum_joint, map_last_joint: the same at the joint end step.
        map_count, map_count_joint: (W, B, Cm) the number of steps in ``map_sum`` / ``map_sum_joint``; None: the
            end step's index + 1 (t_e included).
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
    map_count: torch.Tensor | None = None
    map_count_joint: torch.Tensor | None = None

    def cosine(self, eps: float = 1e-6) -> torch.Tensor:
        """(W, B) cosine similarity of the guided and reference MSE curves over all grid steps."""
        ref = self.mse_reference[None].expand_as(self.mse_guided)
        return F.cosine_similarity(self.mse_guided, ref, dim=-1, eps=eps)

    def anomaly_maps(self, end_step: str = "per_modality", aggregation: str = "mean") -> torch.Tensor:
        """(W, B, Cm, H, W) per-modality anomaly maps H_m for the chosen end-step mode and aggregation."""
        if self.map_sum is None:
            raise ValueError("this forward process was run without maps (need_maps=False)")
        if end_step == "per_modality":
            total, last = self.map_sum, self.map_last
            count = self.end_index + 1 if self.map_count is None else self.map_count
        else:
            total, last = self.map_sum_joint, self.map_last_joint
            if self.map_count_joint is None:
                count = (self.end_index_joint + 1)[..., None].expand_as(self.end_index)
            else:
                count = self.map_count_joint
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
    generator: Generators = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    baseline_curve: torch.Tensor | None = None,
    end_inclusive: bool = True,
    inversion_eps: str = "raw",
    inversion_timing: str = "aligned",
    measure_every: int = 1,
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
        generator: the forward noise's random generator for the whole batch, or one generator per slice (each
            slice's noise then comes from its own generator: :mod:`~anofpdm_monai.inferers.noise`); None: the
            global RNG.
        autocast_dtype: run the network under ``torch.autocast`` with this dtype (e.g. bf16 on GPU); all other
            arithmetic stays in float32 with float64 schedule coefficients.
        progress: show a progress bar over the steps.
        baseline_curve: (K, Cm) positive curve; M_t of every slice is divided by it, step by step, before t_e is
            taken and stored (``divergence_baseline="healthy"``, docs/method.md §3.6). None: M_t as is.
        end_inclusive: the maps are made of the grid steps up to t_e included (True) or of those before t_e (False,
            the official code; S at the first step when t_e is the first step, where the official map is NaN).
        inversion_eps: DDIM inversion noise, ``"raw"`` (e_n) or ``"clipped"`` (re-derived from the clipped x0
            prediction: ``(x_t - sqrt(abar_t) x0_c) / sqrt(1 - abar_t)``, the official code).
        inversion_timing: ``"aligned"`` (the move to t_k reuses the null prediction of step t_{k-1}) or
            ``"official"`` (an extra null call on the previous state at t_k, moved to level t_k + 1, as the
            official ``calc_pred_xstart_loop``: the predictions at t_k see a state one level ahead).
        measure_every: the statistics and maps are measured at every n-th grid step (indices 0, n, 2n, ...); the
            steps between only advance the DDIM inversion, with one null call each (``"aligned"``) or none
            (``"official"``, whose extra call already moves the state). 1: every step. DDIM only: the DDPM forward
            process measures every step of its grid (ignores it). The result's ``timesteps`` are the measured steps.

    Returns:
        :class:`ForwardProcessResult`.
    """
    check_choice("forward", forward, FORWARD_MODES)
    check_choice("reference", reference, REFERENCES)
    x0 = plain_tensor(x0)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("inversion_eps", inversion_eps, INVERSION_EPS)
    check_choice("inversion_timing", inversion_timing, INVERSION_TIMINGS)
    grid = make_step_grid(timesteps=timesteps, num_train_timesteps=schedule.num_train_timesteps)
    if isinstance(measure_every, bool) or int(measure_every) != measure_every or measure_every < 1:
        raise ValueError(f"measure_every must be an integer >= 1, got {measure_every!r}")
    measure_every = int(measure_every)
    if forward != "ddim":  # DDPM has no inversion to advance between measurements: every step is measured
        measure_every = 1
    measured = grid[::measure_every]
    ws = torch.as_tensor(guidance_scales, dtype=torch.float32, device=x0.device).reshape(-1)
    if ws.numel() == 0 or not bool(torch.isfinite(ws).all()) or bool((ws < 0).any()):
        raise ValueError(f"guidance scales must be non-empty, finite and >= 0, got {ws.tolist()}")
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (B, C, H, W), got shape {tuple(x0.shape)}")
    channels = list(map_channels)
    if not channels or min(channels) < 0 or max(channels) >= x0.shape[1]:
        raise ValueError(f"map_channels {channels} out of range for {x0.shape[1]} input channels")
    baseline = None
    if baseline_curve is not None:
        baseline = torch.as_tensor(baseline_curve, dtype=torch.float32, device=x0.device)
        if tuple(baseline.shape) != (len(measured), len(channels)):
            raise ValueError(
                f"baseline_curve must be (measured steps, map channels) = {(len(measured), len(channels))}, "
                f"got {tuple(baseline.shape)}"
            )
        if not bool(torch.isfinite(baseline).all()) or bool((baseline <= 0).any()):
            raise ValueError("baseline_curve must be finite and > 0")

    x0 = x0.float()
    B = x0.shape[0]
    W, K, Cm = ws.numel(), len(measured), len(channels)
    device = x0.device
    x0_map = x0[:, channels]  # (B, Cm, H, W)
    w_view = ws.view(W, 1, 1, 1, 1)
    labels = torch.cat(
        [
            torch.full((B,), HEALTHY, device=device, dtype=torch.long),
            torch.full((B,), NULL, device=device, dtype=torch.long),
        ]
    )
    null_labels = labels[B:]
    rederive = inversion_eps == "clipped" and clip  # without clipping the re-derived noise is e_n itself

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
    prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (clipped x0 of null, its noise) at the previous step
    x_prev: torch.Tensor | None = None  # the previous state (inversion_timing="official")
    sq_prev: torch.Tensor | None = None  # S_t of the previous step (end_inclusive=False)
    for g, t in enumerate(tqdm(grid, desc="forward process", leave=False, disable=not progress)):
        if forward == "ddpm" or g == 0:
            x_t = schedule.q_sample(x0, t, draw_noise(x0.shape, generator, device, x0.dtype))
        elif inversion_timing == "aligned":
            x_t = schedule.ddim_move(prev[0], prev[1], t)
        else:  # guided-diffusion's ddim_reverse_sample(x_prev, t): null call at t, then the move to level t + 1
            t_null = torch.full((B,), t, device=device, dtype=torch.long)
            with amp:
                e_inv = network(x_prev, timesteps=t_null, class_labels=null_labels)
            e_inv = e_inv.float()
            x0_inv = schedule.predict_x0(x_prev, t, e_inv, clip=clip)
            if rederive:
                e_inv = schedule.predict_eps(x_prev, t, x0_inv)
            x_t = schedule.ddim_move(x0_inv, e_inv, t + 1) if t + 1 < schedule.num_train_timesteps else e_inv
        if g % measure_every:  # a step that only advances the inversion
            if inversion_timing == "aligned":
                t_null = torch.full((B,), t, device=device, dtype=torch.long)
                with amp:
                    e_n = network(x_t, timesteps=t_null, class_labels=null_labels).float()
                x0_n = schedule.predict_x0(x_t, t, e_n, clip=clip)
                prev = (x0_n, schedule.predict_eps(x_t, t, x0_n) if rederive else e_n)
            else:
                x_prev = x_t
            continue
        k = g // measure_every  # the index among the measured steps
        t_batch = torch.full((2 * B,), t, device=device, dtype=torch.long)
        with amp:
            eps = network(torch.cat([x_t, x_t]), timesteps=t_batch, class_labels=labels)
        eps = eps.float()
        e_h, e_n = eps[:B], eps[B:]
        x0_n = schedule.predict_x0(x_t, t, e_n, clip=clip)
        if forward == "ddim" and inversion_timing == "aligned":
            prev = (x0_n, schedule.predict_eps(x_t, t, x0_n) if rederive else e_n)
        elif forward == "ddim":
            x_prev = x_t

        e_h_m, e_n_m, x_t_m = e_h[:, channels], e_n[:, channels], x_t[:, channels]
        e_g = classifier_free_guidance(e_h_m[None], e_n_m[None], w_view)  # (W, B, Cm, H, W)
        x0_g = schedule.predict_x0(x_t_m[None].expand_as(e_g), t, e_g, clip=clip)
        x0_ref = x0_n[:, channels] if reference == "null" else schedule.predict_x0(x_t_m, t, e_h_m, clip=clip)

        sq_g = (x0_g - x0_map[None]) ** 2  # S_t, (W, B, Cm, H, W)
        sq_r = (x0_ref - x0_map) ** 2  # (B, Cm, H, W)
        if divergence == "v2":
            m_t = ((x0_g - x0_ref[None]) ** 2).mean(dim=(-2, -1))
        else:
            m_t = (sq_g - sq_r[None]).abs().mean(dim=(-2, -1))
        if baseline is not None:
            m_t = m_t / baseline[k]
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
            if end_inclusive:
                running += sq_g
                upto, at = running, sq_g  # the steps 0..k, and step k
            elif k == 0:
                upto, at = sq_g, sq_g  # no step before the first: S at the first step (the official map is NaN)
            else:
                upto, at = running, sq_prev  # the steps 0..k-1, and step k-1
            sel = improved[..., None, None]
            snap_sum = torch.where(sel, upto, snap_sum)
            snap_last = torch.where(sel, at, snap_last)
            sel_j = improved_j[..., None, None, None]
            snap_sum_j = torch.where(sel_j, upto, snap_sum_j)
            snap_last_j = torch.where(sel_j, at, snap_last_j)
            if not end_inclusive:
                running += sq_g
                sq_prev = sq_g

    return ForwardProcessResult(
        timesteps=torch.as_tensor(measured, dtype=torch.long),
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
        map_count=_map_count(end_index, end_inclusive) if need_maps else None,
        map_count_joint=_map_count(end_index_j, end_inclusive)[..., None].expand_as(end_index).clone()
        if need_maps
        else None,
    )


def _map_count(end_index: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """The number of grid steps a mean map of end index ``end_index`` averages: ``k_e + 1`` with t_e included, else
    ``k_e`` (1 at ``k_e = 0``, where the map is S at the first step)."""
    return end_index + 1 if inclusive else end_index.clamp_min(1)
