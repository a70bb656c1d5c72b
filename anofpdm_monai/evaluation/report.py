"""The evaluation's report: the papers' Table 1 layout in Markdown, and the figures."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..io import atomic_folder, atomic_path, write_text
from ..metrics import PooledAUPRC, aggregate_over_seeds, dice_per_slice, iou_per_slice, segmentation_metrics
from ..visualize import save_curves, save_overlay_grid, save_pr_curves
from .methods import ANOFPDM_METHODS, METHODS

__all__ = [
    "CASE_METRICS",
    "EvaluationReport",
    "ResultMetric",
    "case_metrics",
    "summary_markdown",
    "write_case_reports",
    "write_figures",
]

logger = logging.getLogger(__name__)

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


class ResultMetric:
    """A MONAI metric (a ``CumulativeIterationMetric`` such as ``monai.metrics.DiceMetric`` or this project's
    :class:`~anofpdm_monai.metrics.VolumeDiceMetric`) as an extra column of the evaluation, configured in
    ``evaluate.json``'s ``extra_metrics``: called on a method's stored test results, it feeds the metric
    ``y_pred`` = the chosen result as ``(N, 1, H, W)`` and ``y`` = the ground truth (``(N, 1, H, W)``, or with the
    brain mask as channel 1 for ``with_brain``), one slice per item (``per_case=False``) or one case per item
    (``(1, 1, H, W, slices)``), and returns its aggregate as a float.

    Args:
        metric: the MONAI metric (reset before each use).
        y_pred: ``"mask"`` (gated), ``"mask_ungated"`` or ``"map"`` (the filtered anomaly map).
        per_case: items are whole cases (3D metrics) instead of slices.
        unhealthy_only: only the slices with a lesion (the papers' "unhealthy" setting).
        with_brain: ``y`` carries the brain mask as channel 1 (this project's AUPRC metrics read it).
    """

    INPUTS = ("mask", "mask_ungated", "map")

    def __init__(
        self,
        metric: Any,
        y_pred: str = "mask",
        per_case: bool = False,
        unhealthy_only: bool = False,
        with_brain: bool = False,
    ) -> None:
        if y_pred not in self.INPUTS:
            raise ValueError(f"y_pred must be one of {list(self.INPUTS)}, got {y_pred!r}")
        if not callable(metric) or not hasattr(metric, "aggregate"):
            raise ValueError(f"metric must be a MONAI metric with aggregate(), got {type(metric).__name__}")
        self.metric, self.y_pred = metric, y_pred
        self.per_case, self.unhealthy_only, self.with_brain = bool(per_case), bool(unhealthy_only), bool(with_brain)

    def __call__(
        self, result: Mapping[str, np.ndarray], label: np.ndarray, brain: np.ndarray, case_ids: np.ndarray
    ) -> float:
        pred = np.asarray(result[self.y_pred], dtype=np.float32)
        truth = label.astype(np.float32)
        keep = truth.reshape(len(truth), -1).any(1) if self.unhealthy_only else np.ones(len(truth), dtype=bool)
        y = truth[:, None] if not self.with_brain else np.stack([truth, brain.astype(np.float32)], axis=1)
        x, y, ids = torch.from_numpy(pred[keep][:, None]), torch.from_numpy(y[keep]), np.asarray(case_ids)[keep]
        self.metric.reset()
        if self.per_case:
            for case in dict.fromkeys(ids.tolist()):
                sel = torch.from_numpy(ids == case)
                self.metric(y_pred=x[sel].permute(1, 2, 3, 0)[None], y=y[sel].permute(1, 2, 3, 0)[None])
        elif len(x):
            self.metric(y_pred=x, y=y)
        value = self.metric.aggregate()
        value = value[0] if isinstance(value, (list, tuple)) else value
        return float(torch.as_tensor(value, dtype=torch.float64).mean()) if len(x) else float("nan")


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


class EvaluationReport:
    """The evaluator's last job: metrics, tables and figures from the stored per-case results; a part of
    :class:`~anofpdm_monai.evaluation.runner.Evaluator`."""

    def _picks(self, gt: Mapping[str, np.ndarray], y: np.ndarray) -> tuple[list[int], list[int]]:
        """Example slices: the largest lesion of each case first (then more), one healthy slice; and for the
        curves two lesion slices and two healthy ones."""
        lesion = gt["label"].reshape(len(y), -1).sum(1)
        cases = self.test.table["case_id"].astype(str).to_numpy()
        picks: list[int] = []
        for i in np.argsort(-lesion, kind="stable"):
            if lesion[i] == 0 or len(picks) >= max(1, self.figure_slices - 1):
                break
            if cases[i] not in {cases[j] for j in picks} or len(picks) >= len(set(cases)):
                picks.append(int(i))
        healthy = np.nonzero(y == 0)[0]
        if len(healthy):
            picks.append(int(healthy[len(healthy) // 2]))
        ill = np.nonzero(y == 1)[0]
        curves = [int(i) for i in ill[np.argsort(-lesion[ill], kind="stable")][:2]] + [int(i) for i in healthy[:2]]
        return picks, curves

    def report(self, tuning: Mapping[str, Any]) -> dict[str, Any]:
        """Metrics, tables and figures from the stored per-case results (one method and seed in memory at a time)."""
        gt = self._ground_truth(self.test)
        table = self.test.table
        y = gt["label"].reshape(len(table), -1).any(axis=1).astype(np.int64)
        cases = table["case_id"].astype(str).to_numpy()
        picks, curve_picks = self._picks(gt, y)
        rows, case_rows, summary, pr_curves, examples, curves = [], [], {}, {}, {}, None
        for method in self.methods:
            per_seed = []
            for seed in self._seeds(method):
                r = self._load(method, seed)
                maps = r["map"].astype(np.float32)
                cosine = r.get("cosine") if method in ANOFPDM_METHODS else None
                # the slice classification is the health score's (the cosine unless the settings choose another)
                health = r.get("health", cosine) if method in ANOFPDM_METHODS else None
                extra = {
                    name: metric(r, gt["label"], gt["brain"], cases) for name, metric in self.extra_metrics.items()
                }
                per_seed.append(
                    segmentation_metrics(
                        r["mask"],
                        r["mask_ungated"],
                        gt["label"],
                        maps,
                        gt["brain"],
                        y,
                        cases,
                        cosine=health,
                        y_pred=r["pred_label"],
                    )
                    | extra
                )
                per_case = case_metrics(r, gt["label"], gt["brain"], cases, health)
                case_rows += [{"method": method, "seed": seed, **row} for row in per_case]
                write_case_reports(self.output_dir / "metrics_reports" / f"{method}_seed{seed}", per_case)
                ungated = r["mask_ungated"]
                rows.append(
                    pd.DataFrame(
                        {
                            "method": method,
                            "seed": seed,
                            "case_id": cases,
                            "slice_index": table["slice_index"].to_numpy(),
                            "source_index": table["source_index"].to_numpy(),
                            "label": y,
                            "lesion_area": gt["label"].reshape(len(y), -1).sum(1),
                            "pred_label": r["pred_label"],
                            "mask_area": r["mask"].reshape(len(y), -1).sum(1),
                            "dice_mixed": dice_per_slice(r["mask"], gt["label"]),
                            "iou_mixed": iou_per_slice(r["mask"], gt["label"]),
                            "dice_unhealthy": np.where(y == 1, dice_per_slice(ungated, gt["label"]), np.nan),
                            "iou_unhealthy": np.where(y == 1, iou_per_slice(ungated, gt["label"]), np.nan),
                            "cosine": cosine if cosine is not None else np.nan,
                            "health": health if health is not None else np.nan,
                        }
                    )
                )
                if seed != self._seeds(method)[0]:
                    continue
                examples[self._label(method)] = {"map": maps[picks], "mask": r["mask"][picks]}
                if y.any():
                    acc = PooledAUPRC()
                    acc.update(maps, gt["label"], gt["brain"])
                    precision, recall, _ = acc.precision_recall_curve()
                    pr_curves[self._label(method)] = (precision, recall, acc.compute())
                if method in ANOFPDM_METHODS and (curves is None or method == "anofpdm"):
                    curves = {k: r[k][curve_picks] for k in ("divergence", "mse_guided", "mse_reference", "end_step")}
                    curves["cosine"] = r["cosine"][curve_picks]
                    curves["steps"] = self.store.timesteps(method, seed, cases[0])
            agg = aggregate_over_seeds(per_seed)
            summary[method] = {
                "label": self._label(method),
                "tuning": METHODS[method].tuning,
                "seeds": self._seeds(method),
                "metrics": {k: {"mean": v[0], "std": v[1]} for k, v in agg.items()},
                "tuned": dict(tuning.get(method, {})),
            }
        with atomic_path(self.output_dir / "metrics.csv") as tmp:
            pd.concat(rows, ignore_index=True).to_csv(tmp, index=False)
        with atomic_path(self.output_dir / "cases.csv") as tmp:
            pd.DataFrame(case_rows).to_csv(tmp, index=False)
        out = {
            "num_test_slices": int(len(y)),
            "num_unhealthy": int(y.sum()),
            "test_cases": sorted(set(cases.tolist())),
            "tuning_objective": self.tuning_objective,
            "methods": summary,
        }
        write_text(self.output_dir / "summary.json", json.dumps(out, indent=2, default=float))
        write_text(self.output_dir / "summary.md", summary_markdown(out))
        write_figures(
            self.output_dir,
            self.test,
            self.modalities,
            self.intensity_modality,
            self.map_modalities,
            gt,
            y,
            picks,
            curve_picks,
            examples,
            pr_curves,
            curves,
        )
        logger.info("evaluation written to %s", self.output_dir)
        return out
