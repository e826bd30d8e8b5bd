"""Loading published-layout weights: RT-DETR checkpoints (ema.module / model) and PResNet-vd weights."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import dset
from dset.models.detector import expert_inits, load_backbone_weights, load_checkpoint

SMALL = ["model.decoder.num_queries=20", "model.decoder.num_denoising=0"]


def _saved(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrap", ["ema", "model", "plain"])
def test_rtdetr_checkpoint_loads_strictly_in_all_published_layouts(tmp_path, wrap):
    source = dset.build_model("rtdetr_r18", SMALL)
    state = source.state_dict()
    obj = {"ema": {"module": state, "updates": 10}} if wrap == "ema" else {"model": state} if wrap == "model" else state
    target = dset.build_model("rtdetr_r18", SMALL)
    report = load_checkpoint(target, _saved(tmp_path, obj))
    assert len(report.loaded) == len(state) and not report.class_heads_reinitialised and not report.new_components
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_different_num_classes_reinitialises_the_class_heads_and_reports_it(tmp_path, caplog):
    path = _saved(tmp_path, {"model": dset.build_model("rtdetr_r18", SMALL).state_dict()})
    target = dset.build_model("rtdetr_r18", SMALL + ["model.num_classes=4"])
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a report in the log, not a UserWarning
        report = load_checkpoint(target, path)
    # SMALL has no denoising, so no denoising class embedding: the score heads are all that differ
    heads = (["decoder.enc_score_head.weight", "decoder.enc_score_head.bias"]
             + [f"decoder.dec_score_head.{i}.{p}" for i in range(3) for p in ("weight", "bias")])
    assert sorted(report.class_heads_reinitialised) == sorted(heads)
    assert report.class_heads_reinitialised["decoder.dec_score_head.2.bias"] == "file [80], model [4]"
    assert all(torch.equal(target.state_dict()[k], fresh[k]) for k in heads)
    assert "8 class-head tensors re-initialised (80 classes in the file, 4 in the model)" in report.summary()
    # everything else was loaded
    assert len(report.loaded) == len(target.state_dict()) - 8
    # the log: the summary, then the head report (our names unknown here: the map's hint names none)
    with caplog.at_level(logging.INFO, logger="dset"):
        report.log_to()
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 4   # heads not loaded: a study shows it
    assert caplog.records[0].getMessage().startswith(f"initial weights: {path}: loaded {len(report.loaded)} tensors")
    assert [r.getMessage() for r in caplog.records[1:]] == [
        "  class heads: 80 classes in the file (COCO's, in RT-DETR's label order), 4 in the model",
        "    re-initialised (random weights, prior-probability bias), as a row is a class and the file's classes "
        "are not ours: decoder.enc_score_head (file [80, 256], "
        "model [4, 256]), decoder.dec_score_head.{0,1,2} (file [80, 256], model [4, 256])",
        "    every class starts from scratch: set model.class_map={file class: our class} to keep the file's rows "
        "of the classes both have"]


def test_same_classes_report_the_heads_loaded(tmp_path):
    path = _saved(tmp_path, {"model": dset.build_model("rtdetr_r18", SMALL).state_dict()})
    report = load_checkpoint(dset.build_model("rtdetr_r18", SMALL), path)
    assert report.head_report() == ("class heads loaded: 80 classes in the file and in the model: "
                                    "decoder.enc_score_head, decoder.dec_score_head.{0,1,2}")
    assert "re-initialised" not in report.summary()
    # PResNet weights have no class heads: nothing to say
    presnet = _saved(tmp_path, dset.build_model("rtdetr_r18", SMALL).backbone.state_dict(), "presnet.pth")
    assert load_backbone_weights(dset.build_model("rtdetr_r18", SMALL), presnet).head_report() == ""


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    path = _saved(tmp_path, {"model": dset.build_model("rtdetr_r34", SMALL).state_dict()})
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(dset.build_model("rtdetr_r18", SMALL), path)


def test_missing_or_unreadable_file_is_a_clear_error(tmp_path):
    model = dset.build_model("rtdetr_r18", SMALL)
    with pytest.raises(FileNotFoundError, match="not found.*downloads are not possible"):
        load_checkpoint(model, tmp_path / "rtdetr_r18vd_dec3_6x_coco_from_paddle.pth")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_checkpoint(model, bad)


def test_presnet_imagenet_weights_load_into_the_backbone(tmp_path):
    source = dset.build_model("rtdetr_r34", SMALL).backbone.state_dict()
    # published PResNet weights carry no 'backbone.' prefix and may carry a classifier
    path = _saved(tmp_path, {**source, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    model = dset.build_model("rtdetr_r34", SMALL)
    report = load_backbone_weights(model, path)
    assert len(report.loaded) == len(source)
    assert torch.equal(model.backbone.conv1.conv1_1.conv.weight, source["conv1.conv1_1.conv.weight"])
    with pytest.raises(ValueError, match="does not fit PResNet-18"):
        load_backbone_weights(dset.build_model("rtdetr_r18", SMALL), path)


@pytest.mark.parametrize("expert_init", ["upcycle", "drop_upcycle"])
def test_dset_model_makes_its_experts_from_an_rtdetr_checkpoint(tmp_path, expert_init):
    """Plain upcycling without noise: a DSET model (MoE on, pruning off) started from RT-DETR computes what RT-DETR
    did (its routers cannot learn from that). The presets' Drop-Upcycling: a mixture that computes something else
    from the first step; the load report says how the experts were made."""
    rtdetr = dset.build_model("rtdetr_r18", SMALL).eval()
    path = _saved(tmp_path, {"ema": {"module": rtdetr.state_dict()}})
    cfg = dset.load_config("dset_r18", SMALL + ["model.token_pruning.enabled=false", f"model.checkpoint={path}",
                                                f"model.encoder_moe.expert_init={expert_init}",
                                                f"model.decoder_moe.expert_init={expert_init}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: same classes, same FFN widths
        model = dset.build_model(cfg, load_weights=False)
    report = load_checkpoint(model, path, expert_init=expert_inits(cfg))
    model.eval()
    assert len(model.encoder_moe_layers()) == 1 and len(model.decoder_moe_layers()) == 3
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        a, b = rtdetr(images), model(images)
    if expert_init == "upcycle":
        assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-4)
        assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-5)
        assert "experts of 4 MoE layers upcycled (copies of the dense FFN)" in report.summary()
        assert len(report.upcycled) == 4
    else:
        assert (a["pred_logits"] - b["pred_logits"]).abs().max() > 1e-2
        assert "experts of 4 MoE layers drop-upcycled (copies of the dense FFN, 0.5 of each expert's hidden units " \
               "re-initialised)" in report.summary()
        assert report.upcycled == []   # not plain copies: the experts are new parts (train.lr)
        assert "decoder.decoder.layers.2.moe.w1" in report.new_components


def test_experts_of_another_width_are_reported_not_warned(tmp_path):
    """A MoE layer whose experts are not as wide as the file's dense FFN cannot be made from it: its experts keep
    their random initialisation, and the report (not a warning) says so."""
    path = _saved(tmp_path, {"model": dset.build_model("rtdetr_r18", SMALL).state_dict()})
    cfg = dset.load_config("dset_r18", SMALL + ["model.token_pruning.enabled=false",
                                                "model.decoder_moe.expert_hidden_dim=512"])
    model = dset.build_model(cfg, load_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_checkpoint(model, path, expert_init=expert_inits(cfg))
    narrow = {k: v for k, v in report.expert_init.items() if k.startswith("decoder.")}
    assert len(narrow) == 3 and set(narrow.values()) == {
        "random (the file's FFN is 1024 wide, the experts 512: not made from it)"}
    assert "experts of 3 MoE layers random (the file's FFN is 1024 wide, the experts 512" in report.summary()
    assert report.expert_init["encoder.encoder.0.layers.0.moe"].startswith("drop-upcycled")   # same width: made
    assert "decoder.decoder.layers.0.moe.w1" in report.new_components
