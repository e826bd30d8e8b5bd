"""The optimizer: AdamW with up to four parameter groups, ``pretrained`` / ``new`` x with / without weight
decay (the learning-rate schedule is :mod:`dset.engine.schedule`).

Pretrained parameters (the names the initial weight files set, upcycled experts included: see
:func:`dset.engine.initial_weights.build_training_model`) train at ``train.lr_pretrained``, everything else
(MoE routers, the importance predictor, experts not upcycled, everything when training from scratch) at
``train.lr``. Norm parameters (BatchNorm, LayerNorm, GroupNorm) and biases get no weight decay. Frozen
parameters (``model.backbone.freeze_at``) are not optimised.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..config import Config

__all__ = ["param_groups", "build_optimizer", "no_decay_names"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of norm parameters (BatchNorm, LayerNorm, GroupNorm) and biases: ``*.bias``, ``*_bias``
    (attention's ``in_proj_bias``) and the MoE experts' stacked ``b1``/``b2``."""
    from ..models.moe import MoEFFN

    names = set()
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            if (isinstance(mod, _NORM_TYPES) or p_name == "bias" or p_name.endswith("_bias")
                    or (isinstance(mod, MoEFFN) and p_name in ("b1", "b2"))):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def param_groups(model: nn.Module, pretrained_names: Iterable[str], lr: float, lr_pretrained: float,
                 weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``pretrained``, ``pretrained_no_decay``, ``new``, ``new_no_decay`` (empty
    groups are left out). Each group dict has ``name``, ``params``, ``param_names``, ``lr``,
    ``weight_decay``. Norm parameters and biases are the ``no_decay`` ones."""
    pretrained_names = set(pretrained_names)
    no_decay = no_decay_names(model)
    buckets: dict[str, list] = {"pretrained": [], "pretrained_no_decay": [], "new": [], "new_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = ("pretrained" if name in pretrained_names else "new") + ("_no_decay" if name in no_decay else "")
        buckets[key].append((name, p))
    groups = []
    for key, items in buckets.items():
        if not items:
            continue
        groups.append({
            "name": key,
            "params": [p for _, p in items],
            "param_names": [n for n, _ in items],
            "lr": lr_pretrained if key.startswith("pretrained") else lr,
            "weight_decay": 0.0 if key.endswith("no_decay") else weight_decay,
        })
    return groups


def build_optimizer(model: nn.Module, cfg: Config, pretrained_names: Iterable[str] = ()) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``train.lr``, ``train.lr_pretrained``, ``train.weight_decay``,
    ``train.betas``."""
    t = cfg.train
    groups = param_groups(model, pretrained_names, t.lr, t.lr_pretrained, t.weight_decay)
    params = [p for g in groups for p in g["params"]]
    # the fused kernel (CPU and CUDA) is several times faster than the per-tensor loop on CPU
    fused = bool(params) and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params) \
        and len({p.device for p in params}) == 1
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                             fused=fused or None)
