"""The optimizer: AdamW with up to four parameter groups, ``pretrained`` / ``new`` x with / without weight
decay (the learning-rate schedule is :mod:`dset.engine.schedule`).

Pretrained parameters (the names the initial weight files set, upcycled experts included: see
:func:`dset.engine.initial_weights.build_training_model`) train at ``train.lr_pretrained``, everything else
(MoE routers, the importance predictor, experts not upcycled, everything when training from scratch) at
``train.lr``. Norm parameters (BatchNorm, LayerNorm, GroupNorm) and biases get no weight decay. Frozen
parameters (``model.backbone.freeze_at``) are not optimised. The memory-pruning predictor has a learning rate of
its own where ``model.memory_pruning.predictor_lr`` sets one (groups ``memory_predictor``, ``..._no_decay``): a
linear readout learned from scratch, which at ``train.lr`` barely moves in a short fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
                 weight_decay: float, own_lrs: Mapping[str, tuple[str, float]] | None = None) -> list[dict]:
    """AdamW parameter groups: ``pretrained``, ``pretrained_no_decay``, ``new``, ``new_no_decay`` (empty
    groups are left out). Each group dict has ``name``, ``params``, ``param_names``, ``lr``,
    ``weight_decay``. Norm parameters and biases are the ``no_decay`` ones. ``own_lrs``: group name ->
    (parameter-name prefix, lr): new parameters under the prefix go to that group (and ``<name>_no_decay``)."""
    pretrained_names = set(pretrained_names)
    no_decay = no_decay_names(model)
    lrs = {"pretrained": lr_pretrained, "new": lr, **{g: g_lr for g, (_, g_lr) in (own_lrs or {}).items()}}
    buckets: dict[str, list] = {f"{g}{s}": [] for g in lrs for s in ("", "_no_decay")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = "pretrained" if name in pretrained_names else next(
            (g for g, (prefix, _) in (own_lrs or {}).items() if name.startswith(prefix)), "new")
        buckets[group + ("_no_decay" if name in no_decay else "")].append((name, p))
    groups = []
    for key, items in buckets.items():
        if not items:
            continue
        groups.append({
            "name": key,
            "params": [p for _, p in items],
            "param_names": [n for n, _ in items],
            "lr": lrs[key.removesuffix("_no_decay")],
            "weight_decay": 0.0 if key.endswith("no_decay") else weight_decay,
        })
    return groups


def build_optimizer(model: nn.Module, cfg: Config, pretrained_names: Iterable[str] = ()) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``train.lr``, ``train.lr_pretrained``, ``train.weight_decay``,
    ``train.betas``."""
    t = cfg.train
    own_lrs = {}
    if cfg.model.memory_pruning.predictor_lr is not None:
        own_lrs["memory_predictor"] = ("decoder.memory_pruner.", cfg.model.memory_pruning.predictor_lr)
    groups = param_groups(model, pretrained_names, t.lr, t.lr_pretrained, t.weight_decay, own_lrs)
    params = [p for g in groups for p in g["params"]]
    # the fused kernel (CPU and CUDA) is several times faster than the per-tensor loop on CPU
    fused = bool(params) and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params) \
        and len({p.device for p in params}) == 1
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                             fused=fused or None)
