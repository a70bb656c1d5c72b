"""Tests of the ``conditioning="official"`` mode of AnoFPDMUNet (label embedding + MLP, scale-shift residual blocks,
label tokens in every attention block) against the facts of the official AnoFPDM network (unet_v2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

from anofpdm_monai.networks import (
    CONDITIONING_MODES,
    HEALTHY,
    NETWORK_PRESETS,
    NULL,
    NUM_CLASS_EMBEDS,
    UNHEALTHY,
    AnoFPDMUNet,
    CheckpointError,
    LabelTokenAttentionBlock,
    ScaleShiftResnetBlock,
    build_diffusion_unet,
    load_network,
    load_weights,
    save_checkpoint,
)

LABELS = torch.tensor([HEALTHY, UNHEALTHY, NULL])


def _inputs(size: int, channels: int = 4, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise the zero-initialised layers (residual ``conv2``, attention ``out_proj``, output conv) with
    PyTorch's default initialisation, so that labels can influence the output."""
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.detach().abs().max() > 0:
            m.reset_parameters()
    return net


def _official(size: str = "tiny", seed: int = 0, **kwargs) -> AnoFPDMUNet:
    torch.manual_seed(seed)
    return build_diffusion_unet(4, size, conditioning="official", use_flash_attention=False, **kwargs).eval()


# ------------------------------------------------------------------------------------------------------- structure


def test_modes_and_presets_build():
    assert CONDITIONING_MODES == ("class_embed", "cross_attention", "official")
    for size, preset in NETWORK_PRESETS.items():
        net = build_diffusion_unet(1, size, conditioning="official", use_flash_attention=False)
        tdim = 4 * preset["channels"][0]
        assert net.config["conditioning"] == "official" and net.config["label_context_dim"] == tdim, size
        assert net.num_class_embeds is None and not hasattr(net, "class_embedding")
        assert net.label_embedding.num_embeddings == NUM_CLASS_EMBEDS - 1  # healthy, unhealthy; null is zero
        assert net.label_mlp[0].in_features == preset["channels"][0] and net.label_mlp[2].out_features == tdim
        assert net.label_context_proj is None
        resnets = [m for m in net.modules() if isinstance(m, DiffusionUNetResnetBlock)]
        assert resnets and all(type(m) is ScaleShiftResnetBlock for m in resnets)
        assert all(m.time_emb_proj.out_features == 2 * m.out_channels for m in resnets)
        attentions = [m for m in net.modules() if type(m).__name__.endswith("AttentionBlock")]
        # attention levels (down: num_res_blocks, up: num_res_blocks + 1 each) and the middle block
        n_res = preset["num_res_blocks"]
        assert len(attentions) == sum(preset["attention_levels"]) * (2 * n_res + 1) + 1
        assert all(type(m) is LabelTokenAttentionBlock and m.to_label_kv.in_features == tdim for m in attentions)


def test_class_embed_and_cross_attention_unchanged():
    net = build_diffusion_unet(4, "tiny", use_flash_attention=False)
    assert net.config["conditioning"] == "class_embed" and net.config["label_context_dim"] == 64
    assert net.class_embedding.num_embeddings == NUM_CLASS_EMBEDS
    plain = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=4,
        out_channels=4,
        num_res_blocks=1,
        channels=(16, 32),
        attention_levels=(False, True),
        norm_num_groups=8,
        num_head_channels=16,
        num_class_embeds=NUM_CLASS_EMBEDS,
    )
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert not any(isinstance(m, (ScaleShiftResnetBlock, LabelTokenAttentionBlock)) for m in net.modules())
    cross = build_diffusion_unet(4, "tiny", conditioning="cross_attention", use_flash_attention=False)
    assert cross.config["label_context_dim"] == 64 and cross.label_context.embedding_dim == 64


def test_class_embed_state_dict_loads_into_class_embed_net():
    torch.manual_seed(0)
    source = _randomize(build_diffusion_unet(4, "tiny", use_flash_attention=False)).eval()
    target = build_diffusion_unet(4, "tiny", use_flash_attention=False).eval()
    target.load_state_dict(source.state_dict())  # strict
    x, t = _inputs(16)
    with torch.no_grad():
        torch.testing.assert_close(target(x, t, class_labels=LABELS), source(x, t, class_labels=LABELS))


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("resolution", [16, 32])
def test_shapes_and_zero_output_at_init(size, resolution):
    net = _official(size)
    x, t = _inputs(resolution)
    # MONAI zero-initialises the output convolution and the residual blocks' conv2; the attention out_proj is
    # zero-initialised too (official proj_out): the fresh network outputs exactly zero
    zero_init = [net.out[2]] + [m.conv2 for m in net.modules() if isinstance(m, ScaleShiftResnetBlock)]
    zero_init += [m.attn.out_proj for m in net.modules() if isinstance(m, LabelTokenAttentionBlock)]
    assert all(p.abs().max() == 0 for m in zero_init for p in m.parameters())
    assert net.label_mlp[2].weight.abs().max() > 0  # the label MLP is not zero-initialised
    with torch.no_grad():
        out = net(x, t, class_labels=LABELS)
    assert out.shape == (3, 4, resolution, resolution)
    assert torch.equal(out, torch.zeros_like(out))


# ------------------------------------------------------------------------------------------------------ null label


def test_null_label_is_zero_embedding_and_zero_tokens():
    net = _official()
    labels = torch.tensor([NULL, HEALTHY, NULL, UNHEALTHY])
    with torch.no_grad():
        cemb = net.class_embedding_of(labels)
        tokens = net.label_tokens_of(cemb)
    assert cemb.shape == (4, 64) and tokens.shape == (4, 64, 64)
    assert torch.equal(cemb[[0, 2]], torch.zeros(2, 64)) and torch.equal(tokens[[0, 2]], torch.zeros(2, 64, 64))
    assert cemb[1].abs().max() > 0 and cemb[3].abs().max() > 0 and not torch.equal(cemb[1], cemb[3])
    # official: cemb = MLP(label_emb(y)) and tokens = einsum("ab,ac->abc", cemb, cemb)
    expected = net.label_mlp(net.label_embedding(torch.tensor([HEALTHY, UNHEALTHY])))
    torch.testing.assert_close(cemb[[1, 3]], expected.detach())
    torch.testing.assert_close(tokens, torch.einsum("ab,ac->abc", cemb, cemb))


def test_null_label_gets_no_gradient_into_label_path():
    net = _randomize(_official()).train()
    x, t = _inputs(16, batch=2)
    net(x, t, class_labels=torch.tensor([NULL, NULL])).square().sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in net.label_mlp.parameters())
    assert net.label_embedding.weight.grad is None or net.label_embedding.weight.grad.abs().max() == 0


def test_smaller_label_context_dim():
    net = _official(label_context_dim=8)
    assert net.config["label_context_dim"] == 8 and net.label_context_proj.bias is None
    assert all(m.to_label_kv.in_features == 8 for m in net.modules() if isinstance(m, LabelTokenAttentionBlock))
    with torch.no_grad():
        tokens = net.label_tokens_of(net.class_embedding_of(LABELS))
    assert tokens.shape == (3, 8, 8) and torch.equal(tokens[2], torch.zeros(8, 8))
    x, t = _inputs(16)
    with torch.no_grad():
        assert _randomize(net)(x, t, class_labels=LABELS).shape == (3, 4, 16, 16)


# ------------------------------------------------------------------------------------------------- label influence


def test_labels_change_output_only_through_label_mlp():
    net = _randomize(_official())
    x, t = _inputs(16, batch=1)
    x, t = x.expand(3, -1, -1, -1), t.expand(3)
    with torch.no_grad():
        out = net(x, t, class_labels=LABELS)
        assert (out[0] - out[1]).abs().max() > 1e-4
        assert (out[0] - out[2]).abs().max() > 1e-4
        for p in net.label_mlp.parameters():
            p.zero_()
        out = net(x, t, class_labels=LABELS)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", ["scale_shift", "attention"])
def test_each_label_path_alone_reaches_output(path):
    """The label acts through the residual blocks' scale/shift and through the attention label tokens."""
    net = _randomize(_official())
    with torch.no_grad():
        for m in net.modules():
            if path == "scale_shift" and isinstance(m, LabelTokenAttentionBlock):
                m.to_label_kv.weight.zero_()  # label tokens carry nothing: keys/values are the biases only
            if path == "attention" and isinstance(m, ScaleShiftResnetBlock):
                m.time_emb_proj.weight.zero_()  # emb (time + label) does not reach the residual blocks
        x, t = _inputs(16, batch=1)
        out = net(x.expand(2, -1, -1, -1), t.expand(2), class_labels=torch.tensor([HEALTHY, UNHEALTHY]))
    assert (out[0] - out[1]).abs().max() > 1e-5


# ---------------------------------------------------------------------------------------------------------- blocks


def _block(in_channels=8, out_channels=16, seed=0) -> ScaleShiftResnetBlock:
    torch.manual_seed(seed)
    block = ScaleShiftResnetBlock(
        spatial_dims=2, in_channels=in_channels, temb_channels=12, out_channels=out_channels, norm_num_groups=4
    )
    return _randomize(block, seed)


def test_scale_shift_block_without_emb_is_plain_norm_silu_conv():
    block = _block()
    with torch.no_grad():
        block.time_emb_proj.weight.zero_()
        block.time_emb_proj.bias.zero_()
        x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
        h = block.conv1(F.silu(block.norm1(x)))
        expected = block.skip_connection(x) + block.conv2(F.silu(block.norm2(h)))
        torch.testing.assert_close(block(x, emb), expected)


def test_scale_shift_block_matches_official_formula():
    block = _block()
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    with torch.no_grad():
        emb_out = block.time_emb_proj(F.silu(emb))
        assert emb_out.shape == (2, 32)
        scale, shift = emb_out[:, :16, None, None], emb_out[:, 16:, None, None]
        h = block.conv1(F.silu(block.norm1(x)))
        h = block.conv2(F.silu(block.norm2(h) * (1 + scale) + shift))
        torch.testing.assert_close(block(x, emb), block.skip_connection(x) + h)


def test_scale_shift_block_keeps_monai_configuration():
    monai_block = DiffusionUNetResnetBlock(
        spatial_dims=2, in_channels=8, temb_channels=12, out_channels=16, down=True, norm_num_groups=4
    )
    block = ScaleShiftResnetBlock.like(monai_block)
    assert set(block.state_dict()) == set(monai_block.state_dict())
    assert block.time_emb_proj.weight.shape == (32, 12) and block.downsample is not None
    assert block(torch.randn(1, 8, 8, 8), torch.randn(1, 12)).shape == (1, 16, 4, 4)


def _official_qkv_attention(qkv: torch.Tensor, encoder_kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The official QKVAttention with encoder_kv, written from its description: qkv (B, H*3*ch, N) laid out per head
    as [q, k, v], encoder_kv (B, H*2*ch, T) per head as [k, v]; the encoder keys/values are concatenated in front of
    the spatial ones, per head; both q and k are scaled by ch**-0.25."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, 3 * ch, length).split(ch, dim=1)
    ek, ev = encoder_kv.reshape(bs * n_heads, 2 * ch, -1).split(ch, dim=1)
    k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


@pytest.mark.parametrize("flash", [False, True])
def test_label_token_attention_matches_reference(flash):
    channels, heads, label_dim, tokens = 8, 2, 3, 5
    torch.manual_seed(0)
    block = LabelTokenAttentionBlock(
        2, channels, label_dim, num_head_channels=channels // heads, norm_num_groups=2, use_flash_attention=flash
    )
    assert block.attn.out_proj.weight.abs().max() == 0 and block.attn.out_proj.bias.abs().max() == 0
    _randomize(block)
    x, label = torch.randn(2, channels, 2, 3), torch.randn(2, tokens, label_dim)
    ch = channels // heads
    with torch.no_grad():
        # official layout: per head [q, k, v] of ch rows each; encoder_kv per head [k, v]
        h = block.norm(x).reshape(2, channels, -1)
        q, k, v = (
            F.linear(h.transpose(1, 2), m.weight, m.bias).transpose(1, 2)
            for m in (block.attn.to_q, block.attn.to_k, block.attn.to_v)
        )
        qkv = torch.cat([torch.cat([t[:, i * ch : (i + 1) * ch] for t in (q, k, v)], dim=1) for i in range(heads)], 1)
        lk, lv = block.to_label_kv(label).transpose(1, 2).split(channels, dim=1)
        ekv = torch.cat([torch.cat([t[:, i * ch : (i + 1) * ch] for t in (lk, lv)], dim=1) for i in range(heads)], 1)
        a = _official_qkv_attention(qkv, ekv, heads)
        expected = x + block.attn.out_proj(a.transpose(1, 2)).transpose(1, 2).reshape(x.shape)
        torch.testing.assert_close(block(x, label), expected, rtol=1e-5, atol=1e-5)

        # and an explicit softmax over [label tokens, spatial tokens] for one query, head 1
        qi = q[0, ch:, 4]
        keys = torch.cat([lk[0, ch:], k[0, ch:]], dim=1)  # (ch, T + N)
        values = torch.cat([lv[0, ch:], v[0, ch:]], dim=1)
        w = torch.softmax(qi @ keys / math.sqrt(ch), dim=0)
        torch.testing.assert_close(a[0, ch:, 4], values @ w, rtol=1e-5, atol=1e-5)

        # without label tokens: MONAI's spatial self-attention (with the same weights)
        plain = block(x)
        ref = x + block.attn(block.norm(x).reshape(2, channels, -1).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
        torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)


def test_flash_attention_network_matches_explicit():
    net = _randomize(_official())
    flash = _official()
    flash.load_state_dict(net.state_dict())
    for m in flash.modules():
        if isinstance(m, LabelTokenAttentionBlock):
            m.use_flash_attention = True
    x, t = _inputs(16)
    with torch.no_grad():
        torch.testing.assert_close(flash(x, t, class_labels=LABELS), net(x, t, class_labels=LABELS))


def test_dropout_reaches_scale_shift_blocks():
    net = _randomize(_official(dropout=0.5)).train()
    x, t = _inputs(16)
    with torch.no_grad():
        assert not torch.equal(net(x, t, class_labels=LABELS), net(x, t, class_labels=LABELS))
        net.eval()
        assert torch.equal(net(x, t, class_labels=LABELS), net(x, t, class_labels=LABELS))


def test_rejects_context_and_missing_labels():
    net = _official()
    x, t = _inputs(16)
    with pytest.raises(ValueError, match="no context"):
        net(x, t, context=torch.zeros(3, 1, 8), class_labels=LABELS)
    with pytest.raises(ValueError, match="class_labels is required"):
        net(x, t)


# ----------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_rebuilds_official_net(tmp_path):
    net = _randomize(_official(label_context_dim=16, dropout=0.1))
    path = save_checkpoint(tmp_path / "official.pt", net)
    loaded, info = load_network(path, use_flash_attention=False)
    assert info["network"]["conditioning"] == "official" and info["network"]["label_context_dim"] == 16
    assert isinstance(loaded, AnoFPDMUNet) and loaded.config == net.config
    x, t = _inputs(16)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, class_labels=LABELS), net.eval()(x, t, class_labels=LABELS))
    # an official checkpoint is refused by a class_embed network (and the other way round)
    with pytest.raises(CheckpointError, match="conditioning"):
        load_weights(build_diffusion_unet(4, "tiny", use_flash_attention=False), path)
    other = save_checkpoint(tmp_path / "class_embed.pt", build_diffusion_unet(4, "tiny", use_flash_attention=False))
    with pytest.raises(CheckpointError, match="conditioning"):
        load_weights(_official(), other)
