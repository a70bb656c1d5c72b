"""Training engine pieces for MONAI's SupervisedTrainer: the classifier-free prepare-batch, the class-conditioned
training inferer, and handlers (checkpoints, RNG state, time budget, reconstruction previews, progress bar)."""

from .handlers import ProgressBar, ReconstructionSaver, RNGState, TimeBudget, TrainingCheckpointer, is_main_process
from .prepare_batch import ClassConditionedDiffusionInferer, ClassifierFreePrepareBatch

__all__ = [
    "ClassifierFreePrepareBatch",
    "ClassConditionedDiffusionInferer",
    "ProgressBar",
    "ReconstructionSaver",
    "RNGState",
    "TimeBudget",
    "TrainingCheckpointer",
    "is_main_process",
]
