"""Tests of the class-conditioned DiffusionModelUNet and of checkpoint I/O (anofpdm_monai.networks)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from anofpdm_monai.networks import (
    HEALTHY,
    NETWORK_PRESETS,
    NULL,
    NUM_CLASS_EMBEDS,
    UNHEALTHY,
    AnoFPDMUNet,
    CheckpointError,
    CheckpointMetadata,
    build_diffusion_unet,
    file_digest,
    load_checkpoint,
    load_network,
    load_weights,
    save_checkpoint,
)

# (preset, in_channels, spatial size) of the networks run in the forward tests
FORWARD_CASES = [
    ("tiny", 4, 16),
    ("tiny", 1, 16),
    ("small", 4, 32),
]

# paper configuration: 128 base channels, multipliers 1, 1, 2, 3, 4, two residual blocks, attention at the three
# lowest resolutions, dropout 0.1
PAPER = {
    "channels": (128, 128, 256, 384, 512),
    "attention_levels": (False, False, True, True, True),
    "num_res_blocks": 2,
    "dropout": 0.1,
}


def _inputs(batch: int, channels: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.tensor([HEALTHY, UNHEALTHY, NULL] * batch)[:batch]
    return x, t, y


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise the zero-initialised layers (MONAI zeroes the output and residual convolutions, so a fresh network
    outputs zeros and its labels would not matter) with PyTorch's default initialisation, seeded."""
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.detach().abs().max() > 0:
            m.reset_parameters()
    return net


def _tiny(seed: int = 0, **kwargs) -> AnoFPDMUNet:
    torch.manual_seed(seed)
    return _randomize(build_diffusion_unet(4, "tiny", use_flash_attention=False, **kwargs), seed)


def _resnet_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in net.modules() if m.__class__.__name__ == "DiffusionUNetResnetBlock"]


# ----------------------------------------------------------------------------------------------------------- network


def test_label_constants():
    assert (HEALTHY, UNHEALTHY, NULL, NUM_CLASS_EMBEDS) == (0, 1, 2, 3)


def test_paper_preset_values():
    preset = NETWORK_PRESETS["paper"]
    assert tuple(preset["channels"]) == PAPER["channels"]
    assert [c // 128 for c in preset["channels"]] == [1, 1, 2, 3, 4]
    assert tuple(preset["attention_levels"]) == PAPER["attention_levels"]
    assert preset["num_res_blocks"] == PAPER["num_res_blocks"]
    assert preset["dropout"] == pytest.approx(PAPER["dropout"])


def test_paper_network_builds_with_its_configuration():
    net = build_diffusion_unet(4, "paper", use_flash_attention=False)
    assert net.config["channels"] == list(PAPER["channels"])
    assert net.config["attention_levels"] == list(PAPER["attention_levels"])
    assert net.config["num_res_blocks"] == 2 and net.config["dropout"] == pytest.approx(0.1)
    assert net.num_class_embeds == NUM_CLASS_EMBEDS
    assert net.class_embedding.num_embeddings == 3
    # 2 res blocks per level down, 3 per level up, 2 in the middle block; each one has a dropout hook
    blocks = _resnet_blocks(net)
    assert len(blocks) == 5 * 2 + 5 * 3 + 2
    assert all(len(b.conv2._forward_pre_hooks) == 1 for b in blocks)
    # attention only at the three lowest resolutions
    assert not any(hasattr(b, "attentions") for b in net.down_blocks[:2])
    assert all(hasattr(b, "attentions") for b in net.down_blocks[2:])
    n_params = sum(p.numel() for p in net.parameters())
    assert 80e6 < n_params < 110e6, n_params


@pytest.mark.parametrize("size", sorted(NETWORK_PRESETS))
def test_every_preset_records_its_config(size):
    net = build_diffusion_unet(2, size, use_flash_attention=False)
    preset = NETWORK_PRESETS[size]
    assert net.config["channels"] == list(preset["channels"])
    assert net.config["in_channels"] == 2
    assert net.out_channels == 2 and net.in_channels == 2


def test_unknown_size_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown network size 'huge'"):
        build_diffusion_unet(4, "huge")
    with pytest.raises(ValueError, match="conditioning must be one of"):
        build_diffusion_unet(4, "tiny", conditioning="concat")
    with pytest.raises(ValueError, match="dropout must be in"):
        build_diffusion_unet(4, "tiny", dropout=1.0)


def test_flash_attention_default_follows_cuda():
    net = build_diffusion_unet(4, "tiny")
    attn = [m for m in net.modules() if hasattr(m, "use_flash_attention")]
    assert attn, "the tiny preset has attention blocks"
    assert all(m.use_flash_attention == torch.cuda.is_available() for m in attn)


def test_flash_attention_same_weights_same_outputs():
    plain = _tiny(dropout=0.0).eval()
    flash = build_diffusion_unet(4, "tiny", use_flash_attention=True, dropout=0.0).eval()
    assert all(m.use_flash_attention for m in flash.modules() if hasattr(m, "use_flash_attention"))
    assert list(flash.state_dict()) == list(plain.state_dict())
    flash.load_state_dict(plain.state_dict())
    x, t, y = _inputs(3, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(flash(x, t, class_labels=y), plain(x, t, class_labels=y), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size,channels,spatial", FORWARD_CASES)
def test_forward_shape_and_labels_matter(size, channels, spatial):
    net = _randomize(build_diffusion_unet(channels, size, use_flash_attention=False, dropout=0.0)).eval()
    x, t, _ = _inputs(2, channels, spatial)
    with torch.no_grad():
        out_h = net(x, t, class_labels=torch.full((2,), HEALTHY))
        out_n = net(x, t, class_labels=torch.full((2,), NULL))
    assert out_h.shape == x.shape
    assert torch.isfinite(out_h).all()
    assert (out_h - out_n).abs().max() > 1e-6


def test_class_labels_are_required():
    net = _tiny()
    x, t, _ = _inputs(2, 4, 16)
    with pytest.raises(ValueError, match="class_labels is required"):
        net(x, t)


def test_dropout_active_only_in_train_mode():
    net = _tiny(dropout=0.5)
    x, t, y = _inputs(2, 4, 16)
    with torch.no_grad():
        net.train()
        a, b = net(x, t, class_labels=y), net(x, t, class_labels=y)
        net.eval()
        c, d = net(x, t, class_labels=y), net(x, t, class_labels=y)
    assert (a - b).abs().max() > 1e-4  # fresh dropout masks
    torch.testing.assert_close(c, d, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-4


def test_no_dropout_means_train_mode_is_deterministic():
    net = _tiny(dropout=0.0).train()
    x, t, y = _inputs(2, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, class_labels=y), net(x, t, class_labels=y), atol=0, rtol=0)
    assert all(len(b.conv2._forward_pre_hooks) == 0 for b in _resnet_blocks(net))


def test_state_dict_keys_equal_plain_monai_network():
    net = _tiny(dropout=0.1)
    cfg = net.config
    plain = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=4,
        out_channels=4,
        channels=cfg["channels"],
        attention_levels=cfg["attention_levels"],
        num_res_blocks=cfg["num_res_blocks"],
        num_head_channels=cfg["num_head_channels"],
        norm_num_groups=cfg["norm_num_groups"],
        num_class_embeds=NUM_CLASS_EMBEDS,
    )
    mine, theirs = net.state_dict(), plain.state_dict()
    assert list(mine) == list(theirs)
    assert all(mine[k].shape == theirs[k].shape for k in mine)
    # the weights are portable: a plain MONAI network computes the same function (eval mode, dropout off)
    plain.load_state_dict(mine)
    x, t, y = _inputs(2, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x, t, class_labels=y), net.eval()(x, t, class_labels=y))


def test_cross_attention_mode():
    net = build_diffusion_unet(4, "tiny", conditioning="cross_attention", label_context_dim=8, dropout=0.0)
    net = _randomize(net).eval()
    assert net.config["conditioning"] == "cross_attention" and net.config["label_context_dim"] == 8
    assert net.label_context.weight.shape == (NUM_CLASS_EMBEDS, 8)
    assert any("transformer_blocks" in k for k in net.state_dict())
    x, t, _ = _inputs(2, 4, 16)
    with torch.no_grad():
        out_h = net(x, t, class_labels=torch.full((2,), HEALTHY))
        # the label reaches the network through the cross-attention context too: changing only the context changes
        # the output while the class embedding stays the same
        ctx_n = net.label_context(torch.full((2,), NULL))[:, None, :]
        out_ctx = net(x, t, context=ctx_n, class_labels=torch.full((2,), HEALTHY))
    assert out_h.shape == x.shape
    assert (out_h - out_ctx).abs().max() > 1e-6


# -------------------------------------------------------------------------------------------------------- checkpoint


def _save(tmp_path, net, name="model.pt", **kwargs):
    return save_checkpoint(tmp_path / name, net, **kwargs)


def test_save_load_round_trip(tmp_path):
    net = _tiny(dropout=0.1).eval()
    path = _save(tmp_path, net, preprocessing={"modalities": ["flair"], "image_size": 16})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left
    other = _tiny(seed=1, dropout=0.1)
    load_weights(other, path)
    x, t, y = _inputs(3, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x, t, class_labels=y), net(x, t, class_labels=y), atol=0, rtol=0)


def test_load_network_from_metadata_prefers_ema(tmp_path):
    net = _tiny(dropout=0.1)
    ema = _tiny(seed=1, dropout=0.1)
    path = _save(tmp_path, net, ema=ema, preprocessing={"modalities": ["flair", "t1", "t1ce", "t2"], "image_size": 16})
    loaded, info = load_network(path)
    assert info["network"] == net.config
    assert info["preprocessing"] == {"modalities": ["flair", "t1", "t1ce", "t2"], "image_size": 16}
    assert info["digest"] == file_digest(path) + "-ema" and info["weights"] == "ema"
    assert load_network(path, use_ema=False)[1]["digest"] == file_digest(path) + "-model"
    assert not loaded.training
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0)
    raw, _ = load_network(path, use_ema=False)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(raw.state_dict()[k], v, atol=0, rtol=0)


def test_checkpoint_content_records_configuration(tmp_path):
    net = _tiny()
    content = load_checkpoint(_save(tmp_path, net, extra={"iteration": 7}))
    assert content["metadata"]["format"] == "anofpdm_monai/1"
    assert content["metadata"]["network"]["channels"] == [16, 32]
    assert content["iteration"] == 7


def test_other_architecture_is_refused_with_one_line(tmp_path):
    path = _save(tmp_path, _tiny())
    bigger = build_diffusion_unet(4, {**NETWORK_PRESETS["tiny"], "channels": (16, 64)}, use_flash_attention=False)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(bigger, path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert "channels: [16, 32] in the checkpoint vs [16, 64] here" in message
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())  # untouched


def test_other_in_channels_is_refused(tmp_path):
    path = _save(tmp_path, _tiny())
    one = build_diffusion_unet(1, "tiny", use_flash_attention=False)
    with pytest.raises(CheckpointError, match=r"in_channels: 4 in the checkpoint vs 1 here"):
        load_weights(one, path)


def test_metadata_object_refuses_other_preprocessing():
    net = _tiny()
    state = CheckpointMetadata(net, {"image_size": 128}).state_dict()
    CheckpointMetadata(net, {"image_size": 128}).load_state_dict(state)  # same: accepted
    with pytest.raises(CheckpointError, match="other preprocessing .*image_size: 128 in the checkpoint vs 64 here"):
        CheckpointMetadata(net, {"image_size": 64}).load_state_dict(state)


def test_plain_state_dict(tmp_path):
    net = _tiny().eval()
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    other = _tiny(seed=1)
    load_weights(other, tmp_path / "plain.pt")
    for k, v in net.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="records no network configuration"):
        load_network(tmp_path / "plain.pt")


def _old_style(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename MONAI >= 1.4 keys to the MONAI Generative ones that ``load_old_state_dict`` converts back."""
    old = {}
    for k, v in state.items():
        k = k.replace("attn.to_q", "to_q").replace("attn.to_k", "to_k").replace("attn.to_v", "to_v")
        k = k.replace("attn.out_proj", "proj_attn").replace("postconv", "conv")
        old[k] = v
    return old


def test_monai_generative_state_dict(tmp_path):
    net = _tiny().eval()
    old = _old_style(net.state_dict())
    assert set(old) != set(net.state_dict())  # really renamed
    assert any(k.endswith("proj_attn.weight") for k in old) and any(".upsampler.conv.conv." in k for k in old)
    torch.save(old, tmp_path / "generative.pt")
    other = _tiny(seed=1)
    load_weights(other, tmp_path / "generative.pt")
    x, t, y = _inputs(2, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x, t, class_labels=y), net(x, t, class_labels=y), atol=0, rtol=0)


def test_incomplete_monai_generative_state_dict_is_refused(tmp_path):
    old = _old_style(_tiny().state_dict())
    old.pop(next(k for k in old if k.startswith("time_embed")))
    torch.save(old, tmp_path / "partial.pt")
    other = _tiny()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"partial\.pt does not fit this network: .*missing keys"):
        load_weights(other, tmp_path / "partial.pt")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_missing_and_unreadable_files(tmp_path):
    net = _tiny()
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*absent.pt"):
        load_weights(net, tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_network(tmp_path / "absent.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint\x00\x01")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*garbage.pt") as err:
        load_network(tmp_path / "garbage.pt")
    assert "\n" not in str(err.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a dict"):
        load_weights(net, tmp_path / "list.pt")
    torch.save({"optimizer": {"lr": 1}}, tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="holds neither 'model'/'ema' weights nor a state dict"):
        load_weights(net, tmp_path / "nothing.pt")
