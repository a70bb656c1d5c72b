"""The evaluation's report: the papers' Table 1 layout in Markdown, and the figures."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_folder
from ..metrics import segmentation_metrics
from ..visualize import save_curves, save_overlay_grid, save_pr_curves

__all__ = ["CASE_METRICS", "case_metrics", "summary_markdown", "write_case_reports", "write_figures"]

#: the per-case columns of ``cases.csv`` and of the MONAI metrics reports (``segmentation_metrics`` keys)
CASE_METRICS = (
    "unhealthy_dice",
    "mixed_dice",
    "volume_dice",
    "pooled_auprc",
    "unhealthy_pooled_auprc",
    "accuracy",
    "auroc",
)


def case_metrics(
    result: Mapping[str, np.ndarray],
    label: np.ndarray,
    brain: np.ndarray,
    case_ids: Sequence[str] | np.ndarray,
    health: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """:func:`~anofpdm_monai.metrics.segmentation_metrics` of each case (volume) alone, in order of first
    appearance: one dict per case with ``case_id`` and every metric.

    Args:
        result: a method's test results (``mask``, ``mask_ungated``, ``map``, ``pred_label``), slices first.
        label, brain: (N, H, W) ground truth and brain masks; case_ids: (N,).
        health: the slice health scores (low = unhealthy) for the AUROC, or None.
    """
    ids = np.asarray(case_ids).astype(str)
    y = label.reshape(len(ids), -1).any(axis=1).astype(np.int64)
    rows = []
    for case in dict.fromkeys(ids.tolist()):
        idx = np.nonzero(ids == case)[0]
        m = segmentation_metrics(
            result["mask"][idx],
            result["mask_ungated"][idx],
            label[idx],
            np.asarray(result["map"][idx], dtype=np.float32),
            brain[idx],
            y[idx],
            ids[idx],
            cosine=None if health is None else health[idx],
            y_pred=result["pred_label"][idx],
        )
        rows.append({"case_id": case, **m})
    return rows


def write_case_reports(folder: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """MONAI's metrics reports (:func:`monai.handlers.utils.write_metrics_reports`, the ``MetricsSaver`` layout) of
    one method's per-case rows, written as one unit: ``metrics.csv`` (the means over cases), ``<metric>_raw.csv``
    (one line per case) and ``<metric>_summary.csv`` (mean, median, std, percentiles, not-NaN count)."""
    from monai.handlers.utils import write_metrics_reports

    names = [str(r["case_id"]) for r in rows]
    details = {k: np.asarray([[float(r.get(k, np.nan))] for r in rows]) for k in CASE_METRICS}
    means = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in details.items()}
    with atomic_folder(folder) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a single case (no std) or an all-NaN column (one class)
        write_metrics_reports(
            tmp,
            images=names,
            metrics=means,
            metric_details=details,
            summary_ops=["mean", "median", "std", "min", "max", "25percentile", "75percentile", "notnans"],
        )
    return Path(folder)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown table laid out like the papers' Table 1 (values x 100, mean +- std over seeds)."""

    def cell(m: Mapping[str, Any], key: str) -> str:
        v = m["metrics"].get(key)
        if v is None or v["mean"] is None or not np.isfinite(v["mean"]):
            return "n/a"
        if len(m["seeds"]) > 1:
            return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"
        return f"{100 * v['mean']:.1f}"

    head = (
        "| Method | Tuned with | Mixed Dice | Mixed IoU | Mixed AUPRC | Unhealthy Dice | Unhealthy IoU | "
        "Unhealthy AUPRC | Pooled AUPRC | Volume Dice | Slice acc. | Health AUROC |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for m in summary["methods"].values():
        keys = (
            "mixed_dice",
            "mixed_iou",
            "mixed_auprc_batched",
            "unhealthy_dice",
            "unhealthy_iou",
            "unhealthy_auprc_batched",
            "pooled_auprc",
            "volume_dice",
            "accuracy",
            "auroc",
        )
        lines.append(f"| {m['label']} | {m['tuning']} | " + " | ".join(cell(m, k) for k in keys) + " |")
    note = (
        f"\n{summary['num_test_slices']} test slices ({summary['num_unhealthy']} unhealthy) from "
        f"{len(summary['test_cases'])} case(s). Values x 100; mean ± std over seeds for stochastic methods. "
        "'Mixed' uses every slice with health-gated masks; 'Unhealthy' only lesion slices with ungated masks; "
        "Mixed/Unhealthy AUPRC follow the official batched protocol (batches of 100 slices), Pooled AUPRC is over "
        "all brain pixels. Methods tuned with pixel labels used the validation split's segmentations (objective: "
        f"{summary.get('tuning_objective', 'pooled')} Dice); AnoFPDM rows marked 'image labels only' never saw a "
        "pixel label.\n"
    )
    return head + "\n".join(lines) + "\n" + note


def write_figures(
    output_dir: Path,
    test: Any,
    modalities: Sequence[str],
    intensity_modality: str,
    map_modalities: Sequence[str],
    gt: Mapping[str, np.ndarray],
    y: np.ndarray,
    picks: list[int],
    curve_picks: list[int],
    examples: Mapping[str, Any],
    pr_curves: Mapping[str, Any],
    curves: Mapping[str, np.ndarray] | None,
) -> None:

    fig_dir = Path(output_dir) / "figures"
    table = test.table
    cases = table["case_id"].astype(str).to_numpy()
    channel = list(modalities).index(intensity_modality)
    images = np.stack([test[i]["image"][channel].numpy() for i in picks])
    labels = [f"{cases[i]} slice {int(table['source_index'].iloc[i])}" for i in picks]
    save_overlay_grid(fig_dir / "overlay.png", images, gt["label"][picks], examples, row_labels=labels)
    if pr_curves:
        save_pr_curves(fig_dir / "pr_curves.png", pr_curves, title="pooled precision-recall over brain pixels")
    if curves is not None and curve_picks:
        state = {0: "healthy", 1: "unhealthy"}
        titles = [
            f"{cases[i]} {int(table['source_index'].iloc[i])}, c={float(c):.4f}, {state[int(y[i])]}"
            for i, c in zip(curve_picks, curves["cosine"])
        ]
        save_curves(
            fig_dir / "curves.png",
            curves["steps"],
            curves["divergence"],
            curves["mse_guided"],
            curves["mse_reference"],
            t_end=curves["end_step"],
            titles=titles,
            modality_names=list(map_modalities),
        )
