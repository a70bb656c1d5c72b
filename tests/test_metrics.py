# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""Tests of anofpdm_monai.metrics: hand-derived answers on hand-built masks, sklearn equality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve

from anofpdm_monai.metrics import (
    PooledAUPRC,
    aggregate_over_seeds,
    batched_auprc,
    classification_metrics,
    dice_per_slice,
    iou_per_slice,
    pooled_auprc,
    precision_recall_per_slice,
    segmentation_metrics,
    volume_dice,
)

S = 1e-6  # the protocol's smoothing term


def _mask(*rows: str) -> np.ndarray:
    """Binary mask from strings of '.' and '#', e.g. _mask('##..', '....')."""
    return np.array([[c == "#" for c in r] for r in rows], dtype=bool)


EMPTY = _mask("....", "....", "....", "....")
SQUARE = _mask("##..", "##..", "....", "....")  # 4 pixels, top-left
OTHER = _mask("....", "....", "..##", "..##")  # 4 pixels, bottom-right (disjoint from SQUARE)
SHIFTED = _mask(".##.", ".##.", "....", "....")  # 4 pixels, 2 shared with SQUARE
SPOT = _mask("....", ".#..", ".##.", "....")  # 3 pixels

# name, pred, gt, dice, iou; |P & G|, |P|, |G| counted by hand
OVERLAP_CASES = [
    ("identical", SQUARE, SQUARE, (8 + S) / (8 + S), (4 + S) / (4 + S)),  # = 1
    ("disjoint", OTHER, SQUARE, S / (8 + S), S / (8 + S)),  # ~ 0
    ("half_overlap", SHIFTED, SQUARE, (4 + S) / (8 + S), (2 + S) / (6 + S)),  # 0.5, 1/3
    ("empty_vs_empty", EMPTY, EMPTY, 1.0, 1.0),  # S / S
    ("false_positive_on_healthy", SPOT, EMPTY, S / (3 + S), S / (3 + S)),  # ~ 0
    ("missed_lesion", EMPTY, SPOT, S / (3 + S), S / (3 + S)),  # ~ 0
]

# name, pred, gt, precision, recall (nan = undefined)
PRECISION_RECALL_CASES = [
    ("identical", SQUARE, SQUARE, 1.0, 1.0),
    ("half_overlap", SHIFTED, SQUARE, 0.5, 0.5),
    ("pred_inside_gt", _mask("#...", "....", "....", "...."), SQUARE, 1.0, 0.25),
    ("empty_pred", EMPTY, SQUARE, math.nan, 0.0),
    ("empty_gt", SQUARE, EMPTY, 0.0, math.nan),
]

# name, maps, gt: pooled AUPRC must equal sklearn's average_precision_score on these
_RNG = np.random.default_rng(1234)
_GT = _RNG.random((6, 12, 12)) < 0.2
_CONT = (_RNG.random((6, 12, 12)) + 0.5 * _GT).astype(np.float32)
AUPRC_SKLEARN_CASES = [
    ("continuous", _CONT, _GT),
    ("ties_one_decimal", np.round(_CONT, 1).astype(np.float32), _GT),
    ("all_ties", np.full((6, 12, 12), 0.3, dtype=np.float32), _GT),
    ("integer_scores", (_RNG.random((6, 12, 12)) * 4).astype(np.int64), _GT),
    ("perfect", _GT.astype(np.float32), _GT),
    ("inverted", (~_GT).astype(np.float32), _GT),
]


class TestOverlap:
    @pytest.mark.parametrize("name,pred,gt,dice,iou", OVERLAP_CASES)
    def test_values(self, name, pred, gt, dice, iou):
        np.testing.assert_allclose(dice_per_slice(pred[None], gt[None]), [dice], rtol=1e-12)
        np.testing.assert_allclose(iou_per_slice(pred[None], gt[None]), [iou], rtol=1e-12)

    def test_mean_over_slices(self):
        preds = np.stack([c[1] for c in OVERLAP_CASES])
        gts = np.stack([c[2] for c in OVERLAP_CASES])
        d = dice_per_slice(preds, gts)
        assert d.shape == (len(OVERLAP_CASES),)
        np.testing.assert_allclose(d, [c[3] for c in OVERLAP_CASES], rtol=1e-12)

    def test_dice_iou_relation(self):
        rng = np.random.default_rng(0)
        pred = rng.random((20, 8, 8)) < 0.3
        gt = rng.random((20, 8, 8)) < 0.3
        pred[:, 0, 0] = gt[:, 0, 0] = True  # non-empty union everywhere
        d = dice_per_slice(pred, gt, smooth=0.0)
        j = iou_per_slice(pred, gt, smooth=0.0)
        np.testing.assert_allclose(d, 2 * j / (1 + j), rtol=1e-12)
        assert np.all(j <= d)

    @pytest.mark.parametrize("name,pred,gt,precision,recall", PRECISION_RECALL_CASES)
    def test_precision_recall(self, name, pred, gt, precision, recall):
        p, r = precision_recall_per_slice(pred[None], gt[None])
        np.testing.assert_allclose(p, [precision], equal_nan=True)
        np.testing.assert_allclose(r, [recall], equal_nan=True)

    def test_torch_and_channel_dim(self):
        pred = torch.from_numpy(np.stack([SHIFTED, SQUARE]))[:, None].float()  # (N, 1, H, W) 0/1 float
        gt = torch.from_numpy(np.stack([SQUARE, SQUARE]))[:, None]
        np.testing.assert_allclose(dice_per_slice(pred, gt), [(4 + S) / (8 + S), 1.0], rtol=1e-12)

    def test_errors(self):
        with pytest.raises(ValueError, match="shape mismatch"):
            dice_per_slice(SQUARE[None], np.stack([SQUARE, SQUARE]))
        with pytest.raises(ValueError, match="binary"):
            iou_per_slice(SQUARE[None] * 0.7, SQUARE[None])
        with pytest.raises(ValueError, match="slices first"):
            dice_per_slice(np.ones(4, bool), np.ones(4, bool))


class TestPooledAUPRC:
    @pytest.mark.parametrize("name,maps,gt", AUPRC_SKLEARN_CASES)
    def test_equals_sklearn(self, name, maps, gt):
        brain = np.ones_like(gt)
        brain[:, :2] = False  # leave out two rows per slice
        expected = average_precision_score(gt[brain], maps[brain])
        assert pooled_auprc(maps, gt, brain) == pytest.approx(expected, rel=1e-12, abs=1e-15)

    def test_all_ties_is_prevalence(self):
        gt = _GT
        value = pooled_auprc(np.zeros(gt.shape), gt)
        assert value == pytest.approx(gt.mean(), rel=1e-12)

    def test_hand_computed(self):
        # scores 0.9(+) 0.8(-) 0.7(+) 0.1(-): AP = 1/2 * 1 + 1/2 * 2/3
        maps = np.array([[[0.9, 0.8], [0.7, 0.1]]])
        gt = np.array([[[1, 0], [1, 0]]])
        assert pooled_auprc(maps, gt) == pytest.approx(0.5 + 1 / 3, rel=1e-12)

    def test_accumulation(self):
        maps, gt = AUPRC_SKLEARN_CASES[1][1], AUPRC_SKLEARN_CASES[1][2]
        metric = PooledAUPRC()
        for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
            metric.update(maps[sl], gt[sl])
        assert metric.n_positive + metric.n_negative == gt.size
        assert metric.n_positive == int(gt.sum())
        once = pooled_auprc(maps, gt)
        assert metric.compute() == once
        assert metric.compute() == once  # cached consolidation is stable
        metric.update(maps, gt)  # updates after compute still count: duplicated data, same AP
        assert metric.compute() == pytest.approx(once, rel=1e-12)
        metric.reset()
        assert math.isnan(metric.compute())

    def test_curve_matches_sklearn(self):
        maps, gt = AUPRC_SKLEARN_CASES[1][1], AUPRC_SKLEARN_CASES[1][2]
        metric = PooledAUPRC()
        metric.update(maps, gt)
        precision, recall, thresholds = metric.precision_recall_curve(max_points=None)
        sk_precision, sk_recall, sk_thresholds = precision_recall_curve(gt.ravel(), maps.ravel())
        np.testing.assert_array_equal(thresholds, sk_thresholds)
        np.testing.assert_allclose(precision, sk_precision, rtol=1e-15)
        np.testing.assert_allclose(recall, sk_recall, rtol=1e-15)

    def test_curve_subsampled(self):
        rng = np.random.default_rng(3)
        gt = rng.random((4, 50, 50)) < 0.1
        maps = rng.random((4, 50, 50)).astype(np.float32) + gt
        metric = PooledAUPRC()
        metric.update(maps, gt)
        precision, recall, thresholds = metric.precision_recall_curve(max_points=200)
        assert len(thresholds) <= 200 and len(precision) == len(recall) == len(thresholds) + 1
        assert recall[0] == 1.0 and recall[-1] == 0.0 and precision[-1] == 1.0
        assert thresholds[0] == maps.min() and thresholds[-1] == maps.max()
        assert np.all(np.diff(thresholds) > 0) and np.all(np.diff(recall) <= 0)

    def test_no_positive_and_errors(self):
        assert math.isnan(pooled_auprc(np.ones((1, 3, 3)), np.zeros((1, 3, 3))))
        metric = PooledAUPRC()
        with pytest.raises(ValueError, match="no positive"):
            metric.precision_recall_curve()
        with pytest.raises(ValueError, match="NaN"):
            metric.update(np.full((1, 2, 2), np.nan), np.ones((1, 2, 2)))
        with pytest.raises(ValueError, match="shape mismatch"):
            metric.update(np.zeros((1, 2, 2)), np.ones((1, 2, 2)), np.ones((1, 3, 3)))

    def test_torch(self):
        maps, gt = AUPRC_SKLEARN_CASES[1][1], AUPRC_SKLEARN_CASES[1][2]
        value = pooled_auprc(torch.from_numpy(maps).to(torch.float64), torch.from_numpy(gt))
        assert value == pooled_auprc(maps, gt)


def _identical_unhealthy_slices(n_unhealthy: int, n_healthy: int) -> tuple[np.ndarray, np.ndarray]:
    """Unhealthy slices that are copies of one pattern (AP 1/2 + 1/2 * 2/3), healthy slices scored 0.

    Any batch made of copies of one data set has that data set's AP, and negatives scored below
    every positive do not change it: the batched AP is 5/6 for any permutation and batch size.
    """
    one_maps = np.array([[0.9, 0.8], [0.7, 0.1]])
    one_gt = np.array([[1, 0], [1, 0]], dtype=bool)
    maps = np.concatenate([np.repeat(one_maps[None], n_unhealthy, 0), np.zeros((n_healthy, 2, 2))])
    gt = np.concatenate([np.repeat(one_gt[None], n_unhealthy, 0), np.zeros((n_healthy, 2, 2), bool)])
    return maps, gt


class TestBatchedAUPRC:
    def test_perfect_separation(self):
        rng = np.random.default_rng(0)
        gt = rng.random((250, 6, 6)) < 0.1
        gt[:, 0, 0] = True
        assert batched_auprc(gt.astype(np.float32), gt, batch_size=100) == 1.0

    @pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
    @pytest.mark.parametrize("seed", [0, 1])
    def test_batch_invariant_case(self, batch_size, seed):
        maps, gt = _identical_unhealthy_slices(n_unhealthy=9, n_healthy=5)
        assert batched_auprc(maps, gt, batch_size=batch_size, seed=seed) == pytest.approx(5 / 6, rel=1e-12)

    def test_single_slice_batches_and_weights(self):
        # slice 0: perfect (AP 1); slice 1: all scores tied, 1 positive of 4 (AP 1/4); slice 2 healthy (skipped)
        gt = np.stack([_mask("#.", ".."), _mask("#.", ".."), np.zeros((2, 2), bool)])
        maps = np.stack([gt[0].astype(float), np.full((2, 2), 0.5), np.full((2, 2), 0.9)])
        assert batched_auprc(maps, gt, batch_size=1) == pytest.approx((1 + 0.25) / 2)
        assert batched_auprc(maps, gt, batch_size=1, weights=[2, 1, 5]) == pytest.approx((2 * 1 + 0.25) / 3)
        assert batched_auprc(maps, gt, batch_size=1, weights=[0, 1, 1]) == pytest.approx(0.25)

    def test_weights_exclude_slices(self):
        # unhealthy slices are perfectly separated; healthy slices score 1.0 everywhere (above the negatives,
        # tied with the positives). One batch holds everything: mixed AP = P / (P + healthy pixels).
        rng = np.random.default_rng(2)
        gt = np.zeros((10, 4, 4), bool)
        gt[:6] = rng.random((6, 4, 4)) < 0.3
        gt[:6, 0, 0] = True
        maps = gt.astype(np.float64)
        maps[6:] = 1.0
        y = gt.reshape(10, -1).any(1).astype(int)
        n_pos, n_healthy_px = gt.sum(), 4 * 16
        assert batched_auprc(maps, gt, batch_size=10) == pytest.approx(n_pos / (n_pos + n_healthy_px))
        assert batched_auprc(maps, gt, batch_size=10) == pytest.approx(pooled_auprc(maps, gt))
        assert batched_auprc(maps, gt, batch_size=3, seed=5, weights=y) == 1.0

    def test_seeded(self):
        rng = np.random.default_rng(4)
        gt = rng.random((40, 5, 5)) < 0.2
        maps = rng.random((40, 5, 5)) + gt
        a = batched_auprc(maps, gt, batch_size=7, seed=11)
        assert a == batched_auprc(torch.from_numpy(maps), torch.from_numpy(gt), batch_size=7, seed=11)

    def test_no_positive_and_errors(self):
        assert math.isnan(batched_auprc(np.ones((3, 2, 2)), np.zeros((3, 2, 2))))
        with pytest.raises(ValueError, match="batch_size"):
            batched_auprc(np.ones((3, 2, 2)), np.zeros((3, 2, 2)), batch_size=0)
        with pytest.raises(ValueError, match="weights"):
            batched_auprc(np.ones((3, 2, 2)), np.zeros((3, 2, 2)), weights=[1, -1, 0])


class TestVolumeDice:
    def test_two_cases(self):
        # case "a": slice 0 identical (|P&G| 4, |P| 4, |G| 4), slice 1 false positive SPOT (0, 3, 0)
        #   -> (2*4 + s) / (7 + 4 + s) = 8/11
        # case "b": slice 2 half overlap (2, 4, 4), slice 3 empty vs empty -> (4 + s) / (8 + s) = 1/2
        pred = np.stack([SQUARE, SPOT, SHIFTED, EMPTY])
        gt = np.stack([SQUARE, EMPTY, SQUARE, EMPTY])
        per_case, mean = volume_dice(pred, gt, np.array(["a", "a", "b", "b"]))
        assert list(per_case) == ["a", "b"]
        assert per_case["a"] == pytest.approx(8 / 11, rel=1e-6)
        assert per_case["b"] == pytest.approx(0.5, rel=1e-6)
        assert mean == pytest.approx((8 / 11 + 0.5) / 2, rel=1e-6)

    def test_interleaved_ids_and_errors(self):
        pred = np.stack([SQUARE, SHIFTED, EMPTY])
        per_case, _ = volume_dice(pred, np.stack([SQUARE, SQUARE, EMPTY]), ["x", "y", "x"])
        assert per_case == pytest.approx({"x": 1.0, "y": (4 + S) / (8 + S)})
        with pytest.raises(ValueError, match="case_ids"):
            volume_dice(pred, pred, ["x", "y"])


# name, y_true, y_pred, cosine, expected (accuracy, sensitivity, specificity, auroc)
CLASSIFICATION_CASES = [
    # -c = [-.9, -.1, -.5, -.3]; unhealthy {-.1, -.5} vs healthy {-.9, -.3}: 3 of 4 pairs ordered -> 0.75
    ("mixed", [0, 1, 1, 0], [0, 1, 0, 1], [0.9, 0.1, 0.5, 0.3], (0.5, 0.5, 0.5, 0.75)),
    ("low_cosine_is_unhealthy", [0, 0, 1, 1], [0, 0, 1, 1], [0.99, 0.98, 0.2, 0.1], (1.0, 1.0, 1.0, 1.0)),
    ("high_cosine_unhealthy", [0, 0, 1, 1], [1, 1, 0, 0], [0.1, 0.2, 0.98, 0.99], (0.0, 0.0, 0.0, 0.0)),
    ("one_class", [1, 1, 1], [1, 0, 1], [0.1, 0.5, 0.2], (2 / 3, 2 / 3, math.nan, math.nan)),
    ("no_cosine", [0, 1, 1, 1], [0, 1, 1, 0], None, (0.75, 2 / 3, 1.0, math.nan)),
]


class TestClassification:
    @pytest.mark.parametrize("name,y_true,y_pred,cosine,expected", CLASSIFICATION_CASES)
    def test_values(self, name, y_true, y_pred, cosine, expected):
        out = classification_metrics(y_true, y_pred, cosine)
        assert list(out) == ["accuracy", "sensitivity", "specificity", "auroc"]
        np.testing.assert_allclose([out[k] for k in out], expected, equal_nan=True)

    def test_torch_and_errors(self):
        out = classification_metrics(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0.9, 0.1]))
        assert out == {"accuracy": 1.0, "sensitivity": 1.0, "specificity": 1.0, "auroc": 1.0}
        with pytest.raises(ValueError, match="y_pred"):
            classification_metrics([0, 1], [0, 1, 1])
        with pytest.raises(ValueError, match="y_true"):
            classification_metrics([0, 2], [0, 1])


def _four_slices() -> dict:
    """Slices: 0 healthy, classified healthy (ungated FP); 1 unhealthy, found; 2 unhealthy, half found by the
    ungated mask but classified healthy (gated empty); 3 healthy, classified unhealthy (FP kept after gating)."""
    gt = np.stack([EMPTY, SQUARE, SQUARE, EMPTY])
    ungated = np.stack([SPOT, SQUARE, SHIFTED, SPOT])
    gated = np.stack([EMPTY, SQUARE, EMPTY, SPOT])
    return {
        "pred_gated": gated,
        "pred_ungated": ungated,
        "gt": gt,
        "maps": gt.astype(np.float32),  # perfect maps: every AUPRC is 1
        "brain": np.ones_like(gt),
        "y": np.array([0, 1, 1, 0]),
        "case_ids": np.array(["a", "a", "b", "b"]),
    }


class TestSegmentationMetrics:
    def test_settings(self):
        out = segmentation_metrics(**_four_slices(), cosine=[0.9, 0.1, 0.5, 0.3], y_pred=[0, 1, 0, 1])
        # mixed: slices 1 (1.0) and 0 (empty vs empty, 1.0); 2 (missed) and 3 (FP) ~0 -> 0.5
        assert out["mixed_dice"] == pytest.approx(0.5, rel=1e-5)
        assert out["mixed_iou"] == pytest.approx(0.5, rel=1e-5)
        # unhealthy: slices 1 and 2 only, ungated: (1 + 1/2) / 2 and (1 + 1/3) / 2
        assert out["unhealthy_dice"] == pytest.approx(0.75, rel=1e-6)
        assert out["unhealthy_iou"] == pytest.approx(2 / 3, rel=1e-6)
        for key in ("mixed_auprc_batched", "unhealthy_auprc_batched", "pooled_auprc", "unhealthy_pooled_auprc"):
            assert out[key] == 1.0
        # volume dice on gated masks: case a (8+s)/(8+s) = 1; case b: 0 / (3 + 4) ~ 0
        assert out["volume_dice"] == pytest.approx(0.5, rel=1e-5)
        assert out["n_slices"] == 4 and out["n_unhealthy"] == 2
        assert (out["accuracy"], out["sensitivity"], out["specificity"]) == (0.5, 0.5, 0.5)
        assert out["auroc"] == 0.75

    def test_optional_keys(self):
        base = {
            "mixed_dice",
            "mixed_iou",
            "mixed_auprc_batched",
            "unhealthy_dice",
            "unhealthy_iou",
            "unhealthy_auprc_batched",
            "pooled_auprc",
            "unhealthy_pooled_auprc",
            "volume_dice",
            "n_slices",
            "n_unhealthy",
        }
        assert set(segmentation_metrics(**_four_slices())) == base
        assert set(segmentation_metrics(**_four_slices(), cosine=[0.9, 0.1, 0.5, 0.3])) == base | {"auroc"}
        with_pred = segmentation_metrics(**_four_slices(), y_pred=[0, 1, 0, 1])
        assert set(with_pred) == base | {"accuracy", "sensitivity", "specificity"}

    def test_unhealthy_auprc_uses_unhealthy_slices(self):
        kw = _four_slices()
        kw["maps"] = kw["maps"].copy()
        kw["maps"][0] = 1.0  # a healthy slice scored at the positives' level lowers the mixed/pooled AUPRC only
        out = segmentation_metrics(**kw, auprc_batch_size=4)
        assert out["pooled_auprc"] == pytest.approx(8 / (8 + 16))
        assert out["mixed_auprc_batched"] == pytest.approx(8 / (8 + 16))
        assert out["unhealthy_pooled_auprc"] == 1.0
        assert out["unhealthy_auprc_batched"] == 1.0

    def test_torch_inputs(self):
        kw = {k: torch.from_numpy(np.asarray(v)) if k != "case_ids" else v for k, v in _four_slices().items()}
        assert segmentation_metrics(**kw) == pytest.approx(segmentation_metrics(**_four_slices()))

    def test_label_mismatch_warns(self):
        kw = _four_slices()
        kw["y"] = np.array([1, 1, 1, 0])
        with pytest.warns(UserWarning, match="disagrees"):
            segmentation_metrics(**kw)


class TestAggregateOverSeeds:
    def test_mean_std_nan(self):
        runs = [
            {"dice": 0.5, "auprc": math.nan, "only_one": 0.3},
            {"dice": 0.7, "auprc": 0.2, "all_nan": math.nan},
            {"dice": 0.6, "auprc": 0.4, "all_nan": math.nan},
        ]
        out = aggregate_over_seeds(runs)
        assert list(out) == ["dice", "auprc", "only_one", "all_nan"]
        assert out["dice"] == pytest.approx((0.6, 0.1))  # deviations -.1, .1, 0: var = .02 / 2
        assert out["auprc"] == pytest.approx((0.3, math.sqrt(0.02)))
        assert out["only_one"] == (0.3, 0.0)
        assert all(math.isnan(v) for v in out["all_nan"])

    def test_single_seed_and_empty(self):
        assert aggregate_over_seeds([{"dice": 0.42}]) == {"dice": (0.42, 0.0)}
        assert aggregate_over_seeds([]) == {}


# --------------------------------------------------------------------------------------------------
# the per-slice metrics as MONAI metric classes
# --------------------------------------------------------------------------------------------------
def test_slice_metrics_accumulate_like_the_functions():
    from anofpdm_monai.metrics import SliceDiceMetric, SliceIoUMetric

    rng = np.random.default_rng(3)
    pred, gt = rng.random((9, 6, 6)) > 0.5, rng.random((9, 6, 6)) > 0.6
    gt[0] = pred[0] = False  # empty vs empty scores 1 under the protocol's smoothing
    for metric_cls, fn in ((SliceDiceMetric, dice_per_slice), (SliceIoUMetric, iou_per_slice)):
        metric = metric_cls()
        for chunk in (slice(0, 4), slice(4, 9)):
            metric(torch.as_tensor(pred[chunk]), torch.as_tensor(gt[chunk]))
        assert float(metric.aggregate()) == pytest.approx(fn(pred, gt).mean(), abs=1e-12)
        every = metric_cls(reduction="none")
        every(torch.as_tensor(pred), torch.as_tensor(gt))
        np.testing.assert_allclose(every.aggregate().numpy(), fn(pred, gt))
        assert float(every.aggregate()[0]) == pytest.approx(1.0)


def test_slice_dice_in_a_monai_evaluator_with_metrics_saver(tmp_path):
    """The metric plugs into a MONAI evaluator through IgniteMetricHandler; MetricsSaver writes the per-slice
    values and the mean."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import IgniteMetricHandler, MetricsSaver, from_engine

    from anofpdm_monai.metrics import SliceDiceMetric

    rng = np.random.default_rng(4)
    images = torch.as_tensor(rng.random((6, 1, 8, 8)), dtype=torch.float32)
    labels = (torch.as_tensor(rng.random((6, 1, 8, 8))) > 0.5).float()
    data = [{"image": images[i : i + 3], "label": labels[i : i + 3]} for i in (0, 3)]

    class Threshold(torch.nn.Module):
        def forward(self, x):
            return (x > 0.5).float()

    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=Threshold(),
        decollate=False,
        key_val_metric={
            "slice_dice": IgniteMetricHandler(
                metric_fn=SliceDiceMetric(), output_transform=from_engine(["pred", "label"]), save_details=True
            )
        },
        val_handlers=[MetricsSaver(save_dir=str(tmp_path), metrics="*", metric_details="*")],
    )
    evaluator.run()
    expected = dice_per_slice((images > 0.5).numpy(), labels.bool().numpy()).mean()
    assert evaluator.state.metrics["slice_dice"] == pytest.approx(expected, abs=1e-12)
    assert (tmp_path / "metrics.csv").is_file() and "slice_dice" in (tmp_path / "metrics.csv").read_text()
    assert (tmp_path / "slice_dice_raw.csv").is_file()


def test_segmentation_metrics_of_healthy_slices_only():
    """A set without a lesion slice (a healthy case of a per-case table): the unhealthy metrics are NaN, the mixed
    ones defined (an empty mask on an empty truth scores 1), nothing raises."""
    n = 3
    empty = np.zeros((n, 8, 8), dtype=bool)
    maps = np.random.default_rng(0).uniform(size=(n, 8, 8))
    m = segmentation_metrics(empty, empty, empty, maps, None, np.zeros(n, int), ["a"] * n)
    assert np.isnan(m["unhealthy_dice"]) and np.isnan(m["pooled_auprc"]) and m["mixed_dice"] == 1.0
    assert m["n_unhealthy"] == 0 and m["volume_dice"] == 1.0
