"""RT-DETR set criterion (semantics of the reference RT-DETR ``SetCriterion``, rtdetr_pytorch v1).

``SetCriterion.forward(outputs, targets)`` returns a dict of WEIGHTED losses; their sum is the training loss
(see :func:`total_loss`). Keys:

- ``loss_vfl``, ``loss_bbox``, ``loss_giou``: the last decoder layer (``outputs['pred_logits']``,
  ``outputs['pred_boxes']``), matched by the Hungarian matcher;
- the same names suffixed ``_aux_{i}`` for each entry of ``outputs['aux_outputs']`` (the decoder layers
  except the last, then, last in the list, the encoder's query-selection output), each matched separately;
- the same names suffixed ``_dn_{i}`` for each entry of ``outputs['dn_aux_outputs']`` (denoising queries of
  each decoder layer), matched by construction from ``outputs['dn_meta']`` and normalised by
  ``num_boxes * dn_num_group``;
- each entry of ``outputs['extra_losses']`` (unweighted scalars the model computed: MoE balance, router
  z-loss, token pruning), multiplied by its weight in ``extra_loss_weights``.

``num_boxes`` is the number of target boxes in the batch, averaged over processes when torch.distributed is
initialised, and clamped to at least 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou

__all__ = [
    "SetCriterion",
    "total_loss",
    "UnknownLossError",
    "DEFAULT_WEIGHT_DICT",
    "DEFAULT_EXTRA_LOSS_WEIGHTS",
    "build_criterion",
]

DEFAULT_WEIGHT_DICT: dict[str, float] = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
DEFAULT_EXTRA_LOSS_WEIGHTS: dict[str, float] = {
    "loss_enc_moe_balance": 0.03,
    "loss_dec_moe_balance": 0.05,
    "loss_enc_moe_z": 0.0,
    "loss_dec_moe_z": 0.0,
    "loss_pruning": 0.01,
}
# loss name (the `losses` argument) -> the keys it produces
_LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "vfl": ("loss_vfl",),
    "focal": ("loss_focal",),
    "boxes": ("loss_bbox", "loss_giou"),
}


class UnknownLossError(KeyError):
    """A loss name with no weight (a KeyError whose message reads plainly)."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


def total_loss(loss_dict: Mapping[str, Tensor]) -> Tensor:
    """The training loss: the sum of the (already weighted) values of ``SetCriterion``'s output."""
    if not loss_dict:
        raise ValueError("total_loss: empty loss dict")
    return sum(loss_dict.values())  # type: ignore[return-value]


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class SetCriterion(nn.Module):
    """RT-DETR losses.

    Args:
        num_classes: number of object classes (no background class).
        matcher: a callable ``(outputs, targets) -> list of (query_idx, target_idx)``, e.g. ``HungarianMatcher``.
        weight_dict: loss weights; merged over :data:`DEFAULT_WEIGHT_DICT` (give only what you change).
        alpha, gamma: varifocal (or focal) loss parameters.
        losses: which losses to compute: any of ``"vfl"``, ``"focal"``, ``"boxes"``.
        extra_loss_weights: weights of the model's extra losses; merged over
            :data:`DEFAULT_EXTRA_LOSS_WEIGHTS`. An extra loss whose name has no weight raises
            :class:`UnknownLossError`.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Mapping[str, float] | None = None,
        alpha: float = 0.75,
        gamma: float = 2.0,
        losses: Sequence[str] = ("vfl", "boxes"),
        extra_loss_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.matcher = matcher
        self.weight_dict = {**DEFAULT_WEIGHT_DICT, **{k: float(v) for k, v in (weight_dict or {}).items()}}
        self.extra_loss_weights = {
            **DEFAULT_EXTRA_LOSS_WEIGHTS,
            **{k: float(v) for k, v in (extra_loss_weights or {}).items()},
        }
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.losses = tuple(losses)
        for name in self.losses:
            if name not in _LOSS_KEYS:
                raise ValueError(f"SetCriterion: unknown loss {name!r}; choose from {sorted(_LOSS_KEYS)}")
            for key in _LOSS_KEYS[name]:
                if key not in self.weight_dict:
                    raise ValueError(
                        f"SetCriterion: loss {name!r} produces {key!r}, which has no weight in weight_dict"
                    )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={self.losses}, alpha={self.alpha}, gamma={self.gamma}, "
            f"weight_dict={self.weight_dict}, extra_loss_weights={self.extra_loss_weights}"
        )

    # ------------------------------------------------------------------ individual losses
    def loss_vfl(self, logits: Tensor, boxes: Tensor, match: dict, num_boxes: float) -> dict[str, Tensor]:
        """Varifocal loss: BCE towards ``one_hot(class) * IoU`` (IoU of the matched pair, detached)."""
        b, q, t = match["batch"], match["query"], match["target"]
        labels, tgt_boxes = match["labels"][t], match["boxes"][t]
        src_boxes = boxes[b, q]
        iou, _ = elementwise_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        iou = iou.detach().to(logits.dtype)

        target = torch.zeros_like(logits)
        target[b, q, labels] = 1.0
        target_score = torch.zeros_like(logits)
        target_score[b, q, labels] = iou

        pred_score = logits.detach().sigmoid()
        weight = self.alpha * pred_score.pow(self.gamma) * (1 - target) + target_score
        loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
        return {"loss_vfl": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_focal(self, logits: Tensor, boxes: Tensor, match: dict, num_boxes: float) -> dict[str, Tensor]:
        """Sigmoid focal loss towards the one-hot class of matched queries (torchvision's formula)."""
        b, q, t = match["batch"], match["query"], match["target"]
        target = torch.zeros_like(logits)
        target[b, q, match["labels"][t]] = 1.0
        loss = torchvision.ops.sigmoid_focal_loss(logits, target, self.alpha, self.gamma, reduction="none")
        return {"loss_focal": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_boxes(self, logits: Tensor, boxes: Tensor, match: dict, num_boxes: float) -> dict[str, Tensor]:
        """L1 (cxcywh) and 1 - GIoU (xyxy) over matched pairs, each summed and divided by ``num_boxes``.

        With no matched pair both are an exact 0 that still belongs to the graph (an empty gather summed).
        """
        b, q, t = match["batch"], match["query"], match["target"]
        src_boxes = boxes[b, q]
        tgt_boxes = match["boxes"][t]
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        # unchecked, as in the matcher: sigmoid boxes and sanitised targets cannot be degenerate
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes),
                                               check=False)
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    # ------------------------------------------------------------------ matching helpers
    @staticmethod
    def get_cdn_matched_indices(dn_meta: Mapping, targets: Sequence[Mapping]) -> list[tuple[Tensor, Tensor]]:
        """Denoising matches: positive denoising queries of group g map to targets ``0..n-1`` in order."""
        positive_idx = dn_meta["dn_positive_idx"]
        groups = int(dn_meta["dn_num_group"])
        if len(positive_idx) != len(targets):
            raise ValueError(f"dn_meta: {len(positive_idx)} dn_positive_idx entries for {len(targets)} images")
        indices = []
        for i, t in enumerate(targets):
            num_gt = len(t["labels"])
            device = t["labels"].device
            if num_gt == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=device)
                indices.append((empty, empty.clone()))
                continue
            pos = torch.as_tensor(positive_idx[i], dtype=torch.int64)
            if pos.numel() != num_gt * groups:
                raise ValueError(
                    f"dn_meta: image {i} has {pos.numel()} positive denoising queries, expected "
                    f"num_gt * dn_num_group = {num_gt} * {groups}"
                )
            gt_idx = torch.arange(num_gt, dtype=torch.int64, device=device).tile(groups)
            indices.append((pos, gt_idx))
        return indices

    @staticmethod
    def _flatten_matches(indices, sizes: list[int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image (query_idx, target_idx) -> flat (batch_idx, query_idx, global target row), on ``device``."""
        if len(indices) != len(sizes):
            raise ValueError(f"SetCriterion: {len(indices)} match entries for a batch of {len(sizes)}")
        queries, targets, counts = [], [], []
        offset = 0
        for (src, tgt), n in zip(indices, sizes):
            src = torch.as_tensor(src, dtype=torch.int64).to(device, non_blocking=True)
            tgt = torch.as_tensor(tgt, dtype=torch.int64).to(device, non_blocking=True)
            queries.append(src)
            targets.append(tgt + offset)
            counts.append(len(src))
            offset += n
        batch = torch.repeat_interleave(
            torch.arange(len(sizes), device=device), torch.as_tensor(counts, dtype=torch.int64, device=device)
        )
        return batch, torch.cat(queries), torch.cat(targets)

    def _num_boxes(self, sizes: list[int], device: torch.device) -> float:
        num = float(sum(sizes))
        if _dist_ready():
            t = torch.tensor([num], dtype=torch.float32, device=device)
            dist.all_reduce(t)
            num = t.item() / dist.get_world_size()
        return max(num, 1.0)

    def _layer_losses(self, out: Mapping, indices, all_targets: dict, num_boxes: float, suffix: str) -> dict:
        logits = out["pred_logits"].float()
        boxes = out["pred_boxes"].float()
        batch, query, target = self._flatten_matches(indices, all_targets["sizes"], logits.device)
        match = {
            "batch": batch,
            "query": query,
            "target": target,
            "labels": all_targets["labels"],
            "boxes": all_targets["boxes"],
        }
        losses = {}
        for name in self.losses:
            for key, value in getattr(self, f"loss_{name}")(logits, boxes, match, num_boxes).items():
                losses[key + suffix] = value * self.weight_dict[key]
        return losses

    # ------------------------------------------------------------------ forward
    def forward(self, outputs: Mapping, targets: Sequence[Mapping]) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        device = logits.device
        if len(targets) != logits.shape[0]:
            raise ValueError(f"SetCriterion: {len(targets)} target dicts for a batch of {logits.shape[0]}")
        sizes = [len(t["labels"]) for t in targets]
        for i, t in enumerate(targets):
            if len(t["boxes"]) != sizes[i]:
                raise ValueError(f"SetCriterion: image {i} has {sizes[i]} labels but {len(t['boxes'])} boxes")
        labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)
        all_boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(device=device, dtype=torch.float32)
        if labels.numel() and bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(
                f"SetCriterion: target labels must lie in [0, {self.num_classes}), got "
                f"min {labels.min().item()}, max {labels.max().item()}"
            )
        all_targets = {"labels": labels, "boxes": all_boxes, "sizes": sizes}
        num_boxes = self._num_boxes(sizes, device)

        main = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        losses = self._layer_losses(main, self.matcher(main, targets), all_targets, num_boxes, "")

        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update(self._layer_losses(aux, self.matcher(aux, targets), all_targets, num_boxes, f"_aux_{i}"))

        if "dn_aux_outputs" in outputs and outputs["dn_aux_outputs"] is not None:
            dn_meta = outputs.get("dn_meta")
            if dn_meta is None:
                raise ValueError("SetCriterion: outputs has 'dn_aux_outputs' but no 'dn_meta'")
            dn_indices = self.get_cdn_matched_indices(dn_meta, targets)
            dn_num_boxes = num_boxes * int(dn_meta["dn_num_group"])
            for i, dn in enumerate(outputs["dn_aux_outputs"]):
                losses.update(self._layer_losses(dn, dn_indices, all_targets, dn_num_boxes, f"_dn_{i}"))

        for name, value in (outputs.get("extra_losses") or {}).items():
            if name not in self.extra_loss_weights:
                raise UnknownLossError(
                    f"SetCriterion: extra loss {name!r} has no weight; known extra losses: "
                    f"{sorted(self.extra_loss_weights)} (set extra_loss_weights[{name!r}])"
                )
            if name in losses:
                raise ValueError(f"SetCriterion: extra loss {name!r} clashes with a detection loss of the same name")
            value = torch.as_tensor(value, device=device)
            if value.numel() != 1:
                raise ValueError(f"SetCriterion: extra loss {name!r} must be a scalar, got shape {tuple(value.shape)}")
            losses[name] = value.reshape(()) * self.extra_loss_weights[name]
        return losses


def build_criterion(cfg) -> SetCriterion:
    """Matcher + criterion from a :class:`dset.config.Config` (``model.loss`` and the sparse switches'
    loss weights)."""
    from .matcher import HungarianMatcher

    m = cfg.model
    loss = m.loss
    matcher = HungarianMatcher(cost_class=loss.matcher_cost_class, cost_bbox=loss.matcher_cost_bbox,
                               cost_giou=loss.matcher_cost_giou, use_focal=True, alpha=loss.matcher_alpha,
                               gamma=loss.matcher_gamma)
    extra = {
        "loss_enc_moe_balance": m.encoder_moe.balance_loss_weight,
        "loss_enc_moe_z": m.encoder_moe.z_loss_weight,
        "loss_dec_moe_balance": m.decoder_moe.balance_loss_weight,
        "loss_dec_moe_z": m.decoder_moe.z_loss_weight,
        "loss_pruning": m.token_pruning.loss_weight,
        "loss_memory_pruning": m.memory_pruning.loss_weight,
    }
    weights = {"loss_vfl": loss.vfl_weight, "loss_bbox": loss.bbox_weight, "loss_giou": loss.giou_weight}
    return SetCriterion(m.num_classes, matcher, weight_dict=weights, alpha=loss.vfl_alpha, gamma=loss.vfl_gamma,
                        extra_loss_weights=extra)
