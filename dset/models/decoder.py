"""RT-DETR decoder: query selection from the encoder memory, multi-scale deformable attention
(pure PyTorch, ``grid_sample``), iterative box refinement and contrastive denoising training.

DSET's decoder switch replaces the FFN of every decoder layer by a query-level mixture of experts
(denoising queries are routed too). With it off, names and numbers are the reference's.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .layers import MLP, bias_init_with_prob, inverse_sigmoid
from .memory_pruning import MemoryPruner, SparseValue


def deformable_attention_core(value: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                              sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """value [B, Lv, heads, d]; sampling_locations [B, Lq, heads, levels, points, 2] in [0, 1];
    attention_weights [B, Lq, heads, levels, points] -> [B, Lq, heads*d]."""
    bs, _, n_heads, head_dim = value.shape
    _, len_q, _, n_levels, n_points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        value_l = value_list[level].flatten(2).permute(0, 2, 1).reshape(bs * n_heads, head_dim, h, w)
        grid_l = grids[:, :, :, level].permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B*heads, Lq, points, 2]
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(bs * n_heads, 1, len_q, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).reshape(bs, n_heads * head_dim, len_q)
    return out.permute(0, 2, 1)


class MSDeformableAttention(nn.Module):
    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.head_dim = embed_dim // num_heads
        total_points = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dim, total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        init.constant_(self.sampling_offsets.weight, 0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.reshape(self.num_heads, 1, 1, 2).tile([1, self.num_levels, self.num_points, 1])
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32).reshape(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        init.constant_(self.attention_weights.weight, 0)
        init.constant_(self.attention_weights.bias, 0)
        init.xavier_uniform_(self.value_proj.weight)
        init.constant_(self.value_proj.bias, 0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor | SparseValue,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query [B, Lq, C]; reference_points [B, Lq, 1 or levels, 4] (cx, cy, w, h in [0, 1]); value: the memory
        [B, Lv, C], or after memory pruning its kept tokens (projected alone, then scattered into the maps)."""
        bs, len_q = query.shape[:2]
        if isinstance(value, SparseValue):
            len_v = value.length
            value = value.scatter(self.value_proj(value.kept))
        else:
            len_v = value.shape[1]
            value = self.value_proj(value)
        value = value.reshape(bs, len_v, self.num_heads, self.head_dim)
        offsets = self.sampling_offsets(query).reshape(
            bs, len_q, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).reshape(bs, len_q, self.num_heads, self.num_levels * self.num_points)
        weights = F.softmax(weights, dim=-1).reshape(bs, len_q, self.num_heads, self.num_levels, self.num_points)
        if reference_points.shape[-1] != 4:
            raise ValueError(f"reference_points must end in 4 (cx, cy, w, h), got {tuple(reference_points.shape)}")
        locations = (reference_points[:, :, None, :, None, :2]
                     + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        return self.output_proj(deformable_attention_core(value, spatial_shapes, locations, weights))


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int = 256, n_head: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0,
                 n_levels: int = 3, n_points: int = 4, moe: nn.Module | None = None):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        if moe is None:
            self.linear1 = nn.Linear(d_model, dim_feedforward)
            self.dropout3 = nn.Dropout(dropout)
            self.linear2 = nn.Linear(dim_feedforward, d_model)
        else:
            self.moe = moe
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "moe"):
            return self.moe(x)
        return self.linear2(self.dropout3(F.relu(self.linear1(x))))

    def forward(self, tgt, reference_points, memory, spatial_shapes, attn_mask=None, query_pos=None):
        q = k = tgt if query_pos is None else tgt + query_pos
        attn, _ = self.self_attn(q, k, value=tgt, attn_mask=attn_mask, need_weights=False)
        tgt = self.norm1(tgt + self.dropout1(attn))
        cross = self.cross_attn(tgt if query_pos is None else tgt + query_pos, reference_points, memory, spatial_shapes)
        tgt = self.norm2(tgt + self.dropout2(cross))
        tgt = tgt + self.dropout4(self.ffn(tgt))
        # the reference clamps to float16's range before the last norm, so that AMP training cannot overflow it
        return self.norm3(tgt.clamp(min=-65504, max=65504))


class TransformerDecoder(nn.Module):
    def __init__(self, layers: list[TransformerDecoderLayer], eval_idx: int = -1):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.eval_idx = eval_idx if eval_idx >= 0 else self.num_layers + eval_idx

    def forward(self, tgt, ref_points_unact, memory, spatial_shapes, bbox_head, score_head, query_pos_head,
                attn_mask=None):
        """Returns stacked boxes and logits: every layer in training, only layer ``eval_idx`` in eval."""
        output = tgt
        out_boxes, out_logits = [], []
        ref_points_detach = torch.sigmoid(ref_points_unact)
        ref_points = ref_points_detach
        for i, layer in enumerate(self.layers):
            query_pos = query_pos_head(ref_points_detach)
            output = layer(output, ref_points_detach.unsqueeze(2), memory, spatial_shapes, attn_mask, query_pos)
            inter_ref_bbox = torch.sigmoid(bbox_head[i](output) + inverse_sigmoid(ref_points_detach))
            if self.training:
                out_logits.append(score_head[i](output))
                if i == 0:
                    out_boxes.append(inter_ref_bbox)
                else:
                    # boxes of later layers get gradient through the previous layer's (undetached) boxes
                    out_boxes.append(torch.sigmoid(bbox_head[i](output) + inverse_sigmoid(ref_points)))
            elif i == self.eval_idx:
                out_logits.append(score_head[i](output))
                out_boxes.append(inter_ref_bbox)
                break
            ref_points = inter_ref_bbox
            ref_points_detach = inter_ref_bbox.detach() if self.training else inter_ref_bbox
        return torch.stack(out_boxes), torch.stack(out_logits)


def contrastive_denoising_group(targets: list[dict], num_classes: int, num_queries: int, class_embed: nn.Embedding,
                                num_denoising: int = 100, label_noise_ratio: float = 0.5,
                                box_noise_scale: float = 1.0):
    """Build the denoising queries (positive and negative groups), their attention mask and metadata.

    Returns (class embeddings [B, Nd, C], noised boxes as logits [B, Nd, 4], attn_mask [Nd+Q, Nd+Q],
    dn_meta) or four Nones when there is nothing to denoise. ``attn_mask`` True = may not attend.
    """
    if num_denoising <= 0:
        return None, None, None, None
    num_gts = [len(t["labels"]) for t in targets]
    device = targets[0]["labels"].device
    max_gt = max(num_gts)
    if max_gt == 0:
        return None, None, None, None
    num_group = max(1, num_denoising // max_gt)
    bs = len(num_gts)

    # padded ground truth, vectorised (no loop over images with a host sync)
    slot = torch.arange(max_gt, device=device)
    counts = torch.tensor(num_gts, device=device)
    pad_gt_mask = slot[None, :] < counts[:, None]  # [B, max_gt]
    labels_cat = torch.cat([t["labels"] for t in targets]).to(torch.int64)
    boxes_cat = torch.cat([t["boxes"] for t in targets]).to(torch.float32)
    input_class = torch.full([bs, max_gt], num_classes, dtype=torch.int64, device=device)
    input_bbox = torch.zeros([bs, max_gt, 4], device=device)
    input_class[pad_gt_mask] = labels_cat
    input_bbox[pad_gt_mask] = boxes_cat

    input_class = input_class.tile([1, 2 * num_group])
    input_bbox = input_bbox.tile([1, 2 * num_group, 1])
    pad_gt_mask = pad_gt_mask.tile([1, 2 * num_group])
    negative_mask = torch.zeros([bs, max_gt * 2, 1], device=device)
    negative_mask[:, max_gt:] = 1
    negative_mask = negative_mask.tile([1, num_group, 1])
    # each image's positive denoising queries (not negative, not padding): columns g * 2 * max_gt + j (group g, its
    # j-th object), in order; from the per-image counts on the host, not a nonzero over the positive mask, whose
    # size needs a host read
    group_start = torch.arange(num_group, device=device).unsqueeze(1) * (2 * max_gt)
    dn_positive_idx = [(group_start + torch.arange(n, device=device)).reshape(-1) for n in num_gts]
    total_dn = int(max_gt * 2 * num_group)

    if label_noise_ratio > 0:
        flip = torch.rand(input_class.shape, device=device) < (label_noise_ratio * 0.5)
        new_label = torch.randint_like(input_class, 0, num_classes)
        input_class = torch.where(flip & pad_gt_mask, new_label, input_class)

    if box_noise_scale > 0:
        known = box_cxcywh_to_xyxy(input_bbox)
        diff = torch.tile(input_bbox[..., 2:] * 0.5, [1, 1, 2]) * box_noise_scale
        sign = torch.randint_like(input_bbox, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(input_bbox)
        # negatives are pushed further away than positives: noise in [1, 2) instead of [0, 1)
        part = (part + 1.0) * negative_mask + part * (1 - negative_mask)
        known = (known + part * sign * diff).clip(min=0.0, max=1.0)
        input_bbox = box_xyxy_to_cxcywh(known)
    # as logits, noised or not (the reference leaves them unset without noise, box_noise_scale=0, and fails)
    input_bbox = inverse_sigmoid(input_bbox)

    class_queries = class_embed(input_class)

    size = total_dn + num_queries
    attn_mask = torch.zeros([size, size], dtype=torch.bool, device=device)
    attn_mask[total_dn:, :total_dn] = True  # matching queries cannot see the denoising groups
    group = max_gt * 2
    for i in range(num_group):  # groups cannot see each other
        attn_mask[group * i: group * (i + 1), :group * i] = True
        attn_mask[group * i: group * (i + 1), group * (i + 1): total_dn] = True

    dn_meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": num_group,
               "dn_num_split": [total_dn, num_queries]}
    return class_queries, input_bbox, attn_mask, dn_meta


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index [B, K]`` of ``x [1 or B, N, C]`` -> ``[B, K, C]``."""
    return x.expand(index.shape[0], -1, -1).gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _project_tokens(proj: nn.Sequential, tokens: torch.Tensor) -> torch.Tensor:
    """The decoder's input projection (1x1 conv, BatchNorm with its running statistics) of tokens [B, K, C]: the
    values that projecting the whole map and gathering gives in evaluation, computed for K tokens only."""
    x = F.linear(tokens, proj.conv.weight.flatten(1))
    norm = proj.norm
    return F.batch_norm(x.flatten(0, 1), norm.running_mean, norm.running_var, norm.weight, norm.bias,
                        training=False, eps=norm.eps).view_as(x)


class RTDETRDecoder(nn.Module):
    """The reference's ``RTDETRTransformer`` (its state_dict prefix is ``decoder.``)."""

    def __init__(self, num_classes: int = 80, hidden_dim: int = 256, num_queries: int = 300,
                 feat_channels: list[int] = (256, 256, 256), feat_strides: list[int] = (8, 16, 32),
                 num_levels: int = 3, num_points: int = 4, nhead: int = 8, num_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.0, num_denoising: int = 100,
                 label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0, eval_idx: int = -1,
                 eps: float = 1e-2, aux_loss: bool = True, moe_factory=None,
                 memory_pruner: MemoryPruner | None = None):
        super().__init__()
        feat_strides = list(feat_strides)
        if len(feat_channels) > num_levels or len(feat_strides) != len(feat_channels):
            raise ValueError("decoder: feat_channels/feat_strides do not fit num_levels")
        while len(feat_strides) < num_levels:
            feat_strides.append(feat_strides[-1] * 2)
        self.hidden_dim, self.nhead = hidden_dim, nhead
        self.feat_strides, self.num_levels = feat_strides, num_levels
        self.num_classes, self.num_queries = num_classes, num_queries
        self.eps, self.aux_loss = eps, aux_loss
        self.num_layers = num_layers

        self.input_proj = nn.ModuleList()
        for c in feat_channels:
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, hidden_dim, 1, bias=False)), ("norm", nn.BatchNorm2d(hidden_dim))])))
        c = feat_channels[-1]
        for _ in range(num_levels - len(feat_channels)):
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, hidden_dim, 3, 2, padding=1, bias=False)),
                ("norm", nn.BatchNorm2d(hidden_dim))])))
            c = hidden_dim

        layers = [TransformerDecoderLayer(hidden_dim, nhead, dim_feedforward, dropout, num_levels, num_points,
                                          moe=moe_factory() if moe_factory is not None else None)
                  for _ in range(num_layers)]
        self.decoder = TransformerDecoder(layers, eval_idx)

        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)

        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, num_layers=3) for _ in range(num_layers))
        self._anchor_cache: dict = {}
        self._reset_parameters()
        if memory_pruner is not None and len(feat_channels) != num_levels:
            raise ValueError("memory pruning needs one encoder feature map per decoder level "
                             f"({len(feat_channels)} maps, {num_levels} levels)")
        # set last: the reference's parameters keep their state_dict order (None: a plain attribute, no keys)
        self.memory_pruner = memory_pruner
        # filled by every forward with memory pruning: the scores (with their graph, for the loss), the levels'
        # shapes and the pruner's last_stats
        self.last_memory_pruning: dict | None = None

    def _reset_parameters(self) -> None:
        bias = bias_init_with_prob(0.01)
        init.constant_(self.enc_score_head.bias, bias)
        init.constant_(self.enc_bbox_head.layers[-1].weight, 0)
        init.constant_(self.enc_bbox_head.layers[-1].bias, 0)
        for cls_head, box_head in zip(self.dec_score_head, self.dec_bbox_head):
            init.constant_(cls_head.bias, bias)
            init.constant_(box_head.layers[-1].weight, 0)
            init.constant_(box_head.layers[-1].bias, 0)
        init.xavier_uniform_(self.enc_output[0].weight)
        init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        init.xavier_uniform_(self.query_pos_head.layers[1].weight)

    def _flatten_levels(self, feats: list[torch.Tensor]):
        proj = [self.input_proj[i](f) for i, f in enumerate(feats)]
        for i in range(len(proj), self.num_levels):
            proj.append(self.input_proj[i](feats[-1] if i == len(feats) else proj[-1]))
        spatial_shapes = [(int(p.shape[2]), int(p.shape[3])) for p in proj]
        memory = torch.cat([p.flatten(2).permute(0, 2, 1) for p in proj], dim=1)
        return memory, spatial_shapes

    def anchors(self, spatial_shapes: list[tuple[int, int]], device, dtype=torch.float32, grid_size: float = 0.05):
        """Anchor boxes (as logits) for every memory token and the mask of valid ones, cached per shape.

        The reference precomputes them for ``eval_spatial_size``; computing them for the actual shapes
        gives the same numbers whenever the reference runs, and also works for other input sizes.
        """
        key = (tuple(spatial_shapes), str(device), dtype)
        if key not in self._anchor_cache:
            anchors = []
            for lvl, (h, w) in enumerate(spatial_shapes):
                gy, gx = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
                grid = (torch.stack([gx, gy], -1).unsqueeze(0) + 0.5) / torch.tensor([w, h], dtype=dtype)
                wh = torch.ones_like(grid) * grid_size * (2.0 ** lvl)
                anchors.append(torch.cat([grid, wh], -1).reshape(-1, h * w, 4))
            anchors = torch.cat(anchors, 1)
            valid = ((anchors > self.eps) & (anchors < 1 - self.eps)).all(-1, keepdim=True)
            anchors = torch.log(anchors / (1 - anchors))
            anchors = torch.where(valid, anchors, torch.inf)
            self._anchor_cache = {key: (anchors.to(device), valid.to(device))}  # keep only the latest shape
        return self._anchor_cache[key]

    def _pruned_memory(self, feats: list[torch.Tensor]):
        """Memory pruning (:mod:`dset.models.memory_pruning`): the kept tokens' memory [B, K, C], their anchors
        [1 or B, K, 4], the decoder's value (a :class:`SparseValue`, or the memory when nothing is pruned) and the
        levels' shapes."""
        pruner = self.memory_pruner
        spatial_shapes = [(int(f.shape[2]), int(f.shape[3])) for f in feats]
        sizes = [h * w for h, w in spatial_shapes]
        raw = torch.cat([f.flatten(2).permute(0, 2, 1) for f in feats], dim=1)  # the encoder's tokens
        selection = pruner.select(raw, sizes, floor=self.num_queries)
        self.last_memory_pruning = {"scores": selection.scores, "spatial_shapes": spatial_shapes, **pruner.last_stats}
        anchors, valid_mask = self.anchors(spatial_shapes, raw.device, raw.dtype)
        if not selection.pruned:
            memory, _ = self._flatten_levels(feats)
            memory = valid_mask.to(memory.dtype) * memory
            return memory, anchors, memory, spatial_shapes
        index = selection.index
        if self.training:  # BatchNorm needs the whole map's statistics, as in the reference
            kept = _gather_tokens(self._flatten_levels(feats)[0], index)
        else:  # the projection is per token: projecting the kept tokens alone gives the same values
            levels = raw.split(sizes, dim=1)
            kept = torch.cat([_project_tokens(self.input_proj[i], _gather_tokens(levels[i], idx))
                              for i, idx in enumerate(selection.level_index)], dim=1)
        kept = _gather_tokens(valid_mask.to(kept.dtype), index) * kept
        kept = pruner.straight_through(kept, selection.scores.gather(1, index))
        fill = None if pruner.fill == "zero" else valid_mask.to(raw.dtype) * raw
        value = SparseValue(kept, index, raw.shape[1], fill)
        return kept, _gather_tokens(anchors, index), value, spatial_shapes

    def _select_queries(self, memory: torch.Tensor, anchors: torch.Tensor, spatial_shapes):
        """Score every token of ``memory``, keep the top ``num_queries``: their reference boxes (logits), content
        (detached) and encoder logits. The reference runs the box head on every token, then gathers; we gather
        first and run it on the selected tokens only: the head is per token, so the boxes are the same, and only
        the selected tokens' boxes reach an output or a loss (the encoder's auxiliary loss reads
        ``enc_topk_bboxes``), so training gets the same gradients too. Every model takes this path, RT-DETR
        included: a baseline gets every output-identical optimisation a variant gets (2.14 GFLOPs at 640 px)."""
        output_memory = self.enc_output(memory)
        enc_class = self.enc_score_head(output_memory)
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"model.decoder.num_queries ({self.num_queries}) exceeds the {memory.shape[1]} encoder "
                             f"tokens of a {spatial_shapes[0][0] * self.feat_strides[0]}-pixel-high input; "
                             "use fewer queries or larger images")
        _, topk_ind = torch.topk(enc_class.max(-1).values, self.num_queries, dim=1)
        selected_memory = _gather_tokens(output_memory, topk_ind)
        ref_unact = self.enc_bbox_head(selected_memory) + _gather_tokens(anchors, topk_ind)
        enc_topk_logits = _gather_tokens(enc_class, topk_ind)
        target = selected_memory.detach()
        return ref_unact, target, enc_topk_logits

    def forward(self, feats: list[torch.Tensor], targets: list[dict] | None = None) -> dict:
        if self.training and self.num_denoising > 0:
            if targets is None:
                raise ValueError("training forward needs targets for denoising (model(images, targets))")
            dn_class, dn_bbox_unact, attn_mask, dn_meta = contrastive_denoising_group(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                self.num_denoising, self.label_noise_ratio, self.box_noise_scale)
        else:
            dn_class = dn_bbox_unact = attn_mask = dn_meta = None

        self.last_memory_pruning = None
        if self.memory_pruner is None:
            memory, spatial_shapes = self._flatten_levels(feats)
            anchors, valid_mask = self.anchors(spatial_shapes, memory.device, memory.dtype)
            memory = valid_mask.to(memory.dtype) * memory
            value = memory
        else:
            memory, anchors, value, spatial_shapes = self._pruned_memory(feats)
        # query selection: score every (kept) memory token, keep the top num_queries
        ref_unact, target, enc_topk_logits = self._select_queries(memory, anchors, spatial_shapes)
        enc_topk_bboxes = torch.sigmoid(ref_unact)
        if dn_class is not None:
            ref_unact = torch.cat([dn_bbox_unact, ref_unact], 1)
            target = torch.cat([dn_class, target], 1)

        out_bboxes, out_logits = self.decoder(target, ref_unact.detach(), value, spatial_shapes,
                                              self.dec_bbox_head, self.dec_score_head, self.query_pos_head,
                                              attn_mask=attn_mask)
        if dn_meta is not None:
            dn_out_bboxes, out_bboxes = torch.split(out_bboxes, dn_meta["dn_num_split"], dim=2)
            dn_out_logits, out_logits = torch.split(out_logits, dn_meta["dn_num_split"], dim=2)

        out = {"pred_logits": out_logits[-1], "pred_boxes": out_bboxes[-1]}
        if self.training and self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(out_logits[:-1], out_bboxes[:-1])]
            out["aux_outputs"].append({"pred_logits": enc_topk_logits, "pred_boxes": enc_topk_bboxes})
            if dn_meta is not None:
                out["dn_aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                         for a, b in zip(dn_out_logits, dn_out_bboxes)]
                out["dn_meta"] = dn_meta
        return out
