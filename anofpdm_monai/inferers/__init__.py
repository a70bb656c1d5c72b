"""Inferers: the AnoFPDM forward process and inferers (slices and volumes), and the reconstruction baselines."""

from .anofpdm import AnoFPDMInferer, AnoFPDMOutput, SliceThresholds
from .baselines import (
    BASELINE_METHODS,
    DEFAULT_CLASSIFIER_SCALE,
    DEFAULT_CLASSIFIER_SCALES,
    BaselineOutput,
    IntensityInferer,
    ReconstructionInferer,
)
from .forward_process import ForwardProcessResult, run_forward_process
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
    "classifier_guided_eps",
    "classifier_log_prob_gradient",
    "ddim_decode",
    "ddim_encode",
    "ddpm_decode",
    "guided_eps",
    "reconstruction_grid",
]
