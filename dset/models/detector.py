"""The detector (backbone -> hybrid encoder -> decoder), ``build_model(cfg)`` and weight loading.

With the three DSET switches off, ``build_model`` gives the reference RT-DETR: same modules, same
``state_dict`` keys and shapes, same outputs (checked against ``shared/parity``).
"""

from __future__ import annotations

import difflib
import logging
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config, ConfigError, load_config
from ..config_checks import check_class_map
from .backbone import PResNet
from .coco_classes import COCO_CLASS_NAMES
from .decoder import RTDETRDecoder
from .encoder import HybridEncoder
from .memory_pruning import MemoryPruner
from .moe import UPCYCLED_EXPERT_PARAMS, ExpertInit, MoEFFN
from .pruning import ScheduledPruner, TokenPruner

log = logging.getLogger(__name__)


class Detector(nn.Module):
    """``model(images)`` in eval mode -> {pred_logits [B, Q, C], pred_boxes [B, Q, 4] (cx, cy, w, h)}.

    In train mode ``model(images, targets)`` also runs contrastive denoising and returns the
    auxiliary outputs the criterion needs plus ``extra_losses``: the unweighted MoE balance/z losses
    and the token- and memory-pruning losses, by name. ``sparse_stats()`` reports what the sparse mechanisms
    did in the last forward (expert usage per MoE layer, tokens kept).
    """

    def __init__(self, backbone: PResNet, encoder: HybridEncoder, decoder: RTDETRDecoder):
        super().__init__()
        # registration order backbone, decoder, encoder reproduces the reference's state_dict order
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder
        self.epoch = 0  # set_epoch's; the balance losses' warm-up reads it
        self.balance_warmup_epochs: dict[str, int] = {}  # "enc"/"dec" -> epochs (build_model sets it from cfg)

    # the MoE layers, by where they sit; empty lists when a switch is off
    def encoder_moe_layers(self) -> list[MoEFFN]:
        return [layer.moe for enc in self.encoder.encoder for layer in enc.layers if hasattr(layer, "moe")]

    def decoder_moe_layers(self) -> list[MoEFFN]:
        return [layer.moe for layer in self.decoder.decoder.layers if hasattr(layer, "moe")]

    @property
    def token_pruner(self) -> TokenPruner | None:
        return getattr(self.encoder, "token_pruner", None)

    @property
    def memory_pruner(self) -> MemoryPruner | None:
        return self.decoder.memory_pruner

    def pruners(self) -> list[ScheduledPruner]:
        """The epoch-scheduled pruners this model has (token pruning, memory pruning)."""
        return [p for p in (self.token_pruner, self.memory_pruner) if p is not None]

    def memory_token_counts(self, size: int) -> tuple[int, int]:
        """The decoder memory's tokens (all levels) for a ``size`` x ``size`` input, and how many memory pruning
        keeps at its current ratio (all of them without it)."""
        sizes = [(size // stride) ** 2 for stride in self.decoder.feat_strides[: self.decoder.num_levels]]
        if self.memory_pruner is None:
            return sum(sizes), sum(sizes)
        return sum(sizes), sum(self.memory_pruner.level_counts(sizes, floor=self.decoder.num_queries))

    def set_epoch(self, epoch: int) -> None:
        """Tell epoch-scheduled components (the pruners' keep ratios, the balance losses' warm-up) the current
        epoch."""
        for p in self.pruners():
            p.set_epoch(epoch)
        self.epoch = int(epoch)

    def balance_warmup_factor(self, side: str) -> float:
        """What the ``side`` (``"enc"`` or ``"dec"``) MoE balance loss is multiplied by at the current epoch: its
        warm-up (``model.{encoder,decoder}_moe.balance_warmup_epochs`` = N) ramps it linearly from 0 at epoch 0
        to 1 at epoch N, so that the experts first specialise on the detection loss alone; 1 without warm-up."""
        epochs = self.balance_warmup_epochs.get(side, 0)
        return 1.0 if epochs <= 0 else min(1.0, self.epoch / epochs)

    def set_deployed_epoch(self, epoch: int | None = None) -> None:
        """Set the pruning schedules to ``epoch``, by default each to the end of its ramp: the trained state
        that is measured and deployed (``dset.profile``, ``dset.export``)."""
        for p in self.pruners():
            p.set_epoch(epoch if epoch is not None else p.warmup_epochs + p.ramp_epochs)

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> dict:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
        if images.shape[2] % 32 or images.shape[3] % 32:
            raise ValueError(f"image height and width must be multiples of 32, got {tuple(images.shape[2:])}")
        feats = self.backbone(images)
        outputs = self.decoder(self.encoder(feats), targets)
        if self.training:
            outputs["extra_losses"] = self._extra_losses(targets)
        return outputs

    def _extra_losses(self, targets: list[dict] | None) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for name, layers in (("enc", self.encoder_moe_layers()), ("dec", self.decoder_moe_layers())):
            if layers:
                balance = torch.stack([m.balance_loss for m in layers]).mean()
                losses[f"loss_{name}_moe_balance"] = balance * self.balance_warmup_factor(name)  # x 1.0 is exact
                losses[f"loss_{name}_moe_z"] = torch.stack([m.z_loss for m in layers]).mean()
        pruning = self.encoder.last_pruning
        if pruning is not None and targets is not None:
            losses["loss_pruning"] = self.token_pruner.importance_loss(
                pruning["scores"], pruning["spatial_shape"], targets)
        memory = self.decoder.last_memory_pruning
        if memory is not None and targets is not None:
            losses["loss_memory_pruning"] = self.memory_pruner.importance_loss(
                memory["scores"], memory["spatial_shapes"], targets)
        return losses

    @torch.no_grad()
    def sparse_stats(self) -> dict:
        """What the sparse mechanisms did in the last forward: tensors for usage, numbers for tokens."""
        stats: dict = {}
        for name, layers in (("encoder_moe", self.encoder_moe_layers()), ("decoder_moe", self.decoder_moe_layers())):
            if layers:
                stats[name] = [m.usage for m in layers]
                stats[f"{name}_router_entropy"] = [m.router_entropy for m in layers]
                # the layers themselves: EpochStats reads their experts' similarity from the weights once an epoch
                stats[f"{name}_layers"] = layers
        if self.encoder.last_pruning is not None:  # the numbers only: no per-token tensors
            stats["token_pruning"] = {k: v for k, v in self.encoder.last_pruning.items()
                                      if k not in ("scores", "spatial_shape", "keep_index")}
        if self.decoder.last_memory_pruning is not None:
            stats["memory_pruning"] = {k: v for k, v in self.decoder.last_memory_pruning.items()
                                       if k not in ("scores", "spatial_shapes")}
        return stats


class TensorOutputs(nn.Module):
    """``Detector`` with tensor outputs ``(pred_logits, pred_boxes)`` instead of a dict: what tracing tools want
    (fvcore's FLOP count, the ONNX exporter)."""

    def __init__(self, model: Detector):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out["pred_logits"], out["pred_boxes"]


def _moe_factory(moe_cfg, d_model: int, dense_hidden: int, activation: str, dropout: float):
    if not moe_cfg.enabled:
        return None
    hidden = moe_cfg.expert_hidden_dim or dense_hidden
    return lambda: MoEFFN(d_model, hidden, moe_cfg.num_experts, moe_cfg.top_k, activation=activation,
                          dropout=dropout, router_noise=moe_cfg.router_noise, patch_size=moe_cfg.patch_size)


def build_model(cfg: Config | str = "rtdetr_r18", overrides: list[str] | None = None,
                load_weights: bool = True) -> Detector:
    """Build the detector a configuration (or preset name / YAML path) describes.

    With ``load_weights`` the local files named by ``model.checkpoint`` (an RT-DETR checkpoint) and
    ``model.backbone.pretrained`` (PResNet-vd ImageNet weights) are loaded.
    """
    if not isinstance(cfg, Config) or overrides:
        cfg = load_config(cfg, overrides)
    m = cfg.model
    hidden = m.encoder.hidden_dim
    backbone = PResNet(depth=m.backbone.depth, return_idx=(1, 2, 3), freeze_at=m.backbone.freeze_at)
    pruner = None
    if m.token_pruning.enabled:
        p = m.token_pruning
        pruner = TokenPruner(hidden, keep_ratio=p.keep_ratio, min_tokens=p.min_tokens, warmup_epochs=p.warmup_epochs,
                             ramp_epochs=p.ramp_epochs, fill=p.fill, hidden_dim=p.predictor_hidden_dim)
    encoder = HybridEncoder(
        in_channels=backbone.out_channels, feat_strides=backbone.out_strides, hidden_dim=hidden,
        nhead=m.encoder.nhead, dim_feedforward=m.encoder.dim_feedforward, dropout=m.encoder.dropout,
        enc_act="gelu", use_encoder_idx=(2,), num_encoder_layers=m.encoder.num_encoder_layers,
        pe_temperature=m.encoder.pe_temperature, expansion=m.encoder.expansion, depth_mult=m.encoder.depth_mult,
        act="silu",
        moe_factory=_moe_factory(m.encoder_moe, hidden, m.encoder.dim_feedforward, "gelu", m.encoder.dropout),
        token_pruner=pruner)
    memory_pruner = None
    if m.memory_pruning.enabled:
        mp = m.memory_pruning
        memory_pruner = MemoryPruner(hidden, keep_ratio=mp.keep_ratio, min_tokens=mp.min_tokens,
                                     warmup_epochs=mp.warmup_epochs, ramp_epochs=mp.ramp_epochs, fill=mp.fill,
                                     hidden_dim=mp.predictor_hidden_dim, supervision=mp.supervision,
                                     context_ratio=mp.context_ratio)
    d = m.decoder
    decoder = RTDETRDecoder(
        num_classes=m.num_classes, hidden_dim=hidden, num_queries=d.num_queries,
        feat_channels=[hidden] * 3, feat_strides=backbone.out_strides, num_levels=3, num_points=d.num_points,
        nhead=d.nhead, num_layers=d.num_layers, dim_feedforward=d.dim_feedforward, dropout=d.dropout,
        num_denoising=d.num_denoising, label_noise_ratio=d.label_noise_ratio, box_noise_scale=d.box_noise_scale,
        eval_idx=d.eval_idx, moe_factory=_moe_factory(m.decoder_moe, hidden, d.dim_feedforward, "relu", d.dropout),
        memory_pruner=memory_pruner)
    model = Detector(backbone, encoder, decoder)
    model.config = cfg  # what built it, for checkpoints and measurement
    model.balance_warmup_epochs = {"enc": m.encoder_moe.balance_warmup_epochs,
                                   "dec": m.decoder_moe.balance_warmup_epochs}
    if load_weights:
        if m.backbone.pretrained:
            load_backbone_weights(model, m.backbone.pretrained)
        report = load_configured_checkpoint(model, cfg)
        if report is not None:
            report.log_to(log)
    return model


# ------------------------------------------------------------------------------------ weight loading
CLASS_HEAD_PREFIXES = ("decoder.enc_score_head.", "decoder.dec_score_head.", "decoder.denoising_class_embed.")
_CLASS_COUNT_KEY = "decoder.enc_score_head.bias"  # its length is a state_dict's number of classes


@dataclass
class LoadReport:
    """What a weight file did to a model: which parameter names it set, and what it could not.

    The class heads (:data:`CLASS_HEAD_PREFIXES`) are loaded whole when the file and the model have the same
    classes and no ``class_map`` is given; otherwise they keep their fresh initialisation
    (``class_heads_reinitialised``: key -> file vs model shape), except the rows of the classes ``class_map``
    carries over (``carried_classes``: file class -> our class), which are copied from the file.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    class_heads_loaded: list[str] = field(default_factory=list)        # loaded whole (also in ``loaded``)
    class_heads_reinitialised: dict[str, str] = field(default_factory=dict)   # key -> "file [80, 256], model [3, 256]"
    file_num_classes: int | None = None
    model_num_classes: int | None = None
    file_class_names: list[str] | None = None
    file_class_names_from: str = ""    # where the file's class names come from (COCO's, the checkpoint's own)
    model_class_names: list[str] | None = None
    class_map: dict[str, str] | None = None
    carried_classes: dict[str, str] = field(default_factory=dict)   # file class -> our class, rows copied
    fresh_classes: list[str] = field(default_factory=list)          # our classes that start from their fresh rows
    # MoE layers whose experts are plain copies of the file's dense FFN (expert_init upcycle): pretrained weights
    upcycled: list[str] = field(default_factory=list)
    # every MoE layer that replaced a dense FFN of the file -> how its experts were initialised (ExpertInit.describe)
    expert_init: dict[str, str] = field(default_factory=dict)
    new_components: list[str] = field(default_factory=list)  # in the model, not in the file (DSET parts)

    def summary(self) -> str:
        parts = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        for how in sorted(set(self.expert_init.values())):
            layers = sum(v == how for v in self.expert_init.values())
            parts.append(f"experts of {layers} MoE layers {how}")
        if self.class_heads_reinitialised:
            carried = (f"; {len(self.carried_classes)} of our {self.model_num_classes} classes carried over by "
                       "model.class_map" if self.class_map else "")
            parts.append(f"{len(self.class_heads_reinitialised)} class-head tensors re-initialised "
                         f"({self.file_num_classes} classes in the file, {self.model_num_classes} in the model"
                         f"{carried})")
        if self.new_components:
            parts.append(f"{len(self.new_components)} new tensors keep their initialisation")
        return "; ".join(parts)

    def head_report(self) -> str:
        """A few lines on the class heads: loaded or re-initialised and why, the classes carried over and those
        that start fresh; "" when the file had none (backbone weights)."""
        if self.file_num_classes is None:
            return ""
        ours = self.model_num_classes
        if not self.class_heads_reinitialised:
            text = (f"class heads loaded: {self.file_num_classes} classes in the file and in the model: "
                    f"{_modules_text(self.class_heads_loaded)}")
            names = self.file_class_names, self.model_class_names
            if self._loaded_by_label_onto_other_names():  # loaded by label, not by name: say so
                differ = [f"{a} -> {b}" for a, b in zip(*names) if a != b]
                text += (f"\n  by label, and {len(differ)} labels name other classes in the file "
                         f"({_few(differ, 5)}): model.class_map maps rows by name")
            return text
        file_names = f" ({self.file_class_names_from})" if self.file_class_names_from else ""
        our_names = f" ({', '.join(self.model_class_names)})" if self.model_class_names else ""
        lines = [f"class heads: {self.file_num_classes} classes in the file{file_names}, {ours} in the model"
                 f"{our_names}"]
        shapes = {k.rsplit(".", 1)[0]: why for k, why in self.class_heads_reinitialised.items()
                  if k.endswith(".weight")}
        # a row of these tensors is a class: rows of other classes (or in another order) would mislabel
        why = "re-initialised (random weights, prior-probability bias)"
        if self.class_map:
            why += ", then the rows of the classes in model.class_map copied from the file"
        else:
            why += ", as a row is a class and the file's classes are not ours"
        lines.append(f"  {why}: {_modules_text(list(self.class_heads_reinitialised), shapes)}")
        if self.class_map:
            lines.append("  carried over (file -> ours): "
                         + ", ".join(f"{a} -> {b}" for a, b in self.carried_classes.items()))
            lines.append(f"  start fresh: {', '.join(self.fresh_classes) if self.fresh_classes else 'none'}")
        else:
            everyone = f" ({', '.join(self.model_class_names)})" if self.model_class_names else ""
            lines.append(f"  every class starts from scratch{everyone}: set model.class_map={{file class: our class}} "
                         "to keep the file's rows of the classes both have")
            shared = [n for n in (self.model_class_names or []) if n in (self.file_class_names or [])]
            if shared:
                pairs = ", ".join(f"{n}: {n}" for n in shared)
                lines.append(f"  classes both have by name: model.class_map={{{pairs}}}")
        return "\n".join(lines)

    def log_to(self, logger: logging.Logger | None = None) -> None:
        """The summary and the head report, by default on this module's logger: at INFO, or at WARNING when the
        class heads were not loaded whole or were loaded by label onto other names (what a study's console,
        quiet at INFO, still shows)."""
        logger = logger or log
        level = logging.WARNING if self.class_heads_reinitialised or self._loaded_by_label_onto_other_names() \
            else logging.INFO
        logger.log(level, "initial weights: %s", self.summary())
        for line in self.head_report().splitlines():
            logger.log(level, "  %s", line)

    def _loaded_by_label_onto_other_names(self) -> bool:
        names = self.file_class_names, self.model_class_names
        return not self.class_heads_reinitialised and None not in names and names[0] != names[1]


def _modules_text(keys: list[str], shapes: dict[str, str] | None = None) -> str:
    """Tensor names as their modules, numbered ones folded: "decoder.dec_score_head.{0,1,2} (file .., model ..)"."""
    groups: dict[str, list[str]] = {}
    for module in dict.fromkeys(k.rsplit(".", 1)[0] for k in keys):
        base, _, index = module.rpartition(".")
        if index.isdigit():
            groups.setdefault(base, []).append(index)
        else:
            groups.setdefault(module, [])
    texts = []
    for base, indices in groups.items():
        first = f"{base}.{indices[0]}" if indices else base
        name = f"{base}.{{{','.join(indices)}}}" if len(indices) > 1 else first
        shape = (shapes or {}).get(first)
        texts.append(f"{name} ({shape})" if shape else name)
    return ", ".join(texts)


def class_rows(class_map: dict[str, str], file_classes: list[str] | None, model_classes: list[str] | None,
               source: str, file_names_from: str = "") -> list[tuple[int, int]]:
    """``(file row, model row)`` of each pair of ``class_map`` (file class -> our class), by name; a
    :class:`ConfigError` naming ``model.class_map`` for a name that is not there."""
    check_class_map(class_map)
    if file_classes is None:
        raise ConfigError(f"model.class_map: {source} names no classes, so its rows cannot be found by name "
                          f"({file_names_from})")
    if model_classes is None:
        raise ConfigError("model.class_map: this model's class names are unknown: set data.classes (or train on a "
                          "data set, whose category names a run passes on)")
    for key, value in class_map.items():
        if key not in file_classes:
            close = difflib.get_close_matches(key, file_classes, n=3, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ConfigError(f"model.class_map: {key!r} is not a class of {source} ({len(file_classes)} classes"
                              f"{', ' + file_names_from if file_names_from else ''}: "
                              f"{_few(file_classes)}){hint}")
        if value not in model_classes:
            close = difflib.get_close_matches(value, model_classes, n=3, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ConfigError(f"model.class_map.{key}: {value!r} is not one of our {len(model_classes)} classes "
                              f"({_few(model_classes)}){hint}")
    return [(file_classes.index(k), model_classes.index(v)) for k, v in class_map.items()]


def _few(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# RT-DETRv2 (rtdetrv2_pytorch) names two modules differently and adds buffers with no parameters; with the
# default num_points, cross_attn_method and query_select_method its inference is v1's (../shared/parity)
_V2_RENAMES = ((re.compile(r"^decoder\.enc_output\.proj\."), "decoder.enc_output.0."),
               (re.compile(r"^decoder\.enc_output\.norm\."), "decoder.enc_output.1."),
               (re.compile(r"^(encoder\.input_proj\.\d+)\.conv\."), r"\1.0."),
               (re.compile(r"^(encoder\.input_proj\.\d+)\.norm\."), r"\1.1."))
_V2_BUFFERS = re.compile(r"^decoder\.anchors$|^decoder\.valid_mask$|\.cross_attn\.num_points_scale$")


def is_rtdetrv2_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(_V2_BUFFERS.search(k) or any(rx.search(k) for rx, _ in _V2_RENAMES) for k in state)


def from_rtdetrv2_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An RT-DETRv2 state_dict in RT-DETR (v1) names: renamed keys, v2's three kinds of buffers dropped (anchors
    and valid_mask are recomputed for each input size here; num_points_scale is 1/num_points, a constant).
    A v1 state_dict comes back unchanged."""
    out = {}
    for key, value in state.items():
        if _V2_BUFFERS.search(key):
            continue
        for rx, repl in _V2_RENAMES:
            key = rx.sub(repl, key)
        out[key] = value
    return out


def _read_weights_file(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(the file's top-level dict, its state_dict in v1 names)``: the top level is where our checkpoints keep
    ``category_names`` (``{}`` for a plain state_dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (downloads are not possible here: place the file locally)")
    try:
        top = obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is reported with the file name
        raise ValueError(f"{path}: not a readable PyTorch weights file ({exc})") from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict) and "module" in obj["ema"]:
        obj = obj["ema"]["module"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: no state_dict found (expected 'ema.module', 'model' or a plain state_dict)")
    return (top if top is not obj else {}), from_rtdetrv2_layout(obj)


def checkpoint_class_names(top: dict, state: dict[str, torch.Tensor], source: str) -> tuple[list[str] | None, str]:
    """The class names of a checkpoint's heads, in label order, and where they come from: the
    ``category_names`` our runs save; else COCO's 80 classes in RT-DETR's label order for 80-class heads
    (a published RT-DETR checkpoint); else None (and why)."""
    if _CLASS_COUNT_KEY not in state:
        return None, "it has no class heads"
    count = state[_CLASS_COUNT_KEY].shape[0]
    names = top.get("category_names")
    if names is not None:
        if not (isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names) and len(names) == count):
            raise ValueError(f"{source}: category_names ({names!r}) should be {count} names, one per class of its "
                             "class heads")
        return list(names), "its category_names"
    if count == len(COCO_CLASS_NAMES):
        return list(COCO_CLASS_NAMES), "COCO's, in RT-DETR's label order"
    return None, (f"no category_names in the file, and its {count} classes are not COCO's 80 of a published "
                  "RT-DETR checkpoint")


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    return _read_weights_file(path)[1]


def expert_inits(cfg: Config) -> tuple[ExpertInit, ExpertInit]:
    """``(encoder, decoder)``: how ``cfg``'s MoE layers make their experts from a dense checkpoint's FFNs."""
    return ExpertInit.of(cfg.model.encoder_moe), ExpertInit.of(cfg.model.decoder_moe)


def load_state_dict_into(model: Detector, state: dict[str, torch.Tensor], source: str = "state_dict",
                         expert_init: tuple[ExpertInit, ExpertInit] | None = None,
                         class_map: dict[str, str] | None = None, file_classes: list[str] | None = None,
                         model_classes: list[str] | None = None, file_classes_from: str = "") -> LoadReport:
    """Load an RT-DETR-layout state_dict into ``model`` with strict key matching.

    - Every key of the file must exist in the model, with the same shape, except dense FFN keys of layers that
      are MoE in this model: their experts are made from them as ``expert_init`` (encoder, decoder) says
      (:meth:`MoEFFN.init_experts_from_dense`; None: as ``model.config`` says), and the class heads
      (:data:`CLASS_HEAD_PREFIXES`): loaded whole when the class counts agree and there is no ``class_map``;
      otherwise they keep their fresh initialisation, except the rows of ``class_map``'s classes (file class
      name -> our class name; ``file_classes`` and ``model_classes`` are the two sides' names in label order),
      copied from the file. The report says which (:meth:`LoadReport.head_report`).
    - Every key of the model must come from the file, except the DSET components (routers, experts
      that are not plain copies, the importance predictor), which keep their initialisation.
    Anything else is an error listing the offending keys.
    """
    if expert_init is None and hasattr(model, "config"):
        expert_init = expert_inits(model.config)
    report = LoadReport(source, model_num_classes=model.decoder.num_classes, class_map=class_map or None,
                        file_class_names=file_classes, file_class_names_from=file_classes_from,
                        model_class_names=model_classes)
    if _CLASS_COUNT_KEY in state:
        report.file_num_classes = int(state[_CLASS_COUNT_KEY].shape[0])
    if model_classes is not None and len(model_classes) != model.decoder.num_classes:
        raise ValueError(f"{source}: {len(model_classes)} class names given for a model of "
                         f"{model.decoder.num_classes} classes: {_few(model_classes)}")
    rows = class_rows(class_map, file_classes, model_classes, source, file_classes_from) if class_map else []
    model_state = model.state_dict()
    state = {k: v for k, v in state.items()}
    # the experts of the MoE layers that replaced dense FFNs are made from those FFNs (model.*_moe.expert_init)
    moe_modules = {name: mod for name, mod in model.named_modules() if isinstance(mod, MoEFFN)}
    for name, moe in moe_modules.items():
        layer = name[: -len(".moe")]
        keys = [f"{layer}.linear1.weight", f"{layer}.linear1.bias", f"{layer}.linear2.weight", f"{layer}.linear2.bias"]
        if all(k in state for k in keys):
            w1, b1, w2, b2 = (state.pop(k) for k in keys)
            if tuple(w1.shape) == (moe.hidden_dim, moe.d_model):
                if expert_init is None:
                    raise ValueError(f"{source}: {name} replaces a dense FFN of the file, and this model has no "
                                     "config to say how its experts start: pass expert_init")
                init = expert_init[0] if name.startswith("encoder.") else expert_init[1]
                moe.init_experts_from_dense(types.SimpleNamespace(weight=w1, bias=b1),
                                            types.SimpleNamespace(weight=w2, bias=b2), init)
                report.expert_init[name] = init.describe()
                if init.mode == "upcycle":
                    report.upcycled.append(name)
            else:   # reported (summary, log), not a warning: the experts are new parts
                report.expert_init[name] = (f"random (the file's FFN is {w1.shape[0]} wide, the experts "
                                            f"{moe.hidden_dim}: not made from it)")
    unexpected, mismatched, to_load, head_rows = [], [], {}, {}
    for k, v in state.items():
        if k not in model_state:
            unexpected.append(k)
            continue
        file_shape, model_shape = tuple(v.shape), tuple(model_state[k].shape)
        # a class head's rows are its classes (the denoising embedding's last row is its padding row)
        if k.startswith(CLASS_HEAD_PREFIXES) and file_shape[1:] == model_shape[1:] and (
                class_map or file_shape != model_shape):
            report.class_heads_reinitialised[k] = f"file {list(file_shape)}, model {list(model_shape)}"
            if rows:
                head = model_state[k].clone()
                for file_row, model_row in rows:
                    head[model_row] = v[file_row]
                head_rows[k] = head
        elif file_shape != model_shape:
            mismatched.append(f"{k}: file {file_shape} vs model {model_shape}")
        else:
            to_load[k] = v
    dset_markers = (".moe.", ".token_pruner.", ".memory_pruner.")
    missing = [k for k in model_state if k not in to_load and k not in report.class_heads_reinitialised
               and not any(m in k for m in dset_markers)]
    if unexpected or mismatched or missing:
        lines = [f"{source} does not fit this model:"]
        if unexpected:
            lines.append(f"  {len(unexpected)} keys not in the model, e.g. {unexpected[:5]}")
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatches, e.g. {mismatched[:5]}")
        if missing:
            lines.append(f"  {len(missing)} model keys missing from the file, e.g. {missing[:5]}")
        raise ValueError("\n".join(lines))
    model.load_state_dict({**to_load, **head_rows}, strict=False)
    report.loaded = sorted(to_load)
    report.class_heads_loaded = [k for k in model_state if k in to_load and k.startswith(CLASS_HEAD_PREFIXES)]
    if file_classes is not None:
        report.carried_classes = {file_classes[f]: model_classes[m] for f, m in rows}
    if model_classes is not None and report.class_heads_reinitialised:
        report.fresh_classes = [n for n in model_classes if n not in report.carried_classes.values()]
    copied = {f"{u}.{p}" for u in report.upcycled for p in UPCYCLED_EXPERT_PARAMS}  # routers stay new
    report.new_components = [k for k in model_state if k not in to_load and k not in report.class_heads_reinitialised
                             and k not in copied]
    return report


def load_checkpoint(model: Detector, path: str | Path, expert_init: tuple[ExpertInit, ExpertInit] | None = None,
                    class_map: dict[str, str] | None = None, class_names: list[str] | None = None) -> LoadReport:
    """Load a published RT-DETR checkpoint (``ema.module`` or ``model`` entry; RT-DETR v1 or RT-DETRv2 layout)
    or one of ours (``expert_init``: see :func:`load_state_dict_into`). ``class_map`` (checkpoint class ->
    our class) keeps the checkpoint's class-head rows of those classes; ``class_names`` are ours, in label
    order; the checkpoint's are :func:`checkpoint_class_names`."""
    top, state = _read_weights_file(path)
    file_classes, file_classes_from = checkpoint_class_names(top, state, str(path))
    return load_state_dict_into(model, state, str(path), expert_init, class_map=class_map, file_classes=file_classes,
                                model_classes=list(class_names) if class_names is not None else None,
                                file_classes_from=file_classes_from)


def load_configured_checkpoint(model: Detector, cfg: Config, class_names: list[str] | None = None
                               ) -> LoadReport | None:
    """Load ``model.checkpoint`` as ``cfg`` says (experts, ``model.class_map``); ``class_names`` are ours (by
    default ``data.classes``). None without a checkpoint; a :class:`ConfigError` for a class map without one."""
    m = cfg.model
    if m.class_map and not m.checkpoint:
        raise ConfigError(f"model.class_map: {m.class_map} is set, but model.checkpoint is not: the map says which "
                          "class rows of the checkpoint to keep; give model.checkpoint=FILE or drop the map")
    if not m.checkpoint:
        return None
    if class_names is None and cfg.data.classes is not None:
        if len(cfg.data.classes) == m.num_classes:
            class_names = cfg.data.classes
        elif m.class_map:   # a run sets num_classes from the data; a model built by hand may not have
            raise ConfigError(f"model.class_map: data.classes names {len(cfg.data.classes)} classes, but "
                              f"model.num_classes is {m.num_classes}: set model.num_classes={len(cfg.data.classes)}")
    return load_checkpoint(model, m.checkpoint, expert_init=expert_inits(cfg), class_map=m.class_map,
                           class_names=class_names)


def load_backbone_weights(model: Detector, path: str | Path) -> LoadReport:
    """Load PResNet-vd ImageNet weights (keys without the ``backbone.`` prefix; any ``fc``/classifier
    keys are ignored) into ``model.backbone`` with strict matching of the backbone's keys."""
    state = _read_state_dict(path)
    state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "classifier."))}
    result = model.backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not fit PResNet-{model.backbone.depth}: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    report = LoadReport(str(path), loaded=[f"backbone.{k}" for k in state])
    return report


__all__ = ["Detector", "build_model", "load_checkpoint", "load_backbone_weights", "load_state_dict_into",
           "load_configured_checkpoint", "checkpoint_class_names", "class_rows", "expert_inits",
           "from_rtdetrv2_layout", "is_rtdetrv2_layout",
           "LoadReport", "ConfigError"]
