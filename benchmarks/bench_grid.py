"""Accuracy against the step grid on a trained model: which grid is the cheapest within 1 point of stride 1?

For the DDIM and DDPM forward processes the script measures, against stride 1 on the test split:

- uniform grids 0..t_max with strides 1, 2, 5, 10, 20, 30 (``--strides``);
- non-uniform grids, dense where M_t peaks and sparse elsewhere; the dense range is taken from the stride-1 M_t curves
  of the VALIDATION slices (the t_e of those slices), never from the test split;
- a per-slice early exit, simulated from the streamed curves: a slice stops once its M_t has fallen below
  ``(1 - drop)`` x its running maximum for ``patience`` diffusion steps after that maximum (every map modality). The
  statistics of a stopped slice are those of the grid's prefix: its curves end there, so the cosine health score
  sees only the prefix (tau is recalibrated on the validation prefixes). For DDPM the prefix maps are exact (every
  step is recorded, below); for DDIM they are exact whenever the prefix argmax is the full run's argmax, and the
  table counts the slices where it is not;
- skipping slices with little brain (brain area below a fraction of the slice): measured on ALL test slices from
  the slice cache (no network needed): the slices and lesion pixels that would be skipped.

Every grid is recalibrated at its own grid (M_max and tau depend on it) with the library's calibration
(:func:`anofpdm_monai.calibration.calibrate_from_statistics`) on the validation slices, with w fixed to the given
calibration's w (not re-picked). Masks, thresholds and health labels come from :class:`AnoFPDMInferer`
``.postprocess``; metrics from :func:`anofpdm_monai.metrics.segmentation_metrics`.

DDIM runs every grid (its trajectory depends on the grid). DDPM draws fresh noise at every step, so its statistics at
a step depend only on (x0, t, that step's noise): one stride-1 pass that records every step (the library's forward
process called one step at a time with one continuing generator) yields every DDPM grid as a sub-sample, with common
random numbers across the rows. Results of each (forward, grid, split) run are cached in ``--output``/cache, so reruns
and new rows are cheap; ``--run`` restricts which runs this process makes (two processes can share the work), and
``--no-report`` skips the table.

Usage::

    python benchmarks/bench_grid.py --checkpoint runs/kfold/fold0/model/model.pt \\
        --datalist runs/kfold/fold0/datalist.json --dataset-dir ../shared/data --cache-dir runs/grid/cache \\
        --calibration runs/kfold/fold0/calibration.json --output runs/grid --val-slices 8 --test-slices 12
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from anofpdm_monai.calibration import Calibration, CalibrationStatistics, calibrate_from_statistics  # noqa: E402
from anofpdm_monai.data import SliceDataset  # noqa: E402
from anofpdm_monai.evaluation.runner import Evaluator  # noqa: E402
from anofpdm_monai.inferers import AnoFPDMInferer, ForwardProcessResult, run_forward_process  # noqa: E402
from anofpdm_monai.metrics import (  # noqa: E402
    DEFAULT_SMOOTH,
    _dice_from_counts,
    _overlap_counts,
    dice_per_slice,
    segmentation_metrics,
)
from anofpdm_monai.networks import load_network  # noqa: E402
from anofpdm_monai.settings import (  # noqa: E402
    CALIBRATED_FIELDS,
    DEFAULT_GUIDANCE_CANDIDATES,
    FORWARD_MODES,
    AnoFPDMSettings,
)

POINT = 0.01  # "1 point" on a 0-1 metric


# ------------------------------------------------------------------------------------------------------------ grids
def uniform_grid(t_max: int, stride: int) -> list[int]:
    """0, s, 2s, ... <= t_max (the library's rule: the last step is t_max only when s divides it)."""
    return list(range(0, t_max + 1, stride))


def nonuniform_grid(t_max: int, dense: tuple[int, int], dense_stride: int, sparse_stride: int) -> list[int]:
    """Sparse steps below and above the dense range, dense steps inside it; always 0 and t_max."""
    lo, hi = max(0, int(dense[0])), min(t_max, int(dense[1]))
    steps = set(range(0, lo, sparse_stride)) | set(range(lo, hi + 1, dense_stride))
    steps |= set(range(hi, t_max + 1, sparse_stride)) | {0, t_max}
    return sorted(steps)


def dense_range(
    end_steps: np.ndarray, t_max: int, quantiles: tuple[float, float] = (0.1, 0.9), margin: int = 30
) -> tuple[int, int]:
    """The range where M_t peaks: quantiles of the validation slices' t_e, widened by ``margin`` steps, rounded to
    multiples of 10."""
    te = np.asarray(end_steps, dtype=np.float64).reshape(-1)
    lo, hi = np.quantile(te, quantiles[0]), np.quantile(te, quantiles[1])
    lo = max(0, int(math.floor((lo - margin) / 10.0)) * 10)
    hi = min(t_max, int(math.ceil((hi + margin) / 10.0)) * 10)
    return lo, max(hi, lo)


def early_exit_stop(divergence: np.ndarray, timesteps: Sequence[int], drop: float, patience: int) -> np.ndarray:
    """Per slice, the last grid index visited under the early-exit rule (K - 1 when it never triggers).

    A slice stops at the first grid step k where, for every map modality, M_{t_k} <= (1 - drop) x max_{j<=k} M_{t_j}
    and t_k - t_{argmax_{j<=k}} >= patience (diffusion steps).

    Args:
        divergence: (N, K, Cm) M_t curves.
        timesteps: (K,) the grid.
    """
    div = np.asarray(divergence, dtype=np.float64)
    t = np.asarray(timesteps, dtype=np.int64)
    N, K, _ = div.shape
    running = np.maximum.accumulate(div, axis=1)
    # index of the running (first) maximum: the last k where div reached a new strict maximum
    new_max = np.concatenate([np.ones((N, 1, div.shape[2]), bool), div[:, 1:] > running[:, :-1]], axis=1)
    arg = np.maximum.accumulate(np.where(new_max, np.arange(K)[None, :, None], 0), axis=1)
    fallen = div <= (1.0 - drop) * running
    waited = (t[None, :, None] - t[arg]) >= patience
    done = (fallen & waited & (running > 0)).all(axis=2)  # (N, K)
    stop = np.where(done.any(axis=1), done.argmax(axis=1), K - 1)
    return stop.astype(np.int64)


# ------------------------------------------------------------------------------------------------------------- data
def pick_slices(
    labels: np.ndarray, lesion: np.ndarray, brain: np.ndarray, n: int, min_brain: float = 0.15
) -> np.ndarray:
    """A deterministic subset of ``n`` slices (all when ``n`` <= 0): 60 % unhealthy spread evenly over the lesion
    sizes, the rest healthy slices with at least ``min_brain`` brain spread evenly in dataset order."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    ill = np.nonzero(labels == 1)[0]
    ok = np.nonzero((labels == 0) & (brain >= min_brain))[0]
    n_ill = min(len(ill), int(round(0.6 * n)) if len(ok) else n)
    n_ok = min(len(ok), n - n_ill)
    ill = ill[np.argsort(lesion[ill], kind="stable")]
    pick = [ill[i] for i in np.linspace(0, len(ill) - 1, n_ill).round().astype(int)] if n_ill else []
    pick += [ok[i] for i in np.linspace(0, len(ok) - 1, n_ok).round().astype(int)] if n_ok else []
    return np.asarray(sorted(set(int(i) for i in pick)), dtype=np.int64)


def load_split(args: argparse.Namespace, preprocessing: dict[str, Any], split: str) -> tuple[SliceDataset, dict]:
    ds = SliceDataset.from_datalist(
        args.datalist, args.dataset_dir, split, args.cache_dir, preprocessing, progress=False
    )
    gt = Evaluator._ground_truth(ds)
    gt["y"] = gt["label"].reshape(len(ds), -1).any(axis=1).astype(np.int64)
    gt["lesion"] = gt["label"].reshape(len(ds), -1).sum(axis=1)
    gt["brain_frac"] = gt["brain"].reshape(len(ds), -1).mean(axis=1)
    gt["case"] = ds.table["case_id"].astype(str).to_numpy()
    return ds, gt


def images(ds: SliceDataset, idx: np.ndarray) -> torch.Tensor:
    return torch.stack([ds[int(i)]["image"] for i in idx]).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------------------- runs
class Runner:
    """Forward-process runs of one (forward, grid, split), cached as .npz files.

    Every run evaluates all ``--guidance-scales`` candidates at once (the network calls do not depend on w), so the
    runs can start before the calibration file exists; the report takes the calibration's w. The other options are
    the library defaults (the report checks that the calibration was made with them)."""

    def __init__(self, args: argparse.Namespace, net: torch.nn.Module, info: dict[str, Any]) -> None:
        self.args, self.net, self.info = args, net, info
        self.settings = AnoFPDMSettings()
        self.map_channels = [int(c) for c in args.map_channels]
        self.ws = [float(w) for w in args.guidance_scales]
        self.w = float("nan")  # the calibration's w, set by the report
        self.cache = Path(args.output) / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)

    def inferer(self, forward: str, grid: Sequence[int], measure_every: int = 1) -> AnoFPDMInferer:
        return AnoFPDMInferer(
            self.settings.replace(forward=forward, timesteps=tuple(grid), measure_every=measure_every),
            guidance_scale=self.ws[0],
            map_channels=self.map_channels,
            scheduler=self.info["schedule"],
            seed=self.args.seed,
        )

    def key(
        self, forward: str, grid: Sequence[int], split: str, idx: np.ndarray, record: bool, measure_every: int = 1
    ) -> Path:
        base = self.settings.replace(timesteps=(0,)).to_dict()
        base.pop("measure_every", None)  # keys of the runs made before the option existed stay valid
        text = json.dumps(
            [
                self.info["digest"],
                forward,
                list(grid),
                split,
                idx.tolist(),
                self.ws,
                self.map_channels,
                self.args.seed,
                record,
            ]
            + [base]
            + ([measure_every] if measure_every > 1 else [])
        )
        return self.cache / f"{forward}_{split}_{len(grid)}_{hashlib.sha256(text.encode()).hexdigest()[:12]}.npz"

    def run(
        self,
        forward: str,
        grid: Sequence[int],
        split: str,
        x: torch.Tensor,
        idx: np.ndarray,
        record: bool = False,
        compute: bool = True,
        measure_every: int = 1,
    ) -> dict[str, np.ndarray] | None:
        """The statistics of every slice (N first): curves, end indices, map snapshots (test), timing.

        ``record`` (DDPM): one step at a time, keeping every step's S_t (test) and statistics."""
        path = self.key(forward, grid, split, idx, record, measure_every)
        if path.is_file():
            return dict(np.load(path))
        if not compute or split not in self.args.splits:
            return None
        inferer = self.inferer(forward, grid, measure_every)
        need_maps = split == "test"
        parts: list[dict[str, np.ndarray]] = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for start in range(0, len(x), self.args.batch_size):
            xb = x[start : start + self.args.batch_size]
            if record:
                parts.append(record_ddpm(self.net, inferer, xb, need_maps, self.ws))
            else:
                result = inferer.forward_process(xb, self.net, guidance_scales=self.ws, need_maps=need_maps)
                parts.append(arrays_of(result))
            print(f"  {forward} {split} K={len(grid)}: {start + len(xb)}/{len(x)} slices", flush=True)
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "timesteps"}
        out["cpu_s"] = np.float64(time.process_time() - cpu0)
        out["wall_s"] = np.float64(time.perf_counter() - wall0)
        out["timesteps"] = np.asarray(inferer.measured_timesteps)
        out["evals"] = np.float64(inferer.settings.network_evaluations(inferer.schedule.num_train_timesteps))
        np.savez(path, **out)
        return out


@torch.no_grad()
def record_ddpm(
    net: torch.nn.Module,
    inferer: AnoFPDMInferer,
    xb: torch.Tensor,
    need_maps: bool,
    guidance_scales: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """The DDPM forward process on the inferer's grid, one step at a time with one continuing generator (the draws
    of a whole-grid run), keeping every step's statistics and, with ``need_maps``, every step's S_t; for several w
    at once (arrays (B, W, ...), as :func:`arrays_of`)."""
    gen = inferer._generator(xb.device)
    s = inferer.settings
    ws = [inferer.guidance_scale] if guidance_scales is None else list(guidance_scales)
    div, mse_g, mse_r, steps = [], [], [], []
    for t in inferer.timesteps:
        r = run_forward_process(
            net,
            xb,
            inferer.schedule,
            [t],
            ws,
            inferer.map_channels,
            forward="ddpm",
            reference=s.reference,
            divergence=s.divergence,
            clip=s.clip,
            need_maps=need_maps,
            generator=gen,
        )
        div.append(r.divergence[:, :, 0].transpose(0, 1))  # (B, W, Cm)
        mse_g.append(r.mse_guided[:, :, 0].transpose(0, 1))  # (B, W)
        mse_r.append(r.mse_reference[:, 0])
        if need_maps:
            steps.append(r.map_last.transpose(0, 1).half())  # S_t (B, W, Cm, H, W)
    out = {
        "divergence": torch.stack(div, 2).numpy(),  # (B, W, K, Cm)
        "mse_guided": torch.stack(mse_g, 2).numpy(),  # (B, W, K)
        "mse_reference": torch.stack(mse_r, 1).numpy(),  # (B, K)
        "timesteps": np.asarray(inferer.timesteps),
    }
    if need_maps:
        out["step_maps"] = torch.stack(steps, 2).numpy()  # (B, W, K, Cm, H, W) float16
    return out


W_KEYS = ("divergence", "mse_guided", "end_index", "end_index_joint", "map_sum", "map_last", "map_sum_joint")
W_KEYS += ("map_last_joint", "step_maps")


def arrays_of(r: ForwardProcessResult) -> dict[str, np.ndarray]:
    """The arrays of a streamed result, slices first: (B, W, ...) for the w-dependent ones."""
    out = {"mse_reference": r.mse_reference.numpy(), "timesteps": r.timesteps.numpy()}
    for k in W_KEYS:
        v = getattr(r, k, None)
        if v is not None:
            out[k] = v.transpose(0, 1).numpy()
    return out


def select_w(a: dict[str, np.ndarray], w_index: int) -> dict[str, np.ndarray]:
    """The arrays of one guidance scale (the W axis removed)."""
    return {k: (v[:, w_index] if k in W_KEYS else v) for k, v in a.items()}


def result_for(
    a: dict[str, np.ndarray], sel: np.ndarray | None = None, stop: np.ndarray | None = None, w: float = 0.0
) -> tuple[ForwardProcessResult, int]:
    """A :class:`ForwardProcessResult` for the grid ``sel`` (indices into the run's grid; None: all of it), every
    slice ending at its grid index ``stop`` (None: the last). Curves after a slice's stop are zero, so the cosine is
    that of the prefix and the argmax stays inside it.

    Returns:
        the result and the number of slices whose prefix map is not exact (DDIM runs, argmax moved).
    """
    K0 = a["divergence"].shape[1]
    sel = np.arange(K0) if sel is None else np.asarray(sel)
    div = torch.from_numpy(a["divergence"][:, sel]).float()
    mse_g = torch.from_numpy(a["mse_guided"][:, sel]).float()
    mse_r = torch.from_numpy(a["mse_reference"][:, sel]).float()
    N, K, Cm = div.shape
    stop_t = torch.full((N,), K - 1) if stop is None else torch.from_numpy(np.asarray(stop))
    alive = torch.arange(K)[None, :] <= stop_t[:, None]  # (N, K)
    div = div * alive[..., None]
    mse_g, mse_r = mse_g * alive, mse_r * alive
    end = div.argmax(dim=1)  # first maximum: (N, Cm)
    end_j = div.mean(dim=-1).argmax(dim=1)  # (N,)
    inexact = 0
    maps: dict[str, torch.Tensor | None] = dict.fromkeys(("map_sum", "map_last", "map_sum_joint", "map_last_joint"))
    if "step_maps" in a:  # recorded steps (DDPM): exact maps of any grid and prefix
        s = torch.from_numpy(a["step_maps"][:, sel]).float()  # (N, K, Cm, H, W)
        cs = s.cumsum(dim=1)

        def gather(src: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            picked = [src[n, k[n, m], m] for n in range(N) for m in range(Cm)]
            return torch.stack(picked).reshape(N, Cm, *s.shape[-2:])

        maps["map_sum"], maps["map_last"] = gather(cs, end), gather(s, end)
        end_jm = end_j[:, None].expand(N, Cm)
        maps["map_sum_joint"], maps["map_last_joint"] = gather(cs, end_jm), gather(s, end_jm)
    elif "map_sum" in a:  # streamed snapshots of a full run: exact while the argmax did not move
        if sel is not None and len(sel) != K0:
            raise ValueError("a streamed run cannot be sub-sampled")
        full_end = torch.from_numpy(a["end_index"])
        full_end_j = torch.from_numpy(a["end_index_joint"])
        inexact = int(((end != full_end).any(dim=1) | (end_j != full_end_j)).sum())
        for k in maps:
            maps[k] = torch.from_numpy(a[k]).float()
    res = ForwardProcessResult(
        timesteps=torch.from_numpy(a["timesteps"][sel]),
        guidance_scales=torch.tensor([w]),
        divergence=div[None],
        mse_guided=mse_g[None],
        mse_reference=mse_r,
        end_index=end[None],
        end_index_joint=end_j[None],
        **{k: (None if v is None else v[None]) for k, v in maps.items()},
    )
    return res, inexact


# ------------------------------------------------------------------------------------------------------- evaluation
def calibrate(res: ForwardProcessResult, labels: np.ndarray, w: float, health: str = "cosine") -> dict[str, Any]:
    """M_max and tau of this grid from the validation statistics, w fixed (one candidate); ``health`` is the
    settings' health score (the cosine of the MSE curves by default)."""
    if health == "cosine":
        score = res.cosine()
    else:  # other health scores, where the library has them
        from anofpdm_monai.inferers.health import health_score

        score = health_score(res, health)
    names = {f.name for f in dataclasses.fields(CalibrationStatistics)}
    stats = CalibrationStatistics(
        guidance_scales=np.asarray([w]),
        divergence_max=res.divergence_max("per_modality").numpy(),
        divergence_max_joint=res.divergence_max("joint")[..., 0].numpy(),
        labels=labels,
        **{"score" if "score" in names else "cosine": score.numpy()},
    )
    return calibrate_from_statistics(stats)


def evaluate(
    runner: Runner,
    forward: str,
    res_val: ForwardProcessResult,
    res_test: ForwardProcessResult,
    gt_val: dict,
    gt_test: dict,
    vidx: np.ndarray,
    tidx: np.ndarray,
) -> dict[str, Any]:
    health = getattr(runner.settings, "health_score", "cosine")
    cal = calibrate(res_val, gt_val["y"][vidx], runner.w, health)
    grid = res_test.timesteps.tolist()
    inferer = AnoFPDMInferer(
        runner.settings.replace(forward=forward, timesteps=tuple(grid)),
        guidance_scale=runner.w,
        map_channels=runner.map_channels,
        m_max=cal["m_max"] if runner.settings.end_step == "per_modality" else [cal["m_max_joint"]],
        tau=cal["tau"],
        scheduler=runner.info["schedule"],
    )
    out = inferer.postprocess(res_test)
    m = segmentation_metrics(
        out.mask.numpy(),
        out.mask_ungated.numpy(),
        gt_test["label"][tidx],
        out.filtered_map.numpy(),
        gt_test["brain"][tidx],
        gt_test["y"][tidx],
        gt_test["case"][tidx],
        cosine=out.cosine.numpy(),
        y_pred=out.pred_label.numpy(),
    )
    return {"metrics": m, "out": out, "calibration": cal}


# ------------------------------------------------------------------------------------------------ paired bootstrap
# Our own resampler rather than scipy.stats.bootstrap: the replicates are stratified by volume (3D Dice needs every
# volume in every replicate) and the pooled AUPRC is recomputed from one pre-sorted pixel list by weights, not by
# sorting again per replicate.
BOOT_METRICS = ("unhealthy_dice", "volume_dice", "pooled_auprc")


class SliceParts:
    """What the three bootstrapped metrics need of one grid's test masks and maps, per slice: the ungated Dice, the
    gated overlap counts and the brain pixels sorted by map value (for a weighted average precision)."""

    def __init__(self, out: Any, gt: dict[str, np.ndarray], tidx: np.ndarray) -> None:
        label = gt["label"][tidx].astype(bool)
        self.unhealthy = gt["y"][tidx] == 1
        self.dice = dice_per_slice(out.mask_ungated.numpy(), label)
        self.inter, self.n_pred, self.n_gt = (c.astype(np.float64) for c in _overlap_counts(out.mask.numpy(), label))
        _, self.volume = np.unique(gt["case"][tidx], return_inverse=True)
        brain = gt["brain"][tidx].astype(bool)
        scores = out.filtered_map.numpy().astype(np.float64)[brain]
        order = np.argsort(-scores, kind="stable")
        self.pixel_slice = np.nonzero(brain)[0][order]
        self.pixel_y = label[brain][order].astype(np.float64)
        ranked = scores[order]
        self.last = np.r_[np.nonzero(np.diff(ranked))[0], len(ranked) - 1]  # the end of each tied score group

    def metrics(self, c: np.ndarray) -> dict[str, float]:
        """The three metrics with slice i counted ``c[i]`` times (all ones: the plain values)."""
        u = c * self.unhealthy
        nv = self.volume.max() + 1
        inter, n_pred, n_gt = (np.bincount(self.volume, c * v, nv) for v in (self.inter, self.n_pred, self.n_gt))
        w = c[self.pixel_slice]
        tp, fp = np.cumsum(w * self.pixel_y)[self.last], np.cumsum(w * (1.0 - self.pixel_y))[self.last]
        precision = tp / np.maximum(tp + fp, 1e-300)
        recall_step = np.diff(np.r_[0.0, tp]) / max(tp[-1], 1e-300)
        return {
            "unhealthy_dice": float((u * self.dice).sum() / u.sum()),
            "volume_dice": float(np.mean(_dice_from_counts(inter, n_pred, n_gt, DEFAULT_SMOOTH))),
            "pooled_auprc": float((recall_step * precision).sum()),
        }


def bootstrap_weights(volume: np.ndarray, reps: int, seed: int = 0) -> np.ndarray:
    """(reps, N) slice counts: each replicate redraws the slices of every volume with replacement, within it."""
    rng = np.random.default_rng(seed)
    out = np.zeros((reps, len(volume)))
    for v in np.unique(volume):
        idx = np.nonzero(volume == v)[0]
        out[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=reps)
    return out


def paired_intervals(
    parts: SliceParts, ref: SliceParts, weights: np.ndarray, ref_values: list[dict[str, float]] | None = None
) -> dict[str, tuple[float, float]]:
    """The 95 % percentile intervals of (this grid - stride 1) for :data:`BOOT_METRICS` over the same replicates."""
    ref_values = ref_values or [ref.metrics(c) for c in weights]
    diffs = {k: [] for k in BOOT_METRICS}
    for c, r in zip(weights, ref_values):
        m = parts.metrics(c)
        for k in BOOT_METRICS:
            diffs[k].append(m[k] - r[k])
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in diffs.items()}


def pearson(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)).numpy()


# ------------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--datalist", type=Path, required=True)
    parser.add_argument("--dataset-dir", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, required=True, help="slice cache (built here when missing)")
    parser.add_argument("--calibration", type=Path, default=None, help="its w is used (needed for the report)")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=list(DEFAULT_GUIDANCE_CANDIDATES))
    parser.add_argument("--map-channels", type=int, nargs="+", default=[0])
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "grid")
    parser.add_argument("--forwards", nargs="+", default=list(FORWARD_MODES), choices=FORWARD_MODES)
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 2, 5, 10, 20, 30])
    parser.add_argument("--t-max", type=int, default=AnoFPDMSettings().t_max, help="last step of every grid")
    parser.add_argument(
        "--dense",
        type=int,
        nargs=2,
        action="append",
        default=None,
        metavar=("DENSE", "SPARSE"),
        help="non-uniform grid strides inside/outside the dense range (repeatable; default 10 50 and 20 60)",
    )
    parser.add_argument(
        "--early-exit",
        type=float,
        nargs=2,
        action="append",
        default=None,
        metavar=("DROP", "PATIENCE"),
        help="early-exit rule (repeatable; default 0.5 50 and 0.3 100)",
    )
    parser.add_argument(
        "--measure",
        type=int,
        nargs=2,
        action="append",
        default=[],
        metavar=("STRIDE", "EVERY"),
        help="DDIM: the inversion at STRIDE, the statistics measured at every EVERY-th step (repeatable; run name "
        "ddim:m<STRIDE>/<EVERY>)",
    )
    parser.add_argument(
        "--range-grid",
        type=int,
        nargs=4,
        action="append",
        default=[],
        metavar=("LO", "HI", "DENSE", "SPARSE"),
        help="a non-uniform grid with a fixed dense range LO..HI (repeatable; run name "
        "ddim:r<LO>-<HI>/<DENSE>/<SPARSE>)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap replicates (0: none)")
    parser.add_argument("--brain-skip", type=float, nargs="+", default=[0.02, 0.05, 0.10], help="brain-area fractions")
    parser.add_argument("--val-slices", type=int, default=0, help="validation subset size (0: all)")
    parser.add_argument("--test-slices", type=int, default=0, help="test subset size (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument(
        "--run",
        nargs="+",
        default=None,
        help="only make these runs: ddim:<stride>, ddim:nu, ddpm (report reads the cache)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["validation", "test"],
        choices=["validation", "test"],
        help="with --run: compute only these splits (two processes can share one grid)",
    )
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dense_specs = [tuple(int(v) for v in d) for d in (args.dense or [(10, 50), (20, 60)])]
    exit_specs = [(float(d), int(p)) for d, p in (args.early_exit or [(0.5, 50), (0.3, 100)])]

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    net, info = load_network(args.checkpoint, use_ema=not args.no_ema)
    net.eval()
    runner = Runner(args, net, info)
    t_max = args.t_max
    val, gt_val = load_split(args, info["preprocessing"], "validation")
    test, gt_test = load_split(args, info["preprocessing"], "test")
    vidx = pick_slices(gt_val["y"], gt_val["lesion"], gt_val["brain_frac"], args.val_slices)
    tidx = pick_slices(gt_test["y"], gt_test["lesion"], gt_test["brain_frac"], args.test_slices)
    x_val, x_test = images(val, vidx), images(test, tidx)
    print(
        f"model {info['digest']} ({info['network']['channels']}, {x_test.shape[-1]} px), w candidates {runner.ws}, "
        f"grid 0..{t_max}; validation {len(vidx)} of {len(val)} slices "
        f"({int(gt_val['y'][vidx].sum())} unhealthy), test {len(tidx)} of {len(test)} slices "
        f"({int(gt_test['y'][tidx].sum())} unhealthy, {len(set(gt_test['case'][tidx]))} cases)",
        flush=True,
    )
    wanted = set(args.run) if args.run else None

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    strides = sorted(set([1, *args.strides]))
    runs: dict[tuple[str, str], dict[str, Any]] = {}  # (forward, row name) -> val/test arrays, selection, grid
    for forward in args.forwards:
        if forward == "ddpm":
            full = uniform_grid(t_max, 1)
            rec = {
                s: runner.run("ddpm", full, s, xs, ix, record=True, compute=want("ddpm"))
                for s, xs, ix in (("validation", x_val, vidx), ("test", x_test, tidx))
            }
            if rec["validation"] is None or rec["test"] is None:
                continue
            for st in strides:
                runs[(forward, f"stride {st}")] = {
                    "val": rec["validation"],
                    "test": rec["test"],
                    "sel": np.arange(0, len(full), st),
                }
            te = np.asarray(full)[rec["validation"]["divergence"].argmax(axis=2)]  # every slice, w and modality
            lo_hi = dense_range(te, t_max)
            for d, s in dense_specs:
                g = nonuniform_grid(t_max, lo_hi, d, s)
                runs[(forward, f"dense {d} in {lo_hi[0]}..{lo_hi[1]}, {s} outside")] = {
                    "val": rec["validation"],
                    "test": rec["test"],
                    "sel": np.asarray(g),
                }
            continue
        for st in strides:
            g = uniform_grid(t_max, st)
            pair = [
                runner.run(forward, g, s, xs, ix, compute=want(f"{forward}:{st}"))
                for s, xs, ix in (("validation", x_val, vidx), ("test", x_test, tidx))
            ]
            if all(p is not None for p in pair):
                runs[(forward, f"stride {st}")] = {"val": pair[0], "test": pair[1], "sel": None}
        for st, every in args.measure:
            g = uniform_grid(t_max, st)
            pair = [
                runner.run(forward, g, s, xs, ix, compute=want(f"{forward}:m{st}/{every}"), measure_every=every)
                for s, xs, ix in (("validation", x_val, vidx), ("test", x_test, tidx))
            ]
            if all(p is not None for p in pair):
                runs[(forward, f"stride {st}, measured every {every}")] = {"val": pair[0], "test": pair[1], "sel": None}
        for lo, hi, d, sp in args.range_grid:
            g = nonuniform_grid(t_max, (lo, hi), d, sp)
            pair = [
                runner.run(forward, g, s, xs, ix, compute=want(f"{forward}:r{lo}-{hi}/{d}/{sp}"))
                for s, xs, ix in (("validation", x_val, vidx), ("test", x_test, tidx))
            ]
            if all(p is not None for p in pair):
                runs[(forward, f"{d} in {lo}..{hi}, {sp} outside")] = {"val": pair[0], "test": pair[1], "sel": None}
        # the dense range needs only the validation run at stride 1 (another process may still run its test half)
        ref_val = runner.run(forward, uniform_grid(t_max, 1), "validation", x_val, vidx, compute=want(f"{forward}:1"))
        if ref_val is None:
            continue
        te = np.asarray(ref_val["timesteps"])[ref_val["divergence"].argmax(axis=2)]  # every slice, w and modality
        lo_hi = dense_range(te, t_max)
        for d, s in dense_specs:
            g = nonuniform_grid(t_max, lo_hi, d, s)
            pair = [
                runner.run(forward, g, s_, xs, ix, compute=want(f"{forward}:nu"))
                for s_, xs, ix in (("validation", x_val, vidx), ("test", x_test, tidx))
            ]
            if all(p is not None for p in pair):
                runs[(forward, f"dense {d} in {lo_hi[0]}..{lo_hi[1]}, {s} outside")] = {
                    "val": pair[0],
                    "test": pair[1],
                    "sel": None,
                }
    if args.no_report:
        return 0
    if args.calibration is None:
        parser.error("the report needs --calibration (its w)")
    cal = Calibration.load(args.calibration)
    diff = runner.settings.differences(
        cal.settings, [f for f in CALIBRATED_FIELDS if f not in ("timesteps", "forward")]
    )
    if diff or cal.map_channels != runner.map_channels or float(cal.guidance_scale) not in runner.ws:
        parser.error(
            f"{args.calibration} does not fit these runs: {diff}, map channels {cal.map_channels}, "
            f"w {cal.guidance_scale}"
        )
    runner.w = float(cal.guidance_scale)
    runner.settings = cal.settings  # its post-processing (median kernel, component size scaled to the resolution)
    wi = runner.ws.index(runner.w)
    runs = {k: {**v, "val": select_w(v["val"], wi), "test": select_w(v["test"], wi)} for k, v in runs.items()}
    print(f"w = {runner.w:g} from {args.calibration}", flush=True)
    report(args, runner, runs, gt_val, gt_test, vidx, tidx, exit_specs, t_max)
    return 0


def report(args, runner, runs, gt_val, gt_test, vidx, tidx, exit_specs, t_max) -> None:  # noqa: ANN001
    rows: list[dict[str, Any]] = []
    for forward in args.forwards:
        names = [name for (f, name) in runs if f == forward]
        if "stride 1" not in names:
            print(f"{forward}: no stride-1 run in the cache; skipped")
            continue
        ref = None
        variants: list[tuple[str, dict[str, Any], list[tuple[float, int]] | None]] = [
            (n, runs[(forward, n)], None) for n in names
        ]
        # early exit on stride 1 and on the coarser uniform grids
        for n in names:
            if n.startswith("stride") and "measured" not in n and int(n.split()[1]) in (1, 10, 20):
                for spec in exit_specs:
                    variants.append(
                        (f"{n} + early exit (drop {spec[0]:g}, patience {spec[1]})", runs[(forward, n)], [spec])
                    )
        for name, run, exit_spec in variants:
            rv, sv = result_for(run["val"], run["sel"], w=runner.w)
            rt, st = result_for(run["test"], run["sel"], w=runner.w)
            grid = rt.timesteps.numpy()
            inexact = 0
            own = run["sel"] is None and "evals" in run["test"]  # a run of its own grid knows its cost
            evals = float(run["test"]["evals"]) if own else 2.0 * len(grid)
            if exit_spec:
                drop, patience = exit_spec[0]
                stop_v = early_exit_stop(rv.divergence[0].numpy(), grid, drop, patience)
                stop_t = early_exit_stop(rt.divergence[0].numpy(), grid, drop, patience)
                rv, _ = result_for(run["val"], run["sel"], stop_v, w=runner.w)
                rt, inexact = result_for(run["test"], run["sel"], stop_t, w=runner.w)
                evals = 2.0 * float(np.mean(stop_t + 1))
            ev = evaluate(runner, forward, rv, rt, gt_val, gt_test, vidx, tidx)
            cpu = float(run["test"]["cpu_s"]) * (len(grid) / run["test"]["divergence"].shape[1])
            row = {
                "forward": forward,
                "grid": name,
                "steps": len(grid),
                "evals": evals,
                "slices_per_cpu_s": len(tidx) / cpu * (2.0 * len(grid) / evals),
                "inexact": inexact,
                **{
                    k: ev["metrics"][k]
                    for k in ("unhealthy_dice", "mixed_dice", "pooled_auprc", "volume_dice", "accuracy")
                },
                "m_max": ev["calibration"]["m_max"],
                "tau": ev["calibration"]["tau"],
                "_out": ev["out"],
            }
            if name == "stride 1":
                ref = row
            rows.append(row)
        for row in rows:
            if row["forward"] != forward:
                continue
            o, r = row["_out"], ref["_out"]
            te, te_ref = o.end_step.double(), r.end_step.double()
            row["dte"] = float((te - te_ref).abs().mean())
            row["te_within_20"] = float(((te - te_ref).abs() <= 20).all(dim=1).double().mean())
            row["map_r"] = float(np.mean(pearson(o.anomaly_map, r.anomaly_map)))
            both = r.mask_ungated.flatten(1).any(1) | o.mask_ungated.flatten(1).any(1)
            row["mask_dice_vs_s1"] = (
                float(dice_per_slice(o.mask_ungated[both], r.mask_ungated[both]).mean()) if bool(both.any()) else 1.0
            )
            for k in ("unhealthy_dice", "mixed_dice", "pooled_auprc", "accuracy"):
                row[f"d_{k}"] = row[k] - ref[k]
            row["within_1pt"] = all(
                abs(row[f"d_{k}"]) <= POINT for k in ("unhealthy_dice", "mixed_dice", "pooled_auprc")
            )
        if args.bootstrap > 0:  # paired, stratified by volume: the same replicates for every grid
            ref_parts = SliceParts(ref["_out"], gt_test, tidx)
            plain = ref_parts.metrics(np.ones(len(tidx)))
            for k in BOOT_METRICS:  # the resampler's metrics are the library's
                if not math.isclose(plain[k], ref[k], rel_tol=1e-9, abs_tol=1e-12):
                    raise AssertionError(f"bootstrap {k} {plain[k]} differs from the library's {ref[k]}")
            weights = bootstrap_weights(ref_parts.volume, args.bootstrap, args.seed)
            ref_values = [ref_parts.metrics(c) for c in weights]
            for row in rows:
                if row["forward"] == forward:
                    parts = SliceParts(row["_out"], gt_test, tidx)
                    row["ci"] = paired_intervals(parts, ref_parts, weights, ref_values)
                    row["ci_within_1pt"] = all(lo >= -POINT and hi <= POINT for lo, hi in row["ci"].values())
                    row["ci_not_worse"] = all(lo >= -POINT for lo, _ in row["ci"].values())
    hdr = (
        "| forward | grid | steps | evals/slice | slices/CPU-s | unhealthy Dice | mixed Dice | pooled AUPRC | "
        "slice acc | mean abs dt_e | t_e within 20 | map r | mask Dice vs s1 | within 1 pt |"
    )
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]

    def cell(r: dict[str, Any], k: str) -> str:
        return f"{r[k]:.3f} ({r['d_' + k]:+.3f})"

    for r in rows:
        note = f" [{r['inexact']} slices approx.]" if r["inexact"] else ""
        lines.append(
            f"| {r['forward']} | {r['grid']}{note} | {r['steps']} | {r['evals']:.0f} | {r['slices_per_cpu_s']:.3f} | "
            f"{cell(r, 'unhealthy_dice')} | {cell(r, 'mixed_dice')} | {cell(r, 'pooled_auprc')} | "
            f"{cell(r, 'accuracy')} | {r['dte']:.1f} | {r['te_within_20']:.0%} | {r['map_r']:.3f} | "
            f"{r['mask_dice_vs_s1']:.3f} | {'yes' if r['within_1pt'] else 'no'} |"
        )
    if any("ci" in r for r in rows):
        head = (
            "| forward | grid | evals/slice | tumour-slice Dice | 3D Dice | pooled AUPRC | paired bootstrap 95% CI of "
            f"the difference to stride 1 (points; {args.bootstrap} replicates, slices redrawn within each volume): "
            "tumour-slice Dice / 3D Dice / pooled AUPRC | CI within 1 pt | CI not below -1 pt |"
        )
        boot = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            if "ci" not in r:
                continue
            ci = " / ".join(f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" for lo, hi in (r["ci"][k] for k in BOOT_METRICS))
            boot.append(
                f"| {r['forward']} | {r['grid']} | {r['evals']:.0f} | {100 * r['unhealthy_dice']:.1f} | "
                f"{100 * r['volume_dice']:.1f} | {100 * r['pooled_auprc']:.1f} | {ci} | "
                f"{'yes' if r['ci_within_1pt'] else 'no'} | {'yes' if r['ci_not_worse'] else 'no'} |"
            )
        lines += ["", *boot]
    print()
    print("\n".join(lines))
    for forward in args.forwards:
        ok = [r for r in rows if r["forward"] == forward and r["within_1pt"]]
        if ok:
            best = min(ok, key=lambda r: r["evals"])
            print(
                f"{forward}: cheapest grid within 1 point of stride 1 on unhealthy/mixed Dice and pooled AUPRC: "
                f"{best['grid']} ({best['evals']:.0f} evaluations per slice)"
            )
        for key, what in (("ci_within_1pt", "whose intervals all lie within"), ("ci_not_worse", "not worse by")):
            ok = [r for r in rows if r["forward"] == forward and r.get(key)]
            if ok:
                best = min(ok, key=lambda r: r["evals"])
                print(
                    f"{forward}: cheapest grid {what} 1 point of stride 1 (bootstrap, tumour-slice Dice, 3D Dice, "
                    f"pooled AUPRC): {best['grid']} ({best['evals']:.0f} evaluations per slice)"
                )
    # skipping slices with little brain: on every test slice, from the cache (no network)
    print()
    n = len(gt_test["y"])
    lesion_total = max(1, int(gt_test["lesion"].sum()))
    for frac in args.brain_skip:
        skip = gt_test["brain_frac"] < frac
        print(
            f"skip brain < {frac:.0%} of the slice: {int(skip.sum())} of {n} test slices ({skip.mean():.1%}) skipped, "
            f"{int((skip & (gt_test['y'] == 1)).sum())} of them unhealthy, holding "
            f"{gt_test['lesion'][skip].sum() / lesion_total:.2%} of the lesion pixels; network evaluations x "
            f"{1 - skip.mean():.3f}"
        )
    payload = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    (Path(args.output) / "bench_grid.json").write_text(
        json.dumps({"command": sys.argv, "rows": payload}, indent=1, default=float)
    )
    (Path(args.output) / "bench_grid.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
