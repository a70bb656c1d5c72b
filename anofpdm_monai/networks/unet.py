"""The class-conditioned MONAI ``DiffusionModelUNet`` used by AnoFPDM.

Labels: 0 healthy, 1 unhealthy, 2 null (the classifier-free "no label"; the official code uses a zero embedding,
here it is a dedicated index of ``num_class_embeds``). Two conditioning modes:

- ``"class_embed"`` (default): MONAI adds the class embedding to the time embedding;
- ``"cross_attention"``: additionally, every attention level attends to a one-token learned label embedding
  (MONAI's ``with_conditioning`` path), the nearest MONAI equivalent of the official network feeding the label
  embedding to each attention block as extra key/value tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

__all__ = [
    "HEALTHY",
    "UNHEALTHY",
    "NULL",
    "NUM_CLASS_EMBEDS",
    "NETWORK_PRESETS",
    "CONDITIONING_MODES",
    "AnoFPDMUNet",
    "build_diffusion_unet",
]

HEALTHY = 0
UNHEALTHY = 1
NULL = 2
NUM_CLASS_EMBEDS = 3

CONDITIONING_MODES = ("class_embed", "cross_attention")

#: architecture presets; ``paper`` follows the papers (128 base channels, multipliers 1,1,2,3,4, two residual
#: blocks, attention at the three lowest resolutions, dropout 0.1), the others are CPU-sized.
NETWORK_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "channels": (128, 128, 256, 384, 512),
        "attention_levels": (False, False, True, True, True),
        "num_res_blocks": 2,
        "num_head_channels": 64,
        "norm_num_groups": 32,
        "dropout": 0.1,
    },
    "medium": {
        "channels": (64, 128, 192, 256),
        "attention_levels": (False, False, True, True),
        "num_res_blocks": 2,
        "num_head_channels": 32,
        "norm_num_groups": 32,
        "dropout": 0.1,
    },
    "small": {
        "channels": (32, 64, 96, 128),
        "attention_levels": (False, False, False, True),
        "num_res_blocks": 1,
        "num_head_channels": 32,
        "norm_num_groups": 16,
        "dropout": 0.0,
    },
    "tiny": {
        "channels": (16, 32),
        "attention_levels": (False, True),
        "num_res_blocks": 1,
        "num_head_channels": 16,
        "norm_num_groups": 8,
        "dropout": 0.0,
    },
}


class _InputDropout:
    """Forward pre-hook applying dropout to the input of a module (MONAI's ResNet block has no dropout; the
    papers' network drops out before the second convolution). A hook keeps the state-dict keys of MONAI's
    network, so checkpoints stay loadable into a plain ``DiffusionModelUNet``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (F.dropout(args[0], p=self.p, training=module.training),) + tuple(args[1:])


class AnoFPDMUNet(DiffusionModelUNet):
    """MONAI ``DiffusionModelUNet`` with 3 class embeddings (healthy, unhealthy, null), optional dropout in the
    residual blocks and optional label cross-attention. It records its constructor arguments in ``config`` so that
    checkpoints can rebuild it and refuse a different architecture.

    Args:
        in_channels: number of image channels (modalities); the output has as many (epsilon prediction).
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups: as ``DiffusionModelUNet``.
        dropout: dropout probability inside each residual block.
        conditioning: ``"class_embed"`` or ``"cross_attention"`` (see module docstring).
        label_context_dim: width of the label token for cross-attention.
        use_flash_attention: PyTorch SDPA attention (same weights; use it on GPU).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (32, 64, 96, 128),
        attention_levels: Sequence[bool] = (False, False, False, True),
        num_res_blocks: int | Sequence[int] = 1,
        num_head_channels: int | Sequence[int] = 32,
        norm_num_groups: int = 16,
        dropout: float = 0.0,
        conditioning: str = "class_embed",
        label_context_dim: int = 64,
        use_flash_attention: bool = False,
    ) -> None:
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        cross = conditioning == "cross_attention"
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=in_channels,
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            num_class_embeds=NUM_CLASS_EMBEDS,
            with_conditioning=cross,
            cross_attention_dim=label_context_dim if cross else None,
            use_flash_attention=use_flash_attention,
        )
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "channels": [int(c) for c in channels],
            "attention_levels": [bool(a) for a in attention_levels],
            "num_res_blocks": num_res_blocks if isinstance(num_res_blocks, int) else list(num_res_blocks),
            "num_head_channels": num_head_channels if isinstance(num_head_channels, int) else list(num_head_channels),
            "norm_num_groups": int(norm_num_groups),
            "dropout": float(dropout),
            "conditioning": conditioning,
            "label_context_dim": int(label_context_dim),
        }
        self.label_context = nn.Embedding(NUM_CLASS_EMBEDS, label_context_dim) if cross else None
        if dropout > 0:
            for module in self.modules():
                if module.__class__.__name__ == "DiffusionUNetResnetBlock":
                    module.conv2.register_forward_pre_hook(_InputDropout(dropout))

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Epsilon prediction for ``x`` at ``timesteps`` (B,) under ``class_labels`` (B,) in {0, 1, 2}."""
        if class_labels is None:
            raise ValueError("class_labels is required (0 healthy, 1 unhealthy, 2 null)")
        if self.label_context is not None and context is None:
            context = self.label_context(class_labels.long())[:, None, :].to(x.dtype)
        return super().forward(
            x,
            timesteps,
            context=context,
            class_labels=class_labels.long(),
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
        )


def build_diffusion_unet(
    in_channels: int,
    size: str | Mapping[str, Any] = "small",
    conditioning: str = "class_embed",
    use_flash_attention: bool | None = None,
    **overrides: Any,
) -> AnoFPDMUNet:
    """Build the AnoFPDM network from a preset.

    Args:
        in_channels: number of modalities.
        size: a key of :data:`NETWORK_PRESETS` (``paper``, ``medium``, ``small``, ``tiny``) or a dict of
            architecture arguments.
        conditioning: ``"class_embed"`` or ``"cross_attention"``.
        use_flash_attention: SDPA attention; default: on when CUDA is available.
        overrides: architecture arguments replacing the preset's (e.g. ``dropout=0.0``).

    Returns:
        the network; its ``config`` attribute holds every architecture argument.
    """
    if isinstance(size, str):
        if size not in NETWORK_PRESETS:
            raise ValueError(f"unknown network size {size!r}; choose one of {sorted(NETWORK_PRESETS)} or pass a dict")
        params = copy.deepcopy(NETWORK_PRESETS[size])
    else:
        params = dict(size)
    params.update(overrides)
    if use_flash_attention is None:
        use_flash_attention = torch.cuda.is_available()
    return AnoFPDMUNet(
        in_channels=in_channels, conditioning=conditioning, use_flash_attention=use_flash_attention, **params
    )
