"""The calibration record: AnoFPDM settings + the constants learned from image labels (w*, M_max, tau) +
provenance (which checkpoint, schedule, preprocessing and validation data made it).

Written as a small JSON file by the calibrate workflow; inference and evaluation rebuild their inferer from it
(:meth:`~anofpdm_monai.inferers.AnoFPDMInferer.from_calibration`) and refuse it for another setting
(:meth:`Calibration.check`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import write_json
from ..settings import DEFAULT_TOLERANCE, AnoFPDMSettings

__all__ = ["CALIBRATION_FORMAT", "Calibration", "CalibrationError"]

CALIBRATION_FORMAT = "anofpdm_monai.calibration/2"
_FORMAT_1 = "anofpdm_monai.calibration/1"  # flat settings fields; still read


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
        tau: cosine threshold (unhealthy iff c <= tau).
        map_modalities: names of the map modalities; map_channels: their channel indices.
        checkpoint_digest: digest of the checkpoint (and which weights) the statistics came from.
        preprocessing: preprocessing parameters of that checkpoint.
        schedule: noise-schedule parameters of that checkpoint.
        datalist: the datalist used (path or description) and split.
        candidates: per candidate w: accuracy, tau, m_max.
        tolerance: the w* tolerance.
        num_healthy, num_unhealthy: validation slices used.
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
        return json.loads(json.dumps(asdict(self) | {"settings": self.settings.to_dict()}, default=_json_default))

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
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        required = ("settings", "guidance_scale", "m_max", "m_max_joint", "tau")
        missing = [k for k in required if k not in known]
        if missing:
            raise CalibrationError(f"{source} is missing fields {missing}")
        try:
            cal = cls(**known)
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"{source}: {exc}") from None
        return cal

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
        try:
            settings = self.settings.replace(t_max=t_max, stride=stride, timesteps=timesteps, **options)
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"{source}: {exc}") from None
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


def _json_default(value: Any) -> Any:
    if isinstance(value, AnoFPDMSettings):
        return value.to_dict()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
