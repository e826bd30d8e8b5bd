"""The model a run starts from: ``build_model`` plus the local initial weights (``model.backbone.pretrained``,
``model.checkpoint``; MoE experts upcycled from dense FFNs), and the names those weights set ("pretrained",
which :mod:`dset.engine.optim` trains at ``train.lr_pretrained``)."""

from __future__ import annotations

import logging

from ..config import Config
from ..models.detector import Detector, build_model, load_backbone_weights, load_checkpoint
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
        reports.append(load_checkpoint(model, m.checkpoint,
                                       upcycle_noise=(m.encoder_moe.upcycle_noise, m.decoder_moe.upcycle_noise)))
    for r in reports:
        log.info("initial weights: %s", r.summary())
    pretrained: set[str] = set()
    for r in reports:
        pretrained |= set(r.loaded)
        # upcycled experts are the pretrained FFN they were copied from: they keep its rate and weight decay, so
        # that switching MoE on changes nothing else (its router is new)
        pretrained |= {f"{moe}.{p}" for moe in r.upcycled for p in UPCYCLED_EXPERT_PARAMS}
    return model, pretrained, reports
