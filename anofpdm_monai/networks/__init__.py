"""Networks: the class-conditioned MONAI DiffusionModelUNet and checkpoint I/O."""

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointMetadata,
    file_digest,
    load_checkpoint,
    load_network,
    load_weights,
    save_checkpoint,
    unwrap,
)
from .unet import (
    CONDITIONING_MODES,
    HEALTHY,
    NETWORK_PRESETS,
    NULL,
    NUM_CLASS_EMBEDS,
    UNHEALTHY,
    AnoFPDMUNet,
    build_diffusion_unet,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointMetadata",
    "file_digest",
    "load_checkpoint",
    "load_network",
    "load_weights",
    "save_checkpoint",
    "unwrap",
    "CONDITIONING_MODES",
    "HEALTHY",
    "NETWORK_PRESETS",
    "NULL",
    "NUM_CLASS_EMBEDS",
    "UNHEALTHY",
    "AnoFPDMUNet",
    "build_diffusion_unet",
]
