"""Pictures of what a detector does on a few fixed validation images: ``draw_pictures(model, data, out_dir)``.

The first ``num_images`` images of the evaluated validation split, so that every variant of a study shows the
same ones: the detections beside the ground truth, and with the DSET switches the kept tokens and the experts'
routing, as PNGs without metadata (the same model and data give the same bytes) under ``<out_dir>/pictures/``,
described by ``pictures.json``. The files and the index's format: docs/runs.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageFont
from torch.utils.data import Dataset, Subset
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .data.loaders import DataBundle
from .models.box_ops import box_cxcywh_to_xyxy
from .models.detector import Detector
from .models.postprocess import PostProcessor
from .run_folder import RunFolder

__all__ = ["draw_pictures", "trace_image", "ImageTrace", "shade_pruned_tokens", "colour_token_experts",
           "palette_colour", "PICTURE_KINDS", "PALETTE", "LONG_SIDE"]

PICTURE_KINDS = ("detections", "kept_tokens", "encoder_experts", "decoder_experts")
SCHEMA_VERSION = 1
LONG_SIDE = 384          # px: the longer side of every drawn image
MAX_BOXES = 100          # detections drawn at most (COCO's maxDets), so that an untrained model stays readable
FALLBACK_TOP = 3         # shown when no detection reaches the threshold
# the report's confusion matrices count detections from the same score
# (analysis.compute.detection_errors.SCORE_THRESHOLD); at 0.5 the CPU budget's short fine-tuning left every
# variant below the threshold on the default grid's images
SCORE_THRESHOLD = 0.3
FONT_SIZE = 12
BOX_WIDTH = 2
PANEL_GAP = 8            # px of white between side-by-side panels
PRUNED_SHADE = ("#000000", 0.6)   # colour and opacity over pruned tokens
EXPERT_ALPHA = 0.55               # opacity of the expert colours over the image
# fixed colours for classes and experts (index modulo the length): tab10, then darker tab20b/c tones; all
# dark enough for white label text
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
           "#756bb1", "#636363")


def palette_colour(index: int) -> str:
    """The fixed colour of class or expert ``index`` (``#rrggbb``)."""
    return PALETTE[int(index) % len(PALETTE)]


@lru_cache(maxsize=1)
def _font_path() -> str | None:
    """DejaVu Sans as shipped with matplotlib (a dependency): the same glyphs, hence the same bytes, on every
    machine. None: PIL's built-in font."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(path) if path.is_file() else None


def _font_kwargs() -> dict:
    path = _font_path()
    return {"font": path, "font_size": FONT_SIZE} if path else {}


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = _font_path()
    return ImageFont.truetype(path, FONT_SIZE) if path else ImageFont.load_default()


def _text_size(text: str) -> tuple[int, int]:
    """Width and height in pixels of ``text`` (lines split at newlines) as draw_bounding_boxes writes it."""
    from PIL import ImageDraw

    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=_font())
    return math.ceil(right), math.ceil(bottom)


# ------------------------------------------------------------------------------------------ what the model did
@dataclass
class ImageTrace:
    """What the model computed on one image in eval mode.

    ``logits [Q, C]``, ``boxes [Q, 4]`` (normalised cx, cy, w, h): the final prediction. ``grid`` (h, w): the
    AIFI layer's token grid (stride 32). ``kept [h, w]`` (bool): the tokens token pruning kept (None without
    pruning). ``encoder_experts``: per AIFI MoE layer, ``[h, w]`` top-1 expert per token, -1 where a token was
    pruned (not routed). ``decoder_experts [Q]``: top-1 expert per query in the decoder layer whose output is
    the prediction (None without decoder MoE)."""

    logits: torch.Tensor
    boxes: torch.Tensor
    grid: tuple[int, int]
    kept: torch.Tensor | None = None
    encoder_experts: list[torch.Tensor] = field(default_factory=list)
    decoder_experts: torch.Tensor | None = None


def _record_top1(store: dict, key: str):
    """Forward hook for an ``MoEFFN``: store the top-1 expert of every token of its input, shape ``x.shape[:-1]``."""

    def hook(module, inputs, output):
        x = inputs[0]
        top_i = module.route(x.reshape(-1, module.d_model))[1]
        store[key] = top_i[:, 0].reshape(x.shape[:-1]).cpu()

    return hook


def _prediction_decoder_layer(model: Detector) -> int:
    """Index of the decoder layer whose output is the eval prediction."""
    return model.decoder.decoder.eval_idx


@torch.no_grad()
def trace_image(model: Detector, image: torch.Tensor) -> ImageTrace:
    """Run ``model`` (put in eval mode for the call) on one ``[3, H, W]`` image and record its prediction, the
    tokens it kept and its routing (see :class:`ImageTrace`)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"trace_image expects one [3, H, W] image, got shape {tuple(image.shape)}")
    encoder_moes = model.encoder_moe_layers()
    if encoder_moes and len(model.encoder.use_encoder_idx) != 1:
        raise ValueError("expert pictures support one AIFI level (encoder.use_encoder_idx), got "
                         f"{model.encoder.use_encoder_idx}")
    routes: dict[str, torch.Tensor] = {}
    handles = [moe.register_forward_hook(_record_top1(routes, f"encoder{i}")) for i, moe in enumerate(encoder_moes)]
    decoder_layer = model.decoder.decoder.layers[_prediction_decoder_layer(model)]
    if hasattr(decoder_layer, "moe"):
        handles.append(decoder_layer.moe.register_forward_hook(_record_top1(routes, "decoder")))
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        out = model(image.unsqueeze(0).to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    stride = model.encoder.feat_strides[model.encoder.use_encoder_idx[0]]
    grid = (image.shape[1] // stride, image.shape[2] // stride)
    n_tokens = grid[0] * grid[1]
    pruning = model.encoder.last_pruning
    kept = None
    keep_index = torch.arange(n_tokens)
    if pruning is not None:
        grid = tuple(int(v) for v in pruning["spatial_shape"])
        n_tokens = grid[0] * grid[1]
        keep_index = pruning["keep_index"][0].cpu()
        kept = torch.zeros(n_tokens, dtype=torch.bool)
        kept[keep_index] = True
        kept = kept.reshape(grid)
    encoder_experts = []
    for i in range(len(encoder_moes)):
        top1 = routes[f"encoder{i}"][0]
        if top1.numel() != keep_index.numel():
            raise RuntimeError(f"AIFI MoE layer {i} routed {top1.numel()} tokens, but {keep_index.numel()} of the "
                               f"{grid[0]}x{grid[1]} grid went through the layer")
        full = torch.full((n_tokens,), -1, dtype=torch.long)
        full[keep_index] = top1
        encoder_experts.append(full.reshape(grid))
    decoder_experts = routes["decoder"][0] if "decoder" in routes else None
    return ImageTrace(logits=out["pred_logits"][0].float().cpu(), boxes=out["pred_boxes"][0].float().cpu(),
                      grid=grid, kept=kept, encoder_experts=encoder_experts, decoder_experts=decoder_experts)


# ----------------------------------------------------------------------------------------------------- drawing
def _cells_to_pixels(cells: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A ``[h, w]`` grid stretched over a ``height x width`` image (the model saw the whole image resized to a
    square, so cell (i, j) covers the same fraction of the original image)."""
    return F.interpolate(cells[None, None].float(), size=(height, width), mode="nearest")[0, 0]


def shade_pruned_tokens(image: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``image`` (uint8 ``[3, H, W]``) with the cells of the ``[h, w]`` token grid where ``kept`` is False
    shaded; kept cells are left as they are."""
    if kept.dim() != 2 or kept.dtype != torch.bool:
        raise ValueError(f"kept must be a [h, w] bool grid, got {kept.dtype} of shape {tuple(kept.shape)}")
    pruned = _cells_to_pixels(~kept, image.shape[1], image.shape[2]).bool()
    colour, alpha = PRUNED_SHADE
    return draw_segmentation_masks(image, pruned, alpha=alpha, colors=colour)


def colour_token_experts(image: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``image`` (uint8 ``[3, H, W]``) with each cell of the ``[h, w]`` grid ``experts`` coloured by its expert
    (``palette_colour(e)``, one mask per expert); cells holding -1 (not routed) stay uncoloured."""
    if experts.dim() != 2:
        raise ValueError(f"experts must be a [h, w] grid, got shape {tuple(experts.shape)}")
    if int(experts.max()) >= num_experts or int(experts.min()) < -1:
        raise ValueError(f"experts must be in [-1, {num_experts - 1}], got [{int(experts.min())}, "
                         f"{int(experts.max())}]")
    per_pixel = _cells_to_pixels(experts, image.shape[1], image.shape[2]).long()
    masks = torch.stack([per_pixel == e for e in range(num_experts)])
    return draw_segmentation_masks(image, masks, alpha=EXPERT_ALPHA,
                                   colors=[palette_colour(e) for e in range(num_experts)])


def _draw_boxes(image: torch.Tensor, boxes: torch.Tensor, labels: list[str] | None, colours: list[str]) -> torch.Tensor:
    if boxes.shape[0] == 0:
        return image
    h, w = image.shape[1:]
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    return draw_bounding_boxes(image, boxes, labels=labels, colors=colours, width=BOX_WIDTH, fill_labels=True,
                               label_colors="white", **_font_kwargs())


def _wrap(text: str, max_width: int) -> str:
    """``text`` with its lines broken at spaces so that each fits ``max_width`` pixels (a single word longer
    than that stays whole)."""
    out = []
    for line in text.split("\n"):
        current = ""
        for word in line.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and _text_size(candidate)[0] > max_width:
                out.append(current)
                current = word
            else:
                current = candidate
        out.append(current)
    return "\n".join(out)


def _chip_strip(width: int, chips: list[tuple[str, str]], filled: bool) -> torch.Tensor:
    """A white strip ``width`` px wide holding text chips ``(text, colour)`` left to right, wrapped onto as many
    rows as they need. ``filled``: white text on the chip's colour (a legend); else black text and an invisible
    white outline (a caption)."""
    pad = 4   # draw_bounding_boxes writes the text 2 px (box width + 1) inside the box's corner
    chips = [(_wrap(text, width - 2 * pad), colour) for text, colour in chips]
    boxes, x, y, row_height = [], 0, 0, 0
    for text, _ in chips:
        text_w, text_h = _text_size(text)
        chip_w, chip_h = text_w + 2 * pad, text_h + 2 * pad
        if x and x + chip_w > width:
            x, y, row_height = 0, y + row_height + 2, 0
        boxes.append([x, y, min(width - 1, x + chip_w), y + chip_h])
        row_height = max(row_height, chip_h)
        x += chip_w + 4
    strip = torch.full((3, y + row_height + 2, width), 255, dtype=torch.uint8)
    return draw_bounding_boxes(strip, torch.tensor(boxes, dtype=torch.float32), labels=[t for t, _ in chips],
                               colors=[c for _, c in chips], width=1, fill_labels=filled,
                               label_colors="white" if filled else "black", **_font_kwargs())


def _panel(image: torch.Tensor, caption: str, legend: list[tuple[str, str]] | None = None) -> torch.Tensor:
    """The image under its caption (and a legend of colour chips)."""
    width = image.shape[2]
    parts = [_chip_strip(width, [(caption, "white")], filled=False)]
    if legend:
        parts.append(_chip_strip(width, legend, filled=True))
    return torch.cat([*parts, image], dim=1)


def _side_by_side(panels: list[torch.Tensor]) -> torch.Tensor:
    height = max(p.shape[1] for p in panels)
    padded = []
    for i, p in enumerate(panels):
        if i:
            padded.append(torch.full((3, height, PANEL_GAP), 255, dtype=torch.uint8))
        padded.append(F.pad(p, (0, 0, 0, height - p.shape[1]), value=255))
    return torch.cat(padded, dim=2)


def _save_png(image: torch.Tensor, path: Path) -> None:
    # PIL writes no time or text chunk unless asked to: identical pixels give identical bytes
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")


# ---------------------------------------------------------------------------------------------------- pictures
def _dataset_index(dataset: Dataset, index: int) -> int:
    """The index in the underlying ``CocoDetection`` of item ``index`` of ``dataset`` (nested Subsets)."""
    while isinstance(dataset, Subset):
        index = int(dataset.indices[index])
        dataset = dataset.dataset
    return index


def _shown_image(pil: Image.Image) -> tuple[torch.Tensor, float]:
    """The original image resized so that its longer side is LONG_SIDE px (uint8 ``[3, H, W]``), and the scale."""
    w, h = pil.size
    scale = LONG_SIDE / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return pil_to_tensor(pil.resize(size, Image.Resampling.BILINEAR)), scale


def _rounded_box(box: torch.Tensor) -> list[float]:
    return [round(float(v), 1) for v in box]


def _select_detections(trace: ImageTrace, image_size_wh: tuple[int, int], score_threshold: float
                       ) -> tuple[dict[str, torch.Tensor], bool]:
    """The detections to draw (boxes in original pixels): those with score >= threshold (at most MAX_BOXES),
    else the FALLBACK_TOP best; and whether any reached the threshold. Non-finite ones are left out."""
    num_classes = trace.logits.shape[-1]
    post = PostProcessor(num_classes, num_top_queries=MAX_BOXES)
    res = post({"pred_logits": trace.logits[None], "pred_boxes": trace.boxes[None]},
               torch.tensor([image_size_wh]))[0]
    finite = torch.isfinite(res["boxes"]).all(dim=1) & torch.isfinite(res["scores"])
    res = {k: v[finite] for k, v in res.items()}
    passed = res["scores"] >= score_threshold   # scores come sorted, best first
    if bool(passed.any()):
        return {k: v[passed] for k, v in res.items()}, True
    return {k: v[:FALLBACK_TOP] for k, v in res.items()}, False


def _switches(model: Detector) -> dict[str, bool]:
    return {"encoder_moe": bool(model.encoder_moe_layers()), "token_pruning": model.token_pruner is not None,
            "decoder_moe": bool(model.decoder_moe_layers())}


def _remove_old_pictures(run: RunFolder) -> None:
    """An earlier run in the same folder (more images, other switches) must not leave pictures behind."""
    for kind in PICTURE_KINDS:
        for old in run.pictures.glob(f"{kind}_*.png"):
            old.unlink()
    run.pictures_index.unlink(missing_ok=True)


def _check_draw_arguments(model: Detector, data: DataBundle, num_images: int, score_threshold: float) -> list[str]:
    """The data set's category names, once the arguments of :func:`draw_pictures` are known to fit."""
    if not isinstance(model, Detector):
        raise TypeError(f"draw_pictures needs a dset Detector, got {type(model).__name__}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be an integer >= 0, got {num_images!r}")
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    names = list(data.category_names)
    if model.decoder.num_classes != len(names):
        raise ValueError(f"the model predicts {model.decoder.num_classes} classes but the data set has {len(names)} "
                         f"categories ({', '.join(names)}): draw a model trained on this data set")
    return names


class _PictureFolder:
    """The pictures folder being written: the files so far and their ``pictures.json`` entries."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: list[Path] = []
        self.entries: list[dict] = []

    def save(self, kind: str, image_id: int, picture: torch.Tensor, caption: str, **details) -> None:
        path = self.folder / f"{kind}_{image_id}.png"
        _save_png(picture, path)
        self.written.append(path)
        self.entries.append({"file": path.name, "kind": kind, "image_id": image_id, "caption": caption, **details})


@dataclass
class _Scene:
    """One validation image as its pictures show it: boxes are in original pixels, ``shown`` is the image
    at display size (``scale`` display pixels per original pixel)."""

    image_id: int
    input_size: list[int]            # [h, w] of the model's input
    size: list[int]                  # [w, h] of the original image
    shown: torch.Tensor
    scale: float
    trace: ImageTrace
    gt_boxes: torch.Tensor
    gt_labels: list[str]
    gt_colours: list[str]
    dets: dict[str, torch.Tensor]
    passed: bool                     # whether any detection reached the score threshold
    det_text: list[str]
    detections: list[dict]           # the detections as pictures.json records them
    pred_caption: str


def _scene(model: Detector, data: DataBundle, i: int, names: list[str], score_threshold: float) -> _Scene:
    """Run the model on validation item ``i`` and gather what its pictures show."""
    model_input, target = data.val[i]
    image_id = int(target["image_id"])
    index = _dataset_index(data.val, i)
    if data.val_dataset.image_ids[index] != image_id:
        raise ValueError(f"validation item {i} is image {image_id}, but data.val_dataset[{index}] is image "
                         f"{data.val_dataset.image_ids[index]}: val must be (a Subset of) val_dataset")
    original = data.val_dataset.load_image(index)
    w, h = original.size
    shown, scale = _shown_image(original)
    trace = trace_image(model, model_input)

    # ground truth: normalised boxes of the resized image = the same fractions of the original
    gt_boxes = box_cxcywh_to_xyxy(target["boxes"].float()) * torch.tensor([w, h, w, h], dtype=torch.float32)
    dets, passed = _select_detections(trace, (w, h), score_threshold)
    det_labels = [names[int(c)] for c in dets["labels"]]
    det_text = [f"{n} {float(s):.2f}" for n, s in zip(det_labels, dets["scores"])]
    detections = [{"label": n, "score": round(float(s), 4), "box": _rounded_box(b), "query": int(q)}
                  for n, s, b, q in zip(det_labels, dets["scores"], dets["boxes"], dets["queries"])]
    pred_caption = (f"predictions, score >= {score_threshold:.2f} ({len(det_text)})" if passed else
                    f"no prediction >= {score_threshold:.2f}: top {len(det_text)} shown")
    return _Scene(image_id=image_id, input_size=[int(model_input.shape[1]), int(model_input.shape[2])],
                  size=[w, h], shown=shown, scale=scale, trace=trace, gt_boxes=gt_boxes,
                  gt_labels=[names[int(c)] for c in target["labels"]],
                  gt_colours=[palette_colour(int(c)) for c in target["labels"]], dets=dets, passed=passed,
                  det_text=det_text, detections=detections, pred_caption=pred_caption)


def _save_detections(pictures: _PictureFolder, s: _Scene) -> None:
    det_colours = [palette_colour(int(c)) for c in s.dets["labels"]]
    ground_truth = [{"label": n, "box": _rounded_box(b)} for n, b in zip(s.gt_labels, s.gt_boxes)]
    gt_caption = f"image {s.image_id}: ground truth ({len(s.gt_labels)})"
    gt_panel = _panel(_draw_boxes(s.shown, s.gt_boxes * s.scale, s.gt_labels, s.gt_colours), gt_caption)
    pred_panel = _panel(_draw_boxes(s.shown, s.dets["boxes"] * s.scale, s.det_text, det_colours), s.pred_caption)
    pictures.save("detections", s.image_id, _side_by_side([gt_panel, pred_panel]), f"{gt_caption}; {s.pred_caption}",
                  image_size=s.size, threshold_passed=s.passed, ground_truth=ground_truth, detections=s.detections)


def _save_kept_tokens(pictures: _PictureFolder, s: _Scene) -> None:
    trace = s.trace
    k, n = int(trace.kept.sum()), trace.kept.numel()
    caption = (f"image {s.image_id}: token pruning kept {k} of {n} tokens ({100 * k / n:.0f}%)\n"
               f"{trace.grid[0]}x{trace.grid[1]} stride-32 grid; shaded: pruned")
    picture = _draw_boxes(shade_pruned_tokens(s.shown, trace.kept), s.gt_boxes * s.scale, None, s.gt_colours)
    pictures.save("kept_tokens", s.image_id, _panel(picture, caption), caption.replace("\n", "; "),
                  image_size=s.size, grid=list(trace.grid), tokens=n, kept_tokens=k)


def _save_encoder_experts(pictures: _PictureFolder, s: _Scene, num_experts: int) -> None:
    legend = [(f"E{e}", palette_colour(e)) for e in range(num_experts)]
    panels, counts = [], []
    for layer, experts in enumerate(s.trace.encoder_experts):
        counts.append([int((experts == e).sum()) for e in range(num_experts)])
        unrouted = int((experts < 0).sum())
        caption = (f"image {s.image_id}: AIFI layer {layer}, top-1 expert per token"
                   + (f"\n{unrouted} pruned tokens not routed (uncoloured)" if unrouted else ""))
        panels.append(_panel(colour_token_experts(s.shown, experts, num_experts), caption, legend))
    routed = int((s.trace.encoder_experts[0] >= 0).sum())
    pictures.save("encoder_experts", s.image_id, _side_by_side(panels),
                  f"image {s.image_id}: top-1 encoder expert of each of the {routed} routed AIFI tokens",
                  image_size=s.size, num_experts=num_experts, grid=list(s.trace.grid), routed_tokens=routed,
                  tokens_per_expert=counts)


def _save_decoder_experts(pictures: _PictureFolder, s: _Scene, num_experts: int, decoder_layer: int) -> None:
    experts = [int(s.trace.decoder_experts[int(q)]) for q in s.dets["queries"]]
    legend = [(f"E{e}", palette_colour(e)) for e in range(num_experts)]
    text = [f"E{e} {t}" for e, t in zip(experts, s.det_text)]
    caption = (f"image {s.image_id}: decoder layer {decoder_layer}, top-1 expert of each detection's query"
               + ("" if s.passed else f"\n{s.pred_caption}"))
    picture = _draw_boxes(s.shown, s.dets["boxes"] * s.scale, text, [palette_colour(e) for e in experts])
    pictures.save("decoder_experts", s.image_id, _panel(picture, caption, legend), caption.replace("\n", "; "),
                  image_size=s.size, num_experts=num_experts, decoder_layer=decoder_layer,
                  detections=[{**d, "expert": e} for d, e in zip(s.detections, experts)])


def draw_pictures(model: Detector, data: DataBundle, out_dir: str | Path, num_images: int = 4,
                  score_threshold: float = SCORE_THRESHOLD, epoch: int | None = None) -> list[Path]:
    """Draw the pictures of the first ``num_images`` validation images into ``<out_dir>/pictures/`` (see
    docs/runs.md) and return the files written, ``pictures.json`` last. ``epoch``: the training epoch of
    the weights, recorded in ``pictures.json``. Earlier pictures in that folder are removed first."""
    names = _check_draw_arguments(model, data, num_images, score_threshold)
    run = RunFolder(out_dir)
    folder = run.pictures
    folder.mkdir(parents=True, exist_ok=True)
    _remove_old_pictures(run)
    pictures = _PictureFolder(folder)
    switches = _switches(model)
    enc_experts = model.encoder_moe_layers()[0].num_experts if switches["encoder_moe"] else None
    dec_experts = model.decoder_moe_layers()[0].num_experts if switches["decoder_moe"] else None
    decoder_layer = _prediction_decoder_layer(model)
    image_ids: list[int] = []
    input_size = None
    for i in range(min(num_images, len(data.val))):
        scene = _scene(model, data, i, names, score_threshold)
        input_size = scene.input_size
        image_ids.append(scene.image_id)
        _save_detections(pictures, scene)
        if scene.trace.kept is not None:
            _save_kept_tokens(pictures, scene)
        if scene.trace.encoder_experts:
            _save_encoder_experts(pictures, scene, enc_experts)
        if scene.trace.decoder_experts is not None:
            _save_decoder_experts(pictures, scene, dec_experts, decoder_layer)

    config = getattr(model, "config", None)
    index = {
        "schema": SCHEMA_VERSION,
        "model": config.model.name if config is not None else None,
        "epoch": epoch,
        "variant": switches,
        "score_threshold": float(score_threshold),
        "input_size": input_size,
        "long_side": LONG_SIDE,
        "image_ids": image_ids,
        "class_colours": {n: palette_colour(c) for c, n in enumerate(names)},
    }
    num_experts = max(enc_experts or 0, dec_experts or 0)
    if num_experts:
        index["expert_colours"] = {f"E{e}": palette_colour(e) for e in range(num_experts)}
    index["pictures"] = pictures.entries
    index_path = run.pictures_index
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return [*pictures.written, index_path]
