# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""Evaluation metrics for weakly-supervised anomaly segmentation under the AnoFPDM protocol.

Two families of metrics live here:

* the papers' protocol, reproduced so that numbers compare with published ones: per-slice Dice
  and IoU with a ``1e-6`` smoothing term averaged over slices ("mixed" and "unhealthy" settings),
  and the pixel AUPRC averaged over random batches of slices (:func:`batched_auprc`);
* principled complements: the pooled pixel AUPRC over every brain pixel of the test set
  (:class:`PooledAUPRC`, :func:`pooled_auprc`) and the per-volume 3D Dice (:func:`volume_dice`).

The accumulating metrics are also MONAI ``CumulativeIterationMetric`` s, for ``monai.handlers.IgniteMetricHandler``
and MONAI evaluators: :class:`SliceDiceMetric`, :class:`SliceIoUMetric`, :class:`PooledAUPRC`,
:class:`BatchedAUPRCMetric` and :class:`VolumeDiceMetric`. Called as ``metric(y_pred, y)`` (batch-first tensors or
lists of channel-first ones, e.g. decollated items), the AUPRC metrics take the anomaly map as ``y_pred`` (one
channel) and the ground truth as channel 0 of ``y``; the brain mask, when the AUPRC is restricted to brain pixels,
travels as channel 1 of ``y`` (``y = cat([label, brain], dim=channel)``, e.g. with MONAI's ``ConcatItemsd``), since
MONAI metrics only receive ``(y_pred, y)``. Zeroing the map outside the brain would not do: those pixels would still
count as negatives.

Conventions:
    * Inputs are numpy arrays or torch tensors (any device, any dtype); they are converted to
      numpy. The first axis indexes slices: masks ``pred``/``gt``, anomaly maps ``maps`` and brain
      masks ``brain`` have shape ``(N, H, W)`` (any trailing shape is accepted and flattened per
      slice, e.g. ``(N, 1, H, W)``).
    * Binary masks are bool or 0/1 valued; anything else is rejected.
    * Slice labels ``y`` are 0 (healthy) or 1 (unhealthy); the cosine score ``c`` is LOW for
      unhealthy slices.

See ``docs/metrics.md`` for definitions and the differences with the official AnoFPDM code.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.metrics import CumulativeIterationMetric
from monai.utils import convert_to_numpy, evenly_divisible_all_gather
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

__all__ = [
    "DEFAULT_SMOOTH",
    "dice_per_slice",
    "pooled_dice",
    "iou_per_slice",
    "precision_recall_per_slice",
    "SliceDiceMetric",
    "SliceIoUMetric",
    "batched_auprc",
    "BatchedAUPRCMetric",
    "PooledAUPRC",
    "pooled_auprc",
    "volume_dice",
    "VolumeDiceMetric",
    "classification_metrics",
    "segmentation_metrics",
    "aggregate_over_seeds",
]

#: Smoothing term of the protocol's Dice and IoU (official code value).
DEFAULT_SMOOTH = 1e-6


# --------------------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------------------
def _to_numpy(x: NdarrayOrTensor | Sequence, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor (any device/dtype) or sequence to a numpy array."""
    if x is None:
        raise ValueError(f"`{name}` is required, got None")
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            x = x.float()
    return np.asarray(convert_to_numpy(x))


def _as_slices(x: NdarrayOrTensor, name: str) -> np.ndarray:
    """Return ``x`` as a ``(N, P)`` array (slices x flattened pixels)."""
    arr = _to_numpy(x, name)
    if arr.ndim < 2:
        raise ValueError(f"`{name}` must have shape (N, H, W) (slices first), got shape {arr.shape}")
    return arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:])))  # not -1: an empty selection (0, H, W) too


def _as_mask(x: NdarrayOrTensor, name: str) -> np.ndarray:
    """Return a binary mask as a bool ``(N, P)`` array; reject non-binary values."""
    arr = _as_slices(x, name)
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"`{name}` must be a binary mask (bool or 0/1 values)")
        arr = arr.astype(bool)
    return arr


def _as_scores(x: NdarrayOrTensor, name: str) -> np.ndarray:
    """Return an anomaly map as a finite float ``(N, P)`` array."""
    arr = _as_slices(x, name)
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        raise ValueError(f"`{name}` must be numeric, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` contains NaN or Inf values")
    return arr


def _as_labels(x: NdarrayOrTensor | Sequence, name: str, n: int | None = None) -> np.ndarray:
    """Return slice labels as an int ``(N,)`` array of 0/1."""
    arr = _to_numpy(x, name).reshape(-1)
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"`{name}` must hold slice labels 0 (healthy) or 1 (unhealthy)")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"`{name}` must have one entry per slice ({n}), got {arr.shape[0]}")
    return arr.astype(np.int64)


def _check_same_shape(**arrays: np.ndarray) -> None:
    """Raise a ValueError naming the arrays when their shapes differ."""
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {', '.join(f'{k} {s}' for k, s in shapes.items())}")


def _overlap_counts(pred: NdarrayOrTensor, gt: NdarrayOrTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice ``|P & G|``, ``|P|``, ``|G|`` as int64 arrays of shape ``(N,)``."""
    p = _as_mask(pred, "pred")
    g = _as_mask(gt, "gt")
    _check_same_shape(pred=p, gt=g)
    return np.logical_and(p, g).sum(axis=1), p.sum(axis=1), g.sum(axis=1)


def _dice_from_counts(inter: np.ndarray, n_pred: np.ndarray, n_gt: np.ndarray, smooth: float) -> np.ndarray:
    """The smoothed Dice ``(2|P & G| + s) / (|P| + |G| + s)`` of overlap counts, elementwise."""
    return (2.0 * inter + smooth) / (n_pred + n_gt + smooth)


def _pooled_dice_from_counts(inter: np.ndarray, n_pred: np.ndarray, n_gt: np.ndarray) -> float:
    """One unsmoothed Dice over all counts, ``2 sum|P & G| / (sum|P| + sum|G|)``; 1 when both are empty."""
    total = float(n_pred.sum()) + float(n_gt.sum())
    return 2.0 * float(inter.sum()) / total if total > 0 else 1.0


def _safe_mean(x: np.ndarray) -> float:
    """Mean of ``x``, NaN (without a warning) when ``x`` is empty."""
    return float(np.mean(x)) if x.size else math.nan


# --------------------------------------------------------------------------------------------------
# per-slice overlap metrics
# --------------------------------------------------------------------------------------------------
# Written here rather than with MONAI's DiceMetric/compute_iou: the protocol's smoothed formula
# (empty vs empty = 1, no one-hot channels) is three numpy lines and must match the papers exactly.
def dice_per_slice(pred: NdarrayOrTensor, gt: NdarrayOrTensor, smooth: float = DEFAULT_SMOOTH) -> np.ndarray:
    """Per-slice Dice coefficient ``(2|P & G| + s) / (|P| + |G| + s)``.

    With the protocol's ``s = 1e-6``, an empty prediction on an empty ground truth scores 1 and
    any false positive on a healthy slice scores about 0.

    Args:
        pred: predicted binary masks, shape ``(N, H, W)``.
        gt: ground-truth binary masks, same shape.
        smooth: smoothing term ``s`` added to numerator and denominator.

    Returns:
        Float64 array of shape ``(N,)``; average it for the protocol's mean Dice.

    Raises:
        ValueError: on mismatched shapes or non-binary masks.
    """
    return _dice_from_counts(*_overlap_counts(pred, gt), smooth)


def pooled_dice(pred: NdarrayOrTensor, gt: NdarrayOrTensor) -> float:
    """One Dice over all pixels of all given slices, ``2 sum|P & G| / (sum|P| + sum|G|)``, without smoothing: 1 when
    both are empty, and exactly 0 for an empty prediction of a non-empty truth (the pixel-label tuning objective)."""
    return _pooled_dice_from_counts(*_overlap_counts(pred, gt))


def iou_per_slice(pred: NdarrayOrTensor, gt: NdarrayOrTensor, smooth: float = DEFAULT_SMOOTH) -> np.ndarray:
    """Per-slice intersection over union ``(|P & G| + s) / (|P | G| + s)``.

    Args:
        pred: predicted binary masks, shape ``(N, H, W)``.
        gt: ground-truth binary masks, same shape.
        smooth: smoothing term ``s`` added to numerator and denominator.

    Returns:
        Float64 array of shape ``(N,)``.

    Raises:
        ValueError: on mismatched shapes or non-binary masks.
    """
    inter, n_pred, n_gt = _overlap_counts(pred, gt)
    return (inter + smooth) / (n_pred + n_gt - inter + smooth)


def precision_recall_per_slice(pred: NdarrayOrTensor, gt: NdarrayOrTensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice pixel precision ``|P & G| / |P|`` and recall ``|P & G| / |G|``.

    These are the textbook definitions (the official code's ``precision`` and ``recall`` are
    swapped, see ``docs/metrics.md``). No smoothing term is used.

    Args:
        pred: predicted binary masks, shape ``(N, H, W)``.
        gt: ground-truth binary masks, same shape.

    Returns:
        ``(precision, recall)``, two float64 arrays of shape ``(N,)``; precision is NaN where the
        prediction is empty and recall is NaN where the ground truth is empty.

    Raises:
        ValueError: on mismatched shapes or non-binary masks.
    """
    inter, n_pred, n_gt = _overlap_counts(pred, gt)
    inter = inter.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_pred > 0, inter / n_pred, np.nan)
        recall = np.where(n_gt > 0, inter / n_gt, np.nan)
    return precision, recall


# --------------------------------------------------------------------------------------------------
# pixel-level AUPRC
# --------------------------------------------------------------------------------------------------
class _SliceOverlapMetric(CumulativeIterationMetric):
    """MONAI ``CumulativeIterationMetric`` of a per-slice overlap score, so the protocol's metrics drop into MONAI
    evaluators (``IgniteMetricHandler``, ``MetricsSaver``): each call takes a batch of binary masks ``y_pred`` and
    ``y`` of shape ``(B, ...)`` (one slice per item), buffers the per-slice scores, and :meth:`aggregate` returns
    their mean (``reduction="mean"``) or all of them (``"none"``)."""

    score = staticmethod(dice_per_slice)

    def __init__(self, reduction: str = "mean", smooth: float = DEFAULT_SMOOTH) -> None:
        super().__init__()
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.smooth = smooth

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("the ground truth y is required")
        values = self.score(y_pred, y, smooth=self.smooth)
        return torch.as_tensor(values, dtype=torch.float64)[:, None]

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the metric buffer holds no tensor: call the metric on data first")
        values = data.reshape(-1)
        return values.mean() if self.reduction == "mean" else values


class SliceDiceMetric(_SliceOverlapMetric):
    """The protocol's per-slice Dice (:func:`dice_per_slice`) as a MONAI cumulative metric."""

    score = staticmethod(dice_per_slice)


class SliceIoUMetric(_SliceOverlapMetric):
    """The protocol's per-slice IoU (:func:`iou_per_slice`) as a MONAI cumulative metric."""

    score = staticmethod(iou_per_slice)


def _brain_or_all(brain: NdarrayOrTensor | None, like: np.ndarray) -> np.ndarray:
    """Brain mask as bool ``(N, P)``; all pixels when ``brain`` is None."""
    if brain is None:
        return np.ones(like.shape, dtype=bool)
    b = _as_mask(brain, "brain")
    _check_same_shape(maps=like, brain=b)
    return b


def batched_auprc(
    maps: NdarrayOrTensor,
    gt: NdarrayOrTensor,
    brain: NdarrayOrTensor | None = None,
    batch_size: int = 100,
    seed: int = 0,
    weights: NdarrayOrTensor | Sequence[float] | None = None,
) -> float:
    """Pixel AUPRC averaged over random batches of slices: the official AnoFPDM protocol.

    The slices are shuffled with a seeded permutation and split into consecutive batches of
    ``batch_size`` slices. For each batch, ``sklearn.metrics.average_precision_score`` is computed
    over the brain pixels of its slices; the batch values are then averaged. A batch without any
    positive brain pixel is skipped (its AP is undefined).

    ``weights`` reproduces the official "unhealthy" setting: pass ``weights=y`` (the slice
    labels). Slices of zero weight are left out of their batch's AP, and each batch value is
    weighted by the sum of the weights of its slices (the number of unhealthy slices for
    ``weights=y``). Without ``weights``, batches count equally (the official "mixed" setting).

    The result depends on ``seed`` and ``batch_size``; use :class:`PooledAUPRC` for a value that
    does not.

    Args:
        maps: anomaly maps, shape ``(N, H, W)``, higher = more anomalous.
        gt: ground-truth binary masks, same shape.
        brain: binary masks of the pixels to evaluate, same shape; all pixels when None.
        batch_size: number of slices per batch (official: 100).
        seed: seed of the slice permutation (``numpy.random.default_rng``).
        weights: optional non-negative per-slice weights, shape ``(N,)``.

    Returns:
        The (weighted) mean batch AP, or NaN when no batch has a positive pixel.

    Raises:
        ValueError: on mismatched shapes, non-binary masks, non-finite maps, ``batch_size < 1`` or
            invalid weights.
    """
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    scores = _as_scores(maps, "maps")
    labels = _as_mask(gt, "gt")
    _check_same_shape(maps=scores, gt=labels)
    mask = _brain_or_all(brain, scores)
    n = scores.shape[0]
    w = None
    if weights is not None:
        w = _to_numpy(weights, "weights").astype(np.float64).reshape(-1)
        if w.shape[0] != n:
            raise ValueError(f"`weights` must have one entry per slice ({n}), got {w.shape[0]}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("`weights` must be finite and non-negative")

    order = np.random.default_rng(seed).permutation(n)
    values: list[float] = []
    batch_weights: list[float] = []
    for start in range(0, n, int(batch_size)):
        idx = order[start : start + int(batch_size)]
        if w is not None:
            idx = idx[w[idx] > 0]
        if idx.size == 0:
            continue
        sel = mask[idx]
        y_true = labels[idx][sel]
        if not y_true.any():
            continue
        values.append(float(average_precision_score(y_true, scores[idx][sel])))
        batch_weights.append(1.0 if w is None else float(w[idx].sum()))
    if not values:
        return math.nan
    return float(np.average(values, weights=batch_weights))


class BatchedAUPRCMetric(CumulativeIterationMetric):
    """The protocol's batched pixel AUPRC (:func:`batched_auprc`) as a MONAI cumulative metric.

    Each call ``metric(y_pred, y)`` buffers its slices: ``y_pred`` the ``(B, 1, H, W)`` anomaly maps (kept in their
    dtype, on the CPU), ``y`` the ground truth as channel 0 and, optionally, the brain mask as channel 1 (stored as
    bool; use the same number of channels in every call). :meth:`aggregate` shuffles all buffered slices, in the
    order they were added (rank after rank under ``torch.distributed``), with the seeded permutation of
    :func:`batched_auprc` and averages the AP of batches of ``batch_size`` slices; a float64 scalar tensor, NaN
    when no batch has a positive pixel. The value depends on the order of the slices, like the function's.

    Args:
        batch_size: slices per batch (official: 100).
        seed: seed of the slice permutation.
        unhealthy: the official "unhealthy" setting: only slices with a non-empty ground truth enter their batch,
            and each batch is weighted by their number (:func:`batched_auprc` with ``weights`` the slice labels,
            i.e. ``gt.any()`` per slice); False: the "mixed" setting.

    Memory: the whole test set's maps are buffered (an exact value needs every slice); for a large test set prefer
    :class:`PooledAUPRC`, which keeps 4 bytes per brain pixel, and give ``IgniteMetricHandler`` ``save_details=False``
    (its ``metric_details`` would hold a copy of the buffered maps).
    """

    def __init__(self, batch_size: int = 100, seed: int = 0, unhealthy: bool = False) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = seed
        self.unhealthy = bool(unhealthy)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:  # type: ignore[override]
        _map_and_label(y_pred, y)  # validates y and the shapes
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("`y` must hold binary masks (bool or 0/1 values)")
        return [y_pred.cpu(), y.bool().cpu()]

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, list):
            raise ValueError("the metric buffer holds no data: call the metric on data first")
        maps, gt, brain = _map_and_label(data[0], data[1])
        weights = gt.reshape(gt.shape[0], -1).any(dim=1) if self.unhealthy else None
        value = batched_auprc(maps, gt, brain, self.batch_size, self.seed, weights=weights)
        return torch.tensor(value, dtype=torch.float64)


def _map_and_label(
    y_pred: torch.Tensor, y: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Split the ``(y_pred, y)`` of an AUPRC metric call into ``(maps, gt, brain)`` of shape ``(B, ...)``.

    ``y_pred``: ``(B, 1, ...)`` anomaly maps; ``y``: ``(B, 1, ...)`` ground truth or ``(B, 2, ...)`` ground truth and
    brain mask (channel 1); brain is None for a one-channel ``y``.
    """
    if y is None:
        raise ValueError("the ground truth y is required")
    if y_pred.ndim < 3 or y_pred.shape[1] != 1:
        raise ValueError(f"y_pred must be (B, 1, ...) anomaly maps, got shape {tuple(y_pred.shape)}")
    if y.ndim != y_pred.ndim or y.shape[1] not in (1, 2) or y.shape[0] != y_pred.shape[0]:
        raise ValueError(
            f"y must be (B, 1, ...) ground truth or (B, 2, ...) ground truth and brain mask matching y_pred "
            f"{tuple(y_pred.shape)}, got shape {tuple(y.shape)}"
        )
    if y.shape[2:] != y_pred.shape[2:]:
        raise ValueError(f"shape mismatch: y_pred {tuple(y_pred.shape)}, y {tuple(y.shape)}")
    return y_pred[:, 0], y[:, 0], (y[:, 1] if y.shape[1] == 2 else None)


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """Step-wise AP of ascending-sorted positive and negative scores (NaN without positives), as scikit-learn's."""
    n_pos = pos.size
    if n_pos == 0:
        return math.nan
    desc = pos[::-1]
    # last index of each run of equal positive scores = distinct thresholds where recall steps
    last = np.append(np.flatnonzero(desc[1:] != desc[:-1]), n_pos - 1)
    thresholds = desc[last]
    tps = (last + 1).astype(np.float64)  # positives scoring >= threshold
    fps = (neg.size - np.searchsorted(neg, thresholds, side="left")).astype(np.float64)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    # same orientation and formula as sklearn: recall decreasing with a final 0
    recall_rev = np.append(recall[::-1], 0.0)
    ap = -np.sum(np.diff(recall_rev) * precision[::-1])
    return float(max(0.0, ap))


class PooledAUPRC(CumulativeIterationMetric):
    """Pooled pixel AUPRC (average precision) over all brain pixels of a test set.

    Accumulates brain pixels over any number of :meth:`update` calls (float32 scores, split by
    label, i.e. 4 bytes per pixel) and computes exactly the value of
    ``sklearn.metrics.average_precision_score(gt[brain], maps[brain])`` on the concatenation, the
    step-wise ``AP = sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds.

    Not plain sklearn: sklearn's argsort of all pixels plus its per-threshold float64 arrays need
    about 50 bytes per pixel (tens of GB for a BraTS test set); here each class is sorted in place
    and the curve is only evaluated at the distinct positive scores, where recall changes.

    Scores are stored as float32: float64 maps whose values differ only beyond float32 precision
    become ties.

    A MONAI ``CumulativeIterationMetric``: ``metric(y_pred, y)`` (what ``IgniteMetricHandler`` calls) adds a batch
    like :meth:`update`, with the ``(B, 1, ...)`` maps as ``y_pred`` and the ground truth as channel 0 of ``y``; the
    brain mask travels as channel 1 of ``y`` (a one-channel ``y`` evaluates all pixels). :meth:`aggregate` returns
    :meth:`compute`'s value as a float64 tensor after gathering the pixels of every distributed rank (call it on all
    ranks); :meth:`compute`, :meth:`precision_recall_curve`, :attr:`n_positive` and :attr:`n_negative` use this
    process's pixels. The pixels are kept outside MONAI's per-item buffers (which stack equal-shaped items):
    those hold each slice's ``(n_positive, n_negative)`` counts, the handler's ``metric_details``.

    Example::

        metric = PooledAUPRC()
        for batch in loader:
            metric.update(maps, gt, brain)
        ap = metric.compute()
        precision, recall, thresholds = metric.precision_recall_curve()

        handler = IgniteMetricHandler(PooledAUPRC(), output_transform=lambda out: (maps, cat([label, brain], 1)))
    """

    def __init__(self) -> None:
        self._pos: list[np.ndarray] = []
        self._neg: list[np.ndarray] = []
        self._sorted = True
        super().__init__()  # calls reset()

    def reset(self) -> None:
        """Forget all accumulated pixels."""
        super().reset()
        self._pos = []
        self._neg = []
        self._sorted = True

    @property
    def n_positive(self) -> int:
        """Number of accumulated anomalous (positive) pixels."""
        return int(sum(a.size for a in self._pos))

    @property
    def n_negative(self) -> int:
        """Number of accumulated normal (negative) pixels."""
        return int(sum(a.size for a in self._neg))

    def update(self, maps: NdarrayOrTensor, gt: NdarrayOrTensor, brain: NdarrayOrTensor | None = None) -> None:
        """Add the brain pixels of a batch of slices.

        Args:
            maps: anomaly maps, shape ``(N, H, W)``, higher = more anomalous.
            gt: ground-truth binary masks, same shape.
            brain: binary masks of the pixels to evaluate, same shape; all pixels when None.

        Raises:
            ValueError: on mismatched shapes, non-binary masks or non-finite maps.
        """
        counts = self._add(maps, gt, brain)
        if len(counts):  # MONAI's buffers cannot hold an empty batch (a selection of no slice adds nothing)
            self.extend(counts)

    def _add(self, maps: NdarrayOrTensor, gt: NdarrayOrTensor, brain: NdarrayOrTensor | None) -> torch.Tensor:
        """Store the brain pixels of a batch; return each slice's ``(n_positive, n_negative)``, shape ``(N, 2)``."""
        scores = _as_scores(maps, "maps")
        labels = _as_mask(gt, "gt")
        _check_same_shape(maps=scores, gt=labels)
        mask = _brain_or_all(brain, scores)
        scores32 = scores.astype(np.float32, copy=False)
        if not np.isfinite(scores32).all():
            raise ValueError("`maps` has values outside the float32 range")
        pos = np.logical_and(labels, mask)
        neg = np.logical_and(~labels, mask)
        self._pos.append(scores32[pos])
        self._neg.append(scores32[neg])
        self._sorted = False
        return torch.from_numpy(np.stack([pos.sum(axis=1), neg.sum(axis=1)], axis=1).astype(np.int64))

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        maps, gt, brain = _map_and_label(y_pred, y)
        return self._add(maps, gt, brain)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """The AP over the pixels of all distributed ranks (this process's alone without ``torch.distributed``), a
        float64 scalar tensor; NaN without positive pixels. Every rank must call it (it is a collective)."""
        pos, neg = self._sorted_scores()
        gathered = []
        for local in (pos, neg):
            merged = evenly_divisible_all_gather(torch.from_numpy(local), concat=True)
            if merged.shape[0] != local.shape[0]:  # other ranks' pixels were added: re-sort
                local = merged.cpu().numpy()
                local.sort()
            gathered.append(local)
        return torch.tensor(_average_precision(*gathered), dtype=torch.float64)

    def _sorted_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Consolidate the stored chunks into two ascending-sorted arrays (cached)."""
        if not self._sorted:
            for chunks in (self._pos, self._neg):
                merged = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.float32)
                chunks.clear()
                merged.sort()
                chunks.append(merged)
            self._sorted = True
        pos = self._pos[0] if self._pos else np.empty(0, dtype=np.float32)
        neg = self._neg[0] if self._neg else np.empty(0, dtype=np.float32)
        return pos, neg

    def compute(self) -> float:
        """Average precision over all accumulated pixels.

        Returns:
            The AP (equal to scikit-learn's ``average_precision_score`` on the same pixels), or
            NaN when no positive pixel was accumulated.
        """
        return _average_precision(*self._sorted_scores())

    def precision_recall_curve(self, max_points: int | None = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Precision-recall curve in the format of ``sklearn.metrics.precision_recall_curve``.

        Thresholds are the distinct accumulated scores (ascending); precision and recall carry a
        final ``(1, 0)`` point. With ``max_points``, about that many thresholds are kept (evenly
        spaced in rank among the distinct positive and the distinct negative scores, extremes
        included) so that figures stay small; the AP itself is always computed exactly by
        :meth:`compute`.

        Args:
            max_points: upper bound on the number of thresholds; None keeps all of them (the exact
                curve, identical to scikit-learn's with ``drop_intermediate=False``).

        Returns:
            ``(precision, recall, thresholds)``: float64 arrays of length ``K + 1``, ``K + 1`` and a
            float32 array of length ``K``.

        Raises:
            ValueError: when no positive pixel was accumulated or ``max_points < 2``.
        """
        if max_points is not None and max_points < 2:
            raise ValueError(f"`max_points` must be >= 2 or None, got {max_points}")
        pos, neg = self._sorted_scores()
        if pos.size == 0:
            raise ValueError("no positive pixel accumulated: the precision-recall curve is undefined")
        upos = _unique_sorted(pos)
        uneg = _unique_sorted(neg)
        if max_points is not None and upos.size + uneg.size > max_points:
            half = max_points // 2
            upos = _evenly_spaced(upos, half)
            uneg = _evenly_spaced(uneg, max_points - half)
        thresholds = np.union1d(upos, uneg)
        tps = (pos.size - np.searchsorted(pos, thresholds, side="left")).astype(np.float64)
        fps = (neg.size - np.searchsorted(neg, thresholds, side="left")).astype(np.float64)
        precision = tps / (tps + fps)
        recall = tps / pos.size
        return np.append(precision, 1.0), np.append(recall, 0.0), thresholds


def _unique_sorted(a: np.ndarray) -> np.ndarray:
    """Distinct values of an ascending-sorted array (no re-sort, unlike ``np.unique``)."""
    if a.size == 0:
        return a
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _evenly_spaced(a: np.ndarray, k: int) -> np.ndarray:
    """At most ``k`` elements of ``a`` evenly spaced in index, first and last included."""
    if a.size <= k or k < 2:
        return a if a.size <= k else a[[0, -1]]
    return a[np.unique(np.linspace(0, a.size - 1, k).round().astype(np.int64))]


def pooled_auprc(maps: NdarrayOrTensor, gt: NdarrayOrTensor, brain: NdarrayOrTensor | None = None) -> float:
    """Pooled pixel AUPRC over the brain pixels of all given slices (one-shot :class:`PooledAUPRC`).

    Args:
        maps: anomaly maps, shape ``(N, H, W)``, higher = more anomalous.
        gt: ground-truth binary masks, same shape.
        brain: binary masks of the pixels to evaluate, same shape; all pixels when None.

    Returns:
        ``average_precision_score(gt[brain], maps[brain])``, or NaN without positive pixels.
    """
    metric = PooledAUPRC()
    metric.update(maps, gt, brain)
    return metric.compute()


# --------------------------------------------------------------------------------------------------
# per-volume Dice
# --------------------------------------------------------------------------------------------------
def volume_dice(
    pred: NdarrayOrTensor,
    gt: NdarrayOrTensor,
    case_ids: Sequence[str] | np.ndarray,
    smooth: float = DEFAULT_SMOOTH,
) -> tuple[dict[str, float], float]:
    """3D Dice per case: intersections and sizes summed over the slices of each case.

    Args:
        pred: predicted binary masks, shape ``(N, H, W)``.
        gt: ground-truth binary masks, same shape.
        case_ids: case identifier of each slice, shape ``(N,)``.
        smooth: smoothing term ``s`` of ``(2|P & G| + s) / (|P| + |G| + s)``.

    Returns:
        ``(per_case, mean)``: a dict case id -> Dice (cases in sorted order) and the mean over
        cases (NaN when there is no slice).

    Raises:
        ValueError: on mismatched shapes, non-binary masks or a wrong number of case ids.
    """
    inter, n_pred, n_gt = _overlap_counts(pred, gt)
    ids = np.asarray(case_ids).reshape(-1).astype(str)
    if ids.shape[0] != inter.shape[0]:
        raise ValueError(f"`case_ids` must have one entry per slice ({inter.shape[0]}), got {ids.shape[0]}")
    cases, inverse = np.unique(ids, return_inverse=True)
    sums = [np.bincount(inverse, weights=v, minlength=cases.size) for v in (inter, n_pred, n_gt)]
    dice = _dice_from_counts(*sums, smooth)
    per_case = {str(c): float(d) for c, d in zip(cases, dice)}
    return per_case, _safe_mean(dice)


class VolumeDiceMetric(CumulativeIterationMetric):
    """The per-volume 3D Dice (:func:`volume_dice`) as a MONAI cumulative metric: each item is one whole case.

    Each call ``metric(y_pred, y)`` takes binary masks of shape ``(B, ...)`` (e.g. ``(B, 1, H, W, D)`` volumes, or
    the decollated channel-first items of a volume evaluator) and buffers, per item, ``|P & G|``, ``|P|`` and
    ``|G|`` summed over all its pixels (integers, so distributed gathering is exact and cheap).
    :meth:`aggregate` returns a float64 tensor:

    * ``reduction="mean"``: the mean over items of ``(2|P & G| + s) / (|P| + |G| + s)``, the value of
      ``volume_dice(slices, gt, case_ids)[1]`` when each item holds one case's slices;
    * ``"none"``: one Dice per item, in the order added;
    * ``"pooled"``: one unsmoothed Dice over all pixels of all items, :func:`pooled_dice`.

    Args:
        reduction: ``"mean"``, ``"none"`` or ``"pooled"``.
        smooth: smoothing term ``s`` (``"mean"`` and ``"none"``).
    """

    def __init__(self, reduction: str = "mean", smooth: float = DEFAULT_SMOOTH) -> None:
        super().__init__()
        if reduction not in ("mean", "none", "pooled"):
            raise ValueError(f"reduction must be 'mean', 'none' or 'pooled', got {reduction!r}")
        self.reduction = reduction
        self.smooth = smooth

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("the ground truth y is required")
        inter, n_pred, n_gt = _overlap_counts(y_pred, y)
        return torch.from_numpy(np.stack([inter, n_pred, n_gt], axis=1).astype(np.int64))

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the metric buffer holds no tensor: call the metric on data first")
        inter, n_pred, n_gt = data.cpu().numpy().astype(np.float64).T
        if self.reduction == "pooled":
            return torch.tensor(_pooled_dice_from_counts(inter, n_pred, n_gt), dtype=torch.float64)
        dice = _dice_from_counts(inter, n_pred, n_gt, self.smooth)
        return torch.tensor(_safe_mean(dice) if self.reduction == "mean" else dice, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# slice classification
# --------------------------------------------------------------------------------------------------
def classification_metrics(
    y_true: NdarrayOrTensor | Sequence[int],
    y_pred: NdarrayOrTensor | Sequence[int],
    cosine: NdarrayOrTensor | Sequence[float] | None = None,
) -> dict[str, float]:
    """Healthy/unhealthy slice classification metrics (unhealthy = positive class).

    Args:
        y_true: true slice labels, shape ``(N,)``, 0 healthy / 1 unhealthy.
        y_pred: predicted slice labels, same shape.
        cosine: optional cosine scores ``c``, shape ``(N,)``; LOW means unhealthy, so the AUROC
            is ``roc_auc_score(y_true, -c)``.

    Returns:
        Dict with ``accuracy``, ``sensitivity`` (TP / (TP + FN)), ``specificity``
        (TN / (TN + FP)) and ``auroc`` (NaN without ``cosine`` or when only one class is
        present); sensitivity/specificity are NaN when their class is absent.

    Raises:
        ValueError: on labels other than 0/1, mismatched lengths or non-finite cosine scores.
    """
    yt = _as_labels(y_true, "y_true")
    yp = _as_labels(y_pred, "y_pred", n=yt.shape[0])
    if yt.size == 0:
        raise ValueError("`y_true` is empty")
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(yt, yp, labels=[0, 1]).ravel())
    out = {
        "accuracy": (tp + tn) / yt.size,
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "auroc": math.nan,
    }
    if cosine is not None:
        out["auroc"] = _cosine_auroc(yt, cosine)
    return {k: float(v) for k, v in out.items()}


def _cosine_auroc(y_true: np.ndarray, cosine: NdarrayOrTensor | Sequence[float]) -> float:
    """AUROC of the unhealthy class scored by ``-c``; NaN when only one class is present."""
    c = _to_numpy(cosine, "cosine").astype(np.float64).reshape(-1)
    if c.shape[0] != y_true.shape[0]:
        raise ValueError(f"`cosine` must have one entry per slice ({y_true.shape[0]}), got {c.shape[0]}")
    if not np.isfinite(c).all():
        raise ValueError("`cosine` contains NaN or Inf values")
    if np.unique(y_true).size < 2:
        return math.nan
    return float(roc_auc_score(y_true, -c))


# --------------------------------------------------------------------------------------------------
# full summary
# --------------------------------------------------------------------------------------------------
def segmentation_metrics(
    pred_gated: NdarrayOrTensor,
    pred_ungated: NdarrayOrTensor,
    gt: NdarrayOrTensor,
    maps: NdarrayOrTensor,
    brain: NdarrayOrTensor | None,
    y: NdarrayOrTensor | Sequence[int],
    case_ids: Sequence[str] | np.ndarray,
    cosine: NdarrayOrTensor | Sequence[float] | None = None,
    y_pred: NdarrayOrTensor | Sequence[int] | None = None,
    auprc_batch_size: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """All metrics of a test set in both settings of the papers, plus the pooled/per-volume ones.

    * "mixed": all slices, gated masks (the caller gives slices classified healthy an empty
      mask); ``mixed_auprc_batched`` is :func:`batched_auprc` over all slices.
    * "unhealthy": slices with ``y == 1`` only, ungated masks; ``unhealthy_auprc_batched`` uses
      the same batches as the mixed value, restricted to unhealthy slices and weighted by their
      number per batch (official protocol).
    * ``pooled_auprc`` / ``unhealthy_pooled_auprc``: :func:`pooled_auprc` over all / unhealthy
      slices; ``volume_dice``: mean of :func:`volume_dice` on the gated masks.

    Args:
        pred_gated: gated binary masks, shape ``(N, H, W)``.
        pred_ungated: ungated binary masks, same shape.
        gt: ground-truth binary masks, same shape.
        maps: anomaly maps, same shape.
        brain: binary masks of the pixels over which AUPRC is computed, same shape (None = all).
        y: slice labels, shape ``(N,)``, 0 healthy / 1 unhealthy.
        case_ids: case identifier of each slice, shape ``(N,)``.
        cosine: optional cosine scores (low = unhealthy) for the AUROC.
        y_pred: optional predicted slice labels for accuracy/sensitivity/specificity.
        auprc_batch_size: slices per batch of the batched AUPRC (official: 100).
        seed: seed of the batched AUPRC's slice permutation.

    Returns:
        Dict with ``mixed_dice, mixed_iou, mixed_auprc_batched, unhealthy_dice, unhealthy_iou,
        unhealthy_auprc_batched, pooled_auprc, unhealthy_pooled_auprc, volume_dice, n_slices,
        n_unhealthy``; plus ``accuracy, sensitivity, specificity`` when ``y_pred`` is given and
        ``auroc`` when ``cosine`` is given. Undefined values are NaN.

    Raises:
        ValueError: on mismatched shapes or lengths, non-binary masks or labels, non-finite maps.
    """
    gt_np = _as_mask(gt, "gt")
    gated = _as_mask(pred_gated, "pred_gated")
    ungated = _as_mask(pred_ungated, "pred_ungated")
    scores = _as_scores(maps, "maps")
    _check_same_shape(pred_gated=gated, pred_ungated=ungated, gt=gt_np, maps=scores)
    mask = _brain_or_all(brain, scores)
    n = gt_np.shape[0]
    labels = _as_labels(y, "y", n=n)
    if not np.array_equal(labels, gt_np.any(axis=1).astype(np.int64)):
        warnings.warn("`y` disagrees with `gt` (a slice is unhealthy iff its gt mask is non-empty)", stacklevel=2)
    unhealthy = labels == 1

    out: dict[str, float] = {
        "mixed_dice": _safe_mean(dice_per_slice(gated, gt_np)),
        "mixed_iou": _safe_mean(iou_per_slice(gated, gt_np)),
        "mixed_auprc_batched": batched_auprc(scores, gt_np, mask, auprc_batch_size, seed),
        "unhealthy_dice": _safe_mean(dice_per_slice(ungated[unhealthy], gt_np[unhealthy])),
        "unhealthy_iou": _safe_mean(iou_per_slice(ungated[unhealthy], gt_np[unhealthy])),
        "unhealthy_auprc_batched": batched_auprc(scores, gt_np, mask, auprc_batch_size, seed, weights=labels),
        "pooled_auprc": pooled_auprc(scores, gt_np, mask),
        "unhealthy_pooled_auprc": pooled_auprc(scores[unhealthy], gt_np[unhealthy], mask[unhealthy]),
        "volume_dice": volume_dice(gated, gt_np, case_ids)[1],
        "n_slices": n,
        "n_unhealthy": int(unhealthy.sum()),
    }
    if y_pred is not None:
        cls = classification_metrics(labels, y_pred)
        out.update({k: cls[k] for k in ("accuracy", "sensitivity", "specificity")})
    if cosine is not None:
        out["auroc"] = _cosine_auroc(labels, cosine)
    return out


# --------------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------------
def aggregate_over_seeds(results: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation of each metric over the runs of several seeds.

    Args:
        results: one mapping metric name -> value per seed (e.g. :func:`segmentation_metrics`
            outputs). Keys may differ between runs; a missing key counts as NaN.

    Returns:
        Dict metric name -> ``(mean, std)`` (keys in order of first appearance), with ``std`` the
        sample standard deviation (``ddof=1``), 0.0 when a single value is available. NaN values
        are ignored; a metric with no finite value gets ``(nan, nan)``.
    """
    keys: dict[str, None] = {}
    for r in results:
        keys.update(dict.fromkeys(r))
    out: dict[str, tuple[float, float]] = {}
    for k in keys:
        vals = np.asarray([float(r[k]) for r in results if k in r], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        if vals.size == 0:
            out[k] = (math.nan, math.nan)
        elif vals.size == 1:
            out[k] = (float(vals[0]), 0.0)
        else:
            out[k] = (float(vals.mean()), float(vals.std(ddof=1)))
    return out
