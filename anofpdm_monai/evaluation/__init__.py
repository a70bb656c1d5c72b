"""Evaluation of AnoFPDM against the papers' baselines: the runner, the pixel-label tuning of the baselines, the
per-case result store, and the report (table and figures)."""

from .methods import ANOFPDM_METHODS, DEFAULT_METHODS, METHODS, MethodSpec
from .report import ResultMetric, case_metrics, summary_markdown, write_case_reports, write_figures
from .runner import Evaluator
from .store import ResultStore, fingerprint
from .tuning import TUNING_OBJECTIVES, threshold_candidates, tune_threshold

__all__ = [
    "ANOFPDM_METHODS",
    "DEFAULT_METHODS",
    "METHODS",
    "MethodSpec",
    "Evaluator",
    "ResultStore",
    "fingerprint",
    "TUNING_OBJECTIVES",
    "threshold_candidates",
    "tune_threshold",
    "ResultMetric",
    "case_metrics",
    "write_case_reports",
    "summary_markdown",
    "write_figures",
]
