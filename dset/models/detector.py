"""The detector (backbone -> hybrid encoder -> decoder), ``build_model(cfg)`` and weight loading.

With the three DSET switches off, ``build_model`` gives the reference RT-DETR: same modules, same
``state_dict`` keys and shapes, same outputs (checked against ``shared/parity``).
"""

from __future__ import annotations

import re
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config, ConfigError, load_config
from .backbone import PResNet
from .decoder import RTDETRDecoder
from .encoder import HybridEncoder
from .memory_pruning import MemoryPruner
from .moe import UPCYCLED_EXPERT_PARAMS, ExpertInit, MoEFFN
from .pruning import ScheduledPruner, TokenPruner


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
        if m.checkpoint:
            load_checkpoint(model, m.checkpoint, expert_init=expert_inits(cfg))
    return model


# ------------------------------------------------------------------------------------ weight loading
CLASS_HEAD_PREFIXES = ("decoder.enc_score_head.", "decoder.dec_score_head.", "decoder.denoising_class_embed.")


@dataclass
class LoadReport:
    """What a weight file did to a model: which parameter names it set, and what it could not."""

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped_class_heads: list[str] = field(default_factory=list)
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
        if self.skipped_class_heads:
            parts.append(f"skipped {len(self.skipped_class_heads)} class-head tensors (different num_classes)")
        if self.new_components:
            parts.append(f"{len(self.new_components)} new tensors keep their initialisation")
        return "; ".join(parts)


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


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (downloads are not possible here: place the file locally)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
    return from_rtdetrv2_layout(obj)


def expert_inits(cfg: Config) -> tuple[ExpertInit, ExpertInit]:
    """``(encoder, decoder)``: how ``cfg``'s MoE layers make their experts from a dense checkpoint's FFNs."""
    return ExpertInit.of(cfg.model.encoder_moe), ExpertInit.of(cfg.model.decoder_moe)


def load_state_dict_into(model: Detector, state: dict[str, torch.Tensor], source: str = "state_dict",
                         expert_init: tuple[ExpertInit, ExpertInit] | None = None) -> LoadReport:
    """Load an RT-DETR-layout state_dict into ``model`` with strict key matching.

    - Every key of the file must exist in the model, with the same shape, except the class heads when
      ``num_classes`` differs (skipped, and a warning says so) and dense FFN keys of layers that are
      MoE in this model: their experts are made from them as ``expert_init`` (encoder, decoder) says
      (:meth:`MoEFFN.init_experts_from_dense`; None: as ``model.config`` says).
    - Every key of the model must come from the file, except the DSET components (routers, experts
      that are not plain copies, the importance predictor), which keep their initialisation.
    Anything else is an error listing the offending keys.
    """
    if expert_init is None and hasattr(model, "config"):
        expert_init = expert_inits(model.config)
    report = LoadReport(source)
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
            else:
                warnings.warn(f"{source}: {layer} FFN width {w1.shape[0]} != expert_hidden_dim {moe.hidden_dim}; "
                              "experts keep their random initialisation", stacklevel=2)
    unexpected, mismatched, to_load = [], [], {}
    for k, v in state.items():
        if k not in model_state:
            unexpected.append(k)
        elif tuple(model_state[k].shape) != tuple(v.shape):
            if k.startswith(CLASS_HEAD_PREFIXES):
                report.skipped_class_heads.append(k)
            else:
                mismatched.append(f"{k}: file {tuple(v.shape)} vs model {tuple(model_state[k].shape)}")
        else:
            to_load[k] = v
    dset_markers = (".moe.", ".token_pruner.", ".memory_pruner.")
    missing = [k for k in model_state if k not in to_load and k not in report.skipped_class_heads
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
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    copied = {f"{u}.{p}" for u in report.upcycled for p in UPCYCLED_EXPERT_PARAMS}  # routers stay new
    report.new_components = [k for k in model_state if k not in to_load and k not in report.skipped_class_heads
                             and k not in copied]
    if report.skipped_class_heads:
        warnings.warn(f"{source}: class heads not loaded (num_classes differs): "
                      f"{sorted({k.rsplit('.', 1)[0] for k in report.skipped_class_heads})}", stacklevel=2)
    return report


def load_checkpoint(model: Detector, path: str | Path,
                    expert_init: tuple[ExpertInit, ExpertInit] | None = None) -> LoadReport:
    """Load a published RT-DETR checkpoint (``ema.module`` or ``model`` entry; RT-DETR v1 or RT-DETRv2 layout)
    or one of ours (``expert_init``: see :func:`load_state_dict_into`)."""
    return load_state_dict_into(model, _read_state_dict(path), str(path), expert_init)


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
           "expert_inits",
           "from_rtdetrv2_layout", "is_rtdetrv2_layout",
           "LoadReport", "ConfigError"]
