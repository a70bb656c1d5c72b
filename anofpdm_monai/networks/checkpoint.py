"""Checkpoint I/O that keeps the network configuration, the preprocessing and the noise schedule with the weights.

A checkpoint is a dict saved with ``torch.save``. Training checkpoints (written by ignite's ``Checkpoint``) hold
``model``, ``ema``, ``optimizer``, ``trainer``, ``rng`` and ``metadata``; inference checkpoints hold ``model``,
``ema`` and ``metadata``. ``metadata`` records the architecture (``AnoFPDMUNet.config``), the preprocessing
parameters and the noise schedule the model was trained with, so a network and its schedule can be rebuilt from the
file alone and a mismatched architecture is refused with a clear message. Checkpoints written before the schedule
was recorded fall back to the papers' linear schedule with a one-line warning. Plain state dicts (including MONAI
Generative ones, through ``load_old_state_dict``) are accepted when the caller supplies the network.

Loading never runs code from the file: every read goes through ``torch.load(weights_only=True)``, which accepts
tensors and plain containers (dict, list, tuple, str, int, float, bool, None) only, and everything this package
writes is made of those (the NumPy RNG state included, see ``engines.RNGState``). A file holding any other Python
object (a crafted pickle, or a training checkpoint written before loading was made safe, whose NumPy RNG state
was an ``ndarray``) is refused with one line saying how to convert it; :func:`convert_checkpoint` is the one,
explicit, place that unpickles such a file, for a user who trusts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..io import atomic_path, first_line
from ..schedule import NoiseSchedule
from .unet import AnoFPDMUNet

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointMetadata",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_network",
    "load_weights",
    "file_digest",
    "unwrap",
    "schedule_of",
    "UnsafeCheckpointError",
    "convert_checkpoint",
]

CHECKPOINT_FORMAT = "anofpdm_monai/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for the requested network; one line naming the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding Python objects beyond tensors and plain containers: loading it could run code."""


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def _config_of(network: nn.Module) -> dict[str, Any]:
    net = unwrap(network)
    config = getattr(net, "config", None)
    if config is None:
        raise CheckpointError(
            f"{type(net).__name__} records no architecture config; build it with build_diffusion_unet"
        )
    return dict(config)


def _diff(theirs: Mapping[str, Any], mine: Mapping[str, Any]) -> str:
    """``field: checkpoint value vs this value`` for every differing field."""
    keys = sorted(set(theirs) | set(mine))
    diffs = [k for k in keys if theirs.get(k) != mine.get(k)]
    return ", ".join(f"{k}: {theirs.get(k)!r} in the checkpoint vs {mine.get(k)!r} here" for k in diffs)


class CheckpointMetadata:
    """Checkpoint entry describing the network, preprocessing and noise schedule the weights belong to.

    It has ``state_dict``/``load_state_dict`` so ignite's ``Checkpoint`` saves and restores it like the model;
    restoring into a run with another architecture, preprocessing or schedule raises :class:`CheckpointError`.

    Args:
        network: the (possibly wrapped) :class:`AnoFPDMUNet`.
        preprocessing: the preprocessing parameters (``VolumePreprocessor.to_dict()``) or the preprocessor.
        schedule: the :class:`~anofpdm_monai.schedule.NoiseSchedule` the model is trained with (or its dict).
    """

    def __init__(self, network: nn.Module, preprocessing: Any = None, schedule: Any = None) -> None:
        self.network = network
        if preprocessing is not None and hasattr(preprocessing, "to_dict"):
            preprocessing = preprocessing.to_dict()
        self.preprocessing = dict(preprocessing) if preprocessing is not None else None
        if schedule is not None and hasattr(schedule, "to_dict"):
            schedule = schedule.to_dict()
        self.schedule = dict(schedule) if schedule is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "network": _config_of(self.network),
            "preprocessing": self.preprocessing,
            "schedule": self.schedule,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = _config_of(self.network)
        theirs_net = dict(state.get("network") or {})
        if theirs_net != mine:
            raise CheckpointError(f"checkpoint was made for another network architecture ({_diff(theirs_net, mine)})")
        theirs = state.get("preprocessing")
        if self.preprocessing is not None and theirs is not None and dict(theirs) != self.preprocessing:
            raise CheckpointError(f"checkpoint was made with other preprocessing ({_diff(theirs, self.preprocessing)})")
        theirs = state.get("schedule")
        if self.schedule is not None and theirs is not None and dict(theirs) != self.schedule:
            raise CheckpointError(f"checkpoint was made with another noise schedule ({_diff(theirs, self.schedule)})")


def schedule_of(info: Mapping[str, Any], source: str = "checkpoint") -> NoiseSchedule:
    """The noise schedule recorded in checkpoint metadata (``load_network``'s info or the ``metadata`` entry).

    A checkpoint without one (written before the schedule was recorded) gets the papers' linear schedule
    (T = 1000, betas 1e-4..0.02) with a one-line warning.
    """
    params = info.get("schedule")
    if not params:
        logger.warning(
            "%s records no noise schedule; assuming the papers' linear schedule (T=1000, 1e-4..0.02)", source
        )
        return NoiseSchedule()
    try:
        return NoiseSchedule.from_dict(params)
    except ValueError as exc:
        raise CheckpointError(f"{source} has an unusable noise schedule: {exc}") from None


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """SHA-256 of a file (hex, first ``length`` characters); identifies the checkpoint a calibration is for."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def save_checkpoint(
    path: str | os.PathLike,
    network: nn.Module,
    ema: nn.Module | None = None,
    preprocessing: Any = None,
    extra: Mapping[str, Any] | None = None,
    schedule: Any = None,
) -> Path:
    """Save an inference checkpoint atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content: dict[str, Any] = {
        "metadata": CheckpointMetadata(network, preprocessing, schedule).state_dict(),
        "model": unwrap(network).state_dict(),
    }
    if ema is not None:
        content["ema"] = unwrap(ema).state_dict()
    if extra:
        content.update(extra)
    with atomic_path(path) as tmp:
        torch.save(content, tmp)
    return path


# how torch names the object it refused ("Unsupported global: GLOBAL numpy...", "unsupported GLOBAL posix.system")
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint file without running code from it (``torch.load(weights_only=True)``).

    Raises:
        UnsafeCheckpointError: the file holds other Python objects than tensors and plain containers (one line naming
            the file, the first such object and the conversion command).
        CheckpointError: missing or unreadable (one line naming the file).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED_GLOBAL.search(str(exc))
        what = f"a Python object ({found.group(1)})" if found else "Python objects"
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds {what} beyond tensors and plain containers; loading it could run code, so it "
            f"is refused. If you trust its source, convert it once with: "
            f"python -m anofpdm_monai.apps.convert_checkpoint --trust {path} <new file>"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(exc)}") from exc
    if not isinstance(content, Mapping):
        raise CheckpointError(f"checkpoint {path} does not hold a dict (got {type(content).__name__})")
    return dict(content)


def _plain(obj: Any) -> Any:
    """``obj`` with NumPy arrays as tensors and NumPy scalars as Python numbers, containers rebuilt as dict/list/tuple
    (what ``torch.load(weights_only=True)`` accepts)."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "u":  # unsigned ints beyond uint8 have little torch support: widen losslessly
            obj = obj.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def convert_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rewrite a TRUSTED checkpoint that :func:`load_checkpoint` refuses (e.g. a training checkpoint whose NumPy RNG
    state is an ``ndarray``) into one made of tensors and plain containers only.

    This is the package's only full unpickling (``weights_only=False``): it runs whatever code the file holds, so
    call it only on files whose origin you trust. The source is never modified; the target is written atomically
    and read back with the safe loader before the function returns.

    Raises:
        CheckpointError: source missing or unreadable, target the same file as the source, or an object that has no
            plain equivalent (one line naming it).
    """
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise CheckpointError(f"checkpoint file not found: {source}")
    if target.exists() and target.resolve() == source.resolve():
        raise CheckpointError(f"convert_checkpoint: target {target} is the source file; give a new file name")
    try:
        content = torch.load(source, map_location="cpu", weights_only=False)  # explicit trust: see the docstring
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {source}: {first_line(exc)}") from exc
    with atomic_path(target) as tmp:
        torch.save(_plain(content), tmp)
        try:
            load_checkpoint(tmp)
        except UnsafeCheckpointError as exc:
            reason = first_line(exc).split(" holds ", 1)[-1].split(";", 1)[0]
            raise CheckpointError(
                f"cannot convert {source}: it holds {reason}, which has no plain equivalent"
            ) from None
    return target


def _select_state(content: Mapping[str, Any], use_ema: bool, path: Any) -> Mapping[str, torch.Tensor]:
    if "model" in content or "ema" in content:
        key = "ema" if use_ema and "ema" in content else "model"
        if key not in content:
            raise CheckpointError(f"checkpoint {path} has no '{key}' weights")
        return content[key]
    if content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return content  # a plain state dict
    raise CheckpointError(f"checkpoint {path} holds neither 'model'/'ema' weights nor a state dict")


def load_weights(
    network: nn.Module, path: str | os.PathLike, use_ema: bool = True, map_location: Any = "cpu"
) -> nn.Module:
    """Load weights into an existing network, refusing a checkpoint of another architecture.

    Plain state dicts are loaded strictly; failing that, as a MONAI Generative checkpoint through
    ``DiffusionModelUNet.load_old_state_dict``. On any failure the network keeps its previous weights.

    Args:
        network: the network (wrappers are looked through).
        path: checkpoint file.
        use_ema: prefer the EMA weights when the checkpoint has them.
        map_location: as ``torch.load``.

    Returns:
        ``network``, with the weights loaded.

    Raises:
        CheckpointError: one line naming the file and, for another architecture, the differing config fields (or
            the missing, unexpected and mismatched keys of a plain state dict).
    """
    content = load_checkpoint(path, map_location=map_location)
    net = unwrap(network)
    meta = content.get("metadata")
    if meta is not None:
        try:
            CheckpointMetadata(net).load_state_dict(meta)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    state = _select_state(content, use_ema, path)
    mismatch = _state_mismatch(net.state_dict(), state)
    if not mismatch:
        net.load_state_dict(state)
        return network
    if meta is None and hasattr(net, "load_old_state_dict") and _load_old_state_dict(net, state):
        return network
    raise CheckpointError(f"checkpoint {path} does not fit this network: {mismatch}")


def _state_mismatch(mine: Mapping[str, torch.Tensor], theirs: Mapping[str, Any]) -> str:
    """One-line summary of how ``theirs`` differs from ``mine`` (empty when it loads strictly)."""
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    shapes = []
    for k, v in mine.items():
        if k in theirs:
            if not isinstance(theirs[k], torch.Tensor):
                shapes.append(f"{k}: {type(theirs[k]).__name__}, not a tensor")
            elif theirs[k].shape != v.shape:
                shapes.append(f"{k}: {tuple(theirs[k].shape)} in the file vs {tuple(v.shape)} in the network")
    parts = []
    for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {name} (e.g. {items[0]})")
    return "; ".join(parts)


def _load_old_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Try a MONAI Generative state dict through ``DiffusionModelUNet.load_old_state_dict``; False when it does not fit.

    MONAI's converter renames keys one to one, but it silently keeps the network's own (random) values for keys the
    old dict lacks and ignores keys it cannot place; the conversion is therefore accepted only when the old dict has
    as many entries as the network's and every one of them was consumed. On failure the previous weights are restored.
    """
    if len(state) != len(net.state_dict()):
        return False
    backup = {k: v.detach().clone() for k, v in net.state_dict().items()}
    old = dict(state)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints progress messages
            net.load_old_state_dict(old)
    except (KeyError, RuntimeError):
        net.load_state_dict(backup)
        return False
    if old:  # entries the converter could not place
        net.load_state_dict(backup)
        return False
    return True


def load_network(
    path: str | os.PathLike,
    use_ema: bool = True,
    map_location: Any = "cpu",
    use_flash_attention: bool | None = None,
) -> tuple[AnoFPDMUNet, dict[str, Any]]:
    """Rebuild the network recorded in a checkpoint and load its weights.

    Returns:
        ``(network, metadata)``; ``metadata`` has ``network`` (architecture), ``preprocessing`` (parameters or
        None), ``schedule`` (the :class:`~anofpdm_monai.schedule.NoiseSchedule` the model was trained with, see
        :func:`schedule_of`), ``digest`` (file digest and which weights, ``<sha>-ema`` or ``<sha>-model``, for
        calibration records) and ``weights``. The network is in eval mode.
    """
    content = load_checkpoint(path, map_location=map_location)
    meta = content.get("metadata")
    if not isinstance(meta, Mapping) or "network" not in meta:
        raise CheckpointError(
            f"checkpoint {path} records no network configuration; build the network yourself and use load_weights"
        )
    if use_flash_attention is None:
        use_flash_attention = torch.cuda.is_available()
    try:
        network = AnoFPDMUNet(**meta["network"], use_flash_attention=use_flash_attention)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has an unusable network configuration: {exc}") from None
    state = _select_state(content, use_ema, path)
    mismatch = _state_mismatch(network.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"checkpoint {path} weights do not fit its own network configuration: {mismatch}")
    network.load_state_dict(state)
    network.eval()
    weights = "ema" if use_ema and "ema" in content else "model"
    info = {
        "network": dict(meta["network"]),
        "preprocessing": meta.get("preprocessing"),
        "schedule": schedule_of(meta, source=f"checkpoint {path}"),
        # which weights of which file: a calibration made with the EMA weights does not fit the raw ones
        "digest": f"{file_digest(path)}-{weights}",
        "weights": weights,
    }
    return network, info
