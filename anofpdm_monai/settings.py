"""The AnoFPDM options, in one frozen object, each default written once.

:class:`AnoFPDMSettings` is what the inferer, the calibration record, the evaluation and volume inference all take;
a calibration is "settings + learned constants (w*, M_max, tau) + provenance" (:mod:`anofpdm_monai.calibration`).
The method behind each option is in docs/method.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .schedule import make_step_grid

__all__ = [
    "AnoFPDMSettings",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_GUIDANCE_CANDIDATES",
    "DEFAULT_TOLERANCE",
    "FORWARD_MODES",
    "REFERENCES",
    "DIVERGENCES",
    "END_STEPS",
    "AGGREGATIONS",
    "HEALTH_SCORES",
    "DIVERGENCE_BASELINES",
    "PRECISIONS",
    "INVERSION_EPS",
    "INVERSION_TIMINGS",
    "DEFAULT_HEALTH_SCORE",
    "CALIBRATED_FIELDS",
    "PRESETS",
    "autocast_dtype",
    "check_choice",
    "check_guidance_scale",
]

#: w used when no calibration chose one (the papers' BraTS value)
DEFAULT_GUIDANCE_SCALE = 2.0
#: candidate w of the calibration sweep (docs/method.md §6)
DEFAULT_GUIDANCE_CANDIDATES = (0.5, 1.0, 2.0, 3.0, 5.0)
#: w* = the largest candidate whose accuracy is >= tolerance x the best
DEFAULT_TOLERANCE = 0.99

FORWARD_MODES = ("ddim", "ddpm")
REFERENCES = ("null", "healthy")
DIVERGENCES = ("v2", "v1")
END_STEPS = ("per_modality", "joint")
AGGREGATIONS = ("mean", "last")
#: slice health scores (anofpdm_monai/inferers/health.py); "cosine" is the papers' and the official code's
HEALTH_SCORES = ("cosine", "mse_gap", "divergence")
#: the default health score (measured: docs/real_study.md, the papers' cosine was at or below chance there)
DEFAULT_HEALTH_SCORE = "mse_gap"
#: what M_t is measured against before t_e and M are taken: "none" (the papers) or "healthy" (step by step, the
#: calibration's median M_t of healthy slices; docs/method.md §3.6)
DIVERGENCE_BASELINES = ("none", "healthy")
#: numeric mode of the network calls of the forward process: "fp32" (the official code's), or autocast to "bf16" /
#: "fp16" (CUDA; bf16 also on the CPU). The statistics, maps and thresholds are computed in fp32/fp64 in every mode.
PRECISIONS = ("fp32", "bf16", "fp16")
#: the noise of a DDIM inversion step: "raw" (the null prediction itself) or "clipped" (re-derived from the clipped x0
#: prediction, as guided-diffusion's ``ddim_reverse_sample`` in the official code)
INVERSION_EPS = ("raw", "clipped")
#: when the DDIM inversion calls the network: "aligned" (the move to t_k reuses the null prediction of step t_{k-1};
#: the predictions at t_k see a state at noise level t_k) or "official" (the official loop: an extra null call on the
#: previous state at t_k, moved to level t_k + 1; the predictions at t_k then see a state one level ahead)
INVERSION_TIMINGS = ("aligned", "official")

#: the options calibrated constants depend on: a calibration is refused for a setting that differs in one of them
CALIBRATED_FIELDS = (
    "timesteps",
    "forward",
    "reference",
    "divergence",
    "end_step",
    "clip",
    "health_score",
    "divergence_baseline",
    "precision",
    "inversion_eps",
    "inversion_timing",
    "measure_every",
    "calibration_subset",
    "calibration_subset_seed",
    "fixed_guidance_scale",
)

#: named settings (:meth:`AnoFPDMSettings.preset`): the project defaults, and the official code's algorithm
#: (github SoloChe/AnoFPDM: scripts/translation_FPDM.py, scripts/obtain_hyperpara.py,
#: guided_diffusion/gaussian_diffusion.py, config/run_translation_{brats,ATLAS}_fpdm.sh) per dataset; docs/method.md
#: "Project default vs official code"
_OFFICIAL = {
    "t_max": 599,  # forward_steps=600: t = 0..599
    "stride": 1,
    "timesteps": None,
    "forward": "ddim",  # d_reverse=True
    "reference": "healthy",  # the "null" x0 of calc_pred_xstart_loop is the healthy-conditional one (w=-1)
    "divergence": "v2",
    "end_step": "per_modality",
    "end_step_inclusive": False,  # mse[t_s:t_e] excludes t_e
    "clip": True,
    "health_score": "cosine",
    "divergence_baseline": "none",
    "precision": "fp32",
    "inversion_eps": "clipped",
    "inversion_timing": "official",
    "measure_every": 1,  # every step measured
    "calibration_subset_seed": 0,
}
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # --w 2; --num_batches_val 10 --batch_size_val 50; --last_only False
    "official_brats": {
        **_OFFICIAL,
        "aggregation": "mean",
        "calibration_subset": 500,
        "fixed_guidance_scale": 2.0,
    },
    # w=30; --num_batches_val 10 --batch_size_val 100; --last_only True
    "official_atlas": {
        **_OFFICIAL,
        "aggregation": "last",
        "calibration_subset": 1000,
        "fixed_guidance_scale": 30.0,
    },
}


def autocast_dtype(precision: str) -> Any:
    """The ``torch.autocast`` dtype of a :data:`PRECISIONS` name (None for fp32: no autocast)."""
    check_choice("precision", precision, PRECISIONS)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_guidance_scale(value: Any, name: str = "guidance_scale") -> float:
    """``value`` as a float; a one-line ``ValueError`` naming ``name`` unless it is a finite number > 0."""
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(w) or w <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return w


def _integer(name: str, value: Any) -> int:
    """``value`` as an int; a one-line ``ValueError`` naming ``name`` unless it is a whole number (an int, a float
    such as 4.0, or a string such as "4"; not a bool)."""
    try:
        out = int(value)
        whole = not isinstance(value, bool) and float(value) == out
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return out


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class AnoFPDMSettings:
    """Every option of the AnoFPDM forward process and its post-processing (docs/method.md §3-5).

    Attributes:
        t_max: last step of the grid (the official code visits 0..599).
        stride: grid spacing (1 is the official grid, 1200 network evaluations per slice; the default 10 makes 120:
            docs/performance.md, "The step grid on a model whose maps work").
        timesteps: an explicit ascending grid instead of ``t_max``/``stride``.
        forward: ``"ddim"`` (deterministic inversion, the papers' best) or ``"ddpm"`` (fresh noise per step).
        reference: ``"null"`` (paper) or ``"healthy"`` (official code: e_h with w = 0).
        divergence: ``"v2"`` (extended paper, official code) or ``"v1"`` (conference paper).
        end_step: ``"per_modality"`` (official code) or ``"joint"`` (paper eq. 6).
        aggregation: ``"mean"`` of S_t over the steps up to t_e, or ``"last"`` (the last of those steps alone: the
            official ATLAS setting, ``--last_only True``).
        end_step_inclusive: whether the steps the map is made of end AT t_e (True, the default) or just before it
            (False, the official code: ``mse[t_s:t_e]``, so ``"mean"`` averages the grid steps before t_e and
            ``"last"`` takes the grid step before t_e). When t_e is the first grid step there is no step before it
            (the official code's map is then NaN); both aggregations then take S at that first step.
        quantile_range: (a, b) of the Algorithm 1 threshold quantile.
        median_kernel: median filter size of the map.
        min_component_size: mask components of at most this many pixels are removed (40 px at 128 x 128; scale it
            with the resolution, see :func:`anofpdm_monai.postprocessing.scaled_min_component_size`).
        clip: clip x0 predictions to [-1, 1].
        health_score: the slice health score compared with the calibrated tau: ``"mse_gap"`` (the default, chosen
            by the real-MRI study), ``"cosine"`` (the papers') or ``"divergence"``; see
            :mod:`anofpdm_monai.inferers.health`.
        divergence_baseline: ``"none"`` (the papers: t_e = argmax_t M_t) or ``"healthy"``: M_t is divided, step by
            step, by the median M_t of the calibration's healthy slices before t_e and M are taken, so that t_e lands
            where the slice departs most from healthy slices rather than where every slice's M_t is largest. The
            curve is a calibrated constant (image labels only). Not the default: on real MRI it helped one fold's
            maps and hurt two others' (docs/real_study.md, ablation 1).
        precision: numeric mode of the network calls, one of :data:`PRECISIONS`: ``"fp32"`` (the default and the
            official code's) or autocast to ``"bf16"``/``"fp16"``. A calibration is made at one precision and
            inference refuses another (M_max and tau move with it); fp32 stays the default until a GPU measurement
            on a trained model shows bf16 masks agree with fp32 ones (docs/performance.md).
        inversion_eps: the noise of each DDIM inversion step (``forward="ddim"``), one of :data:`INVERSION_EPS`:
            ``"raw"`` (the default: the null prediction e_n itself) or ``"clipped"`` (the official code:
            ``eps' = (x_t - sqrt(abar_t) x0_c) / sqrt(1 - abar_t)`` from the clipped x0 prediction x0_c). They differ
            only where the x0 prediction is clipped.
        inversion_timing: when the DDIM inversion calls the network, one of :data:`INVERSION_TIMINGS`: ``"aligned"``
            (the default: the move to t_k reuses the null prediction of step t_{k-1}, no extra call) or
            ``"official"`` (the official ``calc_pred_xstart_loop``: at every step after the first, a null call on the
            previous state at step t_k, moved to level t_k + 1, so the predictions at t_k see a state one level
            ahead; one more network call of B slices per step).
        measure_every: measure M_t, the MSE curves and S_t at every n-th grid step only (indices 0, n, 2n, ...:
            the measured steps, on which t_e, the maps and the health score are computed); the grid steps between
            only advance the DDIM inversion with one null call each. A fine inversion with sparse measurements:
            ``K + ceil(K / n)`` network evaluations per slice for a K-step grid instead of ``2K``. 1 (every step)
            is the official code's. DDIM only: the DDPM forward process has no inversion to advance, measures every
            step of its grid and ignores it (so ``replace(forward="ddpm")`` keeps a valid setting).
        calibration_subset: calibrate on a seeded random subset of this many validation slices (healthy and
            unhealthy alike, drawn from all of them; M_max, tau and w* all come from the subset), as the official
            code does (10 batches of 50 slices for BraTS, of 100 for ATLAS); None (the default): every validation
            slice. The official batches are independent draws, so a slice can occur in two of them; here the subset
            is drawn without replacement.
        calibration_subset_seed: seed of that subset (``numpy.random.default_rng``).
        fixed_guidance_scale: calibrate this w alone (no search over candidates: the official code fixes w, 2 for
            BraTS and 30 for ATLAS); None (the default): w* is chosen among the calibration's candidates.

    Presets (:meth:`preset`): ``"default"`` (the fields above), ``"official_brats"`` and ``"official_atlas"``
    (``preset("official", dataset="brats")``): the official code's algorithm, reference ``"healthy"``, the end step
    excluded, ``"mean"`` (BraTS) or ``"last"`` (ATLAS) aggregation, the grid 0..599 with stride 1, fp32, cosine
    health score, eps re-derived from the clipped x0 with the official inversion timing, M_max and tau from a seeded
    subset of 500 (BraTS) or 1000 (ATLAS) validation slices, and w fixed to 2 (BraTS) or 30 (ATLAS). Each deviation
    of the defaults from it is a row of docs/method.md "Project default vs official code".
    """

    t_max: int = 599
    stride: int = 10  # 120 network evaluations per slice: docs/performance.md, the step grid on a model whose maps work
    timesteps: tuple[int, ...] | None = None
    forward: str = "ddim"
    reference: str = "null"
    divergence: str = "v2"
    end_step: str = "per_modality"
    aggregation: str = "mean"
    quantile_range: tuple[float, float] = (0.90, 0.98)
    median_kernel: int = 5
    min_component_size: int = 40
    clip: bool = True
    health_score: str = DEFAULT_HEALTH_SCORE
    divergence_baseline: str = "none"
    precision: str = "fp32"
    end_step_inclusive: bool = True
    inversion_eps: str = "raw"
    inversion_timing: str = "aligned"
    measure_every: int = 1
    calibration_subset: int | None = None
    calibration_subset_seed: int = 0
    fixed_guidance_scale: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise types once, here
        set_(self, "t_max", _integer("t_max", self.t_max))
        set_(self, "stride", _integer("stride", self.stride))
        if self.timesteps is not None:  # an explicit grid: t_max and stride describe it, so equal grids compare equal
            if isinstance(self.timesteps, (str, bytes)) or not hasattr(self.timesteps, "__iter__"):
                raise ValueError(f"timesteps must be a list of integers, got {self.timesteps!r}")
            set_(self, "timesteps", tuple(_integer("timesteps", t) for t in self.timesteps))
            if self.timesteps:
                set_(self, "t_max", self.timesteps[-1])
                set_(self, "stride", 1)
        check_choice("forward", self.forward, FORWARD_MODES)
        check_choice("reference", self.reference, REFERENCES)
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("end_step", self.end_step, END_STEPS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("health_score", self.health_score, HEALTH_SCORES)
        check_choice("divergence_baseline", self.divergence_baseline, DIVERGENCE_BASELINES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("inversion_eps", self.inversion_eps, INVERSION_EPS)
        check_choice("inversion_timing", self.inversion_timing, INVERSION_TIMINGS)
        set_(self, "measure_every", _integer("measure_every", self.measure_every))
        if self.measure_every < 1:
            raise ValueError(f"measure_every must be >= 1, got {self.measure_every}")
        if not isinstance(self.end_step_inclusive, bool):
            raise ValueError(f"end_step_inclusive must be true or false, got {self.end_step_inclusive!r}")
        if self.calibration_subset is not None:
            set_(self, "calibration_subset", _integer("calibration_subset", self.calibration_subset))
            if self.calibration_subset < 2:  # a healthy and an unhealthy slice at the very least
                raise ValueError(f"calibration_subset must be >= 2 (null: all), got {self.calibration_subset}")
        set_(self, "calibration_subset_seed", _integer("calibration_subset_seed", self.calibration_subset_seed))
        if self.calibration_subset_seed < 0:
            raise ValueError(f"calibration_subset_seed must be >= 0, got {self.calibration_subset_seed}")
        if self.fixed_guidance_scale is not None:
            set_(self, "fixed_guidance_scale", check_guidance_scale(self.fixed_guidance_scale, "fixed_guidance_scale"))
        if self.divergence_baseline == "healthy" and self.health_score == "divergence":
            # the calibration pass scores the slices before the baseline exists; the score would differ at inference
            raise ValueError("health_score 'divergence' cannot be combined with divergence_baseline 'healthy'")
        q = tuple(float(v) for v in self.quantile_range)
        if len(q) != 2 or not all(math.isfinite(v) for v in q) or not 0.0 <= q[0] <= q[1] <= 1.0:
            raise ValueError(f"quantile_range must be (a, b) with 0 <= a <= b <= 1, got {list(self.quantile_range)}")
        set_(self, "quantile_range", q)
        if _integer("median_kernel", self.median_kernel) < 1:
            raise ValueError(f"median_kernel must be >= 1, got {self.median_kernel}")
        if int(self.median_kernel) % 2 == 0:  # the filter is centred on each pixel (MONAI's median_filter)
            raise ValueError(f"median_kernel must be odd, got {self.median_kernel}")
        set_(self, "median_kernel", int(self.median_kernel))
        if _integer("min_component_size", self.min_component_size) < 0:
            raise ValueError(f"min_component_size must be >= 0, got {self.min_component_size}")
        set_(self, "min_component_size", int(self.min_component_size))
        set_(self, "clip", bool(self.clip))
        # the grid itself is checked against T when it is resolved (grid()); the stride and t_max here
        make_step_grid(self.t_max, self.stride, self.timesteps, num_train_timesteps=max(self.t_max + 1, 10**9))

    @property
    def autocast_dtype(self) -> Any:
        """The ``torch.autocast`` dtype of :attr:`precision` (None for fp32)."""
        return autocast_dtype(self.precision)

    # ------------------------------------------------------------------ grid
    def grid(self, num_train_timesteps: int = 1000) -> list[int]:
        """The ascending step grid for a schedule of ``num_train_timesteps`` steps."""
        return make_step_grid(self.t_max, self.stride, self.timesteps, num_train_timesteps)

    def measured_grid(self, num_train_timesteps: int = 1000) -> list[int]:
        """The grid steps where the statistics and maps are measured: every ``measure_every``-th of :meth:`grid` for
        DDIM, all of them for DDPM."""
        return self.grid(num_train_timesteps)[:: self.measure_every if self.forward == "ddim" else 1]

    def network_evaluations(self, num_train_timesteps: int = 1000) -> int:
        """Network evaluations per slice of one forward process: two (healthy and null) at each measured step, one
        null call at each other step (``"aligned"`` inversion), plus the extra null call of every step after the
        first with the ``"official"`` inversion timing."""
        k, m = len(self.grid(num_train_timesteps)), len(self.measured_grid(num_train_timesteps))
        if self.inversion_timing == "official" and self.forward == "ddim":
            return 2 * m + (k - 1)
        return k + m

    def with_grid(self, num_train_timesteps: int = 1000) -> AnoFPDMSettings:
        """The same settings with the grid written out as ``timesteps`` (what a calibration records)."""
        grid = self.grid(num_train_timesteps)
        return dataclasses.replace(self, timesteps=tuple(grid), t_max=grid[-1], stride=1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str | None = "default", dataset: str | None = None) -> AnoFPDMSettings:
        """The settings of a named preset of :data:`PRESETS`: ``"default"`` (None too), ``"official_brats"``,
        ``"official_atlas"``, or ``"official"`` with ``dataset="brats"`` / ``"atlas"`` (the bundles pass their
        dataset, which the other presets ignore); a one-line ``ValueError`` for another name. Change single options
        afterwards with :meth:`replace`."""
        key = "default" if name is None else str(name)
        if key == "official":  # the dataset picks the official variant; the other presets ignore it
            if dataset is None:
                raise ValueError("the preset 'official' needs dataset='brats' or 'atlas' (or name 'official_brats')")
            key = f"official_{str(dataset).lower()}"
        if key not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)} (or 'official' with a dataset), got {name!r}")
        return cls(**PRESETS[key])

    def replace(self, **changes: Any) -> AnoFPDMSettings:
        """A copy with some options changed; ``None`` values are ignored (``"as before"``). Changing ``t_max`` or
        ``stride`` drops an explicit ``timesteps`` grid unless one is given too."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"unknown AnoFPDM option(s) {unknown}; options: {[f.name for f in dataclasses.fields(self)]}"
            )
        if ("t_max" in changes or "stride" in changes) and "timesteps" not in changes and self.timesteps is not None:
            # a partial grid override keeps the other field of the explicit grid: its last step, or its spacing
            grid = self.timesteps
            changes.setdefault("t_max", grid[-1])
            if "stride" not in changes:
                spacing = {b - a for a, b in zip(grid, grid[1:])}
                if grid[0] != 0 or len(spacing) > 1:
                    raise ValueError(
                        f"t_max alone cannot change the grid {_short(grid)}, which is not 0, s, 2s, ...: "
                        "give stride too, or timesteps"
                    )
                changes["stride"] = spacing.pop() if spacing else 1
            changes["timesteps"] = None
        return dataclasses.replace(self, **changes)

    @classmethod
    def split_kwargs(cls, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split keyword arguments into ``(settings options, the rest)``."""
        names = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return mine, rest

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable options (tuples as lists)."""
        out = dataclasses.asdict(self)
        out["quantile_range"] = list(self.quantile_range)
        out["timesteps"] = None if self.timesteps is None else list(self.timesteps)
        return out

    @classmethod
    def from_dict(cls, options: Mapping[str, Any], source: str = "settings") -> AnoFPDMSettings:
        """Settings from :meth:`to_dict` output; a one-line ``ValueError`` naming ``source`` and the bad key."""
        if not isinstance(options, Mapping):
            raise ValueError(f"{source}: AnoFPDM settings must be a mapping, got {type(options).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"{source}: unknown AnoFPDM option(s) {unknown}")
        try:
            return cls(**dict(options))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    def differences(self, other: AnoFPDMSettings, fields: Sequence[str] = CALIBRATED_FIELDS) -> list[str]:
        """``"field mine vs other"`` for each of ``fields`` that differs (the grid compared as resolved)."""
        out = []
        for name in fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "timesteps":
                mine, theirs = self.grid(10**9), other.grid(10**9)
                if mine != theirs:
                    out.append(f"timesteps {_short(mine)} vs {_short(theirs)}")
            elif mine != theirs:
                out.append(f"{name} {mine!r} vs {theirs!r}")
        return out


def _short(grid: Sequence[int]) -> str:
    return f"{list(grid[:3])}..{grid[-1]} ({len(grid)} steps)"
