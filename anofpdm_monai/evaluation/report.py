"""The evaluation's report: the papers' Table 1 layout in Markdown, and the figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..visualize import save_curves, save_overlay_grid, save_pr_curves

__all__ = ["summary_markdown", "write_figures"]


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
