# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""The evaluation metrics as MONAI metrics (issue 24 item 2): :class:`PooledAUPRC`, :class:`BatchedAUPRCMetric` and
:class:`VolumeDiceMetric` equal the library functions on random data and on hand-derived cases, give the same value
inside a stock ``IgniteMetricHandler`` (a plain ignite ``Engine`` on decollated items and a stock MONAI
``SupervisedEvaluator`` whose post transform carries the brain mask as channel 1 of ``y``), and gather across two
gloo ranks."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, decollate_batch
from monai.engines import SupervisedEvaluator
from monai.handlers import IgniteMetricHandler, from_engine
from monai.transforms import ConcatItemsd

from anofpdm_monai.metrics import (
    BatchedAUPRCMetric,
    PooledAUPRC,
    VolumeDiceMetric,
    batched_auprc,
    pooled_auprc,
    pooled_dice,
    volume_dice,
)

REPO = Path(__file__).resolve().parents[1]


def _data(n: int = 230, size: int = 8, seed: int = 0):
    """(N, H, W) float32 maps, bool gt (about 40 % unhealthy slices), bool brain; maps higher on the lesions."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((n, size, size), dtype=bool)
    for i in np.flatnonzero(rng.random(n) < 0.4):
        r, c = rng.integers(0, size - 3, 2)
        gt[i, r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = True
    brain = rng.random((n, size, size)) < 0.8
    brain |= gt
    maps = (rng.random((n, size, size)) + 0.6 * gt).astype(np.float32)
    maps = np.round(maps, 2)  # ties, as in real maps
    return maps, gt, brain


def _y(gt: np.ndarray, brain: np.ndarray | None = None) -> torch.Tensor:
    """(N, 1 or 2, H, W): ground truth, and the brain mask as channel 1."""
    chans = [torch.from_numpy(gt)] + ([] if brain is None else [torch.from_numpy(brain)])
    return torch.stack(chans, dim=1).float()


def _feed(metric, maps: np.ndarray, y: torch.Tensor, batch: int = 32):
    """Call the metric on batch-first tensors, then once on a list of channel-first items (decollated)."""
    x = torch.from_numpy(maps)[:, None]
    split = len(maps) - 5
    for s in range(0, split, batch):
        e = min(s + batch, split)
        metric(x[s:e], y[s:e])
    metric(list(x[split:]), list(y[split:]))
    return metric


# ------------------------------------------------------------------------------------- equality with the functions
@pytest.mark.parametrize("with_brain", [True, False], ids=["brain", "all-pixels"])
def test_pooled_auprc_metric_equals_function(with_brain):
    maps, gt, brain = _data()
    b = brain if with_brain else None
    expected = pooled_auprc(maps, gt, b)
    metric = _feed(PooledAUPRC(), maps, _y(gt, b))
    assert metric.compute() == expected  # bit for bit
    assert metric.aggregate().dtype == torch.float64 and metric.aggregate().item() == expected
    mask = brain if with_brain else np.ones_like(gt)
    assert metric.n_positive == int((gt & mask).sum()) and metric.n_negative == int((~gt & mask).sum())
    counts = metric.get_buffer()  # MONAI's buffer: each slice's (n_positive, n_negative)
    assert counts.shape == (len(maps), 2)
    np.testing.assert_array_equal(counts[:, 0].numpy(), (gt & mask).sum((1, 2)))
    # the same as the update() path, precision-recall curve included
    direct = PooledAUPRC()
    direct.update(maps, gt, b)
    for mp in (None, 50):
        for a, c in zip(metric.precision_recall_curve(mp), direct.precision_recall_curve(mp)):
            np.testing.assert_array_equal(a, c)
    metric.reset()
    assert metric.n_positive == 0 and metric.get_buffer() is None and math.isnan(metric.compute())


@pytest.mark.parametrize("unhealthy", [False, True], ids=["mixed", "unhealthy"])
@pytest.mark.parametrize("with_brain", [True, False], ids=["brain", "all-pixels"])
def test_batched_auprc_metric_equals_function(unhealthy, with_brain):
    maps, gt, brain = _data()
    b = brain if with_brain else None
    labels = gt.any(axis=(1, 2)).astype(np.int64)
    for batch_size, seed in ((100, 0), (37, 5)):
        expected = batched_auprc(maps, gt, b, batch_size, seed, weights=labels if unhealthy else None)
        metric = _feed(BatchedAUPRCMetric(batch_size, seed, unhealthy=unhealthy), maps, _y(gt, b))
        assert metric.aggregate().item() == expected


def test_volume_dice_metric_equals_function():
    rng = np.random.default_rng(1)
    n, cases = 24, ["c0", "c1", "c2", "c3"]
    gt = rng.random((n, 6, 6)) < 0.2
    pred = np.where(rng.random((n, 6, 6)) < 0.8, gt, rng.random((n, 6, 6)) < 0.2)
    pred[18:] = False  # an empty prediction on c3
    gt[12:18] = False  # c2: no lesion
    case_ids = np.repeat(cases, 6)
    per_case, mean = volume_dice(pred, gt, case_ids)
    # one item per case, (1, H, W, D) volumes, in sorted case order
    vol = [torch.from_numpy(a.reshape(4, 6, 6, 6).transpose(0, 2, 3, 1))[:, None] for a in (pred, gt)]
    metric = VolumeDiceMetric()
    metric(vol[0][:3], vol[1][:3])
    metric(list(vol[0][3:]), list(vol[1][3:]))
    assert metric.aggregate().item() == mean
    metric.reduction = "none"
    assert metric.aggregate().tolist() == [per_case[c] for c in cases]
    metric.reduction = "pooled"
    assert metric.aggregate().item() == pooled_dice(pred, gt)


def test_hand_derived_values():
    maps, gt, brain = _data(60)
    perfect = gt.astype(np.float32)
    constant = np.full(maps.shape, 0.3, dtype=np.float32)
    for metric in (PooledAUPRC(), BatchedAUPRCMetric(), BatchedAUPRCMetric(unhealthy=True)):
        _feed(metric, perfect, _y(gt, brain))
        assert metric.aggregate().item() == 1.0
        metric.reset()
        _feed(metric, constant, _y(gt, brain))  # all ties: AP = fraction of positive brain pixels
        fraction = gt[brain].mean() if not getattr(metric, "unhealthy", False) else None
        if fraction is None:
            unhealthy = gt.any(axis=(1, 2))
            fraction = gt[unhealthy][brain[unhealthy]].mean()
        assert metric.aggregate().item() == pytest.approx(fraction, rel=1e-12)  # one batch (60 <= 100 slices)
    # 3D Dice: P = 4 px, G = 4 px, 2 shared -> (4 + s) / (8 + s); empty vs empty -> 1
    p = torch.zeros(2, 1, 4, 4, 2, dtype=torch.bool)
    g = torch.zeros_like(p)
    p[0, 0, :2, :2, 0] = True
    g[0, 0, :2, 1:3, 0] = True
    metric = VolumeDiceMetric(reduction="none")
    metric(p, g)
    np.testing.assert_allclose(metric.aggregate().numpy(), [(4 + 1e-6) / (8 + 1e-6), 1.0], rtol=1e-15)
    metric.reduction = "pooled"
    assert metric.aggregate().item() == 0.5


def test_input_errors():
    with pytest.raises(ValueError, match="y_pred must be"):
        PooledAUPRC()(torch.zeros(2, 2, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="ground truth and brain"):
        BatchedAUPRCMetric()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="shape mismatch"):
        PooledAUPRC()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 2, 4, 5))
    with pytest.raises(ValueError, match="binary"):
        BatchedAUPRCMetric()(torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="no data"):
        BatchedAUPRCMetric().aggregate()
    with pytest.raises(ValueError, match="reduction"):
        VolumeDiceMetric(reduction="sum")


# ------------------------------------------------------------------------------------------- stock MONAI / ignite
def test_ignite_metric_handler_on_decollated_items():
    """A plain ignite Engine whose output is decollated dicts with pred / label / brain; IgniteMetricHandler with
    an output transform that puts the brain mask in channel 1 of y."""
    maps, gt, brain = _data(130)
    batches = [slice(s, s + 40) for s in range(0, 130, 40)]

    def step(engine, sl):
        batch = {
            "pred": torch.from_numpy(maps[sl])[:, None],
            "label": torch.from_numpy(gt[sl])[:, None].float(),
            "brain": torch.from_numpy(brain[sl])[:, None].float(),
        }
        return decollate_batch(batch)

    def with_brain(out):
        return [d["pred"] for d in out], [torch.cat([d["label"], d["brain"]]) for d in out]

    engine = Engine(step)
    IgniteMetricHandler(PooledAUPRC(), output_transform=with_brain).attach(engine, "pooled_auprc")
    IgniteMetricHandler(BatchedAUPRCMetric(), output_transform=with_brain, save_details=False).attach(engine, "mixed")
    IgniteMetricHandler(BatchedAUPRCMetric(unhealthy=True), output_transform=with_brain).attach(engine, "unhealthy")
    IgniteMetricHandler(PooledAUPRC(), output_transform=from_engine(["pred", "label"])).attach(engine, "all_pixels")
    engine.run(batches, max_epochs=1)
    m = engine.state.metrics
    assert m["pooled_auprc"] == pooled_auprc(maps, gt, brain)
    assert m["all_pixels"] == pooled_auprc(maps, gt)
    assert m["mixed"] == batched_auprc(maps, gt, brain)
    assert m["unhealthy"] == batched_auprc(maps, gt, brain, weights=gt.any(axis=(1, 2)))
    assert engine.state.metric_details["pooled_auprc"].shape == (130, 2)

    # volumes: one item per case
    rng = np.random.default_rng(2)
    vol_gt = rng.random((5, 1, 6, 6, 4)) < 0.3
    vol_pred = rng.random((5, 1, 6, 6, 4)) < 0.3
    engine = Engine(
        lambda e, i: decollate_batch({"pred": torch.from_numpy(vol_pred[i]), "label": torch.from_numpy(vol_gt[i])})
    )
    IgniteMetricHandler(VolumeDiceMetric(), output_transform=from_engine(["pred", "label"])).attach(engine, "dice3d")
    engine.run([slice(0, 2), slice(2, 5)], max_epochs=1)
    slices = [a.transpose(0, 4, 2, 3, 1).reshape(20, 6, 6) for a in (vol_pred, vol_gt)]
    assert engine.state.metrics["dice3d"] == volume_dice(*slices, np.repeat(list("abcde"), 4))[1]


class MapNet(torch.nn.Module):
    """The 'network' of the evaluator: returns its input, so the prediction is the stored anomaly map."""

    def forward(self, x):
        return x.clone()


def test_stock_supervised_evaluator():
    """MONAI's SupervisedEvaluator; the post transform ConcatItemsd carries the brain mask as channel 1 of y."""
    maps, gt, brain = _data(150)
    data = [
        {
            "image": torch.from_numpy(m)[None],
            "label": torch.from_numpy(g)[None].float(),
            "brain": torch.from_numpy(b)[None].float(),
        }
        for m, g, b in zip(maps, gt, brain)
    ]
    pair = from_engine(["pred", "label_brain"])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=64),
        network=MapNet(),
        postprocessing=ConcatItemsd(keys=["label", "brain"], name="label_brain"),
        key_val_metric={"pooled_auprc": IgniteMetricHandler(PooledAUPRC(), output_transform=pair)},
        additional_metrics={
            "mixed_auprc_batched": IgniteMetricHandler(BatchedAUPRCMetric(), output_transform=pair),
            "unhealthy_auprc_batched": IgniteMetricHandler(BatchedAUPRCMetric(unhealthy=True), output_transform=pair),
        },
    )
    evaluator.run()
    m = evaluator.state.metrics
    assert m["pooled_auprc"] == pooled_auprc(maps, gt, brain)
    assert m["mixed_auprc_batched"] == batched_auprc(maps, gt, brain, 100, 0)
    assert m["unhealthy_auprc_batched"] == batched_auprc(maps, gt, brain, 100, 0, weights=gt.any(axis=(1, 2)))


# -------------------------------------------------------------------------------------------------- distributed
_WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    sys.path.insert(0, {tests!r})
    from test_monai_metrics import _data, _y
    from anofpdm_monai.metrics import BatchedAUPRCMetric, PooledAUPRC, VolumeDiceMetric


    def worker(rank, port, out):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=2)
        maps, gt, brain = _data(130)
        part = slice(0, 70) if rank == 0 else slice(70, 130)  # uneven shards: the gather pads and unpads
        x, y = torch.from_numpy(maps[part])[:, None], _y(gt[part], brain[part])
        metrics = {{
            "pooled": PooledAUPRC(),
            "batched": BatchedAUPRCMetric(),
            "unhealthy": BatchedAUPRCMetric(unhealthy=True),
            "dice": VolumeDiceMetric(),
            "empty_rank": PooledAUPRC(),
        }}
        for name, m in metrics.items():
            if name == "dice":
                m(y[:, :1] > 0, torch.from_numpy(maps[part] > 0.9)[:, None])
            elif name == "empty_rank":  # no pixel on rank 1: it still joins aggregate()'s gather
                if rank == 0:
                    m(x, y)
            else:
                m(x, y)
        result = {{k: m.aggregate().tolist() for k, m in metrics.items()}}
        result["local_pooled"] = metrics["pooled"].compute()
        if rank == 0:
            json.dump(result, open(out, "w"))
        dist.destroy_process_group()


    if __name__ == "__main__":
        mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
    """
)


def test_two_gloo_ranks_gather(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(REPO / "tests")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(script), str(port), str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.is_file(), (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())
    maps, gt, brain = _data(130)
    assert r["pooled"] == pooled_auprc(maps, gt, brain)
    assert r["local_pooled"] == pooled_auprc(maps[:70], gt[:70], brain[:70])  # compute(): this rank's pixels
    assert r["empty_rank"] == pooled_auprc(maps[:70], gt[:70], brain[:70])
    # the gathered order is rank 0's slices, then rank 1's: the single-process order here
    assert r["batched"] == batched_auprc(maps, gt, brain)
    assert r["unhealthy"] == batched_auprc(maps, gt, brain, weights=gt.any(axis=(1, 2)))
    dice = volume_dice(gt, maps > 0.9, [f"{i:03d}" for i in range(130)])[1]
    assert r["dice"] == dice
