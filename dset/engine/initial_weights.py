"""The model a run starts from: ``build_model`` plus the local initial weights (``model.backbone.pretrained``,
``model.checkpoint``; MoE experts made from the dense FFNs as ``model.*_moe.expert_init`` says; the class heads'
rows of the classes ``model.class_map`` carries over), and the names those weights set ("pretrained", which
:mod:`dset.engine.optim` trains at ``train.lr_pretrained``; class heads not loaded whole are new parts)."""

from __future__ import annotations

from ..config import Config
from ..models.detector import Detector, build_model, load_backbone_weights, load_configured_checkpoint
from ..models.moe import UPCYCLED_EXPERT_PARAMS

__all__ = ["build_training_model"]


def build_training_model(cfg: Config, class_names: list[str] | None = None, log_reports: bool = True
                         ) -> tuple[Detector, set[str], list]:
    """``build_model(cfg)`` plus the configured local weights; ``class_names`` are the data set's categories in
    label order (``model.class_map``'s values name them; default ``data.classes``). Returns ``(model,
    pretrained_names, load_reports)``: the parameter/buffer names the weight files set (``LoadReport.loaded``).
    ``log_reports``: log each report and its class-head report at INFO (one rank of a DDP run does)."""
    model = build_model(cfg, load_weights=False)
    reports = []
    if cfg.model.backbone.pretrained:
        reports.append(load_backbone_weights(model, cfg.model.backbone.pretrained))
    checkpoint_report = load_configured_checkpoint(model, cfg, class_names)
    if checkpoint_report is not None:
        reports.append(checkpoint_report)
    for r in reports if log_reports else ():
        r.log_to()
    pretrained: set[str] = set()
    for r in reports:
        pretrained |= set(r.loaded)
        # plainly upcycled experts are the pretrained FFN they were copied from: they keep its rate and weight
        # decay, so that switching MoE on changes nothing else. Drop-upcycled and random experts are new parts
        # (train.lr), as the original DSET code trains its experts; routers are always new
        pretrained |= {f"{moe}.{p}" for moe in r.upcycled for p in UPCYCLED_EXPERT_PARAMS}
    return model, pretrained, reports
