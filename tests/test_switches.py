"""DSET's three switches: each changes only its own component; neutral settings reproduce RT-DETR."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path

import dset

SMALL = ["model.num_classes=6", "model.decoder.num_queries=30", "model.decoder.num_denoising=0"]
ALL_OFF = ["model.encoder_moe.enabled=false", "model.token_pruning.enabled=false", "model.decoder_moe.enabled=false"]


def only(switch: str, *extra: str) -> list[str]:
    return SMALL + [s for s in ALL_OFF if not s.startswith(f"model.{switch}.")] + list(extra)


def keys(model) -> set[str]:
    return set(model.state_dict())


def test_each_switch_changes_only_its_own_parameters():
    base = keys(dset.build_model("rtdetr_r18", SMALL))
    enc_moe = keys(dset.build_model("dset_r18", only("encoder_moe")))
    pruning = keys(dset.build_model("dset_r18", only("token_pruning")))
    dec_moe = keys(dset.build_model("dset_r18", only("decoder_moe")))

    aifi = "encoder.encoder.0.layers.0."
    assert base - enc_moe == {aifi + k for k in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")}
    assert all(k.startswith(aifi + "moe.") for k in enc_moe - base)

    assert base - pruning == set()
    assert pruning - base and all(k.startswith("encoder.token_pruner.") for k in pruning - base)

    removed = base - dec_moe
    assert len(removed) == 3 * 4 and all(k.startswith("decoder.decoder.layers.") and ".linear" in k for k in removed)
    assert all(".moe." in k for k in dec_moe - base)


def _copy_shared(src, dst):
    """Copy every tensor the two models have in common."""
    dst_state = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in dst_state}, strict=False)


def test_each_switch_changes_only_the_computation_downstream_of_it():
    torch.manual_seed(1)
    images = torch.rand(2, 3, 128, 128)
    base = dset.build_model("rtdetr_r18", SMALL).eval()
    with torch.no_grad():
        base_feats = base.backbone(images)
        base_enc = base.encoder(base_feats)
        base_out = base(images)

    # decoder MoE: backbone and encoder untouched, decoder output changes
    dec = dset.build_model("dset_r18", only("decoder_moe"))
    _copy_shared(base, dec)
    dec.eval()
    with torch.no_grad():
        enc = dec.encoder(dec.backbone(images))
        out = dec(images)
    assert all(torch.equal(a, b) for a, b in zip(enc, base_enc))
    assert not torch.allclose(out["pred_logits"], base_out["pred_logits"], atol=1e-3)

    # encoder MoE: only the stride-32 map goes through the AIFI layer; the neck then mixes all levels
    enc_moe = dset.build_model("dset_r18", only("encoder_moe"))
    _copy_shared(base, enc_moe)
    enc_moe.eval()
    with torch.no_grad():
        feats = enc_moe.backbone(images)
        proj = [p(f) for p, f in zip(enc_moe.encoder.input_proj, feats)]
        after_aifi = enc_moe.encoder.aifi(proj)
        base_after_aifi = base.encoder.aifi([p(f) for p, f in zip(base.encoder.input_proj, base_feats)])
    assert all(torch.equal(a, b) for a, b in zip(feats, base_feats))
    assert torch.equal(after_aifi[0], base_after_aifi[0]) and torch.equal(after_aifi[1], base_after_aifi[1])
    assert not torch.allclose(after_aifi[2], base_after_aifi[2], atol=1e-3)


def test_keep_ratio_one_equals_no_pruning():
    base = dset.build_model("rtdetr_r18", SMALL).eval()
    pruned = dset.build_model("dset_r18", only("token_pruning", "model.token_pruning.keep_ratio=1.0",
                                               "model.token_pruning.min_tokens=1"))
    _copy_shared(base, pruned)
    pruned.eval().set_epoch(100)
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        a, b = base(images), pruned(images)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    assert pruned.sparse_stats()["token_pruning"]["tokens_after"] == 16  # (128 / 32)^2, all kept


def test_pruning_follows_the_epoch_schedule_in_eval_and_only_touches_kept_tokens():
    model = dset.build_model("dset_r18", only("token_pruning", "model.token_pruning.keep_ratio=0.5",
                                              "model.token_pruning.min_tokens=10",
                                              "model.token_pruning.warmup_epochs=2",
                                              "model.token_pruning.ramp_epochs=2")).eval()
    images = torch.rand(1, 3, 256, 256)  # 8 x 8 = 64 tokens at stride 32
    # warm-up epochs 0-1 keep all; the ramp reaches 0.5 on its last epoch (3), see dset/models/pruning.py
    expected = {0: 64, 1: 64, 2: 48, 3: 32, 4: 32, 9: 32}  # ratios 1, 1, 0.75, 0.5, 0.5, 0.5
    for epoch, kept in expected.items():
        model.set_epoch(epoch)
        with torch.no_grad():
            model(images)
        assert model.sparse_stats()["token_pruning"]["tokens_after"] == kept, epoch
    # pruned positions keep their input features (fill=identity): compare the AIFI output with its input
    with torch.no_grad():
        proj = [p(f) for p, f in zip(model.encoder.input_proj, model.backbone(images))]
        out = model.encoder.aifi(proj)
    unchanged = (out[2] == proj[2]).all(dim=1).flatten()  # per token, [64]
    assert int(unchanged.sum()) == 64 - 32


def test_dset_presets_with_switches_off_reproduce_the_parity_fixture():
    fx = torch.load(shared_path("rtdetr_r18vd_parity.pt"), weights_only=True)
    model = dset.build_model("dset_r18", ALL_OFF).eval()
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in fx["state_dict_fp16"].items()})
    with torch.no_grad():
        enc = model.encoder(model.backbone(fx["input"]))
    for ours, ref in zip(enc, fx["encoder_outs"]):
        assert (ours - ref).abs().max() <= 1e-4
    reference = dset.build_model("rtdetr_r18").eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(fx["input"]), reference(fx["input"])
    assert torch.equal(a["pred_logits"], b["pred_logits"])


def test_sparse_stats_report_expert_usage_per_layer():
    model = dset.build_model("dset_r18", SMALL).eval()
    with torch.no_grad():
        model(torch.rand(2, 3, 128, 128))
    stats = model.sparse_stats()
    assert len(stats["encoder_moe"]) == 1 and len(stats["decoder_moe"]) == 3
    for usage in stats["encoder_moe"] + stats["decoder_moe"]:
        assert usage.shape == (6,) and float(usage.sum()) == pytest.approx(1.0)
