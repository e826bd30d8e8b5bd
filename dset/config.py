"""Typed configuration: dataclasses with defaults, YAML presets, dotted ``key=value`` overrides.

``load_config("rtdetr_r18", ["model.num_classes=4", "train.epochs=2"])`` reads
``dset/configs/rtdetr_r18.yaml`` (or a path to any YAML file), applies the overrides and validates
the result. A preset may name another with ``base: NAME`` and only state what differs. Every
unknown key and every invalid value is a :class:`ConfigError` that names the dotted key, raised
before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_checks import ConfigError, validate

PRESET_DIR = Path(__file__).resolve().parent / "configs"


# --------------------------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    depth: int = 18                      # PResNet-vd depth: 18 or 34
    freeze_at: int = -1                  # freeze the stem and the first N stages (-1: nothing frozen, as RT-DETR)
    pretrained: str | None = None     # local PResNet-vd ImageNet weights (.pth); no download


@dataclass
class EncoderConfig:
    hidden_dim: int = 256                     # channels of every encoder feature map (and of the decoder)
    nhead: int = 8                            # attention heads of the AIFI layer
    dim_feedforward: int = 1024               # width of the AIFI layer's FFN
    dropout: float = 0.0
    num_encoder_layers: int = 1               # AIFI layers on the stride-32 map
    pe_temperature: float = 10000.0           # of the 2D sin-cos position embedding
    expansion: float = 0.5                    # hidden-channel ratio of the CCFF fusion blocks (CSPRepLayer)
    depth_mult: float = 1.0                   # RepVGG blocks per fusion block: round(3 x depth_mult)


@dataclass
class DecoderConfig:
    num_queries: int = 300                    # object queries, chosen from the encoder's top-scoring tokens
    num_layers: int = 3
    nhead: int = 8
    dim_feedforward: int = 1024               # width of each decoder layer's FFN
    dropout: float = 0.0
    num_points: int = 4                       # deformable-attention sampling points per head and level
    num_denoising: int = 100                  # denoising queries in training (0: no denoising groups)
    label_noise_ratio: float = 0.5            # denoising: share of ground-truth labels flipped (x 0.5)
    box_noise_scale: float = 1.0              # denoising: box jitter relative to the box's half size
    eval_idx: int = -1                        # the decoder layer whose output is the prediction in eval


@dataclass
class MoEConfig:
    enabled: bool = False
    num_experts: int = 6
    top_k: int = 3                            # experts each token is routed to
    expert_hidden_dim: int | None = None   # None: the dense FFN's width (1024), as the original DSET
    router_noise: float = 0.0                 # std of the noise added to router logits in training
    patch_size: int = 1                       # encoder only: tokens of one k x k patch share one routing decision
    balance_loss_weight: float = 0.03         # of the load-balancing loss (decoder default: 0.05)
    z_loss_weight: float = 0.0                # of the ST-MoE router z-loss
    # how the experts start from a dense checkpoint's FFN (model.checkpoint): upcycle (copies: the layer is the
    # dense FFN, its router gets no detection-loss gradient), drop_upcycle (copies, drop_upcycle_ratio of each
    # expert's hidden units re-initialised: Drop-Upcycling) or random (xavier-uniform, the original DSET code's)
    expert_init: str = "drop_upcycle"
    drop_upcycle_ratio: float = 0.5           # share of each expert's hidden units re-initialised (drop_upcycle)
    upcycle_noise: float = 0.0                # relative noise when experts are copied (expert_init: upcycle)
    balance_warmup_epochs: int = 0            # the balance loss's weight ramps from 0 (epoch 0) to full (this epoch)


@dataclass
class PruningConfig:
    enabled: bool = False
    keep_ratio: float = 0.7                   # share of the AIFI tokens kept once the schedule has ramped up
    min_tokens: int = 100                     # never keep fewer tokens than this
    warmup_epochs: int = 10                   # epochs without pruning, then the ratio ramps down
    ramp_epochs: int = 10                     # over this many epochs (see dset.models.pruning)
    fill: str = "identity"                    # pruned tokens keep their input ("identity") or become 0 ("zero")
    predictor_hidden_dim: int = 128           # hidden width of the token-importance predictor
    loss_weight: float = 0.01                 # of the pruning loss


@dataclass
class MemoryPruningConfig:
    """The fourth switch: learnable pruning of the decoder's multi-scale memory (dset.models.memory_pruning)."""

    enabled: bool = False
    keep_ratio: float = 0.3                   # share of the memory tokens (all levels together) kept after the ramp
    min_tokens: int = 0                       # never keep fewer than this (and never fewer than the decoder's queries)
    warmup_epochs: int = 1                    # epochs keeping every token (the predictor learns), then the ramp
    ramp_epochs: int = 0                      # epochs of the linear ramp from 1.0 to keep_ratio (0: at once)
    fill: str = "zero"                        # what pruned positions give deformable attention: "zero", or
                                              # "encoder_features" (their encoder features, not value-projected)
    predictor_hidden_dim: int = 0             # hidden width of the importance predictor; 0: one linear layer
                                              # (an MLP of width h costs 2*256*h FLOPs for each of the 8,400 tokens)
    supervision: str = "bce"                  # "bce": tokens inside a box = 1; "gaussian_focal": a Gaussian
                                              # box-plus-context soft target with CenterNet's focal loss (not the
                                              # original DSET's varifocal loss)
    context_ratio: float = 0.5                # gaussian_focal: the context band reaches this share of the box's
                                              # half-size beyond its border
    loss_weight: float = 0.05                 # of the memory-pruning loss
    predictor_lr: float | None = None         # the predictor's own learning rate (None: train.lr, as every new part)


@dataclass
class LossConfig:
    # loss weights and the varifocal loss's focusing parameters (RT-DETR's)
    vfl_weight: float = 1.0
    bbox_weight: float = 5.0                  # L1 on normalised cx, cy, w, h
    giou_weight: float = 2.0
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0
    # the Hungarian matcher's costs (focal-loss class cost with its own alpha and gamma)
    matcher_cost_class: float = 2.0
    matcher_cost_bbox: float = 5.0
    matcher_cost_giou: float = 2.0
    matcher_alpha: float = 0.25
    matcher_gamma: float = 2.0


@dataclass
class ModelConfig:
    name: str = "rtdetr_r18"
    num_classes: int = 80
    eval_spatial_size: list[int] = field(default_factory=lambda: [640, 640])
    checkpoint: str | None = None          # local RT-DETR checkpoint to start from (MoE experts upcycled)
    class_map: dict[str, str] | None = None  # {checkpoint class: our class}: keep those rows of the checkpoint's
                                              # class heads when num_classes differs (model.class_map={car: car})
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    encoder_moe: MoEConfig = field(default_factory=MoEConfig)
    token_pruning: PruningConfig = field(default_factory=PruningConfig)
    decoder_moe: MoEConfig = field(default_factory=lambda: MoEConfig(balance_loss_weight=0.05))
    memory_pruning: MemoryPruningConfig = field(default_factory=MemoryPruningConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class SplitConfig:
    images: str | None = None              # folder of images
    annotations: str | None = None         # COCO instances JSON


@dataclass
class SyntheticConfig:
    num_train: int = 256
    num_val: int = 64
    num_test: int = 0                         # images of the test split (0: none): the scoring split, other images
                                              # than train's and val's (val selects the model, test scores it)
    image_size: int = 320
    seed: int = 0
    num_classes: int = 4                      # shape classes (1..6)
    max_objects: int = 8                      # objects per image: 1..max_objects
    min_object_size: int = 8                  # smallest object side in pixels (sizes are log-uniform up to 0.6 x image)
    root: str | None = None                # cache folder; None: $DSET_CACHE_DIR/synthetic or ~/.cache/dset/synthetic


@dataclass
class DataConfig:
    name: str = "synthetic"                   # "synthetic" (built in) or "coco" (train/val/test below)
    classes: list[str] | None = None       # coco: the class names in category-id order, checked against the
                                              # annotation files (a data file written by dset.data sets them)
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)   # the selection split: best epoch, early stopping, tuning
    test: SplitConfig = field(default_factory=SplitConfig)  # the scoring split (optional): the reported checkpoint
                                                            # is evaluated on it once, at the end of the run
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    image_size: int = 640                     # training and evaluation resolution (square)
    batch_size: int = 4
    num_workers: int = 0
    max_train_images: int | None = None    # use only the first N training images (budgets)
    max_val_images: int | None = None
    augment: str = "rtdetr"                   # training augmentation: "rtdetr" (full recipe), "flip", "none"
    multi_scale: bool = True                  # RT-DETR's per-batch multi-scale training: each training batch is
                                              # resized to a size drawn from MULTI_SCALE_SIZES_640 scaled by
                                              # image_size / 640 (rounded to multiples of 32)
    stop_epoch: int | None = None          # RT-DETRv2's policy: from this epoch on, no multi-scale and no strong
                                              # augmentation (photometric distort, zoom-out, IoU crop); None: never


# --------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    epochs: int = 72
    lr: float = 1e-4                          # new components (everything when training from scratch)
    lr_pretrained: float = 1e-5               # parameters loaded from pretrained weights
    weight_decay: float = 1e-4                # none on norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.1
    warmup_steps: int = 2000                  # linear lr warm-up, then cosine annealing
    min_lr_ratio: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup_steps: int = 2000
    amp: bool = True                          # mixed precision (autocast), only on CUDA
    amp_dtype: str = "bfloat16"               # "bfloat16" (no loss scaling needed) or "float16" (with a GradScaler,
                                              # as the reference RT-DETR trains)
    channels_last: bool = True                # CUDA: the convolutions on NHWC tensors (tensor-core kernels); the
                                              # same computation, rounded differently
    compile: bool = False                     # torch.compile the backbone (dset.engine.step_settings)
    loss_check_every: int = 50                # optimizer steps between host reads of the loss (its NaN/inf check and
                                              # the progress bar); also at every epoch's end. 1: every step, which
                                              # also names the non-finite loss terms
    early_stop_patience: int | None = None # epochs without mAP improvement; None: never stop early
    eval_every: int = 1
    profile: bool = True                      # measure params/GFLOPs/latency of the final model (summary.json)
    profile_deployment: bool = True           # with profile: also eager PyTorch next to ONNX Runtime at batch 1 and 8
                                              # (dset.measure.deployment_latency; an ONNX export of the model)
    pictures: int = 4                         # draw the reported model on this many validation images (pictures/,
                                              # see dset.pictures); 0: none
    checkpoint_every_minutes: float = 10.0    # at most one write of checkpoints/last.pt (the resume state) per this
                                              # many minutes; also written at the end and when the run is interrupted
    keep_last_checkpoint: bool = True         # false: delete last.pt (the resume state) once the run has ended
                                              # without error; best.pt (weights) stays. Studies set false.


# RT-DETR's training sizes at 640 px (v1 rtdetr_pytorch `multi_scale`, v2 include/dataloader.yml)
MULTI_SCALE_SIZES_640 = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


def multi_scale_sizes(image_size: int) -> list[int]:
    """The reference's multi-scale sizes for ``image_size``: the 640 px list scaled by image_size / 640 and
    rounded to the nearest multiple of 32 (at least 32). At 640 px it is the reference's list itself."""
    return [max(32, int(round(s * image_size / 640 / 32)) * 32) for s in MULTI_SCALE_SIZES_640]


# Configuration keys that change neither what a run computes nor its result (where it runs, how it logs,
# what it keeps on disk, how its kernels lay out or fuse the same computation: only the rounding differs). They
# may change when a run is resumed, they are left out of a study run's fingerprint, and runs that differ only in
# these (and in run.seed) are seeds of one variant in the report.
RESULT_NEUTRAL_KEYS = ("run.device", "run.progress", "run.out_dir", "data.num_workers", "train.keep_last_checkpoint",
                       "train.checkpoint_every_minutes", "run.budget", "train.pictures",
                       "train.profile_deployment", "train.channels_last", "train.compile", "train.loss_check_every")


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"                      # "auto", "cpu", "cuda", "cuda:1", ...
    out_dir: str | None = None
    deterministic: bool = False
    progress: bool = True                     # tqdm bar within each epoch
    budget: str | None = None              # the budget file applied under the overrides ("none": none); a
                                              # record of where the schedule came from, set by resolve_config


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flat ``{dotted.key: value}`` view (what studies log as parameters)."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{dotted.key: value}``."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------------------------ construction
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert the harmless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, e.g. {{a: b}}, got {value!r}")
        return {_coerce(k, key_tp, f"{key} (a key)"): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                return _coerce(float(value), float, key)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    defaults = cls()
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown configuration key '{key}'; valid keys here: {', '.join(sorted(names))}")
        default = getattr(defaults, k)
        if dataclasses.is_dataclass(default) and isinstance(v, dict):
            # a partly given group starts from the parent's default for it, not the group class's
            # (e.g. decoder_moe's balance weight 0.05 differs from MoEConfig's 0.03)
            v = _merge(dataclasses.asdict(default), v)
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def find_yaml(name_or_path: str | Path, folder: Path, *, what: str, prefix: str = "", extra_names: tuple = (),
              error: type[Exception] = ConfigError, context: str = "") -> Path:
    """A YAML file given by path (it must exist) or by name: ``folder/<prefix><name>.yaml``. The error names
    what was asked for and lists the known names (``extra_names``: special values the caller accepts)."""
    lead = f"{context}: " if context else ""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise error(f"{lead}{what} file not found: {path}")
        return path
    candidate = folder / f"{prefix}{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem[len(prefix):] for p in folder.glob(f"{prefix}*.yaml")) + list(extra_names)
        raise error(f"{lead}unknown {what} {str(name_or_path)!r}; known: {', '.join(known)} (or a path to a YAML file)")
    return candidate


def read_yaml_mapping(path: Path, error: type[Exception] = ConfigError) -> dict:
    """The top-level mapping of a YAML file (empty file: {}); errors name the file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level")
    return data


def _resolve_preset(name_or_path: str | Path) -> Path:
    return find_yaml(name_or_path, PRESET_DIR, what="preset")


def read_preset(name_or_path: str | Path, seen: tuple = ()) -> dict:
    """A preset (a name in dset/configs or a YAML path) as a nested mapping, with its ``base`` presets merged
    under it; a cycle of bases is a ConfigError naming the files."""
    path = _resolve_preset(name_or_path)
    if path in seen:
        raise ConfigError(f"{path}: 'base' presets form a cycle: {' -> '.join(map(str, seen + (path,)))}")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        merged: dict = {}
        for b in bases:
            b_path = Path(b)
            if b_path.suffix in (".yaml", ".yml") and not b_path.is_absolute():
                b = path.parent / b_path
            merged = _merge(merged, read_preset(b, seen + (path,)))
        data = _merge(merged, data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'model.decoder_moe.top_k=2'`` -> (['model', 'decoder_moe', 'top_k'], 2). Values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    data = _merge({}, data)
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {text!r}: '{p}' is a value, not a group of settings")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict) -> Config:
    return validate(_build(Config, data))


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted keys set to Python values (``{"run.progress": False}``), coerced to each
    key's type and validated; an unknown key is a :class:`ConfigError`. The typed way to edit a configuration
    in code (the ``key=value`` strings are the command line's)."""
    return config_from_dict(_merge(cfg.to_dict(), unflatten(values)))


def load_config(name_or_path: str | Path | Config = "rtdetr_r18", overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML path, apply ``key.sub=value`` overrides, validate."""
    if isinstance(name_or_path, Config):
        data = name_or_path.to_dict()
    else:
        data = read_preset(name_or_path)
    return config_from_dict(apply_overrides(data, overrides))


# ------------------------------------------------------------------------------------------- budgets
# A budget is a YAML file of data.*/train.*/model.* settings that sizes a run (image size, data, epochs):
# dset/configs/budget_<name>.yaml. It may also hold a ``pretrain`` section, stage 1 of a study at that
# scale (see studies/planning/pretrain.py); single runs ignore it.
BUDGET_AUTO = "auto"
DEFAULT_BUDGET = "cpu"   # what "auto" applies: a few minutes on a CPU, on the built-in synthetic data


def budget_path(name: str | Path | None) -> Path | None:
    """The budget file a name or path denotes; None for none/null."""
    if name is None or str(name).lower() in ("none", "null", ""):
        return None
    return find_yaml(name, PRESET_DIR, what="budget", prefix="budget_", extra_names=("none", BUDGET_AUTO),
                     context="budget")


def read_budget(name: str | Path | None) -> tuple[dict, Any]:
    """A budget's configuration layer and its ``pretrain`` section (None when it has none)."""
    path = budget_path(name)
    if path is None:
        return {}, None
    data = read_preset(path)
    return data, data.pop("pretrain", None)


def unflatten(flat: dict[str, Any]) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``, the inverse of :func:`flatten` (nested values are merged as they are)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def split_data_override(overrides: list[str] | None, data: str | Path | None = None) -> tuple[list[str], Any]:
    """``data=FILE`` among command-line overrides names a data file (or a shipped data preset), not a key: the
    other overrides, and the data file (the last ``data=`` given, else ``data``)."""
    rest = []
    for text in overrides or []:
        key, _, value = text.partition("=")
        if key.strip() == "data":
            data = value.strip()
        else:
            rest.append(text)
    return rest, data


def read_data_layer(data: str | Path) -> dict:
    """The configuration layer of a data file (a path; relative paths in it are relative to its folder) or of a
    shipped data preset (a name: ``dset/configs/data_<name>.yaml``, paths relative to the working directory)."""
    from .data_file import read_data_file

    path = find_yaml(data, PRESET_DIR, what="data", prefix="data_", context="data")
    layer, _ = read_data_file(path, relative_to_file=path.resolve().parent != PRESET_DIR.resolve())
    return layer


def with_data_file(cfg: Config, data: str | Path) -> Config:
    """``cfg`` reading the data set of a data file instead of its own: the file's ``name``, ``classes`` and
    splits replace the configuration's (a split the file does not give is unset); image size, batch size and
    the other ``data.*`` settings stay (``dset.evaluate RUN data=other.yaml``)."""
    data_layer = read_data_layer(data)["data"]
    location = {"data.classes": None, **{f"data.{s}": {"images": None, "annotations": None}
                                          for s in ("train", "val", "test")}}
    return with_values(cfg, {**location, **flatten({"data": data_layer})})


def resolve_config(presets: str | Path | list, *, budget: str | Path | None = BUDGET_AUTO,
                   data: str | Path | None = None, layers: tuple | list = (), overrides: list[str] | None = None,
                   seed: int | None = None) -> Config:
    """The one way a run's configuration is put together, for ``dset.train`` and for studies alike.

    Layers, each on top of the one before: the preset(s) (a name in dset/configs or a YAML path, merged in
    order) -> the budget -> ``data`` (``dset/configs/data_<name>.yaml`` or a path) -> ``layers`` (mappings,
    dotted or nested keys: a study's ``set``, a grid cell's values) -> ``overrides`` (``key=value`` strings of
    the command line) -> ``run.seed``. ``run.budget`` records the budget applied.

    ``budget="auto"`` applies ``budget_cpu`` when the run uses the built-in synthetic data and the preset
    files set no ``data.*``/``train.*`` key of their own (a YAML file with its own schedule is left alone);
    ``None``/``"none"`` applies none (the preset's full schedule)."""
    presets = [presets] if isinstance(presets, (str, Path)) else list(presets)
    stack: dict = {}
    for p in presets:
        stack = _merge(stack, read_preset(p))
    overrides, data = split_data_override(overrides, data)
    on_top: list[dict] = []
    if data is not None and str(data).lower() not in ("none", "null", ""):
        on_top.append(read_data_layer(data))
    on_top += [unflatten(layer) for layer in layers]
    if budget is not None and str(budget) == BUDGET_AUTO:
        sets_schedule = any(section in stack for section in ("data", "train"))
        probe = stack
        for layer in on_top:
            probe = _merge(probe, layer)
        probe = apply_overrides(probe, overrides)
        synthetic = (probe.get("data") or {}).get("name", DataConfig.name) == "synthetic"
        budget = DEFAULT_BUDGET if synthetic and not sets_schedule else None
    budget_layer, _ = read_budget(budget)
    stack = _merge(stack, budget_layer)
    for layer in on_top:
        stack = _merge(stack, layer)
    stack = apply_overrides(stack, overrides)
    run = {"budget": "none" if budget_path(budget) is None else str(budget)}
    if seed is not None:
        run["seed"] = seed
    return config_from_dict(_merge(stack, {"run": run}))
