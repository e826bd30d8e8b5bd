"""Configuration: presets, inheritance, overrides, validation errors that name the key."""

from __future__ import annotations

import pytest

import dset
from dset.config import Config, ConfigError, load_config, preset_names


def test_presets_exist_and_differ_where_they_should():
    assert {"rtdetr_r18", "rtdetr_r34", "dset_r18", "dset_r34"} <= set(preset_names())
    r18, r34 = load_config("rtdetr_r18"), load_config("rtdetr_r34")
    assert (r18.model.backbone.depth, r18.model.decoder.num_layers) == (18, 3)
    assert (r34.model.backbone.depth, r34.model.decoder.num_layers) == (34, 4)
    assert r18.model.num_classes == 80
    assert not (r18.model.encoder_moe.enabled or r18.model.token_pruning.enabled or r18.model.decoder_moe.enabled)


def test_dset_preset_inherits_and_switches_everything_on():
    cfg = load_config("dset_r34")
    assert cfg.model.backbone.depth == 34 and cfg.model.decoder.num_layers == 4  # from base rtdetr_r34
    m = cfg.model
    assert m.encoder_moe.enabled and m.token_pruning.enabled and m.decoder_moe.enabled
    assert (m.encoder_moe.num_experts, m.encoder_moe.top_k, m.encoder_moe.balance_loss_weight) == (6, 3, 0.03)
    assert (m.decoder_moe.num_experts, m.decoder_moe.top_k, m.decoder_moe.balance_loss_weight) == (6, 3, 0.05)
    assert (m.token_pruning.keep_ratio, m.token_pruning.min_tokens, m.token_pruning.loss_weight) == (0.7, 100, 0.01)


def test_overrides_are_typed():
    cfg = load_config("rtdetr_r18", ["model.num_classes=4", "train.lr=2e-4", "model.eval_spatial_size=[320, 320]",
                                     "model.decoder_moe.enabled=true", "train.early_stop_patience=null"])
    assert cfg.model.num_classes == 4 and isinstance(cfg.model.num_classes, int)
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.eval_spatial_size == [320, 320]
    assert cfg.model.decoder_moe.enabled is True
    assert cfg.train.early_stop_patience is None


@pytest.mark.parametrize("override,key", [
    ("model.num_clases=4", "model.num_clases"),
    ("model.decoder_moe.top_k=7", "model.decoder_moe.top_k"),
    ("model.encoder_moe.top_k=0", "model.encoder_moe.top_k"),
    ("model.token_pruning.keep_ratio=1.5", "model.token_pruning.keep_ratio"),
    ("model.token_pruning.keep_ratio=0", "model.token_pruning.keep_ratio"),
    ("model.token_pruning.min_tokens=0", "model.token_pruning.min_tokens"),
    ("model.token_pruning.fill=mean", "model.token_pruning.fill"),
    ("model.num_classes=four", "model.num_classes"),
    ("model.backbone.depth=50", "model.backbone.depth"),
    ("model.checkpoint=/nonexistent/rtdetr.pth", "model.checkpoint"),
    ("train.epochs=0", "train.epochs"),
    ("data.name=coco", "data.train.images"),
    ("model.decoder_moe.enabled=maybe", "model.decoder_moe.enabled"),
])
def test_invalid_settings_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config("dset_r18", [override])
    assert key in str(info.value)


def test_unknown_preset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="unknown preset 'rtdetr_r50'"):
        load_config("rtdetr_r50")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("rtdetr_r18", ["model.num_classes"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("missing_file.yaml")


def test_yaml_file_with_base_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: dset_r18\nmodel:\n  decoder_moe: {num_experts: 8, top_k: 2}\n")
    cfg = load_config(str(path))
    assert (cfg.model.decoder_moe.num_experts, cfg.model.decoder_moe.top_k) == (8, 2)
    assert cfg.model.encoder_moe.num_experts == 6
    # the resolved configuration written as YAML loads back to the same thing
    again = tmp_path / "resolved.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(str(again)) == cfg
    flat = cfg.flat()
    assert flat["model.decoder_moe.top_k"] == 2 and flat["model.backbone.depth"] == 18


def test_build_model_accepts_names_configs_and_overrides():
    model = dset.build_model("rtdetr_r18", ["model.num_classes=3", "model.decoder.num_queries=10"])
    assert model.decoder.enc_score_head.out_features == 3
    cfg = load_config("rtdetr_r18", ["model.num_classes=3"])
    assert isinstance(cfg, Config)
    assert dset.build_model(cfg).decoder.dec_score_head[0].out_features == 3


def test_partly_given_groups_keep_their_parent_defaults():
    """Mentioning one decoder_moe key must not reset its other defaults to MoEConfig's (0.03 vs 0.05)."""
    cfg = load_config("rtdetr_r18", ["model.decoder_moe.enabled=true"])
    assert cfg.model.decoder_moe.balance_loss_weight == 0.05
    assert cfg.model.encoder_moe.balance_loss_weight == 0.03


@pytest.mark.parametrize("override, old, new", [
    ("model.memory_pruning.fill=identity", "identity", "encoder_features"),
    ("model.memory_pruning.supervision=gaussian", "gaussian", "gaussian_focal"),
])
def test_option_names_that_claimed_a_source_are_renamed(override, old, new):
    """Memory pruning's fill is not Sparse DETR's and its Gaussian supervision is not the original DSET's loss:
    the old names are errors that give the new one, which is accepted."""
    with pytest.raises(ConfigError, match=f"{old!r}.*now {new!r}"):
        load_config("dset_fast_r18", [override])
    key = override.split("=")[0]
    assert load_config("dset_fast_r18", [f"{key}={new}"]).flat()[key] == new
