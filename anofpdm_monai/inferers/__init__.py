"""Inferers: the AnoFPDM forward process and inferers (slices and volumes), the reconstruction baselines, and the
per-slice forward noise keys."""

from .anofpdm import AnoFPDMInferer, AnoFPDMOutput, SliceThresholds
from .baselines import (
    BASELINE_METHODS,
    DEFAULT_CLASSIFIER_SCALE,
    DEFAULT_CLASSIFIER_SCALES,
    BaselineOutput,
    IntensityInferer,
    ReconstructionInferer,
)
from .forward_process import ForwardProcessResult, plain_tensor, run_forward_process
from .noise import NOISE_SCHEME, slice_noise_key, slice_noise_keys
from .reconstruction import (
    classifier_guided_eps,
    classifier_log_prob_gradient,
    ddim_decode,
    ddim_encode,
    ddpm_decode,
    guided_eps,
    reconstruction_grid,
)
from .volume import AnoFPDMVolumeInferer

__all__ = [
    "BASELINE_METHODS",
    "DEFAULT_CLASSIFIER_SCALE",
    "DEFAULT_CLASSIFIER_SCALES",
    "BaselineOutput",
    "IntensityInferer",
    "ReconstructionInferer",
    "AnoFPDMInferer",
    "AnoFPDMOutput",
    "AnoFPDMVolumeInferer",
    "SliceThresholds",
    "ForwardProcessResult",
    "run_forward_process",
    "plain_tensor",
    "NOISE_SCHEME",
    "slice_noise_key",
    "slice_noise_keys",
    "classifier_guided_eps",
    "classifier_log_prob_gradient",
    "ddim_decode",
    "ddim_encode",
    "ddpm_decode",
    "guided_eps",
    "reconstruction_grid",
]
