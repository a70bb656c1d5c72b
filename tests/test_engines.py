"""Tests of the training engine pieces (anofpdm_monai.engines): classifier-free prepare-batch, the class-conditioned
training inferer, RNG state, checkpoints and resumption, the time budget and the preview/progress handlers."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.networks.schedulers import DDPMScheduler

import anofpdm_monai.engines.prepare_batch as prepare_batch_module
from anofpdm_monai.engines import (
    ClassConditionedDiffusionInferer,
    ClassifierFreePrepareBatch,
    NoisyClassifierPrepareBatch,
    ProgressBar,
    ReconstructionSaver,
    RNGState,
    SliceLabelPrepareBatch,
    TimeBudget,
    TrainingCheckpointer,
)
from anofpdm_monai.networks import NULL, CheckpointError, CheckpointMetadata, build_diffusion_unet, load_network
from anofpdm_monai.schedule import NoiseSchedule

T = 1000

# (p_uncond, number of labels) for the null-fraction test; 4 binomial standard deviations are allowed
NULL_FRACTION_CASES = [(0.1, 20000), (0.25, 20000), (0.5, 4000)]


def _batch(n: int, channels: int = 1, size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, channels, size, size, generator=g) * 2 - 1,
        "class_label": torch.randint(0, 2, (n,), generator=g),
    }


def _tiny(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    net = build_diffusion_unet(1, "tiny", use_flash_attention=False, **kwargs)
    for m in net.modules():  # MONAI zero-initialises some convolutions: give every layer weights
        if isinstance(m, torch.nn.Conv2d) and not m.weight.detach().abs().max() > 0:
            m.reset_parameters()
    return net


# ------------------------------------------------------------------------------------------------------- prepare-batch


@pytest.mark.parametrize("p,n", NULL_FRACTION_CASES)
def test_null_fraction_is_p_within_sampling_error(p, n):
    batch = _batch(n)
    pb = ClassifierFreePrepareBatch(num_train_timesteps=T, p_uncond=p, seed=1)
    _, _, _, kwargs = pb(batch)
    labels = kwargs["class_labels"]
    dropped = labels == NULL
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(int(dropped.sum()) - n * p) <= 4 * sigma, (int(dropped.sum()), n * p, sigma)
    # independent of the label: the fraction is p among healthy and among unhealthy slices alike
    for value in (0, 1):
        sel = batch["class_label"] == value
        m = int(sel.sum())
        assert abs(int(dropped[sel].sum()) - m * p) <= 4 * math.sqrt(m * p * (1 - p))
    # labels not dropped are unchanged
    assert torch.equal(labels[~dropped], batch["class_label"][~dropped])
    assert set(labels.unique().tolist()) <= {0, 1, NULL}


@pytest.mark.parametrize("p,expected_nulls", [(0.0, 0), (1.0, 500)])
def test_null_fraction_extremes(p, expected_nulls):
    batch = _batch(500)
    _, _, _, kwargs = ClassifierFreePrepareBatch(p_uncond=p, seed=0)(batch)
    assert int((kwargs["class_labels"] == NULL).sum()) == expected_nulls
    if p == 0.0:
        assert torch.equal(kwargs["class_labels"], batch["class_label"])


def test_output_structure():
    batch = _batch(6, channels=4, size=8)
    images, target, args, kwargs = ClassifierFreePrepareBatch(num_train_timesteps=T, seed=0)(batch, device="cpu")
    assert torch.equal(images, batch["image"])
    assert args == ()
    assert set(kwargs) == {"noise", "timesteps", "class_labels"}
    assert torch.equal(target, kwargs["noise"])  # epsilon prediction: the target is the noise
    assert kwargs["noise"].shape == images.shape and kwargs["noise"].dtype == images.dtype
    assert kwargs["timesteps"].shape == (6,) and kwargs["timesteps"].dtype == torch.long
    assert kwargs["class_labels"].shape == (6,) and kwargs["class_labels"].dtype == torch.long


def test_timesteps_uniform_and_noise_standard_normal():
    n, bins = 50000, 10
    batch = _batch(n)
    _, noise, _, kwargs = ClassifierFreePrepareBatch(num_train_timesteps=bins, seed=2)(batch)
    t = kwargs["timesteps"]
    assert int(t.min()) == 0 and int(t.max()) == bins - 1
    counts = torch.bincount(t, minlength=bins)
    sigma = math.sqrt(n * (1 / bins) * (1 - 1 / bins))
    assert (counts - n / bins).abs().max() <= 4 * sigma, counts
    # T = 1000: within [0, T), both ends reached over many draws
    t1000 = ClassifierFreePrepareBatch(num_train_timesteps=T, seed=3)(batch)[3]["timesteps"]
    assert 0 <= int(t1000.min()) <= 5 and T - 6 <= int(t1000.max()) <= T - 1
    values = noise.flatten()
    assert abs(float(values.mean())) < 4 / math.sqrt(values.numel())
    assert abs(float(values.std()) - 1.0) < 0.02


def test_max_timestep_restricts_the_training_steps():
    n = 20000
    t = ClassifierFreePrepareBatch(num_train_timesteps=T, seed=4, max_timestep=320)(_batch(n))[3]["timesteps"]
    assert int(t.min()) == 0 and int(t.max()) == 319
    counts = torch.bincount(t // 32, minlength=10)  # 10 equal bins of [0, 320)
    sigma = math.sqrt(n * 0.1 * 0.9)
    assert (counts - n / 10).abs().max() <= 4 * sigma, counts
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match="max_timestep must be in"):
            ClassifierFreePrepareBatch(num_train_timesteps=T, max_timestep=bad)


def test_missing_label_key_and_bad_p():
    with pytest.raises(KeyError, match="class_label"):
        ClassifierFreePrepareBatch(seed=0)({"image": torch.zeros(2, 1, 2, 2)})
    with pytest.raises(ValueError, match="p_uncond must be in"):
        ClassifierFreePrepareBatch(p_uncond=1.5)


def _draw(pb: ClassifierFreePrepareBatch, batch) -> tuple[torch.Tensor, ...]:
    _, noise, _, kwargs = pb(batch)
    return noise, kwargs["timesteps"], kwargs["class_labels"]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_seeded_determinism():
    batch = _batch(64)
    a = _draw(ClassifierFreePrepareBatch(p_uncond=0.3, seed=7), batch)
    b = _draw(ClassifierFreePrepareBatch(p_uncond=0.3, seed=7), batch)
    c = _draw(ClassifierFreePrepareBatch(p_uncond=0.3, seed=8), batch)
    assert _same(a, b)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_unseeded_generator_follows_the_global_seed():
    batch = _batch(64)
    torch.manual_seed(5)
    a = _draw(ClassifierFreePrepareBatch(), batch)
    torch.manual_seed(5)
    b = _draw(ClassifierFreePrepareBatch(), batch)
    torch.manual_seed(6)
    c = _draw(ClassifierFreePrepareBatch(), batch)
    assert _same(a, b) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("seed", [11, None])
def test_attach_restarts_a_seeded_generator_every_epoch(seed):
    batch = _batch(16)
    pb = ClassifierFreePrepareBatch(p_uncond=0.5, seed=seed)
    seen: list[tuple[torch.Tensor, ...]] = []
    engine = Engine(lambda e, b: seen.append(_draw(pb, b)))
    pb.attach(engine)
    engine.run([batch, batch], max_epochs=3)
    assert len(seen) == 6
    by_epoch = [seen[0:2], seen[2:4], seen[4:6]]
    if seed is None:  # training: a continuing stream
        assert not _same(by_epoch[0][0], by_epoch[1][0])
    else:  # validation: the same draws every epoch, different iterations within an epoch
        assert all(_same(by_epoch[0][i], by_epoch[k][i]) for k in (1, 2) for i in (0, 1))
        assert not torch.equal(by_epoch[0][0][0], by_epoch[0][1][0])


def test_state_dict_round_trip():
    batch = _batch(32)
    pb = ClassifierFreePrepareBatch(p_uncond=0.4)
    _draw(pb, batch)
    state = pb.state_dict()
    a = _draw(pb, batch)
    other = ClassifierFreePrepareBatch(p_uncond=0.4)
    other.load_state_dict(state)
    assert _same(a, _draw(other, batch))


def test_load_state_dict_gives_other_ranks_their_own_stream(monkeypatch):
    batch = _batch(32)
    pb = ClassifierFreePrepareBatch(p_uncond=0.4)
    state = pb.state_dict()
    reference = _draw(pb, batch)
    rank0 = ClassifierFreePrepareBatch(p_uncond=0.4)
    rank0.load_state_dict(state)
    assert _same(reference, _draw(rank0, batch))  # rank 0 continues exactly
    monkeypatch.setattr(prepare_batch_module, "_rank", lambda: 1)
    rank1 = ClassifierFreePrepareBatch(p_uncond=0.4)
    rank1.load_state_dict(state)
    drawn = _draw(rank1, batch)
    assert not torch.equal(reference[0], drawn[0]) and not torch.equal(reference[1], drawn[1])
    again = ClassifierFreePrepareBatch(p_uncond=0.4)
    again.load_state_dict(state)
    assert _same(drawn, _draw(again, batch))  # still deterministic on that rank


class _Unmovable(torch.Tensor):
    """A batch entry the loss does not use: moving it (``.to``, ``.cuda``, ``.cpu``) fails the test."""

    def to(self, *args, **kwargs):
        raise AssertionError("a batch entry the loss does not use was moved to the device")

    cuda = cpu = to


def _full_batch(n: int = 4, channels: int = 2, size: int = 8) -> dict:
    """A slice batch as the data pipeline makes it: MetaTensor images, pixel labels, brain masks and ids."""
    batch = _batch(n, channels, size)
    batch["image"] = MetaTensor(batch["image"], meta={"filename_or_obj": "x.nii.gz"})
    batch["label"] = torch.zeros(n, 1, size, size).as_subclass(_Unmovable)
    batch["brain"] = torch.ones(n, 1, size, size).as_subclass(_Unmovable)
    batch["case_id"] = ["case"] * n
    return batch


def test_only_what_the_loss_uses_goes_to_the_device():
    batch = _full_batch()
    images, target, args, kwargs = ClassifierFreePrepareBatch(seed=0)(batch, device="cpu")
    assert type(images) is torch.Tensor and torch.equal(images, batch["image"].as_tensor())  # no MetaTensor
    assert args == () and set(kwargs) == {"noise", "timesteps", "class_labels"}
    for value in (target, *kwargs.values()):
        assert type(value) is torch.Tensor and value.device == images.device
    # the noise-conditioned classifier's batches too: noisy images, labels, timesteps
    x_t, labels, args, kwargs = NoisyClassifierPrepareBatch(NoiseSchedule(), seed=0)(batch, device="cpu")
    assert type(x_t) is torch.Tensor and set(kwargs) == {"timesteps"} and labels.device == x_t.device


def test_the_cpu_stream_is_the_private_generators_as_before():
    """On the CPU the draws are those of the private generator in the order noise, timesteps, label dropout."""
    batch = _batch(16, channels=3, size=4)
    images, noise, _, kwargs = ClassifierFreePrepareBatch(p_uncond=0.3, seed=9, max_timestep=500)(batch)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(noise, torch.randn(images.shape, generator=g))
    assert torch.equal(kwargs["timesteps"], torch.randint(0, 500, (16,), generator=g))
    drop = torch.rand(16, generator=g) < 0.3
    assert torch.equal(kwargs["class_labels"], torch.where(drop, NULL, batch["class_label"]))


def _reference_device_draws(seed: int, batch, n_batches: int, p: float) -> list[tuple[torch.Tensor, ...]]:
    """The device path by its definition: per batch a seed drawn from the private CPU generator re-seeds the device
    generator, which then draws the noise, the timesteps and the dropout."""
    master = torch.Generator().manual_seed(seed)
    out = []
    n = batch["image"].shape[0]
    for _ in range(n_batches):
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=master)))
        noise = torch.randn(batch["image"].shape, generator=g)
        t = torch.randint(0, T, (n,), generator=g)
        drop = torch.rand(n, generator=g) < p
        out.append((noise, t, torch.where(drop, NULL, batch["class_label"])))
    return out


def test_device_generator_path_is_defined_deterministic_and_resumable(monkeypatch):
    """The path of a non-CPU device (run here on the CPU): a device generator re-seeded per batch from the private
    generator; its state_dict is still the private generator's CPU ByteTensor, and resuming continues exactly."""
    monkeypatch.setattr(ClassifierFreePrepareBatch, "_draws_from_private_generator", staticmethod(lambda device: False))
    batch = _batch(32, channels=2, size=4)
    pb = ClassifierFreePrepareBatch(p_uncond=0.4, seed=5)
    drawn = [_draw(pb, batch) for _ in range(3)]
    for got, expected in zip(drawn, _reference_device_draws(5, batch, 3, 0.4)):
        assert _same(got, expected)
    # resume after the first batch
    first = ClassifierFreePrepareBatch(p_uncond=0.4, seed=5)
    _draw(first, batch)
    state = first.state_dict()
    assert state["generator"].dtype == torch.uint8 and state["generator"].device.type == "cpu"
    resumed = ClassifierFreePrepareBatch(p_uncond=0.4)
    resumed.load_state_dict(state)
    assert _same(_draw(resumed, batch), drawn[1]) and _same(_draw(resumed, batch), drawn[2])
    # the epoch restart of a seeded (validation) prepare-batch replays the same draws
    seen = []
    engine = Engine(lambda e, b: seen.append(_draw(pb, b)))
    pb.attach(engine)
    engine.run([batch, batch], max_epochs=2)
    assert _same(seen[0], drawn[0]) and _same(seen[2], drawn[0]) and _same(seen[3], drawn[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_is_drawn_on_the_cuda_device():
    batch = _batch(8, channels=2, size=8)
    pb = ClassifierFreePrepareBatch(p_uncond=0.4, seed=1)
    images, noise, _, kwargs = pb(batch, device="cuda")
    assert images.is_cuda and noise.device == images.device
    assert all(v.device == images.device for v in kwargs.values())
    state = pb.state_dict()
    assert state["generator"].device.type == "cpu"
    again = ClassifierFreePrepareBatch(p_uncond=0.4)
    again.load_state_dict(state)
    a, b = pb(batch, device="cuda"), again(batch, device="cuda")
    assert torch.equal(a[1], b[1]) and torch.equal(a[3]["class_labels"], b[3]["class_labels"])


def test_slice_label_prepare_batch_hands_the_slice_identities_to_the_inferer():
    batch = _full_batch()
    batch["slice_index"] = torch.arange(10, 14)
    image, labels, args, kwargs = SliceLabelPrepareBatch()(batch, device="cpu")
    assert type(image) is torch.Tensor and torch.equal(labels, batch["class_label"]) and args == ()
    assert kwargs["case_id"] == ["case"] * 4 and torch.equal(kwargs["slice_index"], torch.arange(10, 14))
    # a batch without them: image and target only (MONAI's evaluators accept both forms)
    assert len(SliceLabelPrepareBatch()({"image": torch.zeros(2, 1, 2, 2), "class_label": torch.zeros(2)})) == 2


# ------------------------------------------------------------------------------------------------------------ inferer


class _Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def forward(self, x, timesteps=None, context=None, class_labels=None):
        self.calls.append((x, timesteps, context, class_labels))
        return x * 2


def test_inferer_calls_network_with_noised_input_and_labels():
    scheduler = DDPMScheduler(num_train_timesteps=T, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    inferer = ClassConditionedDiffusionInferer(scheduler)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 499, 999])
    y = torch.tensor([0, 1, NULL])
    rec = _Recorder()
    out = inferer(x, rec, noise=noise, timesteps=t, class_labels=y)
    (x_t, t_seen, context, y_seen) = rec.calls[0]
    expected = scheduler.add_noise(original_samples=x, noise=noise, timesteps=t)
    torch.testing.assert_close(x_t, expected, atol=0, rtol=0)
    # and that is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t.double(), abar.sqrt() * x + (1 - abar).sqrt() * noise, atol=1e-5, rtol=1e-5)
    assert torch.equal(t_seen, t) and torch.equal(y_seen, y) and context is None
    torch.testing.assert_close(out, 2 * expected)


def test_inferer_equals_direct_network_call():
    scheduler = DDPMScheduler(num_train_timesteps=T)
    inferer = ClassConditionedDiffusionInferer(scheduler)
    net = _tiny().eval()
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    t, y = torch.tensor([10, 900]), torch.tensor([0, 2])
    with torch.no_grad():
        got = inferer(x, net, noise=noise, timesteps=t, class_labels=y)
        want = net(scheduler.add_noise(x, noise, t), t, class_labels=y)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert got.abs().max() > 0
    with pytest.raises(ValueError, match="class_labels are required"):
        inferer(x, net, noise=noise, timesteps=t)


# ---------------------------------------------------------------------------------------------------------- RNG state


def test_rng_state_round_trip():
    rng = RNGState()
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002 (RNGState covers the legacy global state)
    torch.manual_seed(1)
    state = rng.state_dict()
    first = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    random.seed(99)
    np.random.seed(99)  # noqa: NPY002
    torch.manual_seed(99)
    rng.load_state_dict(state)
    second = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


# ------------------------------------------------------------------------------------------------------- checkpoints


class _Run:
    """A small training run: tiny network, AdamW, ignite engine with random data drawn from the global RNG."""

    def __init__(self, out: Path, max_epochs: int, epoch_length: int = 2, seed: int = 0, **checkpointer_kwargs):
        torch.manual_seed(seed)
        self.net = _tiny(seed=seed, dropout=0.2)
        self.ema = _tiny(seed=seed + 100, dropout=0.2)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3)
        self.calls = 0

        def step(engine, _):
            self.calls += 1
            x = torch.randn(2, 1, 8, 8)
            y = torch.randint(0, 3, (2,))
            loss = self.net(x, torch.randint(0, T, (2,)), class_labels=y).pow(2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.net.parameters()):
                    e.mul_(0.9).add_(p, alpha=0.1)
            return loss.item()

        self.engine = Engine(step)
        self.checkpointer = TrainingCheckpointer(
            out,
            {
                "model": self.net,
                "ema": self.ema,
                "optimizer": self.opt,
                "rng": RNGState(),
                "metadata": CheckpointMetadata(self.net, {"image_size": 8}),
            },
            preprocessing={"image_size": 8},
            **checkpointer_kwargs,
        )
        self.checkpointer.attach(self.engine)
        self.max_epochs, self.epoch_length = max_epochs, epoch_length

    def run(self):
        return self.engine.run(range(self.epoch_length), max_epochs=self.max_epochs, epoch_length=self.epoch_length)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_checkpoint_files_pruning_and_final_model(tmp_path):
    run = _Run(tmp_path, max_epochs=4, n_saved=2)
    run.run()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt", "checkpoint_latest.pt", "model.pt"]
    latest = _load(tmp_path / "checkpoint_latest.pt")
    assert set(latest) == {"model", "ema", "optimizer", "rng", "metadata", "trainer"}
    assert latest["trainer"]["iteration"] == 8
    assert _load(tmp_path / "checkpoint_epoch=3.pt")["trainer"]["iteration"] == 6
    for k, v in run.net.state_dict().items():
        assert torch.equal(latest["model"][k], v)
    # the final inference checkpoint: rebuilt from its metadata, EMA weights by default
    net, info = load_network(tmp_path / "model.pt")
    assert info["preprocessing"] == {"image_size": 8}
    for k, v in run.ema.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    assert _load(tmp_path / "model.pt")["iteration"] == 8


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    run = _Run(tmp_path, max_epochs=1)
    run.run()
    before = _load(tmp_path / "checkpoint_latest.pt")
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")  # a crash halfway through writing
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    run.engine.state.epoch = 2
    with pytest.raises(OSError, match="disk full"):
        run.checkpointer.save(run.engine)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt", "checkpoint_latest.pt", "model.pt"]
    after = _load(tmp_path / "checkpoint_latest.pt")  # still the previous, complete file
    assert after["trainer"]["iteration"] == before["trainer"]["iteration"]
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())


def _states_equal(a: dict, b: dict) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), ("optimizer", i, k)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = _Run(tmp_path / "full", max_epochs=4)
    full.run()
    first = _Run(tmp_path / "split", max_epochs=2)
    first.run()
    torch.manual_seed(1234)  # the resumed run must not depend on the state it starts in
    second = _Run(tmp_path / "split", max_epochs=4, seed=5)
    second.run()
    assert second.checkpointer.resumed_from == tmp_path / "split" / "checkpoint_latest.pt"
    assert second.calls == 4 and second.engine.state.iteration == 8 and second.engine.state.epoch == 4
    _states_equal(_load(tmp_path / "full" / "checkpoint_latest.pt"), _load(tmp_path / "split" / "checkpoint_latest.pt"))


def test_no_resume_when_disabled(tmp_path):
    _Run(tmp_path, max_epochs=1).run()
    again = _Run(tmp_path, max_epochs=1, resume=False)
    again.run()
    assert again.checkpointer.resumed_from is None and again.calls == 2


def test_resume_mid_epoch_after_termination(tmp_path):
    run = _Run(tmp_path, max_epochs=3, epoch_length=2)
    run.engine.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: e.terminate())
    run.run()
    assert _load(tmp_path / "checkpoint_latest.pt")["trainer"]["iteration"] == 3
    assert _load(tmp_path / "model.pt")["iteration"] == 3
    resumed = _Run(tmp_path, max_epochs=3, epoch_length=2)
    resumed.run()
    assert resumed.calls == 3 and resumed.engine.state.iteration == 6


def test_resume_into_another_architecture_is_refused(tmp_path):
    _Run(tmp_path, max_epochs=1).run()
    torch.manual_seed(0)
    other = build_diffusion_unet(1, {"channels": (16, 64), "attention_levels": (False, True), "norm_num_groups": 8})
    before = {k: v.clone() for k, v in other.state_dict().items()}
    checkpointer = TrainingCheckpointer(tmp_path, {"model": other, "metadata": CheckpointMetadata(other)})
    engine = Engine(lambda e, b: None)
    checkpointer.attach(engine)
    with pytest.raises(CheckpointError) as err:
        engine.run([0], max_epochs=1)
    message = str(err.value)
    assert "\n" not in message and "checkpoint_latest.pt" in message
    assert "channels: [16, 32] in the checkpoint vs [16, 64] here" in message
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_amp_grad_scaler_is_checkpointed(tmp_path):
    run = _Run(tmp_path, max_epochs=1)
    engine = Engine(lambda e, b: None)
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    checkpointer = TrainingCheckpointer(tmp_path / "amp", {"model": run.net}, final_name=None)
    checkpointer.attach(engine)
    assert checkpointer.save_dict["scaler"] is engine.scaler
    engine.run([0], max_epochs=1)
    assert _load(tmp_path / "amp" / "checkpoint_latest.pt")["scaler"]["scale"] == 1024.0


def test_save_dict_needs_model(tmp_path):
    with pytest.raises(ValueError, match="must contain 'model'"):
        TrainingCheckpointer(tmp_path, {"optimizer": object()})


# ------------------------------------------------------------------------------------------------------- time budget


def _sleepy_engine(seconds: float = 0.02) -> Engine:
    return Engine(lambda e, b: time.sleep(seconds))


def test_time_budget_stops_the_engine():
    engine = _sleepy_engine()
    TimeBudget(0.3).attach(engine)
    start = time.monotonic()
    engine.run(range(10), max_epochs=1000)
    elapsed = time.monotonic() - start
    assert engine.should_terminate
    assert 3 <= engine.state.iteration < 1000 * 10
    assert 0.3 <= elapsed < 5.0


@pytest.mark.parametrize("seconds", [None, 0])
def test_time_budget_disabled(seconds):
    engine = _sleepy_engine(0.0)
    TimeBudget(seconds).attach(engine)
    engine.run(range(3), max_epochs=2)
    assert engine.state.iteration == 6 and not engine.should_terminate


def test_iteration_limit_counts_total_iterations_across_resumes():
    """The limit is on the engine's total iteration count: exactly N iterations run, and a run resumed at N (the
    resume handler sets the state after the budget's own STARTED handler, as in train.json) runs none."""
    calls: list[int] = []
    engine = Engine(lambda e, b: calls.append(e.state.iteration))
    TimeBudget(None, iterations=7).attach(engine)
    engine.run(range(10), max_epochs=3)
    assert calls == list(range(1, 8)) and engine.state.iteration == 7

    resumed: list[int] = []
    engine = Engine(lambda e, b: resumed.append(e.state.iteration))
    TimeBudget(None, iterations=7).attach(engine)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "iteration", 7))
    engine.run(range(10), max_epochs=3)
    assert resumed == [] and engine.state.iteration == 7

    partial: list[int] = []  # resumed below the limit: continues to exactly the limit
    engine = Engine(lambda e, b: partial.append(e.state.iteration))
    TimeBudget(None, iterations=7).attach(engine)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "iteration", 4))
    engine.run(range(10), max_epochs=3)
    assert partial == [5, 6, 7]


def test_time_budget_agrees_across_ranks(tmp_path):
    """Under a process group the stop decision goes through an all-reduce (here a 1-process gloo group)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        engine = _sleepy_engine()
        TimeBudget(0.2).attach(engine)
        engine.run(range(5), max_epochs=1000)
        assert engine.should_terminate and engine.state.iteration < 5000
        assert prepare_batch_module._rank() == 0
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- preview, progress


def test_reconstruction_saver_writes_a_png(tmp_path):
    net = _tiny()
    dataset = [{"image": torch.rand(1, 8, 8) * 2 - 1, "class_label": torch.tensor(i % 2)} for i in range(3)]
    saver = ReconstructionSaver(net.train(), dataset, tmp_path, interval=1, noise_level=50, num_steps=2, num_items=2)
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    png = tmp_path / "reconstruction_epoch=1.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert net.training  # the training mode is restored


def test_progress_bar_reads_the_loss():
    bar = ProgressBar()
    assert bar._output({"loss": torch.tensor(0.5)}) == {"loss": 0.5}
    assert bar._output([{"loss": 0.25}, {"loss": 1.0}]) == {"loss": 0.25}
    assert bar._output({"pred": 1}) == {}


def test_progress_bar_can_be_disabled():
    engine = Engine(lambda e, b: {"loss": 1.0})
    before = sum(len(v) for v in engine._event_handlers.values())
    ProgressBar(enabled=False).attach(engine)
    assert sum(len(v) for v in engine._event_handlers.values()) == before
    ProgressBar(enabled=True).attach(engine)
    assert sum(len(v) for v in engine._event_handlers.values()) > before
