"""Loading published-layout weights: RT-DETR checkpoints (ema.module / model) and PResNet-vd weights."""

from __future__ import annotations

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
    assert len(report.loaded) == len(state) and not report.skipped_class_heads and not report.new_components
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_different_num_classes_skips_class_heads_and_says_so(tmp_path):
    path = _saved(tmp_path, {"model": dset.build_model("rtdetr_r18", SMALL).state_dict()})
    target = dset.build_model("rtdetr_r18", SMALL + ["model.num_classes=4"])
    with pytest.warns(UserWarning, match="class heads not loaded"):
        report = load_checkpoint(target, path)
    # SMALL has no denoising, so no denoising class embedding: the score heads are all that differ
    assert sorted(report.skipped_class_heads) == sorted(
        ["decoder.enc_score_head.weight", "decoder.enc_score_head.bias"]
        + [f"decoder.dec_score_head.{i}.{p}" for i in range(3) for p in ("weight", "bias")])
    assert "skipped 8 class-head tensors" in report.summary()
    # everything else was loaded
    assert len(report.loaded) == len(target.state_dict()) - 8


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
