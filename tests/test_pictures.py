"""Pictures of a run (dset/pictures.py): what they show is what the model did, they are reproducible, the
engine draws them at the end of a run and studies log them to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_HEADS, one_thread_for_module
from PIL import Image, ImageColor

import dset
from dset import metric_names as M
from dset.data.loaders import build_datasets
from dset.models.encoder import sincos_position_embedding_2d
from dset.pictures import (
    EXPERT_ALPHA,
    LONG_SIDE,
    PRUNED_SHADE,
    colour_token_experts,
    draw_pictures,
    palette_colour,
    shade_pruned_tokens,
    trace_image,
)

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_for_module)

# 96 px synthetic images seen at 128 px: a 4 x 4 stride-32 grid, 16 tokens; pruning keeps 8 of them from epoch 0
DATA = ["data.synthetic.num_train=2", "data.synthetic.num_val=3", "data.synthetic.image_size=96",
        "data.image_size=128", "model.eval_spatial_size=[128,128]"]
MODEL = ["model.num_classes=4", "model.decoder.num_queries=20", "model.decoder.num_denoising=0", *SMALL_HEADS,
         "model.token_pruning.keep_ratio=0.5", "model.token_pruning.min_tokens=1",
         "model.token_pruning.warmup_epochs=0", "model.token_pruning.ramp_epochs=0",
         "model.memory_pruning.warmup_epochs=0"]   # every epoch eligible as the reported checkpoint
SWITCHES = ("encoder_moe", "token_pruning", "decoder_moe")


def dset_model(*on: str):
    """dset_r18 (small) with only the named switches on."""
    off = [f"model.{s}.enabled=false" for s in SWITCHES if s not in on]
    return dset.build_model("dset_r18", MODEL + off, load_weights=False).eval()


@pytest.fixture(scope="module")
def data(module_tmp):
    root = module_tmp("synthetic")
    return build_datasets(dset.load_config("dset_r18", DATA + [f"data.synthetic.root={root}"]), train=False)


def grey(height: int, width: int, value: int = 200) -> torch.Tensor:
    return torch.full((3, height, width), value, dtype=torch.uint8)


def blended(value: int, colour: str, alpha: float) -> list[int]:
    """What draw_segmentation_masks makes of a grey pixel under ``colour`` at ``alpha``."""
    return [int(value * (1 - alpha) + c * alpha) for c in ImageColor.getrgb(colour)]


def cell_centres(grid: tuple[int, int], height: int, width: int):
    """(row, column, y, x) of the pixel at the centre of every token cell."""
    h, w = grid
    for i in range(h):
        for j in range(w):
            yield i, j, int((i + 0.5) * height / h), int((j + 0.5) * width / w)


def aifi_inputs(model, image):
    """The stride-32 tokens and their position embedding, computed here without the encoder's forward."""
    feats = model.backbone(image[None])
    level = model.encoder.use_encoder_idx[0]
    proj = model.encoder.input_proj[level](feats[level])
    _, c, h, w = proj.shape
    pos = sincos_position_embedding_2d(w, h, c, model.encoder.pe_temperature)
    return proj.flatten(2).permute(0, 2, 1), pos, (h, w)


# ------------------------------------------------------------------------------------ what is drawn
@torch.no_grad()
def test_kept_token_grid_is_what_the_pruner_keeps(data):
    model = dset_model("token_pruning")
    image = data.val[0][0]
    trace = trace_image(model, image)

    tokens, pos, grid = aifi_inputs(model, image)
    _, _, keep_index, _ = model.token_pruner.select(tokens, pos)
    assert trace.grid == grid == (4, 4)
    assert int(trace.kept.sum()) == model.token_pruner.num_kept(16) == 8
    assert sorted(trace.kept.flatten().nonzero().flatten().tolist()) == keep_index[0].tolist()
    assert keep_index[0].tolist() != list(range(8))        # not trivially the first tokens

    # drawn: kept cells clear, pruned cells shaded (a 96 x 64 image: cells 24 x 16 px)
    drawn = shade_pruned_tokens(grey(96, 64), trace.kept)
    colour, alpha = PRUNED_SHADE
    for i, j, y, x in cell_centres(grid, 96, 64):
        expected = [200] * 3 if trace.kept[i, j] else blended(200, colour, alpha)
        assert drawn[:, y, x].tolist() == expected, (i, j)
    assert (drawn[0] == 200).sum() == 8 * 24 * 16


@torch.no_grad()
def test_encoder_expert_map_is_the_routers_top1_and_pruned_tokens_stay_uncoloured(data):
    model = dset_model("encoder_moe", "token_pruning")
    image = data.val[1][0]
    trace = trace_image(model, image)

    # the AIFI layer by hand up to its FFN: pruner, self-attention, first norm, then the MoE's router
    tokens, pos, grid = aifi_inputs(model, image)
    kept, kept_pos, keep_index, _ = model.token_pruner.select(tokens, pos)
    layer = model.encoder.encoder[0].layers[0]
    q = kept + kept_pos
    x = layer.norm1(kept + layer.self_attn(q, q, value=kept, need_weights=False)[0])
    top1 = layer.moe.route(x.reshape(-1, x.shape[-1]))[1][:, 0]
    expected = torch.full((16,), -1, dtype=torch.long)
    expected[keep_index[0]] = top1
    assert len(trace.encoder_experts) == 1
    assert trace.encoder_experts[0].flatten().tolist() == expected.tolist()
    assert (expected == -1).sum() == 8 and len(set(top1.tolist())) >= 2   # several experts: colours can be wrong

    num_experts = layer.moe.num_experts
    drawn = colour_token_experts(grey(64, 64), trace.encoder_experts[0], num_experts)
    for i, j, y, x in cell_centres(grid, 64, 64):
        e = int(expected[i * 4 + j])
        assert drawn[:, y, x].tolist() == ([200] * 3 if e < 0 else blended(200, palette_colour(e), EXPERT_ALPHA))


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.info.keys() <= {"dpi"} and not im.text   # no metadata: reproducible bytes
        return np.asarray(im.convert("RGB"))


@torch.no_grad()
def test_decoder_boxes_are_coloured_by_the_prediction_layers_top1_expert(data, tmp_path, monkeypatch):
    model = dset_model("decoder_moe")
    layers = model.decoder.decoder.layers
    inputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):   # record each decoder MoE's input, independently of the pictures' hooks
        def recording(x, _i=i, _forward=layer.moe.forward):
            inputs[_i] = x.detach().clone()
            return _forward(x)
        monkeypatch.setattr(layer.moe, "forward", recording)

    index = _index(draw_pictures(model, data, tmp_path, num_images=1, score_threshold=1.0))
    final = model.decoder.decoder.eval_idx
    assert final == len(layers) - 1 == 2
    top1 = {i: layers[i].moe.route(x.reshape(-1, x.shape[-1]))[1][:, 0] for i, x in inputs.items()}
    assert not torch.equal(top1[final], top1[0])    # the layer matters

    (picture,) = [p for p in index["pictures"] if p["kind"] == "decoder_experts"]
    assert picture["decoder_layer"] == final and picture["num_experts"] == layers[0].moe.num_experts
    # nothing reaches a threshold of 1.0: the three best are shown, and the caption says so
    dets = picture["detections"]
    assert len(dets) == 3 and "top 3 shown" in picture["caption"]
    assert [d["expert"] for d in dets] == [int(top1[final][d["query"]]) for d in dets]
    # the last box drawn is on top: its corner has its expert's colour (the JSON's box is rounded: +-1 px)
    pixels = _png(tmp_path / "pictures" / picture["file"])
    scale = LONG_SIDE / max(picture["image_size"])
    x0, y0 = (min(LONG_SIDE - 2, max(1, int(v * scale))) for v in dets[-1]["box"][:2])
    top = pixels.shape[0] - LONG_SIDE     # caption and legend above the image
    corner = {tuple(v) for v in pixels[top + y0 - 1:top + y0 + 2, x0 - 1:x0 + 2].reshape(-1, 3).tolist()}
    assert ImageColor.getrgb(palette_colour(dets[-1]["expert"])) in corner
    assert index["expert_colours"] == {f"E{e}": palette_colour(e) for e in range(6)}


def _index(paths: list[Path]) -> dict:
    assert paths[-1].name == "pictures.json"
    return json.loads(paths[-1].read_text())


def test_a_dense_rtdetr_gets_only_detection_pictures(data, tmp_path):
    model = dset.build_model("rtdetr_r18", MODEL, load_weights=False)
    paths = draw_pictures(model, data, tmp_path, num_images=2, score_threshold=0.0)
    ids = data.val_image_ids[:2]
    assert [p.name for p in paths] == [f"detections_{i}.png" for i in ids] + ["pictures.json"]
    index = _index(paths)
    assert index["variant"] == {s: False for s in SWITCHES} and "expert_colours" not in index
    assert index["image_ids"] == ids and index["score_threshold"] == 0.0
    first = index["pictures"][0]
    assert first["threshold_passed"] and len(first["detections"]) == 20 * 4   # every query x class pair
    # the ground truth panel shows the data set's boxes, in original pixels
    target = data.val[0][1]
    assert [g["label"] for g in first["ground_truth"]] == [data.category_names[c] for c in target["labels"]]
    cx, cy, w, h = (target["boxes"][0] * 96).tolist()
    assert first["ground_truth"][0]["box"] == pytest.approx([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], abs=0.1)
    # side by side, each image LONG_SIDE px wide, over its caption
    pixels = _png(paths[0])
    assert pixels.shape[1] == 2 * LONG_SIDE + 8 and pixels.shape[0] > LONG_SIDE


def test_all_pictures_of_a_dset_model_are_reproducible_and_described(data, tmp_path):
    model = dset_model(*SWITCHES)
    first = draw_pictures(model, data, tmp_path / "a", num_images=2)
    second = draw_pictures(model, data, tmp_path / "b", num_images=2)
    kinds = ("detections", "kept_tokens", "encoder_experts", "decoder_experts")
    ids = data.val_image_ids[:2]
    assert [p.name for p in first] == [f"{k}_{i}.png" for i in ids for k in kinds] + ["pictures.json"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    index = _index(first)
    assert index["variant"] == {s: True for s in SWITCHES} and index["input_size"] == [128, 128]
    assert index["class_colours"] == {n: palette_colour(c) for c, n in enumerate(data.category_names)}
    kept = [p for p in index["pictures"] if p["kind"] == "kept_tokens"]
    assert [(p["kept_tokens"], p["tokens"], p["grid"]) for p in kept] == [(8, 16, [4, 4])] * 2
    assert "kept 8 of 16 tokens" in kept[0]["caption"]
    for p in index["pictures"]:
        if p["kind"] == "encoder_experts":
            assert p["routed_tokens"] == 8 and sum(p["tokens_per_expert"][0]) == 8
    # drawn again with fewer images into the same folder: the earlier pictures go
    again = draw_pictures(model, data, tmp_path / "a", num_images=1)
    assert sorted(p.name for p in (tmp_path / "a" / "pictures").iterdir()) == sorted(p.name for p in again)


def test_bad_input_is_a_clear_error(data, tmp_path):
    model = dset_model()
    with pytest.raises(ValueError, match="num_images must be an integer >= 0, got -1"):
        draw_pictures(model, data, tmp_path, num_images=-1)
    with pytest.raises(ValueError, match=r"score_threshold must be in \[0, 1\], got 1.5"):
        draw_pictures(model, data, tmp_path, score_threshold=1.5)
    with pytest.raises(ValueError, match="the model predicts 80 classes but the data set has 4 categories"):
        draw_pictures(dset.build_model("rtdetr_r18", load_weights=False), data, tmp_path)
    with pytest.raises(TypeError, match="needs a dset Detector, got Linear"):
        draw_pictures(torch.nn.Linear(2, 2), data, tmp_path)


# ------------------------------------------------------------------------------------- engine, MLflow
def tiny_run(tmp_path, *extra):
    """One epoch of one step on 2 training images; the 3 validation images are evaluated and drawn."""
    return [*DATA, *MODEL, f"data.synthetic.root={tmp_path / 'synthetic'}", "data.batch_size=2", "data.augment=none",
            "data.multi_scale=false", "train.epochs=1", "train.warmup_steps=1", "train.ema_warmup_steps=1",
            "train.profile=false", "run.progress=false", *extra]


@pytest.mark.slow   # a training run, and a fresh MLflow store (its schema migrations alone take about 10 s)
def test_a_run_draws_its_reported_checkpoint_and_studies_log_the_pictures(tmp_path, store, monkeypatch):
    from dset.engine import loop as train_mod
    from studies.tracking import schema
    from studies.tracking.callback import log_artifacts
    from studies.tracking.mlflow_store import client, get_experiment

    maps = iter([0.5, 0.4])    # epoch 0 is the best: the reported weights are not the final ones
    real = train_mod.evaluate_detections

    def fake_eval(*args, **kwargs):
        return {**real(*args, **kwargs), "mAP": next(maps)}

    monkeypatch.setattr(train_mod, "evaluate_detections", fake_eval)
    out = tmp_path / "run"
    cfg = dset.load_config("dset_r18", tiny_run(tmp_path, "train.pictures=2", "train.epochs=2"))
    summary = train_mod.fit(cfg, out)
    assert (summary["status"] == "completed" and summary["metrics"][M.BEST_EPOCH] == 0
            and "pictures_error" not in summary)
    files = sorted((out / "pictures").iterdir())
    assert sorted(str(p.relative_to(out)) for p in files) == sorted(summary["pictures"]) and len(files) == 9
    # the pictures are those of best.pt's EMA weights
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    model = dset.build_model(dset.load_config(out / "config.yaml"), load_weights=False)
    model.load_state_dict(best["ema"]["module"])
    again = draw_pictures(model, build_datasets(cfg, train=False), tmp_path / "again", num_images=2,
                          epoch=best["epoch"])
    assert {p.name: p.read_bytes() for p in again} == {p.name: p.read_bytes() for p in files}
    assert _index(again)["epoch"] == best["epoch"] == 0
    model.load_state_dict(torch.load(out / "checkpoints" / "last.pt", weights_only=True)["ema"]["module"])
    final = draw_pictures(model, build_datasets(cfg, train=False), tmp_path / "final", num_images=2, epoch=0)
    assert final[-1].read_bytes() != (out / "pictures" / "pictures.json").read_bytes()   # other weights, other boxes

    assert schema.ARTIFACT_PICTURES == "pictures" and schema.ARTIFACT_PICTURES_INDEX == "pictures/pictures.json"
    c = client(store)
    run_id = c.create_run(get_experiment(c, "pictures", store)).info.run_id
    logged = log_artifacts(c, run_id, out, summary, "a run")
    assert schema.ARTIFACT_PICTURES in logged and schema.ARTIFACT_IMAGES in logged
    listed = {Path(a.path).name for a in c.list_artifacts(run_id, schema.ARTIFACT_PICTURES)}
    assert listed == {p.name for p in files}
    got = Path(c.download_artifacts(run_id, schema.ARTIFACT_PICTURES_INDEX, str(tmp_path / "dl")))
    assert got.read_bytes() == (out / "pictures" / "pictures.json").read_bytes()
    # and as MLflow images (the run page's image view): a PNG and a compressed preview per picture
    images = [Path(a.path).name for a in c.list_artifacts(run_id, schema.ARTIFACT_IMAGES)]
    keys = sorted(p.stem for p in files if p.suffix == ".png")
    assert sorted(n.split("+")[0] for n in images if n.endswith("+compressed.webp")) == keys
    assert sorted(n.split("+")[0] for n in images if n.endswith(".png")) == keys
    assert all(f"+step+{best['epoch']}+" in n for n in images)
    assert c.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"


def test_a_drawing_failure_leaves_the_run_finished_with_the_reason(tmp_path, monkeypatch):
    import dset.pictures
    from dset.engine.loop import fit

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dset.pictures, "draw_pictures", broken)
    cfg = dset.load_config("rtdetr_r18", tiny_run(tmp_path))
    summary = fit(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["pictures_error"] == "OSError: disk full"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["pictures_error"] == "OSError: disk full"
