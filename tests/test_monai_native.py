"""The inferers inside stock MONAI components (issue 24 item 1): outputs that ``decollate_batch`` splits per slice and
that a stock ``SupervisedEvaluator`` with MONAI post transforms (``FlattenSubKeysd``) and a MONAI metric handler
consumes; ``sample()`` / ``get_likelihood()`` of the class-conditioned training inferer with class
labels (and a one-line error without); the training preview's healthy samples."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, decollate_batch
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.transforms import Compose, FlattenSubKeysd

from anofpdm_monai.engines import ClassConditionedDiffusionInferer, LabelledNetwork, ReconstructionSaver
from anofpdm_monai.inferers import AnoFPDMInferer, IntensityInferer
from anofpdm_monai.networks import build_diffusion_unet
from anofpdm_monai.networks.unet import HEALTHY, NULL
from anofpdm_monai.settings import AnoFPDMSettings


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    net = build_diffusion_unet(1, "tiny", use_flash_attention=False)
    for m in net.modules():  # MONAI zero-initialises some convolutions: give every layer weights
        if isinstance(m, torch.nn.Conv2d) and not m.weight.detach().abs().max() > 0:
            m.reset_parameters()
    return net.eval()


def _slices(n: int = 6, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    items = []
    for i in range(n):
        image = torch.rand(1, size, size, generator=g) * 1.6 - 0.8
        label = torch.zeros(1, size, size)
        if i % 2:
            label[:, 4:9, 5:11] = 1.0
            image[:, 4:9, 5:11] += 0.5
        items.append({"image": image, "label": label, "class_label": torch.tensor(i % 2)})
    return items


INFERER = AnoFPDMInferer(
    AnoFPDMSettings(t_max=30, stride=10, min_component_size=2, median_kernel=3), threshold=0.01, seed=0
)


@pytest.mark.parametrize("inferer", [INFERER, IntensityInferer(threshold=0.3)], ids=["anofpdm", "intensity"])
def test_outputs_decollate_per_slice(inferer):
    net = _tiny()
    x = torch.stack([s["image"] for s in _slices(4)])
    out = inferer(x, net)
    assert dict(out).keys() == set(out) and "mask" in out
    assert out["mask"].shape == (4, 1, 16, 16) and torch.equal(out["mask"][:, 0], out.mask)  # channel-first
    items = decollate_batch(out, detach=True)
    assert len(items) == 4
    for b, item in enumerate(items):
        for key, value in item.items():
            full = torch.as_tensor(getattr(out, key))
            full = full[:, None] if key in out._images else full
            if key in getattr(out, "_shared", ()):  # one value for the batch, repeated per slice
                torch.testing.assert_close(torch.as_tensor(value), full, equal_nan=True)
            else:
                torch.testing.assert_close(torch.as_tensor(value), full[b], equal_nan=True)
    if isinstance(inferer, AnoFPDMInferer):
        assert items[0]["timesteps"].tolist() == [0, 10, 20, 30] and float(items[2]["guidance_scale"]) == 2.0
        assert "reconstruction" not in out  # None fields are not entries
    with pytest.raises(KeyError):
        out["nonexistent"]


def test_stock_supervised_evaluator_with_monai_post_transforms():
    """A user's evaluator: MONAI's SupervisedEvaluator, the sub-keys of the prediction flattened by a MONAI post
    transform, the masks scored by MONAI's MeanDice handler and the maps collected per slice; equal to the inferer
    called directly. (MONAI 1.6.1's ``SaveImaged`` fails in ``resample_if_needed`` on this machine's torch for any
    input, so the maps are collected instead of written; the project writes NIfTI with its own writer.)"""
    net = _tiny()
    data = _slices(6)
    maps: list[torch.Tensor] = []

    def collect(item):
        maps.append(item["anomaly_map"])
        return item

    post = Compose([FlattenSubKeysd(keys="pred", delete_keys=True), collect])
    dice = MeanDice(include_background=True, output_transform=from_engine(["mask", "label"]))
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=4),
        network=net,
        inferer=INFERER,
        postprocessing=post,
        key_val_metric={"dice": dice},
    )
    evaluator.run()

    # without noise keys a slice's forward noise is keyed by its position in the batch: the same batches here
    parts = [INFERER(torch.stack([d["image"] for d in data[i : i + 4]]), net) for i in (0, 4)]
    direct = SimpleNamespace(**{k: torch.cat([p_[k][:, 0] for p_ in parts]) for k in ("anomaly_map", "mask")})
    assert len(maps) == 6 and all(m.shape == (1, 16, 16) for m in maps)  # channel-first per slice
    torch.testing.assert_close(torch.stack(maps)[:, 0], direct.anomaly_map)
    truth = torch.stack([d["label"][0] for d in data]).bool()
    inter = (direct.mask & truth).sum((1, 2)).float()
    total = (direct.mask.sum((1, 2)) + truth.sum((1, 2))).float()
    has_truth = truth.any(dim=(1, 2))  # MONAI's ignore_empty: a slice without ground truth is NaN, left out
    expected = [float(2 * i / t) for i, t, h in zip(inter, total, has_truth) if h]
    assert evaluator.state.metrics["dice"] == pytest.approx(np.mean(expected), abs=1e-5)


class LabelEcho(torch.nn.Module):
    """eps = 0.1 * label + 0.01 * t / 1000 * x: which label and step the network saw is visible in its output."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[int], list[int]]] = []

    def forward(self, x, timesteps, class_labels):
        self.calls.append((class_labels.tolist(), timesteps.tolist()))
        return 0.1 * class_labels.float().view(-1, 1, 1, 1) + 0.01 * timesteps.float().view(-1, 1, 1, 1) / 1000 * x


def test_labelled_network_guidance():
    net = LabelEcho()
    x = torch.randn(3, 1, 4, 4)
    t = torch.tensor([500.0])
    out = LabelledNetwork(net, torch.full((3,), HEALTHY), guidance_scale=2.0)(x, timesteps=t)
    eps_h = 0.1 * HEALTHY + 0.005 * x
    eps_n = 0.1 * NULL + 0.005 * x
    torch.testing.assert_close(out, 3.0 * eps_h - 2.0 * eps_n)
    assert net.calls == [([HEALTHY] * 3 + [NULL] * 3, [500] * 6)]  # one batched call for both labels


def test_sample_with_class_labels():
    net = LabelEcho()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(5)
    inferer = ClassConditionedDiffusionInferer(scheduler)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sample = inferer.sample(noise, net, class_labels=HEALTHY, guidance_scale=1.0, verbose=False)
    assert len(net.calls) == 5 and all(labels == [0, 0, NULL, NULL] for labels, _ in net.calls)
    # the same loop by hand with MONAI's scheduler step and the guided noise
    image = noise.clone()
    for t in scheduler.timesteps:
        eps = 2.0 * (0.1 * HEALTHY + 0.01 * t / 1000 * image) - 1.0 * (0.1 * NULL + 0.01 * t / 1000 * image)
        image, _ = scheduler.step(eps, t, image)
    torch.testing.assert_close(sample, image)
    unhealthy = inferer.sample(noise, net, class_labels=[1, 1], verbose=False)
    assert not torch.allclose(unhealthy, sample)


def test_sample_and_likelihood_need_class_labels():
    inferer = ClassConditionedDiffusionInferer(DDPMScheduler(num_train_timesteps=10))
    x = torch.zeros(2, 1, 4, 4)
    for call in (
        lambda: inferer.sample(x, LabelEcho(), verbose=False),
        lambda: inferer.get_likelihood(x, LabelEcho(), verbose=False),
    ):
        with pytest.raises(ValueError, match=r"needs class_labels \(0 healthy, 1 unhealthy, 2 null\)") as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="3 class_labels for a batch of 2"):
        inferer.sample(x, LabelEcho(), class_labels=[0, 1, 0], verbose=False)
    with pytest.raises(ValueError, match=r"takes class_labels, not \['conditioning'\]"):
        inferer.sample(x, LabelEcho(), class_labels=0, conditioning=torch.zeros(2, 1, 4), verbose=False)


def test_likelihood_with_class_labels():
    net = _tiny()
    inferer = ClassConditionedDiffusionInferer(DDPMScheduler(num_train_timesteps=20))
    x = torch.stack([s["image"] for s in _slices(2)])
    torch.manual_seed(0)
    healthy = inferer.get_likelihood(x, net, class_labels=HEALTHY, verbose=False)
    torch.manual_seed(0)
    null = inferer.get_likelihood(x, net, class_labels=NULL, verbose=False)
    assert healthy.shape == (2,) and torch.isfinite(healthy).all()
    assert not torch.allclose(healthy, null)  # the label reaches the network


def test_preview_writes_healthy_samples(tmp_path):
    net = _tiny().train()
    dataset = [{"image": torch.rand(1, 8, 8) * 2 - 1, "class_label": torch.tensor(i % 2)} for i in range(3)]
    engine = Engine(lambda e, b: None)
    ReconstructionSaver(net, dataset, tmp_path, noise_level=50, num_steps=2, num_items=2, num_samples=3).attach(engine)
    ReconstructionSaver(net, dataset, tmp_path / "none", noise_level=50, num_steps=2, num_samples=0).attach(engine)
    engine.run([0], max_epochs=2)
    for epoch in (1, 2):
        png = tmp_path / f"samples_epoch={epoch}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same noise at every preview and the same weights: the same picture
    assert (tmp_path / "samples_epoch=1.png").read_bytes() == (tmp_path / "samples_epoch=2.png").read_bytes()
    assert not list((tmp_path / "none").glob("samples_*")) and list((tmp_path / "none").glob("reconstruction_*"))
    assert net.training
