"""Tables of the k-fold real-MRI study (benchmarks/real_study.py ``--stages report``).

Reads each finished fold's evaluation store (``<out>/fold<k>/evaluation<tag>/cases``), the slice cache and the
fold's model, and writes ``<out>/study<tag>.md`` and ``study<tag>.json``:

1. per test volume and method: unhealthy Dice, mixed Dice, 3D Dice, AUPRC over the volume's brain pixels, health
   AUROC and accuracy; then the mean and standard deviation over volumes, and the values pooled over every slice;
2. the health scores (every score of :mod:`anofpdm_monai.inferers.health`, the raw (not relative) peak divergence
   and MSE gap, a logistic
   regression on the curve features fitted on each fold's calibration volume, and the brain area alone): AUROC on all
   test slices and on the central slices only (brain area >= 60 % of the volume's largest), per volume and pooled.
   A score that merely learns slice position beats nothing on the central slices;
3. the divergence M_t step by step, for each AnoFPDM forward mode: the AUROC of M_t alone (tumour vs healthy slices,
   all and central) and the median M_t of tumour slices over that of healthy slices, at a few grid steps. It shows
   where along the grid the anomaly signal is (where argmax_t M_t should land) and how much of M_t's growth with t
   is shared by healthy slices.

The calibration volume's curves (for the logistic regression) are computed once per fold with the fold's calibrated
DDIM inferer and cached in ``<fold>/health_validation.npz``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

CENTRAL_FRACTION = 0.6
SCORES = ("cosine", "mse_gap", "mse_gap_raw", "divergence", "divergence_raw", "logistic", "brain_area")


def _auroc(y: np.ndarray, unhealthiness: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, unhealthiness)) if 0 < y.sum() < y.size else float("nan")


def _curve_features(arrays: dict[str, np.ndarray], last_step: float) -> dict[str, np.ndarray]:
    """Health scores as unhealthiness (high = unhealthy) from stored curves, through the library's definitions."""
    from anofpdm_monai.inferers.forward_process import ForwardProcessResult
    from anofpdm_monai.inferers.health import health_scores

    div = torch.as_tensor(arrays["divergence"], dtype=torch.float64)  # (N, K, Cm)
    n, k = div.shape[:2]
    result = ForwardProcessResult(
        timesteps=torch.arange(k),
        guidance_scales=torch.ones(1),
        divergence=div[None],
        mse_guided=torch.as_tensor(arrays["mse_guided"], dtype=torch.float64)[None],
        mse_reference=torch.as_tensor(arrays["mse_reference"], dtype=torch.float64),
        end_index=torch.zeros(1, n, div.shape[-1], dtype=torch.long),
        end_index_joint=torch.zeros(1, n, dtype=torch.long),
    )
    out = {name: -v[0].numpy() for name, v in health_scores(result).items()}
    out["divergence_raw"] = div.mean(-1).amax(-1).numpy()
    out["mse_gap_raw"] = (result.mse_guided[0] - result.mse_reference).mean(-1).numpy()
    # t_e is stored as a step of the grid: its position between the first step (0) and the grid's last
    out["end_fraction"] = np.asarray(arrays["end_step"], dtype=np.float64).reshape(n, -1).mean(1) / last_step
    return out


def _logistic(train: dict[str, np.ndarray], y_train: np.ndarray, test: dict[str, np.ndarray]) -> np.ndarray:
    """P(unhealthy) from a logistic regression on the curve features (no brain area), fitted on the calibration
    volume's slice labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names = ("cosine", "mse_gap", "divergence", "end_fraction")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    model.fit(np.stack([train[k] for k in names], 1), y_train)
    return model.predict_proba(np.stack([test[k] for k in names], 1))[:, 1]


def _fold_inputs(fold_dir: Path, tag: str) -> dict[str, Any] | None:
    from anofpdm_monai.calibration import Calibration
    from anofpdm_monai.data import SliceDataset
    from anofpdm_monai.evaluation.runner import Evaluator
    from anofpdm_monai.evaluation.store import ResultStore
    from anofpdm_monai.networks import load_network

    evaluation = fold_dir / f"evaluation{tag}"
    if not (evaluation / "summary.json").is_file():
        return None
    datalist = json.loads((fold_dir / "datalist.json").read_text())
    dataset_dir = json.loads((fold_dir.parent / "folds.json").read_text())["args"]["data"]
    cache_dir = fold_dir.parent / "cache"
    network, info = load_network(fold_dir / "model" / "model.pt")
    datasets = {
        split: SliceDataset.from_datalist(
            datalist, dataset_dir, split, cache_dir, info["preprocessing"], progress=False
        )
        for split in ("validation", "test")
    }
    test = datasets["test"]
    table = test.table.reset_index(drop=True)
    gt = Evaluator._ground_truth(test)
    summary = json.loads((evaluation / "summary.json").read_text())
    store = ResultStore(evaluation)
    cases = list(dict.fromkeys(table["case_id"].astype(str)))
    results = {m: store.load(m, 0, cases) for m in summary["methods"]}
    if "anofpdm" in results:
        results["anofpdm"]["timesteps"] = store.timesteps("anofpdm", 0, cases[0])
    # the calibration volume's curves, for the logistic regression
    cache = fold_dir / f"health_validation{tag}.npz"
    cal = Calibration.load(fold_dir / f"calibration{tag}.json")
    if cache.is_file():
        with np.load(cache) as stored:
            if "guidance_scale" not in stored.files or float(stored["guidance_scale"]) != cal.guidance_scale:
                cache.unlink()  # made with another calibration
    if not cache.is_file():
        from anofpdm_monai.inferers import AnoFPDMInferer

        inferer = AnoFPDMInferer.from_calibration(cal, scheduler=info["schedule"])
        parts: dict[str, list[np.ndarray]] = {"divergence": [], "mse_guided": [], "mse_reference": [], "end_step": []}
        loader = torch.utils.data.DataLoader(datasets["validation"], batch_size=64, shuffle=False)
        for batch in loader:
            out = inferer.postprocess(inferer.run(batch["image"], network))
            for key in parts:
                parts[key].append(getattr(out, key).cpu().numpy())
        curves = {k: np.concatenate(v) for k, v in parts.items()}
        np.savez(cache, labels=datasets["validation"].slice_labels, guidance_scale=cal.guidance_scale, **curves)
    with np.load(cache) as stored:
        validation = {k: stored[k] for k in stored.files}
    return {"table": table, "gt": gt, "results": results, "summary": summary, "validation": validation}


def _volume_rows(fold: int, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    from anofpdm_monai.evaluation.report import case_metrics

    table, gt = inputs["table"], inputs["gt"]
    rows = []
    for method, r in inputs["results"].items():
        label = inputs["summary"]["methods"][method]["label"]
        health = r.get("health", r.get("cosine"))
        for m in case_metrics(r, gt["label"], gt["brain"], table["case_id"].astype(str).to_numpy(), health):
            case = m.pop("case_id")
            rows.append({"fold": fold, "case": case, "method": method, "label": label, **m})
    return rows


def _health_rows(fold: int, inputs: dict[str, Any]) -> pd.DataFrame:
    r = inputs["results"].get("anofpdm")
    if r is None:
        return pd.DataFrame()
    table = inputs["table"]
    last_step = float(np.asarray(r["timesteps"]).max())  # the calibration's grid, also the validation curves'
    test = _curve_features(r, last_step)
    val = _curve_features(inputs["validation"], last_step)
    test["logistic"] = _logistic(val, inputs["validation"]["labels"], test)
    # the calibration's threshold rule (docs/method.md §6.2) on the calibration volume, applied to the test slices
    from anofpdm_monai.calibration.algorithm import select_tau

    y_val = np.asarray(inputs["validation"]["labels"])
    for name in ("cosine", "mse_gap", "divergence"):
        tau, _ = select_tau(-val[name][y_val == 0], -val[name][y_val == 1])
        test[f"{name}_pred"] = (-test[name] <= tau).astype(np.int64)
    area = table["brain_area"].to_numpy(dtype=np.float64)
    test["brain_area"] = area
    frame = pd.DataFrame(
        {k: test[k] for k in (*SCORES, "end_fraction", "cosine_pred", "mse_gap_pred", "divergence_pred")}
    )
    frame["fold"], frame["case"] = fold, table["case_id"].astype(str).to_numpy()
    frame["y"], frame["central"] = _label_and_central(table)
    return frame


def _label_and_central(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: 1 when it holds tumour, and whether it is central (brain area >= CENTRAL_FRACTION of its volume's
    largest)."""
    y = (table["lesion_area"].to_numpy() > 0).astype(np.int64)
    area = table["brain_area"].to_numpy(dtype=np.float64)
    largest = pd.Series(area).groupby(table["case_id"].astype(str).to_numpy()).transform("max").to_numpy()
    return y, area >= CENTRAL_FRACTION * largest


def _divergence_rows(fold: int, inputs: dict[str, Any]) -> pd.DataFrame:
    """Per slice and grid step: M_t (mean over map modalities) of each AnoFPDM forward mode, with the slice label
    and whether it is central."""
    y, central = _label_and_central(inputs["table"])
    frames = []
    for method in ("anofpdm", "anofpdm_ddpm"):
        r = inputs["results"].get(method)
        if r is None or "divergence" not in r:
            continue
        div = np.asarray(r["divergence"], dtype=np.float64).mean(-1)  # (N, K)
        grid = inputs["results"].get("anofpdm", {}).get("timesteps")  # both forward modes share the calibrated grid
        steps = np.arange(div.shape[1]) if grid is None else np.asarray(grid)
        frames.append(
            pd.DataFrame(
                {
                    "fold": fold,
                    "method": method,
                    "slice": np.repeat(np.arange(len(y)), div.shape[1]),
                    "t": np.tile(steps, len(y)),
                    "m_t": div.reshape(-1),
                    "y": np.repeat(y, div.shape[1]),
                    "central": np.repeat(central, div.shape[1]),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def divergence_by_step(frame: pd.DataFrame, points: int = 8) -> pd.DataFrame:
    """AUROC of M_t alone (all and central slices, pooled over folds) and the median tumour / healthy ratio at
    ``points`` grid steps spread over the grid, per forward mode."""
    rows = []
    for method, group in frame.groupby("method", sort=False):
        steps = np.sort(group["t"].unique())
        chosen = steps[np.unique(np.linspace(1, len(steps) - 1, points).round().astype(int))]
        for t in chosen:
            at = group[group["t"] == t]
            cen = at[at["central"]]
            rows.append(
                {
                    "method": method,
                    "t": int(t),
                    "auroc_all": _auroc(at.y, at.m_t),
                    "auroc_central": _auroc(cen.y, cen.m_t),
                    "ratio": float(at.m_t[at.y == 1].median() / max(at.m_t[at.y == 0].median(), 1e-12)),
                    "healthy_median": float(at.m_t[at.y == 0].median()),
                }
            )
    return pd.DataFrame(rows)


def source_statistics(out: Path) -> pd.DataFrame:
    """What the model sees of each volume after preprocessing (first channel, in [-1, 1]): quantiles of the brain
    pixels, of the healthy brain pixels, the mean outside the brain, and the slice count, one row per volume."""
    from anofpdm_monai.data import SliceDataset
    from anofpdm_monai.networks import load_network

    fold_dirs = sorted(p for p in out.glob("fold*") if (p / "model" / "model.pt").is_file())
    if not fold_dirs:
        return pd.DataFrame()
    datalist = json.loads((fold_dirs[0] / "datalist.json").read_text())
    entries = {e["id"]: e for split in ("training", "validation", "test") for e in datalist.get(split, [])}
    datalist["training"], datalist["validation"], datalist["test"] = list(entries.values()), [], []
    dataset_dir = json.loads((out / "folds.json").read_text())["args"]["data"]
    _, info = load_network(fold_dirs[0] / "model" / "model.pt")
    data = SliceDataset.from_datalist(
        datalist, dataset_dir, "training", out / "cache", info["preprocessing"], progress=False
    )
    rows = []
    for case in entries:
        arrays = data.cache.arrays(case)
        image = np.asarray(arrays["image"][:, 0], dtype=np.float32)
        brain = np.asarray(arrays["brain"], dtype=bool)
        lesion = np.asarray(arrays["label"], dtype=bool)
        q = np.quantile(image[brain], [0.05, 0.5, 0.95])
        healthy = np.median(image[brain & ~lesion])
        rows.append(
            {
                "case": case,
                "slices": image.shape[0],
                "brain q05": q[0],
                "brain median": q[1],
                "brain q95": q[2],
                "healthy median": healthy,
                "lesion median": np.median(image[lesion]) if lesion.any() else np.nan,
                "outside mean": image[~brain].mean(),
            }
        )
    return pd.DataFrame(rows)


def _fmt(mean: float, std: float | None = None, scale: float = 100.0) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{scale * mean:.1f}" if std is None or not np.isfinite(std) else f"{scale * mean:.1f} ± {scale * std:.1f}"


def write_report(out: Path, tag: str = "") -> dict[str, Any]:
    fold_dirs = sorted(p for p in out.glob("fold*") if p.is_dir())
    volume_rows, health, divergence = [], [], []
    for fold_dir in fold_dirs:
        inputs = _fold_inputs(fold_dir, tag)
        if inputs is None:
            print(f"{fold_dir.name}: no finished evaluation, skipped")
            continue
        fold = int(fold_dir.name[4:])
        volume_rows += _volume_rows(fold, inputs)
        health.append(_health_rows(fold, inputs))
        divergence.append(_divergence_rows(fold, inputs))
    if not volume_rows:
        raise SystemExit(f"no finished fold under {out}")
    vol = pd.DataFrame(volume_rows)
    metrics = [
        ("unhealthy_dice", "Unhealthy Dice"),
        ("mixed_dice", "Mixed Dice"),
        ("volume_dice", "3D Dice"),
        ("pooled_auprc", "AUPRC"),
        ("auroc", "Health AUROC"),
        ("accuracy", "Slice acc."),
    ]
    lines = [f"{vol['case'].nunique()} test volumes over {vol['fold'].nunique()} folds; values x 100.\n"]
    lines.append("### Mean ± std over test volumes\n")
    lines.append("| Method | " + " | ".join(t for _, t in metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    for label, group in vol.groupby("label", sort=False):
        cells = [_fmt(group[k].mean(), group[k].std(ddof=0)) for k, _ in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("\n### Per volume (unhealthy Dice / mixed Dice / 3D Dice / AUPRC)\n")
    cases = list(dict.fromkeys(vol["case"]))
    lines.append("| Method | " + " | ".join(f"{c} (fold {vol[vol.case == c].fold.iloc[0]})" for c in cases) + " |")
    lines.append("|---|" + "---|" * len(cases))
    for label, group in vol.groupby("label", sort=False):
        by_case = group.set_index("case")
        cells = [
            " / ".join(_fmt(by_case.loc[c, k]) for k in ("unhealthy_dice", "mixed_dice", "volume_dice", "pooled_auprc"))
            for c in cases
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    report: dict[str, Any] = {"volumes": volume_rows}
    frame = pd.concat([h for h in health if len(h)], ignore_index=True) if any(len(h) for h in health) else None
    if frame is not None:
        lines.append("\n### Health scores (AnoFPDM DDIM curves at the calibrated w): AUROC x 100\n")
        lines.append(
            f"Central slices: brain area >= {CENTRAL_FRACTION:.0%} of the volume's largest "
            f"({int(frame.central.sum())} of {len(frame)} slices, {int(frame[frame.central].y.sum())} with tumour). "
            "Per-volume values: mean ± std over volumes; pooled: all slices of all volumes together."
        )
        lines.append("\n| Score | All slices, per volume | All, pooled | Central, per volume | Central, pooled |")
        lines.append("|---|---|---|---|---|")
        health_table = {}
        for score in SCORES:
            per_all = [_auroc(g.y, g[score]) for _, g in frame.groupby("case")]
            per_central = [_auroc(g.y, g[score]) for _, g in frame[frame.central].groupby("case")]
            row = {
                "all_per_volume": (np.nanmean(per_all), np.nanstd(per_all)),
                "all_pooled": _auroc(frame.y, frame[score]),
                "central_per_volume": (np.nanmean(per_central), np.nanstd(per_central)),
                "central_pooled": _auroc(frame[frame.central].y, frame[frame.central][score]),
            }
            health_table[score] = row
            lines.append(
                f"| {score} | {_fmt(*row['all_per_volume'])} | {_fmt(row['all_pooled'])} | "
                f"{_fmt(*row['central_per_volume'])} | {_fmt(row['central_pooled'])} |"
            )
        report["health"] = health_table
        lines.append(
            "\nSlice accuracy with tau from the calibration volume (the calibration's rule), on the test slices:"
        )
        for name in ("cosine", "mse_gap", "divergence"):
            pred, y = frame[f"{name}_pred"], frame.y
            per = [float((g[f"{name}_pred"] == g.y).mean()) for _, g in frame.groupby("case")]
            lines.append(
                f"{name}: accuracy {np.mean(per):.3f} ± {np.std(per):.3f} per volume, pooled {(pred == y).mean():.3f} "
                f"(sensitivity {pred[y == 1].mean():.3f}, specificity {1 - pred[y == 0].mean():.3f});"
            )
            health_table[name]["accuracy_pooled"] = float((pred == y).mean())
        lines.append(f"majority class: {max(frame.y.mean(), 1 - frame.y.mean()):.3f}.")
        at_end = frame.end_fraction >= 1.0
        tumour, healthy = frame.y == 1, frame.y == 0
        lines.append(
            f"\nEnd step t_e (AnoFPDM DDIM): at the last grid step for {at_end[tumour].mean():.0%} of tumour slices "
            f"and {at_end[healthy].mean():.0%} of healthy slices; median position in the grid "
            f"{frame.end_fraction[tumour].median():.2f} (tumour) and {frame.end_fraction[healthy].median():.2f} "
            "(healthy), 0 = first step, 1 = t_max."
        )
        report["end_step"] = {
            "at_end_tumour": float(at_end[frame.y == 1].mean()),
            "at_end_healthy": float(at_end[frame.y == 0].mean()),
        }
    steps = pd.concat(divergence, ignore_index=True) if any(len(d) for d in divergence) else None
    if steps is not None:
        by_step = divergence_by_step(steps)
        lines.append("\n### The divergence M_t step by step (test slices of every fold, pooled)\n")
        lines.append(
            "AUROC of M_t alone for tumour vs healthy slices (x 100; central: brain area >= "
            f"{CENTRAL_FRACTION:.0%} of the volume's largest), the median M_t of tumour slices over that of healthy "
            "slices, and the healthy slices' median M_t (x 1000): where along the grid the anomaly signal is, and "
            "how much of M_t's growth with t every slice shares.\n"
        )
        lines.append("| Forward | t | AUROC all | AUROC central | tumour / healthy | healthy median M_t x 1000 |")
        lines.append("|---|---|---|---|---|---|")
        for row in by_step.itertuples(index=False):
            lines.append(
                f"| {row.method} | {row.t} | {_fmt(row.auroc_all)} | {_fmt(row.auroc_central)} | {row.ratio:.2f} | "
                f"{1000 * row.healthy_median:.2f} |"
            )
        report["divergence_by_step"] = by_step.to_dict(orient="records")
    sources = source_statistics(out)
    if len(sources):
        lines.append("\n### What the model sees of each volume (first channel after preprocessing, in [-1, 1])\n")
        lines.append("| " + " | ".join(sources.columns) + " |")
        lines.append("|---" * len(sources.columns) + "|")
        for row in sources.itertuples(index=False):
            lines.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.2f}" for v in row) + " |")
        report["sources"] = sources.to_dict(orient="records")
    text = "\n".join(lines) + "\n"
    (out / f"study{tag}.md").write_text(text)
    (out / f"study{tag}.json").write_text(json.dumps(report, indent=2, default=float))
    print(text)
    return report
