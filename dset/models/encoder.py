"""RT-DETR HybridEncoder: an AIFI transformer layer on the stride-32 map, then the CCFM neck.

DSET switches act here, on the AIFI layer only:
- ``moe``: the layer's FFN becomes a token-level mixture of experts (:class:`dset.models.moe.MoEFFN`);
- ``token_pruner``: only the tokens that the importance predictor keeps go through the AIFI layer
  (attention and FFN); the others return to the map unchanged (or zeroed), so the CCFM neck always
  sees a full map (:class:`dset.models.pruning.TokenPruner`).
With both off, module names and numbers are those of the reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvNormLayer, make_activation
from .moe import RoutingGroups, patch_groups


class RepVggBlock(nn.Module):
    """3x3 conv-BN plus 1x1 conv-BN, summed (the training-time form of a RepVGG block)."""

    def __init__(self, ch_in: int, ch_out: int, act: str = "relu"):
        super().__init__()
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1, act=None)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0, act=None)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3, expansion: float = 1.0,
                 act: str = "silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = ConvNormLayer(hidden, out_channels, 1, 1, act=act) if hidden != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer layer (the AIFI layer). ``moe`` replaces the dense FFN when given."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 1024, dropout: float = 0.0,
                 activation: str = "gelu", moe: nn.Module | None = None):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        if moe is None:
            self.linear1 = nn.Linear(d_model, dim_feedforward)
            self.dropout = nn.Dropout(dropout)
            self.linear2 = nn.Linear(dim_feedforward, d_model)
            self.activation = make_activation(activation)
        else:
            self.moe = moe
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def ffn(self, x: torch.Tensor, routing: RoutingGroups | None = None) -> torch.Tensor:
        if hasattr(self, "moe"):
            return self.moe(x, routing)
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor | None = None,
                routing: RoutingGroups | None = None) -> torch.Tensor:
        """``routing``: the MoE's patch-level routing groups of ``src``'s tokens (None: per token)."""
        q = k = src if pos_embed is None else src + pos_embed
        attn, _ = self.self_attn(q, k, value=src, need_weights=False)
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self.ffn(src, routing)))


class TransformerEncoder(nn.Module):
    def __init__(self, layers: list[TransformerEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def routing_patch_size(self) -> int:
        """The side of patch-level routing's patches in this encoder's MoE layers (1: per token)."""
        return max((layer.moe.patch_size for layer in self.layers if hasattr(layer, "moe")), default=1)

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor | None = None,
                routing: RoutingGroups | None = None) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos_embed=pos_embed, routing=routing)
        return src


def sincos_position_embedding_2d(w: int, h: int, embed_dim: int = 256, temperature: float = 10000.0,
                                 device: torch.device | None = None) -> torch.Tensor:
    """[1, w*h, embed_dim] 2D sine-cosine embedding, laid out exactly as the reference builds it.

    The reference builds the grid with ``meshgrid(grid_w, grid_h, indexing='ij')`` and flattens it,
    so the first quarter of the channels varies along the token's *row* block index for a square map;
    pretrained checkpoints depend on this layout, so we keep it.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for the 2D sin-cos embedding")
    grid_w = torch.arange(int(w), dtype=torch.float32, device=device)
    grid_h = torch.arange(int(h), dtype=torch.float32, device=device)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = embed_dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32, device=device) / pos_dim
    omega = 1.0 / (temperature ** omega)
    out_w = grid_w.flatten()[:, None] @ omega[None]
    out_h = grid_h.flatten()[:, None] @ omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]


class HybridEncoder(nn.Module):
    def __init__(self, in_channels: list[int], feat_strides: list[int] = (8, 16, 32), hidden_dim: int = 256,
                 nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0, enc_act: str = "gelu",
                 use_encoder_idx: tuple[int, ...] = (2,), num_encoder_layers: int = 1,
                 pe_temperature: float = 10000.0, expansion: float = 1.0, depth_mult: float = 1.0,
                 act: str = "silu", moe_factory=None, token_pruner: nn.Module | None = None):
        """``moe_factory``: callable returning a fresh MoE FFN module for each AIFI layer, or None (dense)."""
        super().__init__()
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = tuple(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature

        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1, bias=False), nn.BatchNorm2d(hidden_dim))
            for c in self.in_channels)

        def make_layer() -> TransformerEncoderLayer:
            return TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, enc_act,
                                           moe=moe_factory() if moe_factory is not None else None)

        self.encoder = nn.ModuleList(
            TransformerEncoder([make_layer() for _ in range(num_encoder_layers)]) for _ in self.use_encoder_idx)
        if token_pruner is not None:
            if len(self.use_encoder_idx) != 1:
                raise ValueError("token pruning supports exactly one AIFI level (use_encoder_idx)")
            self.token_pruner = token_pruner

        n = len(self.in_channels)
        blocks = round(3 * depth_mult)
        self.lateral_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=act) for _ in range(n - 1))
        self.fpn_blocks = nn.ModuleList(
            CSPRepLayer(hidden_dim * 2, hidden_dim, blocks, expansion=expansion, act=act) for _ in range(n - 1))
        self.downsample_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act) for _ in range(n - 1))
        self.pan_blocks = nn.ModuleList(
            CSPRepLayer(hidden_dim * 2, hidden_dim, blocks, expansion=expansion, act=act) for _ in range(n - 1))
        # Filled by every forward: what the pruner saw and did (scores keep their graph for the loss; keep_index
        # [B, K], detached, says which tokens of the row-major H*W map were kept, for dset.pictures).
        self.last_pruning: dict | None = None

    def aifi(self, proj_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run the AIFI layer(s) on the selected level(s), with token pruning when it is on."""
        proj_feats = list(proj_feats)
        self.last_pruning = None
        if self.num_encoder_layers == 0:
            return proj_feats
        for i, level in enumerate(self.use_encoder_idx):
            b, c, h, w = proj_feats[level].shape
            tokens = proj_feats[level].flatten(2).permute(0, 2, 1)  # [B, H*W, C]
            pos = sincos_position_embedding_2d(w, h, self.hidden_dim, self.pe_temperature, device=tokens.device)
            pos = pos.to(tokens.dtype)
            pruner = getattr(self, "token_pruner", None)
            patch = self.encoder[i].routing_patch_size
            if pruner is None:
                routing = patch_groups(h, w, patch, b, device=tokens.device) if patch > 1 else None
                memory = self.encoder[i](tokens, pos_embed=pos, routing=routing)
            else:
                kept, kept_pos, keep_index, scores = pruner.select(tokens, pos)
                # the kept tokens' patches: a patch's decision is taken on those of its tokens that were kept
                routing = patch_groups(h, w, patch, b, index=keep_index) if patch > 1 else None
                memory = pruner.merge(tokens, self.encoder[i](kept, pos_embed=kept_pos, routing=routing), keep_index)
                self.last_pruning = {"scores": scores, "spatial_shape": (h, w), "keep_index": keep_index.detach(),
                                     **pruner.last_stats}
            proj_feats[level] = memory.permute(0, 2, 1).reshape(b, c, h, w).contiguous()
        return proj_feats

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder expects {len(self.in_channels)} feature maps, got {len(feats)}")
        proj_feats = self.aifi([proj(f) for proj, f in zip(self.input_proj, feats)])
        n = len(self.in_channels)

        # top-down (FPN)
        inner_outs = [proj_feats[-1]]
        for idx in range(n - 1, 0, -1):
            feat_high = self.lateral_convs[n - 1 - idx](inner_outs[0])
            inner_outs[0] = feat_high
            feat_low = proj_feats[idx - 1]
            if feat_low.shape[2] == 2 * feat_high.shape[2] and feat_low.shape[3] == 2 * feat_high.shape[3]:
                up = F.interpolate(feat_high, scale_factor=2.0, mode="nearest")
            else:
                up = F.interpolate(feat_high, size=feat_low.shape[2:], mode="bilinear")
            inner_outs.insert(0, self.fpn_blocks[n - 1 - idx](torch.cat([up, feat_low], dim=1)))

        # bottom-up (PAN)
        outs = [inner_outs[0]]
        for idx in range(n - 1):
            down = self.downsample_convs[idx](outs[-1])
            outs.append(self.pan_blocks[idx](torch.cat([down, inner_outs[idx + 1]], dim=1)))
        return outs
