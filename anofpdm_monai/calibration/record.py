"""The calibration record: AnoFPDM settings + the constants learned from image labels (w*, M_max, tau) +
provenance (which checkpoint, schedule, preprocessing and validation data made it).

Written as a small JSON file by the calibrate workflow; inference and evaluation rebuild their inferer from it
(:meth:`~anofpdm_monai.inferers.AnoFPDMInferer.from_calibration`) and refuse it for another setting
(:meth:`Calibration.check`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import write_json
from ..settings import DEFAULT_TOLERANCE, AnoFPDMSettings, check_guidance_scale

__all__ = ["CALIBRATION_FORMAT", "Calibration", "CalibrationError", "grid_digest"]

logger = logging.getLogger(__name__)

CALIBRATION_FORMAT = "anofpdm_monai.calibration/2"
_FORMAT_1 = "anofpdm_monai.calibration/1"  # flat settings fields; still read

#: the range of each health score (anofpdm_monai/inferers/health.py); a tau outside it classifies every slice the same
#: way and can only come from a hand edit. cosine: of two MSE curves, in [-1, 1]; mse_gap: 1 - sum mse_g / sum
#: mse_ref <= 1 (MSEs are >= 0); divergence: minus a divergence over an MSE, <= 0.
SCORE_RANGES = {"cosine": (-1.0, 1.0), "mse_gap": (-math.inf, 1.0), "divergence": (-math.inf, 0.0)}
#: with x0 predictions clipped to [-1, 1] and no healthy baseline, M_t is a mean of squared differences of values in
#: [-1, 1] (v2) or of differences of such squares (v1): at most 4
M_MAX_BOUND = 4.0
#: a calibration file is a few kB; anything over this is not one (``/dev/zero`` would otherwise be read forever)
MAX_CALIBRATION_BYTES = 16 * 2**20


class CalibrationError(ValueError):
    """A calibration that cannot be made or does not match the inference setting (one line)."""


@dataclass
class Calibration:
    """Everything inference needs, and what it was made for.

    Attributes:
        settings: the AnoFPDM settings the constants were calibrated with (the grid written out).
        guidance_scale: w*.
        m_max: M_max per map modality (for ``end_step="per_modality"``).
        m_max_joint: M_max of the modality-mean divergence (for ``end_step="joint"``).
        tau: threshold of the settings' health score (unhealthy iff score <= tau; ``health_score``, ``mse_gap`` by
            default; files written before that option existed used the cosine).
        map_modalities: names of the map modalities; map_channels: their channel indices.
        checkpoint_digest: digest of the checkpoint (and which weights) the statistics came from.
        preprocessing: preprocessing parameters of that checkpoint.
        schedule: noise-schedule parameters of that checkpoint.
        datalist: the datalist used (path or description) and split.
        candidates: per candidate w: accuracy, tau, m_max.
        tolerance: the w* tolerance.
        num_healthy, num_unhealthy: validation slices used (those of the subset, with one).
        subset: with the settings' ``calibration_subset``: ``{"size": slices used, "of": validation slices, "seed":
            its seed}``; None: every validation slice was used.
        baseline_curve: (K, Cm) the healthy slices' median M_t per grid step and map modality at w*
            (``divergence_baseline="healthy"``; None otherwise).
    """

    settings: AnoFPDMSettings
    guidance_scale: float
    m_max: list[float]
    m_max_joint: float
    tau: float
    map_modalities: list[str] = field(default_factory=list)
    map_channels: list[int] = field(default_factory=list)
    checkpoint_digest: str = ""
    preprocessing: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    datalist: str = ""
    candidates: list[dict[str, Any]] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE
    num_healthy: int = 0
    num_unhealthy: int = 0
    baseline_curve: list[list[float]] | None = None
    subset: dict[str, int] | None = None
    format: str = CALIBRATION_FORMAT
    created: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.settings, Mapping):
            self.settings = AnoFPDMSettings.from_dict(self.settings, source="calibration settings")
        if not isinstance(self.settings, AnoFPDMSettings):
            raise CalibrationError(f"calibration settings must be AnoFPDMSettings, got {type(self.settings).__name__}")

    # the settings read as attributes (``calibration.timesteps``, ``calibration.forward``, ...)
    @property
    def timesteps(self) -> list[int]:
        return self.settings.grid(10**9)

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings")
        if isinstance(settings, AnoFPDMSettings) and name in AnoFPDMSettings.__dataclass_fields__:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def m_max_for(self, end_step: str) -> list[float]:
        """The M_max values Algorithm 1 needs for this end-step mode."""
        return list(self.m_max) if end_step == "per_modality" else [float(self.m_max_joint)]

    def without_created(self) -> dict[str, Any]:
        """Everything results depend on (the dict without its creation time), for fingerprints."""
        return {k: v for k, v in self.to_dict().items() if k != "created"}

    # ------------------------------------------------------------------ file
    def to_dict(self) -> dict[str, Any]:
        """JSON content of the file; ``grid_digest`` fingerprints the grid the statistics were computed on, so a grid
        edited by hand afterwards is refused by :meth:`from_dict`."""
        content = asdict(self) | {"settings": self.settings.to_dict(), "grid_digest": grid_digest(self.timesteps)}
        return json.loads(json.dumps(content, default=_json_default))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file atomically."""
        if not self.created:
            self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "calibration") -> Calibration:
        """A calibration from :meth:`to_dict` output (format 1 files with flat settings fields are converted)."""
        data = dict(data)
        if data.get("format") == _FORMAT_1:
            setting_names = set(AnoFPDMSettings.__dataclass_fields__)
            flat = {k: data.pop(k) for k in list(data) if k in setting_names}
            data["settings"] = flat
            data["format"] = CALIBRATION_FORMAT
        if isinstance(data.get("settings"), Mapping) and "health_score" not in data["settings"]:
            # files written before the option existed thresholded the papers' cosine, whatever today's default
            data["settings"] = {**data["settings"], "health_score": "cosine"}
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        required = ("settings", "guidance_scale", "m_max", "m_max_joint", "tau")
        missing = [k for k in required if k not in known]
        if missing:
            raise CalibrationError(f"{source} is missing fields {missing}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__) - {"grid_digest"})
        if unknown:
            logger.warning("%s: unknown key(s) %s ignored", source, unknown)
        _check_content(known, source)
        try:
            cal = cls(**known)
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"{source}: {exc}") from None
        _check_grid(data, cal, source)
        _check_baseline(cal, source)
        return cal

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read a calibration file; one-line :class:`CalibrationError` when missing or malformed."""
        path = Path(path)
        if not path.exists():
            raise CalibrationError(f"calibration file not found: {path} (run the calibrate workflow first)")
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} is not a regular file (a folder, device or pipe)")
        try:
            if path.stat().st_size > MAX_CALIBRATION_BYTES:
                raise CalibrationError(
                    f"calibration file {path} is over {MAX_CALIBRATION_BYTES >> 20} MB: not a calibration file"
                )
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"cannot read calibration file {path}: {exc}") from None
        if not isinstance(data, Mapping) or data.get("format") not in (CALIBRATION_FORMAT, _FORMAT_1):
            raise CalibrationError(f"{path} is not an anofpdm_monai calibration file (format {CALIBRATION_FORMAT})")
        return cls.from_dict(data, source=f"calibration file {path}")

    # ------------------------------------------------------------------ consistency
    def inference_settings(
        self,
        source: str,
        model_info: Mapping[str, Any],
        guidance_scale: float | None = None,
        t_max: int | None = None,
        stride: int | None = None,
        timesteps: Sequence[int] | None = None,
        **options: Any,
    ) -> AnoFPDMSettings:
        """The settings inference runs with (this calibration's, with the requested options; None means "as
        calibrated") after checking that the calibration belongs to the checkpoint (``model_info`` from
        :func:`~anofpdm_monai.networks.load_network`) and to those settings.

        Raises:
            CalibrationError: naming every field that differs.
        """
        # the requested values first: a bad argument is named as such, not as a calibration mismatch
        if guidance_scale is not None:
            check_guidance_scale(guidance_scale)
        AnoFPDMSettings().replace(**{k: v for k, v in options.items() if v is not None})
        if timesteps is not None or t_max is not None or stride is not None:
            AnoFPDMSettings().replace(t_max=t_max, stride=stride, timesteps=timesteps)
        try:
            settings = self.settings.replace(t_max=t_max, stride=stride, timesteps=timesteps, **options)
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"{source}: {exc}") from None
        self.check_model(source, model_info)
        schedule = model_info.get("schedule")
        self.check(
            source=source,
            settings=settings,
            checkpoint_digest=model_info.get("digest"),
            guidance_scale=guidance_scale,
            preprocessing=dict(model_info["preprocessing"]) if model_info.get("preprocessing") else None,
            schedule=schedule.to_dict() if (schedule is not None and self.schedule is not None) else None,
        )
        return settings

    def check_model(self, source: str, model_info: Mapping[str, Any]) -> None:
        """Refuse map channels the checkpoint does not have, or that are not the recorded map modalities; warn when
        the calibration's preprocessing (image size, modalities) is not the checkpoint's (the digest check that
        follows refuses it)."""
        pre = dict(model_info.get("preprocessing") or {})
        modalities = list(pre.get("modalities") or [])
        channels = int((model_info.get("network") or {}).get("in_channels", len(modalities)) or len(modalities))
        if channels and any(c >= channels for c in self.map_channels):
            raise CalibrationError(
                f"{source}: map_channels {list(self.map_channels)} do not exist in a {channels}-channel checkpoint "
                f"(modalities {modalities})"
            )
        if modalities and self.map_modalities:
            named = [modalities[c] for c in self.map_channels if c < len(modalities)]
            if named != list(self.map_modalities):
                raise CalibrationError(
                    f"{source}: map_channels {list(self.map_channels)} are the checkpoint's {named}, not "
                    f"map_modalities {list(self.map_modalities)}"
                )
        mine = dict(self.preprocessing or {})
        for key in ("image_size", "modalities"):
            if key in mine and key in pre and mine[key] != pre[key]:
                logger.warning(
                    "%s was made with %s %s but the checkpoint has %s %s", source, key, mine[key], key, pre[key]
                )

    def check(self, source: str = "calibration", settings: AnoFPDMSettings | None = None, **values: Any) -> None:
        """Refuse a calibration made for another setting.

        Args:
            source: name of the calibration (file) for the message.
            settings: the settings inference will use; the options the constants depend on
                (:data:`~anofpdm_monai.settings.CALIBRATED_FIELDS`) must equal the calibration's.
            values: single values to compare: any settings option (``timesteps``, ``forward``, ``quantile_range``,
                ...) or ``checkpoint_digest``, ``guidance_scale``, ``map_channels``, ``map_modalities``,
                ``preprocessing``, ``schedule``; a value of None is not compared.

        Raises:
            CalibrationError: naming every field that differs.
        """
        diffs = []
        if settings is not None:
            diffs += [f"{d} (calibration vs requested)" for d in self.settings.differences(settings)]
        for key, value in values.items():
            if value is None:
                continue
            if key == "timesteps":
                mine, value = self.timesteps, [int(t) for t in value]
            else:
                mine = getattr(self, key)
            if isinstance(value, (tuple, list, np.ndarray)) and isinstance(mine, (tuple, list)):
                value, mine = list(np.asarray(value).tolist()), list(mine)  # (0, 3) and [0, 3] are the same
            if key == "guidance_scale":
                same = math.isclose(float(value), float(mine), rel_tol=0, abs_tol=1e-9)
            else:
                same = value == mine
            if not same:
                shown = _short if key == "timesteps" else repr
                diffs.append(f"{key} {shown(mine)} vs requested {shown(value)}")
        if diffs:
            raise CalibrationError(f"{source} was made for another setting: {'; '.join(diffs)}; recalibrate")


def _short(grid: Sequence[int]) -> str:
    return f"{list(grid[:3])}..{grid[-1]} ({len(grid)} steps)"


def grid_digest(grid: Sequence[int]) -> str:
    """Fingerprint of a step grid (stored in calibration files)."""
    return hashlib.sha256(",".join(str(int(t)) for t in grid).encode()).hexdigest()[:16]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_content(data: Mapping[str, Any], source: str) -> None:
    """Every key's type and range, as one-line :class:`CalibrationError` naming ``source`` and the key."""

    def bad(key: str, expected: str) -> CalibrationError:
        return CalibrationError(f"{source}: key '{key}' must be {expected}, got {data[key]!r}")

    if not isinstance(data["settings"], Mapping):
        raise bad("settings", "a mapping of AnoFPDM options")
    if not _is_number(data["guidance_scale"]) or data["guidance_scale"] <= 0:
        raise bad("guidance_scale", "a finite number > 0")
    settings = data["settings"]
    # M_t is bounded when the x0 predictions are clipped and M_t is not divided by a healthy baseline
    bounded = settings.get("clip", True) is True and settings.get("divergence_baseline", "none") == "none"
    top = M_MAX_BOUND * (1 + 1e-6) if bounded else math.inf
    within = f" in (0, {M_MAX_BOUND:g}] (x0 clipped to [-1, 1])" if bounded else " > 0"
    m_max = data["m_max"]
    if not isinstance(m_max, list) or not m_max or not all(_is_number(v) and 0 < v <= top for v in m_max):
        raise bad("m_max", f"a non-empty list of finite numbers{within}")
    if not _is_number(data["m_max_joint"]) or not 0 < data["m_max_joint"] <= top:
        raise bad("m_max_joint", f"a finite number{within}")
    score = settings.get("health_score", "cosine")
    low, high = SCORE_RANGES.get(score, (-math.inf, math.inf))
    if not _is_number(data["tau"]) or not low <= data["tau"] <= high:
        if score == "cosine":
            expected = "a number in [-1, 1] (a cosine)"
        elif score in SCORE_RANGES:
            expected = f"a finite number <= {high:g} (the range of the {score} health score)"
        else:
            expected = "a finite number"
        raise bad("tau", expected)
    for key in ("map_modalities", "map_channels"):
        if key in data and not isinstance(data[key], list):
            raise bad(key, "a list")
    if not all(isinstance(m, str) for m in data.get("map_modalities", [])):
        raise bad("map_modalities", "a list of modality names")
    channels = data.get("map_channels", [])
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels) or len(
        set(channels)
    ) != len(channels):
        raise bad("map_channels", "a list of distinct channel indices >= 0")
    if channels and len(m_max) != len(channels):
        raise CalibrationError(f"{source}: key 'm_max' has {len(m_max)} values for {len(channels)} map_channels")
    if data.get("map_modalities") and channels and len(data["map_modalities"]) != len(channels):
        raise CalibrationError(
            f"{source}: key 'map_modalities' names {len(data['map_modalities'])} modalities for {len(channels)} "
            "map_channels"
        )
    for key in ("checkpoint_digest", "datalist", "created", "format"):
        if key in data and not isinstance(data[key], str):
            raise bad(key, "a string")
    for key in ("preprocessing", "schedule"):
        if data.get(key) is not None and not isinstance(data[key], Mapping):
            raise bad(key, "a mapping or null")
    if "candidates" in data and not (
        isinstance(data["candidates"], list) and all(isinstance(c, Mapping) for c in data["candidates"])
    ):
        raise bad("candidates", "a list of mappings")
    if "tolerance" in data and not (_is_number(data["tolerance"]) and 0 < data["tolerance"] <= 1):
        raise bad("tolerance", "a number in (0, 1]")
    for key in ("num_healthy", "num_unhealthy"):
        if key in data and not (isinstance(data[key], int) and not isinstance(data[key], bool) and data[key] >= 0):
            raise bad(key, "an integer >= 0")
    subset = data.get("subset")
    if subset is not None and not (
        isinstance(subset, Mapping)
        and set(subset) == {"size", "of", "seed"}
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in subset.values())
        and subset["size"] <= subset["of"]
    ):
        raise bad("subset", "null or {size, of, seed}: integers >= 0 with size <= of")


def _check_grid(data: Mapping[str, Any], cal: Calibration, source: str) -> None:
    """The grid in the file must be the one its statistics were computed on: an explicit ``timesteps`` grid is
    written with ``t_max`` = its last step and ``stride`` 1, and ``grid_digest`` fingerprints it."""
    raw = data["settings"]
    grid = cal.timesteps
    if raw.get("timesteps") is not None:
        if "stride" in raw and raw["stride"] != 1:
            raise CalibrationError(
                f"{source}: key 'settings.stride' is {raw['stride']!r} but the statistics were computed on "
                f"settings.timesteps {_short(grid)}; a calibration's grid cannot be edited: recalibrate"
            )
        if "t_max" in raw and raw["t_max"] != grid[-1]:
            raise CalibrationError(
                f"{source}: key 'settings.t_max' is {raw['t_max']!r} but the statistics were computed on "
                f"settings.timesteps {_short(grid)}; a calibration's grid cannot be edited: recalibrate"
            )
    stored = data.get("grid_digest")
    if stored is not None and stored != grid_digest(grid):
        raise CalibrationError(
            f"{source}: key 'settings' describes the grid {_short(grid)}, not the grid its statistics were computed "
            "on (grid_digest differs); a calibration's grid cannot be edited: recalibrate"
        )


def _check_baseline(cal: Calibration, source: str) -> None:
    """``baseline_curve``: present exactly when the settings divide by it, one positive value per grid step and map
    channel."""
    curve = cal.baseline_curve
    if cal.settings.divergence_baseline != "healthy":
        if curve is not None:
            raise CalibrationError(
                f"{source}: key 'baseline_curve' is set but settings.divergence_baseline is "
                f"{cal.settings.divergence_baseline!r}"
            )
        return
    shape = (len(cal.settings.measured_grid(10**9)), len(cal.map_channels) or len(cal.m_max))
    try:
        values = np.asarray(curve, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if curve is None or values.shape != shape or not bool(np.all(np.isfinite(values) & (values > 0))):
        raise CalibrationError(
            f"{source}: key 'baseline_curve' must be {shape[0]} x {shape[1]} finite numbers > 0 (grid steps x map "
            "channels) for divergence_baseline 'healthy'"
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, AnoFPDMSettings):
        return value.to_dict()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
