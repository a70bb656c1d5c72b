"""The device path of inference (issues 21 and 22): forward noise keyed per slice by (seed, case, slice), so that
results do not depend on the batch a slice is run in; plain tensors (no MONAI ``MetaTensor``) into the network on the
volume, calibration and evaluation paths; schedule coefficients read from per-(device, dtype) tables with no host
transfer in the per-step path.

The networks here are analytic and row-wise (each output row depends only on its own input row, step and label), so
a slice's results are bit for bit the same in any batch: every comparison across batchings is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from torch.overrides import TorchFunctionMode

from anofpdm_monai.apps.inference import VolumeInferer
from anofpdm_monai.calibration import CalibrationInferer
from anofpdm_monai.data import SliceDataset, VolumePreprocessor
from anofpdm_monai.data.synthetic import make_case, make_dataset, phantom_anatomy
from anofpdm_monai.engines import SliceLabelPrepareBatch
from anofpdm_monai.evaluation import Evaluator
from anofpdm_monai.evaluation.store import ResultStore
from anofpdm_monai.inferers import AnoFPDMInferer, AnoFPDMVolumeInferer, ReconstructionInferer, run_forward_process
from anofpdm_monai.inferers.reconstruction import ddim_decode, ddpm_decode
from anofpdm_monai.networks.unet import HEALTHY
from anofpdm_monai.schedule import NoiseSchedule
from anofpdm_monai.settings import AnoFPDMSettings

GRID = [0, 100, 200, 300]
C, S = 4, 16
BRATS = ["flair", "t1", "t1ce", "t2"]


class RowwiseNet(nn.Module):
    """An analytic epsilon network whose output row depends only on its own input row, step and label: null
    ``eps = 0.2 x + 0.05 cos(pi t / T)``, healthy adds ``0.8 relu(x - 0.2)`` (it "removes" bright values). Records
    the type of every tensor it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.types: set[tuple[type, type, type]] = set()
        self.calls = 0

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.types.add((type(x), type(timesteps), type(class_labels)))
        wave = torch.cos(torch.pi * timesteps.to(x.dtype) / 1000.0).view(-1, 1, 1, 1)
        eps = 0.2 * x + 0.05 * wave
        healthy = (class_labels == HEALTHY).view(-1, 1, 1, 1)
        return torch.where(healthy, eps + 0.8 * torch.relu(x - 0.2), eps)

    def only_plain_tensors(self) -> bool:
        return self.calls > 0 and self.types == {(torch.Tensor, torch.Tensor, torch.Tensor)}


def _slices(n: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, C, S, S, generator=g) * 1.8 - 0.9


def _inferer(forward: str = "ddpm", seed: int | None = 0, **kwargs) -> AnoFPDMInferer:
    options = dict(map_channels=[0, 3], timesteps=GRID, m_max=[0.05, 0.05], tau=0.9, min_component_size=2)
    options.update(kwargs)
    return AnoFPDMInferer(forward=forward, seed=seed, **options)


def _run_in_batches(inferer, x, keys, batch_size):
    """The per-slice outputs of ``inferer`` over ``x`` in batches of ``batch_size`` (keys split alike)."""
    parts = []
    for start in range(0, x.shape[0], batch_size):
        part = slice(start, start + batch_size)
        parts.append(inferer(x[part], RowwiseNet(), noise_keys=keys[part]))
    fields = ("anomaly_map", "filtered_map", "mask", "end_step", "divergence", "mse_guided", "cosine", "threshold")
    return {f: torch.cat([getattr(p, f) for p in parts]) for f in fields}


def _assert_same(a: dict, b: dict, rows=None) -> None:
    for name, value in a.items():
        other = b[name] if rows is None else b[name][rows]
        assert torch.equal(value, other), name


# --------------------------------------------------------------------------------------------------------------------
# per-slice noise: batch size, subsets, seed
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("forward", ["ddpm", "ddim"])
def test_results_do_not_depend_on_the_batch(forward):
    x = _slices(7)
    inferer = _inferer(forward)
    keys = inferer.noise_keys("case-1", list(range(10, 17)))
    whole = _run_in_batches(inferer, x, keys, 128)
    _assert_same(whole, _run_in_batches(inferer, x, keys, 2))
    _assert_same(whole, _run_in_batches(inferer, x, keys, 5))
    # a subset of the slices, in another order, gives those slices' results
    rows = [5, 1, 4]
    _assert_same(_run_in_batches(inferer, x[rows], [keys[i] for i in rows], 8), whole, rows)
    # the seed, the case and the slice index all matter (DDPM: noise at every step)
    if forward == "ddpm":
        for other_keys in (
            _inferer(forward, seed=1).noise_keys("case-1", list(range(10, 17))),
            inferer.noise_keys("case-2", list(range(10, 17))),
            inferer.noise_keys("case-1", list(range(11, 18))),
        ):
            other = _run_in_batches(inferer, x, other_keys, 128)
            assert not torch.equal(other["divergence"], whole["divergence"])
            assert not torch.equal(other["anomaly_map"], whole["anomaly_map"])


def test_seed_still_matters_and_plain_batches_use_positions():
    x = _slices(4)
    net = RowwiseNet()
    a, b = _inferer(seed=0)(x, net), _inferer(seed=1)(x, net)
    assert not torch.equal(a.divergence, b.divergence)
    # without keys, slice b of a plain batch is position b of the anonymous case
    inferer = _inferer(seed=0)
    keyed = inferer(x, net, noise_keys=inferer.noise_keys(None, range(4)))
    assert torch.equal(a.divergence, keyed.divergence) and torch.equal(a.anomaly_map, keyed.anomaly_map)
    # so a plain batch's second slice alone (position 0) differs from its result in the batch (position 1)
    assert not torch.equal(inferer(x[1:2], net).divergence[0], a.divergence[1])
    # seed None: the global RNG (one draw for the batch), reproducible with torch.manual_seed
    torch.manual_seed(3)
    g1 = _inferer(seed=None)(x, net)
    torch.manual_seed(3)
    assert torch.equal(g1.divergence, _inferer(seed=None)(x, net).divergence)


def test_anoddpm_noise_is_per_slice():
    x = _slices(5)
    inferer = ReconstructionInferer("anoddpm", noise_level=200, num_steps=4, map_channels=[0, 3], seed=0)
    keys = inferer.noise_keys("case-1", [3, 4, 5, 6, 7])
    whole = inferer.reconstruct(x, RowwiseNet(), noise_keys=keys)
    parts = torch.cat([inferer.reconstruct(x[i : i + 2], RowwiseNet(), noise_keys=keys[i : i + 2]) for i in (0, 2, 4)])
    assert torch.equal(whole, parts)
    other = ReconstructionInferer("anoddpm", noise_level=200, num_steps=4, map_channels=[0, 3], seed=1)
    assert not torch.equal(
        whole, other.reconstruct(x, RowwiseNet(), noise_keys=other.noise_keys("case-1", range(3, 8)))
    )


def _volume(depth: int = 9, seed: int = 0) -> tuple[MetaTensor, MetaTensor]:
    g = torch.Generator().manual_seed(seed)
    image = MetaTensor(
        torch.rand(1, C, S, S, depth, generator=g) * 1.8 - 0.9, affine=torch.diag(torch.tensor([2.0] * 3 + [1.0]))
    )
    brain = torch.zeros(1, 1, S, S, depth)
    brain[..., 3:13, 3:13, 1 : depth - 1] = 1.0  # the kept range: slices 1 .. depth - 2
    return image, MetaTensor(brain, affine=image.affine)


def test_volume_results_do_not_depend_on_batch_size_and_match_the_slice_inferer():
    image, brain = _volume()
    inferer = _inferer("ddpm")
    nets = {}
    outs = {}
    for batch_size in (2, 5, 64):
        nets[batch_size] = RowwiseNet()
        volume = AnoFPDMVolumeInferer(inferer, batch_size=batch_size)
        outs[batch_size] = volume(image, nets[batch_size], brain=brain, case_id=["case-1"])  # collated, as the engine
    for batch_size in (5, 64):
        for name, value in outs[2].items():  # bit for bit (NaN cosine and +inf threshold outside the kept range)
            torch.testing.assert_close(value, outs[batch_size][name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert all(net.only_plain_tensors() for net in nets.values())
    assert all(type(v) is torch.Tensor for v in outs[2].values())
    # slice d of the volume is the slice inferer's result on that slice with the key of (seed, case, d): what the
    # evaluation computes from a SliceDataset (whose slice_index is the same RAS axial index)
    kept = [3, 6, 7]
    x = image.as_tensor()[0][..., kept].permute(3, 0, 1, 2).contiguous()  # the volume's batches are contiguous
    th = inferer.thresholds(inferer.run(x, RowwiseNet(), noise_keys=inferer.noise_keys("case-1", kept)))
    assert torch.equal(th.anomaly_map.permute(1, 2, 0), outs[2]["anomaly_map"][0, 0][..., kept])
    assert torch.equal(th.threshold, outs[2]["threshold"][0, kept])
    assert torch.equal(th.cosine, outs[2]["cosine"][0, kept])
    # another case id draws other noise; without a case id the case is anonymous
    other = AnoFPDMVolumeInferer(inferer, batch_size=4)(image, RowwiseNet(), brain=brain, case_id="case-2")
    assert not torch.equal(other["anomaly_map"], outs[2]["anomaly_map"])
    anonymous = AnoFPDMVolumeInferer(inferer, batch_size=4)(image, RowwiseNet(), brain=brain)
    th = inferer.thresholds(inferer.run(x, RowwiseNet(), noise_keys=inferer.noise_keys(None, kept)))
    assert torch.equal(th.threshold, anonymous["threshold"][0, kept])


# --------------------------------------------------------------------------------------------------------------------
# plain tensors into the network: volume (the whole inference pipeline with Invertd), calibration, evaluation
# --------------------------------------------------------------------------------------------------------------------


def test_volume_pipeline_gives_the_network_plain_tensors_and_still_inverts(tmp_path):
    anatomy = phantom_anatomy((24, 28, 12))
    entry = make_case(anatomy, tmp_path / "data", "case_1", num_lesions=1, lesion_radius=3.0, seed=2)
    entry = {"id": entry["id"], "image": [str(tmp_path / "data" / p) for p in entry["image"]]}
    net = RowwiseNet()
    vi = VolumeInferer(net, _inferer("ddim"), VolumePreprocessor(image_size=S), progress=False, batch_size=3)
    summary = vi.run([entry], tmp_path / "out")
    assert summary["done"] == ["case_1"] and not summary["failed"]
    assert net.only_plain_tensors(), net.types
    import nibabel as nib

    ref = nib.load(entry["image"][0])
    out = nib.load(tmp_path / "out" / "case_1" / "case_1_anomaly_map.nii.gz")
    assert out.shape == ref.shape[:3]  # Invertd took the map back onto the input grid
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)


def _calibration_statistics(batches, inferer, net) -> dict[str, torch.Tensor]:
    stats_inferer = CalibrationInferer(inferer, [0.5, 2.0])
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=batches,
        epoch_length=len(batches),
        network=net,
        prepare_batch=SliceLabelPrepareBatch(),
        inferer=stats_inferer,
        decollate=False,
    )
    outputs = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output["pred"]))
    evaluator.run()
    return {k: torch.cat([o[k] for o in outputs], dim=1) for k in outputs[0]}


def test_calibration_evaluator_gives_plain_tensors_and_per_slice_noise():
    """The calibration evaluator (SupervisedEvaluator + SliceLabelPrepareBatch + CalibrationInferer, as
    calibrate.json) on MetaTensor batches: the network sees plain tensors and the statistics do not depend on the
    batch size (the prepare-batch hands the slices' case ids and indices to the inferer)."""
    x = _slices(6)
    cases = ["a", "a", "a", "b", "b", "b"]
    slices = torch.tensor([4, 5, 6, 4, 5, 6])
    labels = torch.tensor([0, 1, 1, 0, 0, 1])

    def batches(size):
        return [
            {
                "image": MetaTensor(x[i : i + size]),
                "class_label": labels[i : i + size],
                "case_id": cases[i : i + size],
                "slice_index": slices[i : i + size],
                "label": MetaTensor(torch.zeros(len(cases[i : i + size]), 1, S, S)),
            }
            for i in range(0, 6, size)
        ]

    inferer = _inferer("ddpm")
    nets = [RowwiseNet() for _ in range(2)]
    a = _calibration_statistics(batches(2), inferer, nets[0])
    b = _calibration_statistics(batches(6), inferer, nets[1])
    assert all(net.only_plain_tensors() for net in nets)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the keys are those of (seed, case, slice): the same numbers from a direct keyed run
    direct = inferer.forward_process(
        x,
        RowwiseNet(),
        guidance_scales=[0.5, 2.0],
        need_maps=False,
        relative=False,
        noise_keys=inferer.noise_keys(cases, slices),
    )
    assert torch.equal(direct.divergence_max("per_modality"), a["divergence_max"])


@pytest.fixture(scope="module")
def slice_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("device_path")
    datalist = make_dataset(
        root / "data", phantom_anatomy((24, 28, 16)), splits={"validation": 2, "test": 1}, lesion_radius=3.0
    )
    pre = VolumePreprocessor(image_size=S)
    kwargs = dict(progress=False, require_labels=True)
    val = SliceDataset.from_datalist(datalist, root / "data", "validation", root / "cache", pre, **kwargs)
    test = SliceDataset.from_datalist(datalist, root / "data", "test", root / "cache", pre, **kwargs)
    return {"root": root, "val": val, "test": test}


def _as_meta(item: dict) -> dict:
    return {**item, "image": MetaTensor(item["image"])}


def test_evaluation_gives_plain_tensors_and_does_not_depend_on_batch_size(slice_data, tmp_path):
    """The whole evaluation (calibration, pixel-label tuning, test runs) on MetaTensor slices: the network sees plain
    tensors, and the stored results of the stochastic methods are the same with batches of 3 and of 64."""
    val, test = (SliceDataset(d.cache, d.table, transform=_as_meta) for d in (slice_data["val"], slice_data["test"]))
    assert type(val[0]["image"]) is MetaTensor
    stored = {}
    for batch_size in (3, 64):
        net = RowwiseNet()
        out = tmp_path / f"b{batch_size}"
        Evaluator(
            net,
            "digest0",
            BRATS,
            ["flair", "t2"],
            val,
            test,
            out,
            methods=["anofpdm_ddpm", "anoddpm"],
            seeds=[0],
            noise_levels=[100],
            num_steps=2,
            guidance_scales=[0.5, 2.0],
            settings=AnoFPDMSettings(timesteps=GRID),
            median_kernel=3,
            min_component_size=0,
            batch_size=batch_size,
            progress=False,
            figure_slices=1,
        ).run()
        assert net.only_plain_tensors(), net.types
        cases = sorted(set(test.table["case_id"].astype(str)))
        stored[batch_size] = {m: ResultStore(out).load(m, 0, cases) for m in ("anofpdm_ddpm", "anoddpm")}
    for method, arrays in stored[3].items():
        for name, value in arrays.items():
            np.testing.assert_array_equal(value, stored[64][method][name], err_msg=f"{method}/{name}")


# --------------------------------------------------------------------------------------------------------------------
# schedule coefficients: per-(device, dtype) tables, no host transfer per step
# --------------------------------------------------------------------------------------------------------------------


class HostTransfers(TorchFunctionMode):
    """Records the torch calls that read a tensor on the host or copy one between devices (on a GPU each is a
    synchronisation or a transfer): ``.cpu()``, ``.item()``, ``.tolist()``, ``.numpy()``, ``bool()``/``float()``/
    ``int()`` of a tensor, ``torch.tensor``/``as_tensor`` of host data, and ``.to``/``.copy_``/``.cuda`` with a
    device. Calls made inside the network (``inside``) are not recorded; each record carries the number of network
    calls made before it."""

    HOST = {"cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "tensor", "as_tensor"}

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, str]] = []
        self.calls = 0
        self.inside = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside:
            name = getattr(func, "__name__", str(func))
            device_arg = "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])
            if name in self.HOST or (name in ("to", "copy_", "cuda") and device_arg):
                self.events.append((self.calls, name))
        return func(*args, **kwargs)


class CountedNet(nn.Module):
    """RowwiseNet whose calls are counted by (and hidden from) a :class:`HostTransfers` recorder."""

    def __init__(self, recorder: HostTransfers) -> None:
        super().__init__()
        self.recorder, self.net = recorder, RowwiseNet()

    def forward(self, x, timesteps, class_labels):
        self.recorder.inside = True
        try:
            return self.net(x, timesteps=timesteps, class_labels=class_labels)
        finally:
            self.recorder.inside = False
            self.recorder.calls += 1


def _transfers_per_step(run, num_steps: int) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(events of the steps after the first, all events) of ``run(network, grid)`` on a grid of ``num_steps``: the
    events recorded after the second network call and before the last one (the first step, which makes the cached
    tables, ends before the second call)."""
    recorder = HostTransfers()
    with recorder:
        run(CountedNet(recorder), list(range(0, 10 * num_steps, 10)))
    assert recorder.calls >= num_steps
    later = [e for e in recorder.events if 2 <= e[0] < recorder.calls]
    return later, recorder.events


def test_the_recorder_sees_the_old_coefficient_lookup():
    """The stub has power: the lookup ``_coef`` used to do (CPU table, ``t.cpu()``, copy to the device) is seen."""
    schedule, like = NoiseSchedule(), torch.zeros(2, 1, 4, 4)
    recorder = HostTransfers()
    with recorder:
        t = torch.as_tensor(7, dtype=torch.long)
        schedule.alphas_cumprod.sqrt()[t.cpu()].to(device=like.device, dtype=torch.float64)
    assert [name for _, name in recorder.events] == ["as_tensor", "cpu", "to"]


@pytest.mark.parametrize("forward", ["ddim", "ddpm"])
def test_forward_process_makes_no_host_transfer_per_step(forward):
    x = _slices(3)

    def run(net, grid):  # a fresh schedule: its tables are made (once) in the run
        generators = [torch.Generator().manual_seed(k) for k in (1, 2, 3)]
        run_forward_process(net, x, NoiseSchedule(), grid, [0.5, 2.0], [0, 3], forward=forward, generator=generators)

    between, events = _transfers_per_step(run, 12)
    assert between == [], between
    _, events_short = _transfers_per_step(run, 3)
    assert len(events) == len(events_short)  # what happens before the first and after the last step: a constant


@pytest.mark.parametrize("decode", ["ddim", "ddpm"])
def test_reconstruction_loops_make_no_host_transfer_per_step(decode):
    x = _slices(2)

    def run(net, grid):
        if decode == "ddim":
            ddim_decode(net, x, NoiseSchedule(), grid, label=HEALTHY, guidance_scale=2.0)
        else:
            ddpm_decode(net, x, NoiseSchedule(), grid, generator=[torch.Generator().manual_seed(k) for k in (5, 6)])

    between, events = _transfers_per_step(run, 8)
    assert between == [], between
    assert len(events) == len(_transfers_per_step(run, 3)[1])


def test_schedule_tables_are_cached_per_device_and_dtype_and_exact():
    schedule = NoiseSchedule()
    abar = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), dim=0)
    for dtype, working in (
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ):
        like = torch.zeros(3, 2, 4, 4, dtype=dtype)
        c = schedule.sqrt_alpha_bar(417, like)
        assert c.dtype == working and c.ndim == 0
        assert c.item() == abar[417].sqrt().to(working).item()  # the float64 value rounded once: bit for bit
        t = torch.tensor([0, 417, 999])
        c = schedule.sqrt_one_minus_alpha_bar(t, like)
        assert c.shape == (3, 1, 1, 1) and c.dtype == working
        assert torch.equal(c.flatten(), (1.0 - abar[t]).sqrt().to(working))
    # one table per (name, device, dtype), reused
    first = schedule._table("sqrt_alpha_bar", torch.device("cpu"), torch.float32)
    schedule.sqrt_alpha_bar(3, torch.zeros(1, 1, 2, 2))
    assert schedule._table("sqrt_alpha_bar", torch.device("cpu"), torch.float32) is first
    assert {k[2] for k in schedule._tables} == {torch.float32, torch.float64}
    # the cache is not pickled
    import pickle

    assert pickle.loads(pickle.dumps(schedule))._tables == {}


def test_ddpm_posterior_makes_no_tensor_on_the_host():
    schedule = NoiseSchedule()
    x0, x_t = torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3)
    recorder = HostTransfers()
    with recorder:
        mean, std = schedule.ddpm_posterior(x0, x_t, 300, 250)
    assert recorder.events == []
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    beta = 1.0 - abar[300] / abar[250]
    var = beta * (1.0 - abar[250]) / (1.0 - abar[300])
    assert std.item() == pytest.approx(np.sqrt(var), rel=1e-6) and std.device == x0.device
    np.testing.assert_allclose(mean.numpy(), np.sqrt(1 - beta) * (1 - abar[250]) / (1 - abar[300]), rtol=1e-6)
