"""The noise-conditioned healthy/unhealthy slice classifier of the "DDIM + classifier guidance" baseline (Wolleb et
al. 2022): MONAI's ``DiffusionModelEncoder`` (the timestep-conditioned encoder half of the diffusion UNet, then
fully connected layers) with 2 output logits, class 0 healthy and 1 unhealthy (the slice labels of
:mod:`.unet`), trained on noisy slices x_t at uniformly drawn t of the diffusion model's noise schedule.

Its checkpoint holds the same ``metadata`` as the diffusion model's (architecture, preprocessing, noise schedule;
:class:`~anofpdm_monai.networks.CheckpointMetadata`), so the evaluation can refuse a classifier trained for other
slices or another schedule.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder

from .checkpoint import (
    CheckpointError,
    _diff,
    _select_state,
    _state_mismatch,
    file_digest,
    load_checkpoint,
    schedule_of,
)
from .unet import HEALTHY, NETWORK_PRESETS, UNHEALTHY

__all__ = [
    "NUM_CLASSES",
    "AnoFPDMClassifier",
    "build_classifier",
    "load_classifier",
    "checkpoint_setup",
    "check_classifier_fits",
]

#: logits of the classifier: index HEALTHY (0) and UNHEALTHY (1)
NUM_CLASSES = max(HEALTHY, UNHEALTHY) + 1

# the architecture fields of the diffusion presets that the encoder shares (its fully connected head is MONAI's)
_PRESET_FIELDS = ("channels", "attention_levels", "num_res_blocks", "num_head_channels", "norm_num_groups")


class AnoFPDMClassifier(DiffusionModelEncoder):
    """MONAI ``DiffusionModelEncoder`` for 2D slices with :data:`NUM_CLASSES` logits, called as
    ``classifier(x_t, timesteps=t)``. It records its constructor arguments in ``config`` (checkpoint metadata).

    Args:
        in_channels: number of image channels (modalities).
        image_size: side of the square input (the encoder's fully connected head depends on it).
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups: as the diffusion UNet's
            (every level halves the resolution).
        use_flash_attention: PyTorch SDPA attention (same weights).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: Sequence[int] = (32, 64, 96, 128),
        attention_levels: Sequence[bool] = (False, False, False, True),
        num_res_blocks: int | Sequence[int] = 1,
        num_head_channels: int | Sequence[int] = 32,
        norm_num_groups: int = 16,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=NUM_CLASSES,
            input_shape=(int(image_size), int(image_size)),
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            use_flash_attention=use_flash_attention,
        )
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "channels": [int(c) for c in channels],
            "attention_levels": [bool(a) for a in attention_levels],
            "num_res_blocks": num_res_blocks if isinstance(num_res_blocks, int) else list(num_res_blocks),
            "num_head_channels": num_head_channels if isinstance(num_head_channels, int) else list(num_head_channels),
            "norm_num_groups": int(norm_num_groups),
        }

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, 2) of ``x`` (B, C, H, W) at diffusion steps ``timesteps`` (B,)."""
        return super().forward(x, timesteps)


def build_classifier(
    in_channels: int,
    image_size: int,
    size: str | Mapping[str, Any] = "small",
    use_flash_attention: bool | None = None,
    **overrides: Any,
) -> AnoFPDMClassifier:
    """Build the classifier from the encoder half of a diffusion network preset.

    Args:
        in_channels: number of modalities.
        image_size: slice side at model resolution.
        size: a key of :data:`~anofpdm_monai.networks.NETWORK_PRESETS` (its channels, attention levels, residual
            blocks, heads and groups) or a dict of architecture arguments.
        use_flash_attention: SDPA attention; default: on when CUDA is available.
        overrides: architecture arguments replacing the preset's.
    """
    if isinstance(size, str):
        if size not in NETWORK_PRESETS:
            raise ValueError(f"unknown network size {size!r}; choose one of {sorted(NETWORK_PRESETS)} or pass a dict")
        params = {k: copy.deepcopy(v) for k, v in NETWORK_PRESETS[size].items() if k in _PRESET_FIELDS}
    else:
        params = dict(size)
    params.update(overrides)
    if use_flash_attention is None:
        use_flash_attention = torch.cuda.is_available()
    return AnoFPDMClassifier(in_channels, image_size, use_flash_attention=use_flash_attention, **params)


def load_classifier(
    path: str | os.PathLike, map_location: Any = "cpu", use_flash_attention: bool | None = None
) -> tuple[AnoFPDMClassifier, dict[str, Any]]:
    """Rebuild the classifier recorded in a checkpoint (``train_classifier.json``'s ``classifier.pt``).

    Returns:
        ``(classifier, info)``: the classifier in eval mode; ``info`` has ``network`` (architecture),
        ``preprocessing``, ``schedule`` (:class:`~anofpdm_monai.schedule.NoiseSchedule`) and ``digest``.

    Raises:
        CheckpointError: one line naming the file (missing, not a classifier checkpoint, weights that do not fit).
    """
    content = load_checkpoint(path, map_location=map_location)
    meta = content.get("metadata")
    config = meta.get("network") if isinstance(meta, Mapping) else None
    if not isinstance(config, Mapping) or "image_size" not in config:
        raise CheckpointError(
            f"checkpoint {path} is not a classifier checkpoint (train one with train_classifier.json)"
        )
    if use_flash_attention is None:
        use_flash_attention = torch.cuda.is_available()
    try:
        classifier = AnoFPDMClassifier(**config, use_flash_attention=use_flash_attention)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has an unusable classifier configuration: {exc}") from None
    state = _select_state(content, use_ema=False, path=path)
    mismatch = _state_mismatch(classifier.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"checkpoint {path} weights do not fit its own classifier configuration: {mismatch}")
    classifier.load_state_dict(state)
    classifier.eval()
    info = {
        "network": dict(config),
        "preprocessing": meta.get("preprocessing"),
        "schedule": schedule_of(meta, source=f"classifier checkpoint {path}"),
        "digest": f"{file_digest(path)}-classifier",
    }
    return classifier, info


def checkpoint_setup(path: str | os.PathLike) -> dict[str, Any]:
    """What a classifier for the diffusion checkpoint ``path`` must be trained with: its ``preprocessing``
    parameters (a dict) and noise ``schedule`` (:class:`~anofpdm_monai.schedule.NoiseSchedule`), read from the
    checkpoint's metadata (``train_classifier.json`` takes both from the diffusion model it is trained for)."""
    content = load_checkpoint(path)
    meta = content.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("preprocessing"):
        raise CheckpointError(f"checkpoint {path} records no preprocessing; train the diffusion model with the bundle")
    return {"preprocessing": dict(meta["preprocessing"]), "schedule": schedule_of(meta, source=f"checkpoint {path}")}


def check_classifier_fits(
    classifier_info: Mapping[str, Any], model_info: Mapping[str, Any], source: str = "classifier"
) -> None:
    """Refuse a classifier trained for other slices (preprocessing) or another noise schedule than the diffusion
    model it is to guide (the ``info`` of :func:`load_classifier` and :func:`~anofpdm_monai.networks.load_network`):
    its gradients would be taken at the wrong noise levels or resolution. One-line :class:`CheckpointError`."""
    theirs, mine = classifier_info.get("preprocessing"), model_info.get("preprocessing")
    if theirs is not None and mine is not None and dict(theirs) != dict(mine):
        diff = _diff(theirs, mine)
        raise CheckpointError(f"{source} was trained with other preprocessing than the diffusion model ({diff})")
    if classifier_info.get("schedule") != model_info.get("schedule"):
        raise CheckpointError(
            f"{source} was trained with another noise schedule ({classifier_info.get('schedule')!r}) than the "
            f"diffusion model ({model_info.get('schedule')!r})"
        )
