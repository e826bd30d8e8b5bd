"""Turn raw detector outputs into detections: top-k over queries x classes with sigmoid scores."""

from __future__ import annotations

import torch
import torch.nn as nn

from .box_ops import box_cxcywh_to_xyxy


class PostProcessor(nn.Module):
    """``forward(outputs, orig_sizes_wh [B, 2])`` -> list of {labels, boxes (xyxy pixels), scores, queries}.

    As in RT-DETR with focal-style classification: every (query, class) pair is a candidate, and the
    ``num_top_queries`` best by sigmoid score are kept, so one query may yield several classes.
    ``queries`` is the decoder query each detection came from (what per-query routing is looked up by).
    """

    def __init__(self, num_classes: int, num_top_queries: int = 300):
        super().__init__()
        self.num_classes = num_classes
        self.num_top_queries = num_top_queries

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes_wh: torch.Tensor) -> list[dict]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        boxes = box_cxcywh_to_xyxy(boxes) * orig_sizes_wh.to(boxes.dtype).repeat(1, 2).unsqueeze(1)
        k = min(self.num_top_queries, logits.shape[1] * logits.shape[2])
        scores, index = torch.topk(torch.sigmoid(logits).flatten(1), k, dim=-1)
        labels = index % self.num_classes
        query = index // self.num_classes
        boxes = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        return [{"labels": lab, "boxes": b, "scores": s, "queries": q}
                for lab, b, s, q in zip(labels, boxes, scores, query)]
