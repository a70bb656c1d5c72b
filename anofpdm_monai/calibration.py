"""Calibration of AnoFPDM from image-level (slice) labels only.

From the validation slices and their healthy/unhealthy labels (no pixel labels):

- ``M_max`` per map modality: the largest max_t M_t over unhealthy slices (Algorithm 1's normaliser);
- ``tau``: over q in linspace(0.005, 0.095, 100), tau_q = the q-quantile of the healthy slices' cosine c; the first
  tau_q minimising #(unhealthy with c > tau_q) + #(healthy with c < tau_q);
- the fixed guidance ``w*``: for each candidate w, the classification accuracy at its own tau; w* is the largest
  candidate whose accuracy is >= ``tolerance`` x the best (0.99 by default; the extended paper states 0.98 in one
  place and 0.99 in another).

The network outputs (and the DDIM trajectory) do not depend on w, so every candidate is evaluated from ONE pass of
network calls over the validation set (:func:`~anofpdm_monai.inferers.anofpdm.run_forward_process` with all
candidates at once). The result is a small JSON file with everything inference needs and what it was made for;
inference refuses a calibration that does not match its checkpoint, step grid, forward mode or w.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .utils import atomic_path

__all__ = [
    "CALIBRATION_FORMAT",
    "Calibration",
    "CalibrationError",
    "CalibrationStatistics",
    "select_tau",
    "select_guidance",
    "calibrate_from_statistics",
    "collect_statistics",
    "run_calibration",
]

CALIBRATION_FORMAT = "anofpdm_monai.calibration/1"
DEFAULT_TAU_LEVELS = tuple(np.linspace(0.005, 0.095, 100).tolist())


class CalibrationError(ValueError):
    """A calibration that cannot be made or does not match the inference setting (one line)."""


@dataclass
class Calibration:
    """Everything inference needs, and what it was made for.

    Attributes:
        guidance_scale: w*.
        m_max: M_max per map modality (for ``end_step="per_modality"``).
        m_max_joint: M_max of the modality-mean divergence (for ``end_step="joint"``).
        tau: cosine threshold (unhealthy iff c <= tau).
        timesteps: the step grid.
        forward, reference, divergence, end_step: forward-process options used.
        quantile_range: (a, b) of Algorithm 1.
        map_modalities: names of the map modalities; map_channels: their channel indices.
        median_kernel, min_component_size: the map post-processing (5 and 40 px at 128 x 128 in the papers; scale
            the component size with the resolution, e.g. 10 px at 64 x 64).
        checkpoint_digest: digest of the checkpoint file the statistics came from.
        preprocessing: preprocessing parameters of that checkpoint.
        datalist: the datalist used (path or description) and split.
        candidates: per candidate w: accuracy, tau, m_max.
        tolerance: the w* tolerance.
        num_healthy, num_unhealthy: validation slices used.
    """

    guidance_scale: float
    m_max: list[float]
    m_max_joint: float
    tau: float
    timesteps: list[int]
    forward: str = "ddim"
    reference: str = "null"
    divergence: str = "v2"
    end_step: str = "per_modality"
    quantile_range: list[float] = field(default_factory=lambda: [0.90, 0.98])
    map_modalities: list[str] = field(default_factory=list)
    map_channels: list[int] = field(default_factory=list)
    median_kernel: int = 5
    min_component_size: int = 40
    checkpoint_digest: str = ""
    preprocessing: dict[str, Any] | None = None
    datalist: str = ""
    candidates: list[dict[str, Any]] = field(default_factory=list)
    tolerance: float = 0.99
    num_healthy: int = 0
    num_unhealthy: int = 0
    format: str = CALIBRATION_FORMAT
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file atomically."""
        if not self.created:
            self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read a calibration file; one-line :class:`CalibrationError` when missing or malformed."""
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file not found: {path} (run the calibrate workflow first)")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"cannot read calibration file {path}: {exc}") from None
        if not isinstance(data, Mapping) or data.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"{path} is not an anofpdm_monai calibration file (format {CALIBRATION_FORMAT})")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as exc:
            raise CalibrationError(f"calibration file {path} is missing fields: {exc}") from None

    def check(self, source: str = "calibration", **setting: Any) -> None:
        """Refuse a calibration made for another setting.

        Args:
            source: name of the calibration (file) for the message.
            setting: values to compare, among ``checkpoint_digest``, ``timesteps``, ``forward``, ``reference``,
                ``divergence``, ``end_step``, ``guidance_scale``, ``map_channels``, ``preprocessing``; a value of
                None is not compared.

        Raises:
            CalibrationError: naming every field that differs.
        """
        diffs = []
        for key, value in setting.items():
            if value is None:
                continue
            mine = getattr(self, key)
            if key == "timesteps":
                value, mine = [int(t) for t in value], [int(t) for t in mine]
            elif isinstance(value, (tuple, list, np.ndarray)) and isinstance(mine, (tuple, list)):
                value, mine = list(np.asarray(value).tolist()), list(mine)  # (0, 3) and [0, 3] are the same
            same = abs(float(value) - float(mine)) < 1e-9 if key == "guidance_scale" else value == mine
            if not same:
                shown = (lambda v: f"{v[:3]}..{v[-1]} ({len(v)} steps)") if key == "timesteps" else repr
                diffs.append(f"{key} {shown(mine)} vs requested {shown(value)}")
        if diffs:
            raise CalibrationError(f"{source} was made for another setting: {'; '.join(diffs)}; recalibrate")


def select_tau(
    cosine_healthy: Sequence[float] | np.ndarray,
    cosine_unhealthy: Sequence[float] | np.ndarray,
    levels: Sequence[float] = DEFAULT_TAU_LEVELS,
) -> tuple[float, int]:
    """The cosine threshold: the first ``tau_q = quantile(healthy c, q)`` (linear interpolation) over ``levels``
    minimising #(unhealthy with c > tau_q) + #(healthy with c < tau_q).

    Returns:
        ``(tau, errors)``.
    """
    healthy = np.asarray(cosine_healthy, dtype=np.float64)
    unhealthy = np.asarray(cosine_unhealthy, dtype=np.float64)
    if healthy.size == 0:
        raise CalibrationError("no healthy validation slices: tau needs healthy and unhealthy slice labels")
    best_tau, best_err = float("nan"), None
    for q in levels:
        tau = float(np.quantile(healthy, q))
        err = int((unhealthy > tau).sum() + (healthy < tau).sum())
        if best_err is None or err < best_err:
            best_tau, best_err = tau, err
    return best_tau, int(best_err)


def select_guidance(accuracies: Mapping[float, float], tolerance: float = 0.99) -> float:
    """w* = the largest candidate whose accuracy is >= ``tolerance`` x the best accuracy."""
    if not accuracies:
        raise CalibrationError("no guidance scale candidates")
    if not 0 < tolerance <= 1:
        raise CalibrationError(f"tolerance must be in (0, 1], got {tolerance}")
    best = max(accuracies.values())
    return float(max(w for w, acc in accuracies.items() if acc >= tolerance * best))


@dataclass
class CalibrationStatistics:
    """What one pass over the validation slices yields, for W candidate guidance scales and N slices.

    Attributes:
        guidance_scales: (W,).
        divergence_max: (W, N, Cm) max_t M_t per map modality.
        divergence_max_joint: (W, N) max_t of the modality-mean M_t.
        cosine: (W, N) cosine of the MSE curves.
        labels: (N,) slice labels (0 healthy, 1 unhealthy).
    """

    guidance_scales: np.ndarray
    divergence_max: np.ndarray
    divergence_max_joint: np.ndarray
    cosine: np.ndarray
    labels: np.ndarray


def calibrate_from_statistics(
    stats: CalibrationStatistics, tolerance: float = 0.99, tau_levels: Sequence[float] = DEFAULT_TAU_LEVELS
) -> dict[str, Any]:
    """M_max, tau and w* from validation statistics (pure function).

    Returns:
        dict with ``guidance_scale``, ``m_max`` (list per modality), ``m_max_joint``, ``tau``, ``candidates``,
        ``num_healthy``, ``num_unhealthy``.
    """
    labels = np.asarray(stats.labels).astype(np.int64)
    healthy, unhealthy = labels == 0, labels == 1
    if healthy.sum() == 0 or unhealthy.sum() == 0:
        raise CalibrationError(
            f"calibration needs healthy and unhealthy validation slices (found {int(healthy.sum())} healthy, "
            f"{int(unhealthy.sum())} unhealthy)"
        )
    ws = [float(w) for w in np.asarray(stats.guidance_scales).reshape(-1)]
    candidates, accuracies = [], {}
    for i, w in enumerate(ws):
        c = np.asarray(stats.cosine[i], dtype=np.float64)
        tau, err = select_tau(c[healthy], c[unhealthy], tau_levels)
        accuracy = 1.0 - err / labels.size
        m_max = np.asarray(stats.divergence_max[i])[unhealthy].max(axis=0)
        m_max_joint = float(np.asarray(stats.divergence_max_joint[i])[unhealthy].max())
        accuracies[w] = accuracy
        candidates.append(
            {
                "guidance_scale": w,
                "accuracy": accuracy,
                "tau": tau,
                "m_max": [float(v) for v in m_max],
                "m_max_joint": m_max_joint,
            }
        )
    w_star = select_guidance(accuracies, tolerance)
    chosen = next(c for c in candidates if c["guidance_scale"] == w_star)
    m_chosen = np.asarray(chosen["m_max"] + [chosen["m_max_joint"]], dtype=np.float64)
    if not bool(np.all(np.isfinite(m_chosen) & (m_chosen > 0))):
        # Algorithm 1 divides by M_max: a zero (or NaN) would only fail later, at inference
        raise CalibrationError(
            f"M_max for w={w_star:g} is {chosen['m_max']} (joint {chosen['m_max_joint']:.3g}), not positive: the "
            "guided and reference predictions do not differ on the unhealthy validation slices (an untrained "
            "network, or w = 0 with reference='healthy')"
        )
    return {
        "guidance_scale": w_star,
        "m_max": chosen["m_max"],
        "m_max_joint": chosen["m_max_joint"],
        "tau": chosen["tau"],
        "candidates": candidates,
        "num_healthy": int(healthy.sum()),
        "num_unhealthy": int(unhealthy.sum()),
    }


@torch.no_grad()
def collect_statistics(
    network: torch.nn.Module,
    inferer: Any,
    batches: Iterable[Mapping[str, Any]],
    guidance_scales: Sequence[float],
    device: torch.device | str = "cpu",
    progress: bool = True,
    total: int | None = None,
) -> CalibrationStatistics:
    """One pass of network calls over the validation batches, for all candidate w at once.

    Args:
        network: the epsilon network (put in eval mode).
        inferer: an :class:`~anofpdm_monai.inferers.AnoFPDMInferer` (its grid and options are used).
        batches: dicts with ``image`` (B, C, H, W) and ``class_label`` (B,).
        guidance_scales: candidate w.
        device: where to run.
        progress: progress bar over batches.
        total: number of batches, for the progress bar.
    """
    network.eval()
    div, div_j, cos, labels = [], [], [], []
    for batch in tqdm(batches, desc="calibration pass", unit="batch", total=total, disable=not progress):
        x = torch.as_tensor(batch["image"]).to(device)
        result = inferer.forward_process(x, network, guidance_scales=guidance_scales, need_maps=False)
        div.append(result.divergence_max("per_modality").cpu())
        div_j.append(result.divergence_max("joint")[..., 0].cpu())
        cos.append(result.cosine().cpu())
        labels.append(torch.as_tensor(batch["class_label"]).reshape(-1).cpu())
    if not labels:
        raise CalibrationError("no validation slices to calibrate on")
    return CalibrationStatistics(
        guidance_scales=np.asarray(list(guidance_scales), dtype=np.float64),
        divergence_max=torch.cat(div, dim=1).numpy(),
        divergence_max_joint=torch.cat(div_j, dim=1).numpy(),
        cosine=torch.cat(cos, dim=1).numpy(),
        labels=torch.cat(labels).numpy(),
    )


def run_calibration(
    checkpoint: str | os.PathLike,
    datalist: str | os.PathLike | Mapping[str, Any],
    dataset_dir: str | os.PathLike | None,
    output_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    map_modalities: Sequence[str],
    guidance_scales: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0),
    tolerance: float = 0.99,
    split: str = "validation",
    t_max: int = 599,
    stride: int = 1,
    timesteps: Sequence[int] | None = None,
    forward: str = "ddim",
    reference: str = "null",
    divergence: str = "v2",
    end_step: str = "per_modality",
    quantile_range: Sequence[float] = (0.90, 0.98),
    median_kernel: int = 5,
    min_component_size: int = 40,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp: bool = False,
    use_ema: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> Calibration:
    """Calibrate a trained checkpoint on a datalist split with slice labels, and write the calibration file.

    The network architecture and the preprocessing come from the checkpoint. See the module docstring for what
    is calibrated; the step grid and options are those the inference must then use.

    Returns:
        the :class:`Calibration` (also written to ``output_path``).
    """
    from .data import SliceDataset
    from .inferers.anofpdm import AnoFPDMInferer
    from .networks import load_network

    device = torch.device(device)
    network, info = load_network(checkpoint, use_ema=use_ema, map_location="cpu")
    network = network.to(device)
    if not info.get("preprocessing"):
        raise CalibrationError(f"checkpoint {checkpoint} records no preprocessing; train with the bundle")
    modalities = list(info["preprocessing"]["modalities"])
    missing = [m for m in map_modalities if m not in modalities]
    if missing:
        raise CalibrationError(f"map modalities {missing} are not among the model's modalities {modalities}")
    channels = [modalities.index(m) for m in map_modalities]
    dataset = SliceDataset.from_datalist(
        datalist, dataset_dir, split, cache_dir, info["preprocessing"], progress=progress, require_labels=True
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    inferer = AnoFPDMInferer(
        guidance_scale=float(guidance_scales[0]),
        map_channels=channels,
        t_max=t_max,
        stride=stride,
        timesteps=timesteps,
        forward=forward,
        reference=reference,
        divergence=divergence,
        end_step=end_step,
        quantile_range=quantile_range,
        seed=seed,
        autocast_dtype=torch.bfloat16 if (amp and device.type == "cuda") else None,
    )
    stats = collect_statistics(network, inferer, loader, guidance_scales, device, progress, total=len(loader))
    result = calibrate_from_statistics(stats, tolerance=tolerance)
    calibration = Calibration(
        timesteps=list(inferer.timesteps),
        forward=forward,
        reference=reference,
        divergence=divergence,
        end_step=end_step,
        quantile_range=[float(quantile_range[0]), float(quantile_range[1])],
        map_modalities=list(map_modalities),
        map_channels=channels,
        median_kernel=int(median_kernel),
        min_component_size=int(min_component_size),
        checkpoint_digest=info["digest"],
        preprocessing=dict(info["preprocessing"]),
        datalist=f"{datalist if not isinstance(datalist, Mapping) else '<in-memory datalist>'} [{split}]",
        tolerance=tolerance,
        **result,
    )
    calibration.save(output_path)
    return calibration
