"""The class-conditioned MONAI ``DiffusionModelUNet`` used by AnoFPDM.

Labels: 0 healthy, 1 unhealthy, 2 null (the classifier-free "no label"; the official code uses a zero embedding,
here it is a dedicated index of ``num_class_embeds``, except in ``"official"`` mode, where label 2 gives the zero
embedding). Three conditioning modes:

- ``"class_embed"`` (default): MONAI adds the class embedding to the time embedding;
- ``"cross_attention"``: additionally, every attention level attends to a one-token learned label embedding
  (MONAI's ``with_conditioning`` path), the nearest MONAI equivalent of the official network feeding the label
  embedding to each attention block as extra key/value tokens.
- ``"official"``: the label conditioning of the official AnoFPDM network (``guided_diffusion/unet_v2.py`` with
  ``--unet_ver v2 --clf_free True``) on MONAI's blocks: a label embedding + MLP added to the time embedding (zero for
  the null label), scale-shift normalisation in every residual block and the label as extra key/value tokens of
  every attention block (see :class:`AnoFPDMUNet`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, get_timestep_embedding, zero_module

__all__ = [
    "HEALTHY",
    "UNHEALTHY",
    "NULL",
    "NUM_CLASS_EMBEDS",
    "NETWORK_PRESETS",
    "CONDITIONING_MODES",
    "AnoFPDMUNet",
    "LabelTokenAttentionBlock",
    "ScaleShiftResnetBlock",
    "build_diffusion_unet",
]

HEALTHY = 0
UNHEALTHY = 1
NULL = 2
NUM_CLASS_EMBEDS = 3

CONDITIONING_MODES = ("class_embed", "cross_attention", "official")

#: label tokens of the pre-existing modes (``cross_attention``); recorded as such in their configs
_DEFAULT_LABEL_CONTEXT_DIM = 64

#: architecture presets; ``paper`` follows the papers (128 base channels, multipliers 1,1,2,3,4, two residual
#: blocks, attention at the three lowest resolutions, dropout 0.1), the others are CPU-sized.
NETWORK_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "channels": (128, 128, 256, 384, 512),
        "attention_levels": (False, False, True, True, True),
        "num_res_blocks": 2,
        "num_head_channels": 64,
        "norm_num_groups": 32,
        "dropout": 0.1,
    },
    "medium": {
        "channels": (64, 128, 192, 256),
        "attention_levels": (False, False, True, True),
        "num_res_blocks": 2,
        "num_head_channels": 32,
        "norm_num_groups": 32,
        "dropout": 0.1,
    },
    "small": {
        "channels": (32, 64, 96, 128),
        "attention_levels": (False, False, False, True),
        "num_res_blocks": 1,
        "num_head_channels": 32,
        "norm_num_groups": 16,
        "dropout": 0.0,
    },
    "tiny": {
        "channels": (16, 32),
        "attention_levels": (False, True),
        "num_res_blocks": 1,
        "num_head_channels": 16,
        "norm_num_groups": 8,
        "dropout": 0.0,
    },
}


class _InputDropout:
    """Forward pre-hook applying dropout to the input of a module (MONAI's ResNet block has no dropout; the
    papers' network drops out before the second convolution). A hook keeps the state-dict keys of MONAI's
    network, so checkpoints stay loadable into a plain ``DiffusionModelUNet``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (F.dropout(args[0], p=self.p, training=module.training),) + tuple(args[1:])


class ScaleShiftResnetBlock(DiffusionUNetResnetBlock):
    """MONAI's residual block with scale-shift (FiLM) conditioning, the official ``use_scale_shift_norm=True``.

    ``time_emb_proj`` maps SiLU(emb) to ``2 * out_channels`` values, split into ``scale, shift`` (in that order), and
    the second half of the block is ``conv2(SiLU(norm2(h) * (1 + scale) + shift))`` instead of MONAI's
    ``conv2(SiLU(norm2(h + proj(emb))))``. Parameter names are MONAI's; ``conv2`` stays zero-initialised.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.time_emb_proj = nn.Linear(self.emb_channels, 2 * self.out_channels)

    @classmethod
    def like(cls, block: DiffusionUNetResnetBlock) -> ScaleShiftResnetBlock:
        """A freshly initialised scale-shift block with the configuration of MONAI's ``block``."""
        return cls(
            spatial_dims=block.spatial_dims,
            in_channels=block.channels,
            temb_channels=block.emb_channels,
            out_channels=block.out_channels,
            up=block.up,
            down=block.down,
            norm_num_groups=block.norm1.num_groups,
            norm_eps=block.norm1.eps,
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.nonlinearity(self.norm1(x))
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        emb_out = self.time_emb_proj(self.nonlinearity(emb)).reshape(*emb.shape[:1], -1, *([1] * self.spatial_dims))
        scale, shift = emb_out.chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.nonlinearity(h))
        return self.skip_connection(x) + h


class LabelTokenAttentionBlock(SpatialAttentionBlock):
    """MONAI's spatial self-attention whose keys and values also include label tokens (official ``AttentionBlock``
    with ``encoder_kv``).

    The spatial tokens are group-normalised and projected by ``attn.to_q/to_k/to_v`` as in MONAI; the label tokens
    (B, T, label_dim) are not normalised and ``to_label_kv`` (a linear layer, the official 1x1 ``Conv1d``) maps them to
    keys and values that are concatenated with the spatial ones before the per-head softmax, so every spatial query
    attends over [label tokens, spatial tokens]. The official network splits its ``encoder_kv`` output per head into
    (k, v); here it is split into k | v, then per head: the same function up to a permutation of the output rows.
    ``attn.out_proj`` is zero-initialised (official ``proj_out``; MONAI leaves it random), so the block starts as
    the identity.

    Args:
        spatial_dims, num_channels, num_head_channels, norm_num_groups, norm_eps: as ``SpatialAttentionBlock``.
        label_dim: width of a label token.
        use_flash_attention: ``torch.nn.functional.scaled_dot_product_attention`` instead of the explicit softmax.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_channels: int,
        label_dim: int,
        num_head_channels: int | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            num_channels=num_channels,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            use_flash_attention=use_flash_attention,
        )
        self.to_label_kv = nn.Linear(label_dim, 2 * num_channels)
        zero_module(self.attn.out_proj)
        self.use_flash_attention = use_flash_attention

    @classmethod
    def like(
        cls, block: SpatialAttentionBlock, label_dim: int, use_flash_attention: bool = False
    ) -> LabelTokenAttentionBlock:
        """A freshly initialised label-token attention block with the configuration of MONAI's ``block``."""
        channels = block.norm.num_channels
        return cls(
            spatial_dims=block.spatial_dims,
            num_channels=channels,
            label_dim=label_dim,
            num_head_channels=channels // block.attn.num_heads,
            norm_num_groups=block.norm.num_groups,
            norm_eps=block.norm.eps,
            use_flash_attention=use_flash_attention,
        )

    def forward(self, x: torch.Tensor, label_tokens: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """``x`` (B, C, *spatial) plus the attention output; ``label_tokens`` (B, T, label_dim) or None (self-attention
        only)."""
        shape, attn = x.shape, self.attn
        h = self.norm(x).reshape(*shape[:2], -1).transpose(1, 2)  # B, N, C
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        if label_tokens is not None:
            label_k, label_v = self.to_label_kv(label_tokens.to(h.dtype)).chunk(2, dim=-1)
            k, v = torch.cat([label_k, k], dim=1), torch.cat([label_v, v], dim=1)
        heads = attn.num_heads
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))  # B, H, L, d
        if self.use_flash_attention:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        else:
            weights = torch.einsum("bhnd,bhmd->bhnm", q, k) * attn.scale
            out = torch.einsum("bhnm,bhmd->bhnd", weights.float().softmax(dim=-1).to(v.dtype), v)
        out = attn.out_proj(out.transpose(1, 2).reshape(h.shape))
        return x + out.transpose(1, 2).reshape(shape)


class AnoFPDMUNet(DiffusionModelUNet):
    """MONAI ``DiffusionModelUNet`` with 3 class embeddings (healthy, unhealthy, null), optional dropout in the
    residual blocks and optional label cross-attention. It records its constructor arguments in ``config`` so that
    checkpoints can rebuild it and refuse a different architecture.

    ``conditioning="official"`` conditions on the label as the official AnoFPDM network (unet_v2, classifier-free):

    - ``label_embedding`` (2 x ``channels[0]``, healthy/unhealthy) and ``label_mlp`` (Linear -> SiLU -> Linear to the
      time-embedding width ``4 * channels[0]``) give ``cemb``, added to the time embedding. The null label (2) gives
      ``cemb = 0`` exactly, the official null embedding, so the prepare-batch's dropout to label 2 is the official
      label dropout. MONAI's own ``class_embedding`` is not built (``num_class_embeds=None``): it would add a
      second, unmasked label path and parameters without gradient.
    - every residual block is a :class:`ScaleShiftResnetBlock` (``use_scale_shift_norm=True``);
    - every attention block is a :class:`LabelTokenAttentionBlock` attending over [label tokens, spatial tokens];
      the label tokens are ``c c^T`` (B, D, D: D tokens of width D, zero for null), ``c = cemb`` as in the
      official ``cemb_mm`` when ``label_context_dim`` D equals the time-embedding width (the default: 512 at paper
      size, 128 small, 64 tiny, as official), else ``c = label_context_proj(cemb)`` (bias-free linear, so null
      stays zero), which caps the extra keys per attention block at D when memory or speed matter.

    Args:
        in_channels: number of image channels (modalities); the output has as many (epsilon prediction).
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups: as ``DiffusionModelUNet``.
        dropout: dropout probability inside each residual block.
        conditioning: one of :data:`CONDITIONING_MODES` (see module docstring).
        label_context_dim: width of the label token for ``cross_attention`` (default 64); number and width of
            the label tokens for ``official`` (default the time-embedding width ``4 * channels[0]``).
        use_flash_attention: PyTorch SDPA attention (same weights; use it on GPU).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (32, 64, 96, 128),
        attention_levels: Sequence[bool] = (False, False, False, True),
        num_res_blocks: int | Sequence[int] = 1,
        num_head_channels: int | Sequence[int] = 32,
        norm_num_groups: int = 16,
        dropout: float = 0.0,
        conditioning: str = "class_embed",
        label_context_dim: int | None = None,
        use_flash_attention: bool = False,
    ) -> None:
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        cross = conditioning == "cross_attention"
        official = conditioning == "official"
        time_embed_dim = 4 * int(channels[0])
        if label_context_dim is None:
            label_context_dim = time_embed_dim if official else _DEFAULT_LABEL_CONTEXT_DIM
        if label_context_dim < 1:
            raise ValueError(f"label_context_dim must be positive, got {label_context_dim}")
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=in_channels,
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            num_class_embeds=None if official else NUM_CLASS_EMBEDS,
            with_conditioning=cross,
            cross_attention_dim=label_context_dim if cross else None,
            use_flash_attention=use_flash_attention,
        )
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "channels": [int(c) for c in channels],
            "attention_levels": [bool(a) for a in attention_levels],
            "num_res_blocks": num_res_blocks if isinstance(num_res_blocks, int) else list(num_res_blocks),
            "num_head_channels": num_head_channels if isinstance(num_head_channels, int) else list(num_head_channels),
            "norm_num_groups": int(norm_num_groups),
            "dropout": float(dropout),
            "conditioning": conditioning,
            "label_context_dim": int(label_context_dim),
        }
        self.conditioning = conditioning
        self.label_context = nn.Embedding(NUM_CLASS_EMBEDS, label_context_dim) if cross else None
        if official:
            self.label_embedding = nn.Embedding(NUM_CLASS_EMBEDS - 1, int(channels[0]))  # healthy, unhealthy
            self.label_mlp = nn.Sequential(
                nn.Linear(int(channels[0]), time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            )
            self.label_context_proj = (
                None
                if label_context_dim == time_embed_dim
                else nn.Linear(time_embed_dim, label_context_dim, bias=False)
            )
            for module in list(self.modules()):
                for name, child in list(module.named_children()):
                    if type(child) is DiffusionUNetResnetBlock:
                        setattr(module, name, ScaleShiftResnetBlock.like(child))
                    elif type(child) is SpatialAttentionBlock:
                        setattr(
                            module, name, LabelTokenAttentionBlock.like(child, label_context_dim, use_flash_attention)
                        )
        if dropout > 0:
            for module in self.modules():
                if isinstance(module, DiffusionUNetResnetBlock):
                    module.conv2.register_forward_pre_hook(_InputDropout(dropout))

    def class_embedding_of(self, class_labels: torch.Tensor) -> torch.Tensor:
        """``official`` mode: the label embedding ``cemb`` (B, 4 * channels[0]) added to the time embedding; exactly
        zero for the null label."""
        labels = class_labels.long()
        null = labels == NULL
        cemb = self.label_mlp(self.label_embedding(torch.where(null, torch.zeros_like(labels), labels)))
        return torch.where(null[:, None], torch.zeros_like(cemb), cemb)

    def label_tokens_of(self, cemb: torch.Tensor) -> torch.Tensor:
        """``official`` mode: the label tokens (B, D, D), the outer product ``c c^T`` of ``c = cemb`` (or its
        projection to ``label_context_dim``): D tokens of width D, zero for the null label."""
        c = cemb if self.label_context_proj is None else self.label_context_proj(cemb)
        return c[:, :, None] * c[:, None, :]

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Epsilon prediction for ``x`` at ``timesteps`` (B,) under ``class_labels`` (B,) in {0, 1, 2}."""
        if class_labels is None:
            raise ValueError("class_labels is required (0 healthy, 1 unhealthy, 2 null)")
        if self.conditioning == "official":
            if context is not None:
                raise ValueError("conditioning='official' takes no context: the label is the only condition")
            return self._official_forward(
                x, timesteps, class_labels, down_block_additional_residuals, mid_block_additional_residual
            )
        if self.label_context is not None and context is None:
            context = self.label_context(class_labels.long())[:, None, :].to(x.dtype)
        return super().forward(
            x,
            timesteps,
            context=context,
            class_labels=class_labels.long(),
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
        )

    def _official_forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        down_residuals: Sequence[torch.Tensor] | None,
        mid_residual: torch.Tensor | None,
    ) -> torch.Tensor:
        """``DiffusionModelUNet.forward`` with the label tokens passed to every attention block (MONAI's blocks
        drop ``context`` when they have no cross-attention)."""
        emb = self.time_embed(get_timestep_embedding(timesteps, self.block_out_channels[0]).to(x.dtype))
        cemb = self.class_embedding_of(class_labels).to(emb.dtype)
        emb = emb + cemb
        tokens = self.label_tokens_of(cemb)

        def resnets_and_attentions(block: nn.Module) -> zip:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            return zip(block.resnets, attentions)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for resnet, attention in resnets_and_attentions(block):
                h = resnet(h, emb)
                h = h if attention is None else attention(h, tokens)
                skips.append(h)
            if block.downsampler is not None:
                h = block.downsampler(h, emb)
                skips.append(h)
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals)]
        mid = self.middle_block
        h = mid.resnet_2(mid.attention(mid.resnet_1(h, emb), tokens), emb)
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.up_blocks:
            for resnet, attention in resnets_and_attentions(block):
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
                h = h if attention is None else attention(h, tokens)
            if block.upsampler is not None:
                h = block.upsampler(h, emb)
        return self.out(h)


def build_diffusion_unet(
    in_channels: int,
    size: str | Mapping[str, Any] = "small",
    conditioning: str = "class_embed",
    use_flash_attention: bool | None = None,
    **overrides: Any,
) -> AnoFPDMUNet:
    """Build the AnoFPDM network from a preset.

    Args:
        in_channels: number of modalities.
        size: a key of :data:`NETWORK_PRESETS` (``paper``, ``medium``, ``small``, ``tiny``) or a dict of
            architecture arguments.
        conditioning: one of :data:`CONDITIONING_MODES` (``"class_embed"``, ``"cross_attention"``, ``"official"``).
        use_flash_attention: SDPA attention; default: on when CUDA is available.
        overrides: architecture arguments replacing the preset's (e.g. ``dropout=0.0``).

    Returns:
        the network; its ``config`` attribute holds every architecture argument.
    """
    if isinstance(size, str):
        if size not in NETWORK_PRESETS:
            raise ValueError(f"unknown network size {size!r}; choose one of {sorted(NETWORK_PRESETS)} or pass a dict")
        params = copy.deepcopy(NETWORK_PRESETS[size])
    else:
        params = dict(size)
    params.update(overrides)
    if use_flash_attention is None:
        use_flash_attention = torch.cuda.is_available()
    return AnoFPDMUNet(
        in_channels=in_channels, conditioning=conditioning, use_flash_attention=use_flash_attention, **params
    )
