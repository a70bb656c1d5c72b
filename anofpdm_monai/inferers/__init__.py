"""Inferers: the AnoFPDM forward-process anomaly inferer, reconstruction-based baselines and volume inference."""

from .anofpdm import AnoFPDMInferer, AnoFPDMOutput, ForwardProcessResult, run_forward_process
from .baselines import BASELINE_METHODS, BaselineOutput, IntensityInferer, ReconstructionInferer
from .postprocess import (
    batch_quantile,
    binarize_map,
    median_filter_2d,
    quantile_level,
    remove_small_components,
    scaled_min_component_size,
)
from .reconstruction import ddim_decode, ddim_encode, ddpm_decode, guided_eps, reconstruction_grid
from .schedule import NoiseSchedule, make_step_grid
from .volume import CaseResult, InferenceFailures, VolumeInferer, inferer_from_calibration, write_nifti_like

__all__ = [
    "BASELINE_METHODS",
    "BaselineOutput",
    "IntensityInferer",
    "ReconstructionInferer",
    "AnoFPDMInferer",
    "AnoFPDMOutput",
    "ForwardProcessResult",
    "run_forward_process",
    "batch_quantile",
    "binarize_map",
    "median_filter_2d",
    "quantile_level",
    "remove_small_components",
    "scaled_min_component_size",
    "ddim_decode",
    "ddim_encode",
    "ddpm_decode",
    "guided_eps",
    "reconstruction_grid",
    "NoiseSchedule",
    "make_step_grid",
    "CaseResult",
    "InferenceFailures",
    "VolumeInferer",
    "inferer_from_calibration",
    "write_nifti_like",
]
