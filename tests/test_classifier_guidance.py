"""DDIM with classifier guidance (Wolleb et al. 2022, the "DDIM clf" baseline; docs/method.md §7): the guided noise
and one guided DDIM decode against formulas written out here in float64 with an analytic classifier whose
log-probability gradient is known in closed form; scale 0 equal to the plain DDIM baseline; the noise-conditioned
classifier (MONAI's DiffusionModelEncoder), its checkpoint and its noisy prepare-batch; ``train_classifier.json``
run as a MONAI bundle workflow; the ``ddim_clf`` row of the evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from anofpdm_monai.apps.workflow import run_workflow
from anofpdm_monai.bundle import config_files
from anofpdm_monai.data import SliceDataset, VolumePreprocessor
from anofpdm_monai.data.datalist import write_datalist
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy
from anofpdm_monai.engines import NoisyClassifierPrepareBatch
from anofpdm_monai.evaluation import METHODS, Evaluator
from anofpdm_monai.inferers import ReconstructionInferer, classifier_guided_eps, ddim_decode
from anofpdm_monai.networks import (
    CheckpointError,
    build_classifier,
    build_diffusion_unet,
    check_classifier_fits,
    load_classifier,
    load_network,
    save_checkpoint,
)
from anofpdm_monai.networks.unet import HEALTHY, NULL
from anofpdm_monai.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule()


def _abar(t: int) -> float:
    """alpha-bar of the papers' linear schedule (T = 1000, betas 1e-4..0.02), computed here in float64."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return float(np.cumprod(1.0 - betas)[t])


class AnalyticClassifier(torch.nn.Module):
    """log p(healthy | x, t) = -c(t) ||x - a||^2 / 2 with c(t) = 1 + t / 1000, so grad_x log p = c(t) (a - x).

    Logits: healthy 0, unhealthy log(exp(q) - 1) with q = c(t) ||x - a||^2 / 2; then log_softmax[healthy] = -q."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, x, timesteps):
        c = 1.0 + timesteps.to(x.dtype) / 1000.0
        q = c * 0.5 * ((x - self.a) ** 2).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(q), torch.log(torch.expm1(q))], dim=1)


class LinearEps(torch.nn.Module):
    """eps(x, t, y) = k x for the null label (any other label: an error, the baseline decodes with the null one)."""

    k = 0.3

    def forward(self, x, timesteps, class_labels=None):
        assert bool((class_labels == NULL).all())
        return self.k * x


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64) * 0.3
    a = torch.randn(1, 2, 6, 6, generator=g, dtype=torch.float64) * 0.2
    return x, a


def _guided_by_hand(x: np.ndarray, a: np.ndarray, t: int, s: float) -> np.ndarray:
    """eps_hat = k x - s sqrt(1 - abar_t) c(t) (a - x)."""
    return LinearEps.k * x - s * np.sqrt(1.0 - _abar(t)) * (1.0 + t / 1000.0) * (a - x)


@pytest.mark.parametrize("t, s", [(0, 10.0), (250, 3.0), (600, 100.0)])
def test_guided_eps_is_the_hand_formula(t, s):
    x, a = _inputs()
    eps = LinearEps.k * x
    got = classifier_guided_eps(eps, x, t, SCHEDULE, AnalyticClassifier(a), s, label=HEALTHY)
    np.testing.assert_allclose(got.numpy(), _guided_by_hand(x.numpy(), a.numpy(), t, s), rtol=1e-10, atol=1e-12)


def test_one_guided_ddim_decode_is_the_hand_formula():
    """Grid [0, t]: the move t -> 0 and the final x0 prediction at 0, both with guided noise and clipped x0."""
    x, a = _inputs()
    xn, an = x.numpy(), a.numpy()
    t, s = 40, 5.0
    got = ddim_decode(
        LinearEps(), x, SCHEDULE, [0, t], label=NULL, classifier=AnalyticClassifier(a), classifier_scale=s
    )
    # by hand: step t -> 0
    e = _guided_by_hand(xn, an, t, s)
    x0 = np.clip((xn - np.sqrt(1 - _abar(t)) * e) / np.sqrt(_abar(t)), -1, 1)
    x_0 = np.sqrt(_abar(0)) * x0 + np.sqrt(1 - _abar(0)) * e
    # the final prediction at 0
    e = _guided_by_hand(x_0, an, 0, s)
    expected = np.clip((x_0 - np.sqrt(1 - _abar(0)) * e) / np.sqrt(_abar(0)), -1, 1)
    assert 0 < np.abs(expected).max() < 1  # the clip does not decide the comparison
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-7)  # the decoder works in float32
    unguided = ddim_decode(LinearEps(), x, SCHEDULE, [0, t], label=NULL)
    assert not torch.allclose(got, unguided)  # the guidance did act


# a tiny class-conditioned MONAI UNet without attention, perturbed (MONAI zero-initialises the output convolution)
MICRO = {
    "channels": (8, 16),
    "attention_levels": (False, False),
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "dropout": 0.0,
}


def _micro_net(channels: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_diffusion_unet(channels, MICRO, use_flash_attention=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _micro_classifier(channels: int = 2, image_size: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier(channels, image_size, MICRO_CLASSIFIER, use_flash_attention=False).eval()


MICRO_CLASSIFIER = {k: v for k, v in MICRO.items() if k != "dropout"}


def test_scale_zero_is_the_plain_ddim_baseline():
    """s = 0 with a real classifier (its gradient is computed and multiplied by 0): the DDIM baseline exactly."""
    torch.manual_seed(1)
    x0 = torch.rand(2, 2, 16, 16) * 1.6 - 0.8
    net, clf = _micro_net(), _micro_classifier()
    options = dict(noise_level=300, num_steps=4, map_channels=[0, 1], median_kernel=1)
    plain = ReconstructionInferer("ddim", **options)
    guided0 = ReconstructionInferer("ddim_clf", classifier=clf, classifier_scale=0.0, **options)
    torch.testing.assert_close(guided0.reconstruct(x0, net), plain.reconstruct(x0, net), atol=0, rtol=0)
    guided = ReconstructionInferer("ddim_clf", classifier=clf, classifier_scale=50.0, **options)
    out = guided(x0, net)
    assert out.anomaly_map.shape == (2, 16, 16) and not out.mask.any()
    assert not torch.allclose(out.reconstruction, plain.reconstruct(x0, net))
    assert not clf.training and not net.training
    # one inversion shared by several decoders (the tuning of s): the same maps as each inverting on its own
    shared = guided(x0, net, inverted=plain.invert(x0, net))
    torch.testing.assert_close(shared.anomaly_map, out.anomaly_map, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no DDIM inversion"):
        ReconstructionInferer("anoddpm", noise_level=300).invert(x0, net)


def test_ddim_clf_inferer_errors():
    with pytest.raises(ValueError, match="needs a classifier"):
        ReconstructionInferer("ddim_clf", noise_level=100)
    with pytest.raises(ValueError, match="classifier_scale"):
        ReconstructionInferer("ddim_clf", noise_level=100, classifier=_micro_classifier(), classifier_scale=-1.0)


# --------------------------------------------------------------------------------------------------------------------
# the classifier, its checkpoint and its batches
# --------------------------------------------------------------------------------------------------------------------


def test_classifier_checkpoint_round_trip(tmp_path):
    clf = _micro_classifier(channels=3, image_size=24)
    x, t = torch.randn(2, 3, 24, 24), torch.tensor([5, 700])
    pre = VolumePreprocessor(modalities=["flair", "t1", "t2"], image_size=24).to_dict()
    schedule = NoiseSchedule(400, beta_end=0.025)
    path = save_checkpoint(tmp_path / "classifier.pt", clf, preprocessing=pre, schedule=schedule)
    loaded, info = load_classifier(path)
    assert info["schedule"] == schedule and info["preprocessing"] == pre and info["digest"].endswith("-classifier")
    torch.testing.assert_close(loaded(x, timesteps=t), clf(x, timesteps=t))
    assert loaded(x, timesteps=t).shape == (2, 2)
    # each loader refuses the other kind of checkpoint
    with pytest.raises(CheckpointError):
        load_network(path)
    unet = save_checkpoint(tmp_path / "model.pt", _micro_net(), preprocessing=pre, schedule=schedule)
    with pytest.raises(CheckpointError, match="not a classifier checkpoint"):
        load_classifier(unet)


def test_noisy_prepare_batch():
    schedule = NoiseSchedule(400, beta_end=0.025)
    images = torch.rand(5, 2, 8, 8) * 2 - 1
    batch = {"image": images, "class_label": torch.tensor([0, 1, 1, 0, 1])}
    prep = NoisyClassifierPrepareBatch(schedule, seed=3, max_timestep=50)
    x_t, labels, args, kwargs = prep(batch)
    t = kwargs["timesteps"]
    assert args == () and labels.tolist() == [0, 1, 1, 0, 1] and t.shape == (5,) and int(t.max()) < 50
    # x_t is the forward process of the drawn t and noise (same generator order: timesteps, then noise)
    g = torch.Generator().manual_seed(3)
    t_ref = torch.randint(0, 50, (5,), generator=g)
    noise = torch.randn(images.shape, generator=g)
    assert torch.equal(t, t_ref)
    torch.testing.assert_close(x_t, schedule.q_sample(images, t_ref, noise))
    with pytest.raises(KeyError, match="class_label"):
        prep({"image": images})


# --------------------------------------------------------------------------------------------------------------------
# train_classifier.json and the ddim_clf row of the evaluation
# --------------------------------------------------------------------------------------------------------------------

# a schedule unlike the default one: the classifier must take the diffusion checkpoint's
DIFFUSION_SCHEDULE = NoiseSchedule(400, beta_end=0.025)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """Synthetic 1-channel T1w volumes at 32 x 32, and a (untrained) diffusion checkpoint of that preprocessing with
    a non-default schedule, for which the classifier is trained."""
    root = tmp_path_factory.mktemp("classifier")
    data = root / "data"
    dl = make_dataset(
        data,
        phantom_anatomy((32, 40, 24), spacing=6.0),
        {"training": 2, "validation": 1, "test": 1},
        ["t1w"],
        lesion_radius=4.0,
    )
    datalist = root / "datalist.json"
    write_datalist(dl, datalist)
    pre = VolumePreprocessor(modalities=["t1w"], image_size=32)
    model = save_checkpoint(
        root / "model" / "model.pt", _micro_net(channels=1), preprocessing=pre.to_dict(), schedule=DIFFUSION_SCHEDULE
    )
    return {"root": root, "data": data, "datalist": datalist, "cache": root / "cache", "model": model, "pre": pre}


def test_train_classifier_bundle(synthetic, tmp_path):
    """``train_classifier.json`` as a MONAI train workflow: property checks, two epochs, a checkpoint that loads
    with the diffusion checkpoint's preprocessing and schedule, a validation accuracy."""
    out = tmp_path / "classifier"
    wf = ConfigWorkflow(
        config_file=config_files("anofpdm_atlas", "train_classifier"),
        workflow_type="train",
        diffusion_checkpoint=str(synthetic["model"]),
        dataset_dir=str(synthetic["data"]),
        datalist=str(synthetic["datalist"]),
        cache_dir=str(synthetic["cache"]),
        output_dir=str(out),
        classifier_size="tiny",
        batch_size=16,
        val_batch_size=32,
        num_epochs=2,
        num_workers=0,
        progress=False,
        device="cpu",
    )
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    trainer = wf.parser.get_parsed_content("train::trainer")
    accuracy = wf.parser.get_parsed_content("validate::evaluator").state.metrics["val_accuracy"]
    wf.finalize()
    assert trainer.state.epoch == 2 and 0.0 <= accuracy <= 1.0
    latest = torch.load(out / "checkpoint_latest.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "trainer", "rng", "prepare_batch", "metadata"} <= set(latest)
    assert latest["trainer"]["iteration"] == trainer.state.iteration > 0
    clf, info = load_classifier(out / "classifier.pt")
    assert info["schedule"] == DIFFUSION_SCHEDULE and info["preprocessing"] == synthetic["pre"].to_dict()
    assert info["network"]["image_size"] == 32 and info["network"]["channels"] == [16, 32]
    # the trained weights, not the initial ones
    torch.testing.assert_close(clf.state_dict()["out.3.weight"], trainer.network.state_dict()["out.3.weight"])
    x = torch.zeros(2, 1, 32, 32)
    assert clf(x, timesteps=torch.tensor([0, 399])).shape == (2, 2)


def _datasets(synthetic) -> tuple[SliceDataset, SliceDataset]:
    kwargs = dict(progress=False, require_labels=True)
    args = (synthetic["datalist"], synthetic["data"])
    val = SliceDataset.from_datalist(*args, "validation", synthetic["cache"], synthetic["pre"], **kwargs)
    test = SliceDataset.from_datalist(*args, "test", synthetic["cache"], synthetic["pre"], **kwargs)
    return val, test


def test_evaluation_ddim_clf_row(synthetic, tmp_path):
    """The ``ddim_clf`` row: its noise level, scale and threshold tuned with pixel labels on the validation split,
    the tuning reused by a rerun with the same classifier."""
    val, test = _datasets(synthetic)
    options = dict(
        methods=["ddim_clf", "intensity"],
        seeds=[0],
        noise_levels=[50, 100],
        num_steps=2,
        median_kernel=3,
        min_component_size=0,
        progress=False,
        schedule=DIFFUSION_SCHEDULE,
        classifier_scales=[0.0, 20.0],
    )
    net, clf = _micro_net(channels=1), _micro_classifier(channels=1, image_size=32)
    summary = Evaluator(
        net, "d0", ["t1w"], ["t1w"], val, test, tmp_path, classifier=clf, classifier_digest="c0", **options
    ).run()
    row = summary["methods"]["ddim_clf"]
    assert row["label"] == METHODS["ddim_clf"].label == "DDIM + classifier guidance"
    assert row["tuning"] == "pixel labels" and 0.0 <= row["metrics"]["mixed_dice"]["mean"] <= 1.0
    assert row["tuned"]["noise_level"] in (50, 100) and row["tuned"]["classifier_scale"] in (0.0, 20.0)
    assert row["tuned"]["classifier"] == "c0" and row["tuned"]["classifier_scales"] == [0.0, 20.0]
    assert any(
        line.startswith("| DDIM + classifier guidance | pixel labels |")
        for line in (tmp_path / "summary.md").read_text().splitlines()
    )
    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert tuning["ddim_clf"] == row["tuned"]


def test_ddim_clf_without_a_classifier_is_one_clear_error(synthetic, tmp_path):
    val, test = _datasets(synthetic)
    with pytest.raises(ValueError, match="'ddim_clf' needs a noise-conditioned classifier: set classifier_checkpoint"):
        Evaluator(_micro_net(channels=1), "d0", ["t1w"], ["t1w"], val, test, tmp_path, methods=["ddim_clf"])
    from anofpdm_monai.apps.evaluate import run_evaluation

    with pytest.raises(ValueError, match=r"\['ddim_clf'\] need classifier_checkpoint") as info:
        run_evaluation(
            synthetic["model"],
            synthetic["datalist"],
            synthetic["data"],
            tmp_path,
            synthetic["cache"],
            ["t1w"],
            methods=["ddim_clf"],
        )
    assert "\n" not in str(info.value)


def test_evaluate_bundle_with_a_classifier_checkpoint(synthetic, tmp_path):
    """``evaluate.json`` with ``classifier_checkpoint``: the ddim_clf row; a classifier trained with another noise
    schedule is refused in one line."""
    pre = synthetic["pre"].to_dict()
    clf = _micro_classifier(channels=1, image_size=32)
    good = save_checkpoint(tmp_path / "good.pt", clf, preprocessing=pre, schedule=DIFFUSION_SCHEDULE)
    common = dict(
        checkpoint=str(synthetic["model"]),
        dataset_dir=str(synthetic["data"]),
        datalist=str(synthetic["datalist"]),
        cache_dir=str(synthetic["cache"]),
        methods=["ddim_clf"],
        seeds=[0],
        noise_levels=[50],
        num_steps=2,
        classifier_scales=[10.0],
        median_kernel=3,
        min_component_size=0,
        progress=False,
        device="cpu",
    )
    run_workflow("anofpdm_atlas", "evaluate", output_dir=str(tmp_path), classifier_checkpoint=str(good), **common)
    summary = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    assert list(summary["methods"]) == ["ddim_clf"]
    assert summary["methods"]["ddim_clf"]["tuned"]["classifier_scale"] == 10.0
    bad = save_checkpoint(tmp_path / "bad.pt", clf, preprocessing=pre, schedule=NoiseSchedule())
    model_info = {"preprocessing": pre, "schedule": DIFFUSION_SCHEDULE}
    with pytest.raises(CheckpointError, match="another noise schedule"):
        check_classifier_fits(load_classifier(bad)[1], model_info)
    other = save_checkpoint(tmp_path / "other.pt", clf, preprocessing={**pre, "image_size": 64}, schedule=None)
    with pytest.raises(CheckpointError, match="other preprocessing than the diffusion model .*image_size"):
        check_classifier_fits(load_classifier(other)[1], model_info)
