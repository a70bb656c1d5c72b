"""Networks: the class-conditioned MONAI DiffusionModelUNet, the noise-conditioned slice classifier (MONAI's
DiffusionModelEncoder) and checkpoint I/O."""

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointMetadata,
    UnsafeCheckpointError,
    convert_checkpoint,
    file_digest,
    load_checkpoint,
    load_network,
    load_weights,
    save_checkpoint,
    unwrap,
)
from .classifier import (
    NUM_CLASSES,
    AnoFPDMClassifier,
    build_classifier,
    check_classifier_fits,
    checkpoint_setup,
    load_classifier,
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
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "file_digest",
    "load_checkpoint",
    "load_network",
    "load_weights",
    "save_checkpoint",
    "unwrap",
    "NUM_CLASSES",
    "AnoFPDMClassifier",
    "build_classifier",
    "check_classifier_fits",
    "checkpoint_setup",
    "load_classifier",
    "CONDITIONING_MODES",
    "HEALTHY",
    "NETWORK_PRESETS",
    "NULL",
    "NUM_CLASS_EMBEDS",
    "UNHEALTHY",
    "AnoFPDMUNet",
    "build_diffusion_unet",
]
