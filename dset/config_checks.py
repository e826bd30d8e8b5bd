"""What a configuration's values must satisfy beyond their types (ranges, choices, files that must exist,
settings that must agree), and :class:`ConfigError`, which names the dotted key (and file) of a problem.

:func:`validate` is called by :mod:`dset.config` on every configuration it builds; it reads the sections of
:mod:`dset.config`'s dataclasses, which it does not import (that module imports this one). Torch-free.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ConfigError", "AMP_DTYPES", "EXPERT_INITS", "check_class_map", "validate"]

# train.amp_dtype's choices (dset.engine.step_settings)
AMP_DTYPES = ("bfloat16", "float16")

# model.*_moe.expert_init's choices (dset.models.moe.ExpertInit)
EXPERT_INITS = ("upcycle", "drop_upcycle", "random")


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) concerned."""


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_class_map(class_map) -> None:
    """``model.class_map`` (checkpoint class name -> our class name): non-empty names, and no two checkpoint
    classes onto one of ours (which row would it keep?). Whether the names exist is checked at loading, where
    both sides' classes are known."""
    key = "model.class_map"
    _need(isinstance(class_map, dict) and class_map, key,
          f"must map checkpoint class names to ours, e.g. {{car: car, person: pedestrian}}, got {class_map!r}")
    onto: dict[str, str] = {}
    for name, ours in class_map.items():
        _need(isinstance(name, str) and name.strip() != "", key, f"a checkpoint class name must be a non-empty "
              f"string, got {name!r}")
        # the map's keys become dotted configuration keys (model.class_map.car: MLflow params, study layers)
        _need("." not in name, key, f"{name!r}: a checkpoint class name with a '.' cannot be mapped (dotted keys "
              "are configuration paths)")
        _need(isinstance(ours, str) and ours.strip() != "", f"{key}.{name}",
              f"must be one of our class names (a non-empty string), got {ours!r}")
        _need(ours not in onto, key, f"{onto.get(ours)!r} and {name!r} both map onto our class {ours!r}: "
              "one of our classes can start from one checkpoint class only")
        onto[ours] = name


def _validate_moe(moe, key: str) -> None:
    """``model.encoder_moe`` or ``model.decoder_moe`` (``key``)."""
    _need(moe.num_experts >= 1, f"{key}.num_experts", f"must be >= 1, got {moe.num_experts}")
    _need(1 <= moe.top_k <= moe.num_experts, f"{key}.top_k",
          f"must be between 1 and num_experts ({moe.num_experts}), got {moe.top_k}")
    _need(moe.expert_hidden_dim is None or moe.expert_hidden_dim >= 1, f"{key}.expert_hidden_dim",
          f"must be >= 1, got {moe.expert_hidden_dim}")
    _need(moe.router_noise >= 0, f"{key}.router_noise", f"must be >= 0, got {moe.router_noise}")
    _need(moe.balance_loss_weight >= 0, f"{key}.balance_loss_weight", "must be >= 0")
    _need(moe.z_loss_weight >= 0, f"{key}.z_loss_weight", "must be >= 0")
    _need(moe.patch_size >= 1, f"{key}.patch_size", f"must be >= 1, got {moe.patch_size}")
    _need(moe.patch_size == 1 or key.endswith("encoder_moe"), f"{key}.patch_size",
          f"must be 1, got {moe.patch_size}: patch-level routing groups the tokens of a spatial map, and the "
          "decoder's queries have none")
    _need(moe.balance_warmup_epochs >= 0, f"{key}.balance_warmup_epochs",
          f"must be >= 0, got {moe.balance_warmup_epochs}")
    _need(moe.expert_init in EXPERT_INITS, f"{key}.expert_init",
          f"must be one of {', '.join(EXPERT_INITS)}, got {moe.expert_init!r}")
    _need(0 < moe.drop_upcycle_ratio <= 1, f"{key}.drop_upcycle_ratio",
          f"must be in (0, 1], got {moe.drop_upcycle_ratio}")
    _need(moe.upcycle_noise >= 0, f"{key}.upcycle_noise", f"must be >= 0, got {moe.upcycle_noise}")
    _need(moe.upcycle_noise == 0 or moe.expert_init == "upcycle", f"{key}.upcycle_noise",
          f"applies to expert_init 'upcycle' only, got {moe.upcycle_noise} with expert_init {moe.expert_init!r}")


def _validate_token_pruning(p, epochs: int) -> None:
    """``model.token_pruning`` in a run of ``epochs`` epochs."""
    _need(0 < p.keep_ratio <= 1, "model.token_pruning.keep_ratio", f"must be in (0, 1], got {p.keep_ratio}")
    _need(p.min_tokens >= 1, "model.token_pruning.min_tokens", f"must be >= 1, got {p.min_tokens}")
    _need(p.warmup_epochs >= 0, "model.token_pruning.warmup_epochs", f"must be >= 0, got {p.warmup_epochs}")
    _need(p.ramp_epochs >= 0, "model.token_pruning.ramp_epochs", f"must be >= 0, got {p.ramp_epochs}")
    _need(p.fill in ("identity", "zero"), "model.token_pruning.fill", f"must be 'identity' or 'zero', got {p.fill!r}")
    _need(p.loss_weight >= 0, "model.token_pruning.loss_weight", "must be >= 0")
    if p.enabled:  # the reported checkpoint is chosen among the epochs at the target ratio: there must be one
        target_epoch = p.warmup_epochs + max(p.ramp_epochs, 1) - 1
        _need(target_epoch < epochs, "model.token_pruning.warmup_epochs",
              f"warm-up {p.warmup_epochs} + ramp {p.ramp_epochs} epochs reach the target keep ratio at epoch "
              f"{target_epoch + 1}, after the run's {epochs} epochs (train.epochs); shorten them")


def _validate_memory_pruning(p, epochs: int) -> None:
    """``model.memory_pruning`` in a run of ``epochs`` epochs."""
    key = "model.memory_pruning"
    _need(0 < p.keep_ratio <= 1, f"{key}.keep_ratio", f"must be in (0, 1], got {p.keep_ratio}")
    _need(p.min_tokens >= 0, f"{key}.min_tokens", f"must be >= 0, got {p.min_tokens}")
    _need(p.warmup_epochs >= 0, f"{key}.warmup_epochs", f"must be >= 0, got {p.warmup_epochs}")
    _need(p.ramp_epochs >= 0, f"{key}.ramp_epochs", f"must be >= 0, got {p.ramp_epochs}")
    # the old names claimed a source they do not follow: say what they are called now
    renamed = {"identity": " (now 'encoder_features': it is not Sparse DETR's fill)",
               "gaussian": " (now 'gaussian_focal': it is not the original DSET's loss)"}
    _need(p.fill in ("zero", "encoder_features"), f"{key}.fill",
          f"must be 'zero' or 'encoder_features', got {p.fill!r}{renamed.get(p.fill, '')}")
    _need(p.predictor_hidden_dim >= 0, f"{key}.predictor_hidden_dim", f"must be >= 0, got {p.predictor_hidden_dim}")
    _need(p.supervision in ("bce", "gaussian_focal"), f"{key}.supervision",
          f"must be 'bce' or 'gaussian_focal', got {p.supervision!r}{renamed.get(p.supervision, '')}")
    _need(p.context_ratio >= 0, f"{key}.context_ratio", f"must be >= 0, got {p.context_ratio}")
    _need(p.loss_weight >= 0, f"{key}.loss_weight", "must be >= 0")
    _need(p.predictor_lr is None or p.predictor_lr > 0, f"{key}.predictor_lr", f"must be > 0, got {p.predictor_lr}")
    if p.enabled:
        target_epoch = p.warmup_epochs + max(p.ramp_epochs, 1) - 1
        _need(target_epoch < epochs, f"{key}.warmup_epochs",
              f"warm-up {p.warmup_epochs} + ramp {p.ramp_epochs} epochs reach the target keep ratio at epoch "
              f"{target_epoch + 1}, after the run's {epochs} epochs (train.epochs); shorten them")


def _validate_model(cfg) -> None:
    """``model``, whose pruning schedules depend on ``train.epochs``."""
    m = cfg.model
    _need(m.num_classes >= 1, "model.num_classes", f"must be >= 1, got {m.num_classes}")
    _need(m.backbone.depth in (18, 34), "model.backbone.depth", f"must be 18 or 34, got {m.backbone.depth}")
    _need(len(m.eval_spatial_size) == 2 and all(s > 0 and s % 32 == 0 for s in m.eval_spatial_size),
          "model.eval_spatial_size", f"must be two positive multiples of 32, got {m.eval_spatial_size}")
    _need(m.encoder.hidden_dim % m.encoder.nhead == 0, "model.encoder.nhead",
          f"hidden_dim {m.encoder.hidden_dim} is not divisible by nhead {m.encoder.nhead}")
    _need(m.encoder.hidden_dim % 4 == 0, "model.encoder.hidden_dim", "must be divisible by 4 (2D sin-cos embedding)")
    _need(m.decoder.num_layers >= 1, "model.decoder.num_layers", f"must be >= 1, got {m.decoder.num_layers}")
    _need(m.decoder.num_queries >= 1, "model.decoder.num_queries", f"must be >= 1, got {m.decoder.num_queries}")
    _need(-m.decoder.num_layers <= m.decoder.eval_idx < m.decoder.num_layers, "model.decoder.eval_idx",
          f"must index one of the {m.decoder.num_layers} decoder layers, got {m.decoder.eval_idx}")
    _need(m.decoder.num_denoising >= 0, "model.decoder.num_denoising", "must be >= 0")
    if m.class_map is not None:
        check_class_map(m.class_map)
    for name in ("encoder_moe", "decoder_moe"):
        _validate_moe(getattr(m, name), f"model.{name}")
    _validate_token_pruning(m.token_pruning, cfg.train.epochs)
    _validate_memory_pruning(m.memory_pruning, cfg.train.epochs)
    for path_key, value in (("model.checkpoint", m.checkpoint), ("model.backbone.pretrained", m.backbone.pretrained)):
        _need(value is None or Path(value).is_file(), path_key, f"file not found: {value}")


def _validate_data(d) -> None:
    """``data``."""
    _need(d.name in ("synthetic", "coco"), "data.name", f"must be 'synthetic' or 'coco', got {d.name!r}")
    _need(d.image_size > 0 and d.image_size % 32 == 0, "data.image_size",
          f"must be a positive multiple of 32, got {d.image_size}")
    _need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _need(d.augment in ("rtdetr", "flip", "none"), "data.augment",
          f"must be 'rtdetr', 'flip' or 'none', got {d.augment!r}")
    for key, value in (("data.max_train_images", d.max_train_images), ("data.max_val_images", d.max_val_images)):
        _need(value is None or value >= 1, key, f"must be >= 1 (or null for all images), got {value}")
    sy = d.synthetic
    _need(sy.num_train >= 1, "data.synthetic.num_train", f"must be >= 1, got {sy.num_train}")
    _need(sy.num_val >= 1, "data.synthetic.num_val", f"must be >= 1, got {sy.num_val}")
    _need(sy.num_test >= 0, "data.synthetic.num_test", f"must be >= 0 (0: no test split), got {sy.num_test}")
    _need(sy.image_size >= 32, "data.synthetic.image_size", f"must be >= 32, got {sy.image_size}")
    _need(1 <= sy.num_classes <= 6, "data.synthetic.num_classes", f"must be between 1 and 6, got {sy.num_classes}")
    _need(sy.max_objects >= 1, "data.synthetic.max_objects", f"must be >= 1, got {sy.max_objects}")
    _need(4 <= sy.min_object_size <= 0.6 * sy.image_size, "data.synthetic.min_object_size",
          f"must be between 4 and 0.6 x data.synthetic.image_size ({0.6 * sy.image_size:g}), got {sy.min_object_size}")
    _need(d.stop_epoch is None or d.stop_epoch >= 0, "data.stop_epoch", f"must be >= 0 (or null), got {d.stop_epoch}")
    if d.name == "synthetic":  # paths the user named must never be silently ignored
        for split in ("train", "val", "test"):
            s_cfg = getattr(d, split)
            for part in ("images", "annotations"):
                value = getattr(s_cfg, part)
                _need(value is None, f"data.{split}.{part}",
                      f"is set ({value}) but data.name is 'synthetic', the built-in data set, which would ignore it; "
                      "add data.name=coco to train on your data")
    if d.name == "coco":
        for split in ("train", "val"):
            s = getattr(d, split)
            _need(s.images is not None, f"data.{split}.images", "is required when data.name is 'coco'")
            _need(s.annotations is not None, f"data.{split}.annotations", "is required when data.name is 'coco'")
            _need(Path(s.images).is_dir(), f"data.{split}.images", f"folder not found: {s.images}")
            _need(Path(s.annotations).is_file(), f"data.{split}.annotations", f"file not found: {s.annotations}")
        test = d.test  # optional; when given, both parts
        if test.images is not None or test.annotations is not None:
            for part, other in (("images", "annotations"), ("annotations", "images")):
                _need(getattr(test, part) is not None, f"data.test.{part}",
                      f"is required when data.test.{other} is set (the test split needs both)")
            _need(Path(test.images).is_dir(), "data.test.images", f"folder not found: {test.images}")
            _need(Path(test.annotations).is_file(), "data.test.annotations", f"file not found: {test.annotations}")


def _validate_train(t) -> None:
    """``train``."""
    _need(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _need(t.lr_pretrained >= 0, "train.lr_pretrained", f"must be >= 0, got {t.lr_pretrained}")
    _need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas",
          f"must be two numbers in [0, 1), got {t.betas}")
    _need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _need(t.amp_dtype in AMP_DTYPES, "train.amp_dtype", f"must be one of {', '.join(AMP_DTYPES)}, got {t.amp_dtype!r}")
    _need(isinstance(t.loss_check_every, int) and t.loss_check_every >= 1, "train.loss_check_every",
          f"must be an integer >= 1, got {t.loss_check_every!r}")
    _need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _need(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    _need(t.early_stop_patience is None or t.early_stop_patience >= 1, "train.early_stop_patience", "must be >= 1")
    _need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _need(t.ema_warmup_steps >= 0, "train.ema_warmup_steps", "must be >= 0")
    _need(t.eval_every >= 1, "train.eval_every", f"must be >= 1, got {t.eval_every}")
    _need(t.checkpoint_every_minutes > 0, "train.checkpoint_every_minutes",
          f"must be > 0, got {t.checkpoint_every_minutes}")
    _need(t.pictures >= 0, "train.pictures", f"must be >= 0 (0: no pictures), got {t.pictures}")


def validate(cfg):
    """Checks that the types alone cannot express, on a :class:`dset.config.Config`; returns it. Each error
    names its key."""
    _validate_model(cfg)
    _validate_data(cfg.data)
    _validate_train(cfg.train)
    return cfg
