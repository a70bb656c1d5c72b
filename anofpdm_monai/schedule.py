"""Noise-schedule arithmetic in float64, step grids and the classifier-free guidance combination.

One :class:`NoiseSchedule` object is the single source of the schedule: the training config builds it, the MONAI
scheduler that training noises with is made from it (:meth:`NoiseSchedule.to_monai_scheduler`), its parameters are
stored in every checkpoint (:meth:`NoiseSchedule.to_dict`), and calibration, inference, evaluation and the previews
rebuild it from there (:meth:`NoiseSchedule.from_dict`).

MONAI's schedulers keep ``alphas_cumprod`` in float32 and ``add_noise`` recasts it to the input's dtype (bf16 in,
bf16 schedule); their DDIM ``step``/``reversed_step`` move by ``T // N``, which does not match their own linspace
timesteps, and DDPM ``step`` always goes to ``t - 1``. AnoFPDM needs exact coefficients at arbitrary ``(t, t_prev)``
pairs, so every formula lives here, in float64, and results are cast to the working dtype (float32) at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["NoiseSchedule", "make_step_grid", "classifier_free_guidance"]


def classifier_free_guidance(
    eps_cond: torch.Tensor, eps_null: torch.Tensor, guidance_scale: float | torch.Tensor
) -> torch.Tensor:
    """The classifier-free guided noise ``(1 + w) eps_cond - w eps_null`` (docs/method.md §3); ``w`` may be a tensor
    that broadcasts against the noise (several scales at once)."""
    return (1.0 + guidance_scale) * eps_cond - guidance_scale * eps_null


def make_step_grid(
    t_max: int = 599,
    stride: int = 1,
    timesteps: Sequence[int] | None = None,
    num_train_timesteps: int = 1000,
) -> list[int]:
    """The ascending grid of diffusion steps visited by the forward process.

    Args:
        t_max: largest step (the official code visits 0..599).
        stride: spacing of the grid ``0, stride, 2 stride, ... <= t_max``.
        timesteps: an explicit grid instead (sorted ascending, unique, in ``[0, num_train_timesteps)``).
        num_train_timesteps: T.

    Returns:
        list of ints.
    """
    if timesteps is not None:
        grid = [int(t) for t in timesteps]
        if not grid:
            raise ValueError("timesteps must not be empty")
        if any(b <= a for a, b in zip(grid, grid[1:])):
            raise ValueError(f"timesteps must be strictly ascending, got {grid[:8]}...")
        if grid[0] < 0 or grid[-1] >= num_train_timesteps:
            raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {grid[0]}..{grid[-1]}")
        return grid
    if int(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not 0 <= int(t_max) < num_train_timesteps:
        raise ValueError(f"t_max must be in [0, {num_train_timesteps}), got {t_max}")
    return list(range(0, int(t_max) + 1, int(stride)))


class NoiseSchedule:
    """Variance-preserving diffusion schedule with float64 coefficients.

    Args:
        num_train_timesteps: T.
        schedule: ``"linear_beta"`` (DDPM, the papers) or ``"scaled_linear_beta"``.
        beta_start: first beta.
        beta_end: last beta.
        betas: explicit betas instead (e.g. ``scheduler.betas`` of any MONAI scheduler).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        betas: torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        if betas is not None:
            b = torch.as_tensor(betas, dtype=torch.float64).flatten()
        elif schedule == "linear_beta":
            b = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif schedule == "scaled_linear_beta":
            b = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"unknown schedule {schedule!r}; use 'linear_beta', 'scaled_linear_beta' or pass betas")
        if b.numel() < 2 or bool(((b <= 0) | (b >= 1)).any()):
            raise ValueError("betas must lie in (0, 1)")
        self._params: dict[str, Any] | None = None
        if betas is None:
            self._params = {
                "num_train_timesteps": int(num_train_timesteps),
                "schedule": schedule,
                "beta_start": float(beta_start),
                "beta_end": float(beta_end),
            }
        self.betas = b
        self.alphas_cumprod = torch.cumprod(1.0 - b, dim=0)
        self.num_train_timesteps = int(b.numel())
        # float64 CPU tables, and their copies in each working dtype on each device (see :meth:`_coef`)
        self._float64 = {
            "sqrt_alpha_bar": self.alphas_cumprod.sqrt(),
            "sqrt_one_minus_alpha_bar": (1.0 - self.alphas_cumprod).sqrt(),
        }
        self._abar = [float(a) for a in self.alphas_cumprod.tolist()]
        self._tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:  # the per-device copies are a cache: not pickled
        state = dict(self.__dict__)
        state["_tables"] = {}
        return state

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """Rebuild the schedule of a MONAI scheduler in float64 (recomputed from its parameters when it is the
        linear schedule, so that no float32 rounding of the betas leaks in)."""
        betas = torch.as_tensor(scheduler.betas, dtype=torch.float64)
        T = betas.numel()
        linear = torch.linspace(float(betas[0]), float(betas[-1]), T, dtype=torch.float64)
        if torch.allclose(betas, linear, rtol=1e-5, atol=1e-9):
            return cls(T, "linear_beta", float(f"{float(betas[0]):.6g}"), float(f"{float(betas[-1]):.6g}"))
        return cls(betas=betas)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters (stored in checkpoints); :meth:`from_dict` rebuilds the same schedule."""
        if self._params is not None:
            return dict(self._params)
        return {"betas": [float(b) for b in self.betas]}

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> NoiseSchedule:
        """The schedule of :meth:`to_dict`."""
        try:
            return cls(**dict(params))
        except TypeError as exc:
            raise ValueError(f"not a noise schedule description: {sorted(params)} ({exc})") from None

    def to_monai_scheduler(self) -> Any:
        """A MONAI ``DDPMScheduler`` with this schedule, for MONAI's training inferer (``add_noise``).

        For a named schedule MONAI computes the betas from the same parameters (in its own float32); explicit betas
        are set on the scheduler.
        """
        from monai.networks.schedulers import DDPMScheduler

        if self._params is not None:
            return DDPMScheduler(**self._params)
        scheduler = DDPMScheduler(num_train_timesteps=self.num_train_timesteps)
        scheduler.betas = self.betas.float()
        scheduler.alphas = 1.0 - scheduler.betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
        return scheduler

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and torch.equal(self.betas, other.betas)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.to_dict() if self._params is not None else f'{self.num_train_timesteps} betas'})"

    @staticmethod
    def working_dtype(like: torch.Tensor) -> torch.dtype:
        """The dtype results are computed in: float64 stays float64, anything narrower (float32, bf16, float16)
        becomes float32, so that a bf16 input never pulls the schedule arithmetic down to bf16 (as MONAI's
        ``add_noise`` does)."""
        return torch.promote_types(like.dtype, torch.float32)

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The float64 table ``name`` rounded to ``dtype`` and moved to ``device``, made once per (device, dtype).

        Rounding the float64 values once is what the per-call arithmetic did (float64 coefficient, cast to the
        working dtype), so the coefficients are bit for bit the same; a device without float64 (mps) gets float32.
        """
        key = (name, device, dtype)
        table = self._tables.get(key)
        if table is None:
            if device.type == "mps" and dtype == torch.float64:
                dtype = torch.float32
            table = self._float64[name].to(dtype).to(device)
            self._tables[key] = table
        return table

    def _coef(self, name: str, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """Coefficient ``name`` at step(s) ``t`` on ``like``'s device in :meth:`working_dtype`: a 0-dim tensor for
        one step, else shaped (B, 1, ...) to broadcast against ``like``. Indexed on the device from the cached table:
        no host transfer, no synchronisation (a CPU step tensor is moved to the device first)."""
        table = self._table(name, like.device, self.working_dtype(like))
        if not isinstance(t, torch.Tensor):
            return table[int(t)]
        if t.ndim == 0 and t.device.type == "cpu" and like.device.type != "cpu":
            return table[int(t)]  # a CPU scalar: read on the host, no copy to the device
        c = table[t.to(device=like.device, dtype=torch.long, non_blocking=True)]
        if c.ndim == 0:
            return c
        return c.reshape(-1, *([1] * (like.ndim - 1)))

    def sqrt_alpha_bar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t)`` shaped to broadcast against ``like`` (B, ...), in :meth:`working_dtype`."""
        return self._coef("sqrt_alpha_bar", t, like)

    def sqrt_one_minus_alpha_bar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``sqrt(1 - abar_t)`` shaped to broadcast against ``like``."""
        return self._coef("sqrt_one_minus_alpha_bar", t, like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (float32 for float32/bf16/float16 inputs)."""
        dtype = self.working_dtype(x0)
        x0, noise = x0.to(dtype), noise.to(dtype)
        return self.sqrt_alpha_bar(t, x0) * x0 + self.sqrt_one_minus_alpha_bar(t, x0) * noise

    def predict_x0(
        self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor, clip: bool = True
    ) -> torch.Tensor:
        """``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, clipped to [-1, 1] when ``clip``."""
        dtype = self.working_dtype(x_t)
        x_t, eps = x_t.to(dtype), eps.to(dtype)
        x0 = (x_t - self.sqrt_one_minus_alpha_bar(t, x_t) * eps) / self.sqrt_alpha_bar(t, x_t)
        return x0.clamp(-1.0, 1.0) if clip else x0

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        """The noise consistent with ``x_t`` and ``x0``: ``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``."""
        dtype = self.working_dtype(x_t)
        x_t, x0 = x_t.to(dtype), x0.to(dtype)
        return (x_t - self.sqrt_alpha_bar(t, x_t) * x0) / self.sqrt_one_minus_alpha_bar(t, x_t)

    def ddim_move(self, x0: torch.Tensor, eps: torch.Tensor, t_to: torch.Tensor | int) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) move to step ``t_to``: ``sqrt(abar) x0 + sqrt(1 - abar) eps``; the same
        formula encodes (inversion, ``t_to`` > t) and decodes (``t_to`` < t)."""
        return self.q_sample(x0, t_to, eps)

    def ddpm_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of ``q(x_{t_prev} | x_t, x0)`` for any ``t_prev < t`` (respaced DDPM with the
        "fixed small" variance); ``t_prev = -1`` means the clean image (mean ``x0``, std 0).

        The coefficients are computed in Python floats (IEEE float64, the same values as float64 tensor arithmetic)
        and enter the device arithmetic as scalars: no tensor is copied to the device."""
        abar_t = self._abar[int(t)]
        abar_prev = self._abar[int(t_prev)] if t_prev >= 0 else 1.0
        beta = 1.0 - abar_t / abar_prev
        c0 = math.sqrt(abar_prev) * beta / (1.0 - abar_t)
        ct = math.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar_t)
        var = beta * (1.0 - abar_prev) / (1.0 - abar_t)
        dtype = self.working_dtype(x_t)
        x0, x_t = x0.to(dtype), x_t.to(dtype)
        mean = c0 * x0 + ct * x_t
        return mean, torch.full((), math.sqrt(max(var, 0.0)), dtype=dtype, device=x0.device)
