"""MONAI engine pieces: for training (the classifier-free prepare-batch, the class-conditioned training inferer, the
noisy prepare-batch of the slice classifier, checkpoints, RNG state, time budget, reconstruction previews, progress
bar) and for volume inference (case dataset, case evaluator, prepare-batch, summary)."""

from .handlers import (
    EMAState,
    ProgressBar,
    ReconstructionSaver,
    ResumeLogFilter,
    RNGState,
    TimeBudget,
    TrainingCheckpointer,
    is_main_process,
)
from .inference import CaseDataset, CaseEvaluator, InferenceFailures, InferenceSummary, VolumePrepareBatch
from .prepare_batch import (
    ClassConditionedDiffusionInferer,
    ClassifierFreePrepareBatch,
    LabelledNetwork,
    NoisyClassifierPrepareBatch,
    SliceLabelPrepareBatch,
)

__all__ = [
    "ClassifierFreePrepareBatch",
    "ClassConditionedDiffusionInferer",
    "LabelledNetwork",
    "NoisyClassifierPrepareBatch",
    "SliceLabelPrepareBatch",
    "EMAState",
    "ProgressBar",
    "ReconstructionSaver",
    "ResumeLogFilter",
    "RNGState",
    "TimeBudget",
    "TrainingCheckpointer",
    "is_main_process",
    "CaseDataset",
    "CaseEvaluator",
    "InferenceFailures",
    "InferenceSummary",
    "VolumePrepareBatch",
]
