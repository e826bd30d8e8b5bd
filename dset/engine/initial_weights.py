"""The model a run starts from: ``build_model`` plus the local initial weights (``model.backbone.pretrained``,
``model.checkpoint``; MoE experts made from the dense FFNs as ``model.*_moe.expert_init`` says), and the names those
weights set ("pretrained", which :mod:`dset.engine.optim` trains at ``train.lr_pretrained``)."""

from __future__ import annotations

import logging

from ..config import Config
from ..models.detector import Detector, build_model, expert_inits, load_backbone_weights, load_checkpoint
from ..models.moe import UPCYCLED_EXPERT_PARAMS

__all__ = ["build_training_model"]

log = logging.getLogger(__name__)


def build_training_model(cfg: Config) -> tuple[Detector, set[str], list]:
    """``build_model(cfg)`` plus the configured local weights. Returns ``(model, pretrained_names,
    load_reports)``: the parameter/buffer names the weight files set (``LoadReport.loaded``)."""
    model = build_model(cfg, load_weights=False)
    reports = []
    m = cfg.model
    if m.backbone.pretrained:
        reports.append(load_backbone_weights(model, m.backbone.pretrained))
    if m.checkpoint:
        reports.append(load_checkpoint(model, m.checkpoint, expert_init=expert_inits(cfg)))
    for r in reports:
        log.info("initial weights: %s", r.summary())
    pretrained: set[str] = set()
    for r in reports:
        pretrained |= set(r.loaded)
        # plainly upcycled experts are the pretrained FFN they were copied from: they keep its rate and weight
        # decay, so that switching MoE on changes nothing else. Drop-upcycled and random experts are new parts
        # (train.lr), as the original DSET code trains its experts; routers are always new
        pretrained |= {f"{moe}.{p}" for moe in r.upcycled for p in UPCYCLED_EXPERT_PARAMS}
    return model, pretrained, reports
