"""Memory pruning, the fourth switch (dset.models.memory_pruning): off and keep-all are RT-DETR, what is kept and
what pruned positions hold, both supervision targets, the FLOPs counted as run, and the switch with the others."""

from __future__ import annotations

import math

import pytest
import torch

from dset.config import ConfigError, load_config
from dset.measure import count_flops
from dset.models.criterion import build_criterion
from dset.models.decoder import MSDeformableAttention, _gather_tokens, _project_tokens
from dset.models.detector import build_model, load_state_dict_into
from dset.models.memory_pruning import MemoryPruner, SparseValue, context_focal_loss, context_target_map
from dset.models.pruning import set_epoch_all

SIZE = 128
SMALL = ["model.decoder.num_queries=30", "model.decoder.num_denoising=10", "model.num_classes=3"]


def _model(*overrides: str, preset: str = "rtdetr_r18"):
    torch.manual_seed(0)
    return build_model(preset, SMALL + list(overrides), load_weights=False)


def _targets(batch: int = 2):
    return [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.25, 0.1, 0.1]])}
            for _ in range(batch)]


def _pruned(keep_ratio: float = 0.3, *extra: str):
    m = _model("model.memory_pruning.enabled=true", f"model.memory_pruning.keep_ratio={keep_ratio}", *extra)
    m.load_state_dict(_model().state_dict(), strict=False)  # the same RT-DETR weights as _model()
    return m


def test_off_has_no_memory_pruner_and_the_reference_keys():
    off = _model()
    assert off.memory_pruner is None and off.decoder.last_memory_pruning is None
    assert not any("memory_pruner" in k for k in off.state_dict())
    on = _pruned()
    extra = [k for k in on.state_dict() if k not in off.state_dict()]
    assert extra == ["decoder.memory_pruner.epoch", "decoder.memory_pruner.predictor.weight",
                     "decoder.memory_pruner.predictor.bias"]
    # the reference's keys keep their order (the pruner is registered last)
    assert [k for k in on.state_dict() if k in off.state_dict()] == list(off.state_dict())


def test_keep_all_gives_rtdetrs_outputs():
    """In warm-up (ratio 1.0) nothing is pruned: the outputs are RT-DETR's."""
    x = torch.rand(2, 3, SIZE, SIZE)
    ref, mp = _model().eval(), _pruned().eval()
    mp.set_epoch(0)
    with torch.no_grad():
        a, b = ref(x), mp(x)
    assert mp.sparse_stats()["memory_pruning"]["keep_ratio"] == 1.0
    assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-6)
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)


def test_level_counts_per_level_with_floor_and_min_tokens():
    p = MemoryPruner(8, keep_ratio=0.3, warmup_epochs=0)
    assert p.level_counts([256, 64, 16]) == [77, 20, 5]  # ceil(0.3 * n) per level
    # raised so that the total reaches the floor (the decoder's queries): ratio 150/336
    assert p.level_counts([256, 64, 16], floor=150) == [115, 29, 8]
    assert sum(MemoryPruner(8, keep_ratio=0.3, min_tokens=200, warmup_epochs=0).level_counts([256, 64, 16])) >= 200
    assert MemoryPruner(8, keep_ratio=0.3, warmup_epochs=2).level_counts([256, 64, 16]) == [256, 64, 16]  # warm-up


def test_select_keeps_each_levels_top_scores_in_order():
    p = MemoryPruner(4, keep_ratio=0.5, warmup_epochs=0)
    with torch.no_grad():
        p.predictor.weight.copy_(torch.tensor([[1.0, 0, 0, 0]]))
        p.predictor.bias.zero_()
    level_scores = [torch.tensor([5.0, 1, 4, 0]), torch.tensor([0.0, 9])]  # levels of 4 and 2 tokens
    tokens = torch.zeros(1, 6, 4)
    tokens[0, :, 0] = torch.cat(level_scores)
    sel = p.select(tokens, [4, 2])
    assert sel.pruned
    assert [i.tolist() for i in sel.level_index] == [[[0, 2]], [[1]]]
    assert sel.index.tolist() == [[0, 2, 5]]  # level 1's token 1 sits at 4 + 1
    assert p.last_stats == {"tokens_before": 6, "tokens_after": 3, "keep_ratio": 0.5, "scheduled_keep_ratio": 0.5}


def test_queries_come_only_from_kept_tokens_and_counts_match():
    mp = _pruned(0.25).eval()
    mp.set_deployed_epoch()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = mp.encoder(mp.backbone(x))
        kept, anchors, value, shapes = mp.decoder._pruned_memory(feats)
    sizes = [h * w for h, w in shapes]  # 16x16, 8x8, 4x4
    assert sizes == [256, 64, 16]
    assert kept.shape[1] == sum(math.ceil(0.25 * n) for n in sizes) == 84
    assert isinstance(value, SparseValue) and value.length == 336 and value.fill is None
    all_anchors, _ = mp.decoder.anchors(shapes, x.device)
    assert torch.equal(anchors, _gather_tokens(all_anchors, value.index))
    # queries are drawn from the kept rows: every selected anchor is one of the kept tokens' anchors
    ref_unact, _, _ = mp.decoder._select_queries(kept, anchors, shapes)
    assert ref_unact.shape == (2, 30, 4)
    assert mp.memory_token_counts(SIZE) == (336, 84)


def test_evaluation_projects_only_the_kept_tokens_with_the_same_values():
    mp = _pruned(0.3).eval()
    proj = mp.decoder.input_proj[0]
    with torch.no_grad():
        proj.norm.running_mean.uniform_(-1, 1)
        proj.norm.running_var.uniform_(0.5, 2)
        fmap = torch.randn(2, 256, 8, 8)
        dense = proj(fmap).flatten(2).permute(0, 2, 1)
        index = torch.tensor([[0, 5, 17, 63], [1, 2, 3, 40]])
        tokens = _gather_tokens(fmap.flatten(2).permute(0, 2, 1), index)
        assert torch.allclose(_project_tokens(proj, tokens), _gather_tokens(dense, index), atol=1e-5)


@pytest.mark.parametrize("fill", ["zero", "encoder_features"])
def test_pruned_positions_give_deformable_attention_zero_or_their_features(fill):
    torch.manual_seed(0)
    attn = MSDeformableAttention(16, num_heads=2, num_levels=2, num_points=2).eval()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.value_proj.bias.normal_()  # a pruned token projected would give the bias, not zero
    shapes = [(4, 4), (2, 2)]
    memory = torch.randn(1, 20, 16)
    index = torch.tensor([[1, 6, 16, 19]])
    query, ref = torch.randn(1, 5, 16), torch.rand(1, 5, 1, 4)
    fill_tensor = None if fill == "zero" else memory
    sparse = SparseValue(_gather_tokens(memory, index), index, 20, fill_tensor)
    with torch.no_grad():
        got = attn(query, ref, sparse, shapes)
        # the same attention over a dense value map built by hand
        expected_map = torch.zeros(1, 20, 16) if fill == "zero" else memory.clone()
        expected_map[0, index[0]] = attn.value_proj(memory[0, index[0]])

        class Projected(torch.nn.Module):  # value_proj already applied: identity
            def forward(self, v):
                return v
        value_proj, attn.value_proj = attn.value_proj, Projected()
        want = attn(query, ref, expected_map, shapes)
        attn.value_proj = value_proj
    assert torch.allclose(got, want, atol=1e-6)


def test_train_forward_prunes_trains_the_predictor_and_adds_its_loss():
    mp = _pruned(0.3)
    mp.set_deployed_epoch()
    mp.train()
    out = mp(torch.rand(2, 3, SIZE, SIZE), _targets())
    assert set(out["extra_losses"]) == {"loss_memory_pruning"}
    stats = mp.sparse_stats()["memory_pruning"]
    assert stats["tokens_before"] == 336 and stats["tokens_after"] == 77 + 20 + 5
    # the detection outputs alone reach the predictor (straight-through factor on the kept tokens)
    (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
    assert mp.memory_pruner.predictor.weight.grad.abs().sum() > 0
    criterion = build_criterion(mp.config)
    assert criterion.extra_loss_weights["loss_memory_pruning"] == 0.05


def test_bce_supervision_is_the_box_map_over_all_levels():
    p = MemoryPruner(8, supervision="bce")
    scores = torch.zeros(1, 16 + 4)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    # 4x4: the 2x2 centre tokens (centres 0.375, 0.625) are inside; 2x2: all four centres (0.25, 0.75) inside
    loss = p.importance_loss(scores, [(4, 4), (2, 2)], targets)
    assert loss.item() == pytest.approx(math.log(2))  # BCE at logit 0 is log 2 for every target value
    s = torch.full((1, 20), -3.0)
    inside = [5, 6, 9, 10, 16, 17, 18, 19]
    s[0, inside] = 3.0
    expected = math.log1p(math.exp(-3.0))  # every token is scored on the right side with margin 3
    assert p.importance_loss(s, [(4, 4), (2, 2)], targets).item() == pytest.approx(expected, rel=1e-5)


def test_context_target_map_values():
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    t = context_target_map((4, 4), targets, context_ratio=0.5).reshape(4, 4)
    band = math.exp(-2.0)  # centres at 0.125: d = 0.375 / 0.25 = 1.5, u = 1, exp(-1 / (2 * 0.25))
    expected = torch.tensor([[band] * 4, [band, 1, 1, band], [band, 1, 1, band], [band] * 4])
    assert torch.allclose(t, expected, atol=1e-6)
    wide = context_target_map((4, 4), targets, context_ratio=1.0).reshape(4, 4)  # u = 0.5: exp(-0.5)
    assert wide[0, 0].item() == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert torch.equal(context_target_map((4, 4), targets, context_ratio=0.0).reshape(4, 4),
                       (expected == 1).float())
    # a small box far from the corner: the corner stays 0; an image without boxes is all zeros
    small = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.9, 0.9, 0.1, 0.1]])}, {"labels": torch.tensor(
        [], dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    m = context_target_map((4, 4), small, 0.5)
    assert m[0, 0] == 0 and m[0, 15] == 1 and m[1].sum() == 0


def test_context_focal_loss_by_hand():
    scores = torch.tensor([[0.0, 0.0, 2.0]])
    target = torch.tensor([[1.0, 0.5, 0.0]])
    p0, p2 = 0.5, 1 / (1 + math.exp(-2.0))
    pos = (1 - p0) ** 2 * math.log(2)
    neg_soft = (1 - 0.5) ** 4 * p0 ** 2 * math.log(2)
    neg = p2 ** 2 * -math.log(1 - p2)
    assert context_focal_loss(scores, target).item() == pytest.approx(pos + neg_soft + neg, rel=1e-5)


def test_gaussian_supervision_in_the_model():
    mp = _pruned(0.3, "model.memory_pruning.supervision=gaussian_focal")
    mp.set_deployed_epoch()
    mp.train()
    out = mp(torch.rand(2, 3, SIZE, SIZE), _targets())
    scores = mp.decoder.last_memory_pruning["scores"]
    target = torch.cat([context_target_map(s, _targets(), 0.5) for s in [(16, 16), (8, 8), (4, 4)]], dim=1)
    assert torch.allclose(out["extra_losses"]["loss_memory_pruning"], context_focal_loss(scores, target))


def test_flops_are_counted_as_run():
    """The decoder's GFLOPs fall by the memory-wide work of the pruned tokens: per token, the input projection,
    enc_output, the score head and every decoder layer's value projection (d = 256, 3 classes, 3 layers)."""
    d, layers, classes = 256, 3, 3
    per_token_macs = d * d + d * d + d * classes + layers * d * d
    dense, keep_all = _model(), _pruned(1.0)
    half = _pruned(0.5)
    for m in (keep_all, half):
        m.set_deployed_epoch()
    g_dense = count_flops(dense, SIZE)["gflops_by_component"]["decoder"]
    g_all = count_flops(keep_all, SIZE)["gflops_by_component"]["decoder"]
    g_half = count_flops(half, SIZE)["gflops_by_component"]["decoder"]
    pruned_tokens = 336 - (128 + 32 + 8)
    # keep 1.0 prunes nothing and costs exactly RT-DETR's decoder (its unused importance scores are traced away),
    # because RT-DETR too runs the encoder box head on its selected queries only (were it to run it on every
    # token, as the reference does, keep 1.0 would read 0.08 GFLOPs cheaper)
    assert g_all == pytest.approx(g_dense, rel=1e-9)
    assert (g_all - g_half) == pytest.approx(2 * pruned_tokens * per_token_macs / 1e9, rel=0.03)


def test_rtdetr_runs_the_encoder_box_head_on_its_selected_queries_only():
    """The baseline gets the output-identical optimisation memory pruning has: the counted GFLOPs of the encoder
    box head (an MLP 256-256-256-4) are those of the 30 selected queries, not of the 336 memory tokens, and the
    whole model at keep 1.0 (which prunes nothing) is not cheaper than RT-DETR."""
    d, queries = 256, 30
    dense, keep_all = _model(), _pruned(1.0)
    keep_all.set_deployed_epoch()
    counted = count_flops(dense, SIZE)
    assert counted["gflops_by_module"]["decoder.enc_bbox_head"] == pytest.approx(
        2 * queries * (d * d + d * d + d * 4) / 1e9, rel=1e-6)
    assert count_flops(keep_all, SIZE)["gflops"] / counted["gflops"] >= 1.0


def test_query_selection_matches_the_reference_in_training():
    """The reference runs the encoder box head on every token and gathers the selected ones; gathering first gives
    the same reference boxes and the same gradients (training mode: the encoder's auxiliary loss reads them)."""
    model = _model().train()
    dec = model.decoder
    torch.manual_seed(1)
    with torch.no_grad():
        for p in dec.enc_bbox_head.parameters():  # the last layer starts at zero: give it weights
            p.normal_(0, 0.05)
    memory = torch.randn(2, 84, 256)
    anchors = torch.randn(1, 84, 4)
    ref_unact, _, _ = dec._select_queries(memory, anchors, [(8, 8), (4, 4), (2, 2)])
    grad_ours = torch.autograd.grad(ref_unact.square().sum(), list(dec.enc_bbox_head.parameters()))
    scores = dec.enc_score_head(dec.enc_output(memory)).max(-1).values
    index = scores.topk(30, dim=1).indices
    expected = _gather_tokens(dec.enc_bbox_head(dec.enc_output(memory)) + anchors, index)
    grad_ref = torch.autograd.grad(expected.square().sum(), list(dec.enc_bbox_head.parameters()))
    assert torch.allclose(ref_unact, expected, atol=1e-5)
    for ours, ref in zip(grad_ours, grad_ref, strict=True):
        assert ours.abs().max() > 1e-2  # a real gradient, compared below
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_combines_with_the_other_three_switches():
    m = _model("model.memory_pruning.enabled=true", "model.token_pruning.min_tokens=4",
               "model.token_pruning.warmup_epochs=0", "model.token_pruning.ramp_epochs=0",
               "model.memory_pruning.warmup_epochs=0", preset="dset_r18")
    assert set_epoch_all(m, 3) == 2 and m.memory_pruner._epoch == 3
    m.train()
    out = m(torch.rand(2, 3, SIZE, SIZE), _targets())
    assert {"loss_enc_moe_balance", "loss_dec_moe_balance", "loss_pruning", "loss_memory_pruning"} <= set(
        out["extra_losses"])
    assert {"encoder_moe", "decoder_moe", "token_pruning", "memory_pruning"} <= set(m.sparse_stats())
    sum(v.sum() for v in out["extra_losses"].values()).backward()


def test_rtdetr_weights_load_and_the_predictor_is_new():
    report = load_state_dict_into(_pruned(0.3), _model().state_dict(), "rtdetr")
    assert report.new_components == ["decoder.memory_pruner.epoch", "decoder.memory_pruner.predictor.weight",
                                     "decoder.memory_pruner.predictor.bias"]


@pytest.mark.parametrize("override, key", [
    ("model.memory_pruning.keep_ratio=0", "model.memory_pruning.keep_ratio"),
    ("model.memory_pruning.fill=mean", "model.memory_pruning.fill"),
    ("model.memory_pruning.supervision=mse", "model.memory_pruning.supervision"),
    ("model.memory_pruning.predictor_hidden_dim=-1", "model.memory_pruning.predictor_hidden_dim"),
    ("model.memory_pruning.context_ratio=-0.5", "model.memory_pruning.context_ratio"),
])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("rtdetr_r18", [override])


def test_warmup_must_end_within_the_run():
    with pytest.raises(ConfigError, match="model.memory_pruning.warmup_epochs"):
        load_config("rtdetr_r18", ["model.memory_pruning.enabled=true", "model.memory_pruning.warmup_epochs=5",
                                   "train.epochs=3"])


def test_fast_presets_are_memory_pruning_at_the_chosen_ratio():
    for depth in (18, 34):
        cfg = load_config(f"dset_fast_r{depth}")
        m = cfg.model
        assert m.backbone.depth == depth and m.memory_pruning.enabled
        assert not (m.encoder_moe.enabled or m.token_pruning.enabled or m.decoder_moe.enabled)
    assert load_config("dset_fast_r18").model.memory_pruning == load_config("dset_fast_r34").model.memory_pruning


@pytest.mark.slow
def test_memory_pruning_exports_to_onnx_and_matches_eager(tmp_path):
    from decisions import decision_margins, make_decisions_decisive

    from dset.export import compare_with_eager, comparison_images, export_onnx, onnxruntime_session

    mp = _pruned(0.3).eval()
    mp.set_deployed_epoch()
    make_decisions_decisive(mp, comparison_images(SIZE, (1, 2)))  # no ties for float rounding to decide
    path = export_onnx(mp, tmp_path / "model.onnx", SIZE)
    diff = compare_with_eager(mp, onnxruntime_session(path), SIZE, batch_sizes=(1, 2))
    margins = decision_margins(mp, comparison_images(SIZE, (1, 2)))  # on compare_with_eager's inputs
    assert set(margins) == {"query_selection", "memory_pruning"} and min(margins.values()) > 1e-5, margins
    assert diff["pred_logits"] <= 1e-4 and diff["pred_boxes"] <= 1e-4, diff


def test_the_predictor_gets_its_own_learning_rate_when_set():
    from dset.engine.optim import build_optimizer

    mp = _pruned(0.3, "model.memory_pruning.predictor_lr=0.01")
    pretrained = [n for n, _ in mp.named_parameters() if "memory_pruner" not in n]
    groups = {g["name"]: g for g in build_optimizer(mp, mp.config, pretrained).param_groups}
    assert groups["memory_predictor"]["param_names"] == ["decoder.memory_pruner.predictor.weight"]
    assert groups["memory_predictor_no_decay"]["param_names"] == ["decoder.memory_pruner.predictor.bias"]
    assert groups["memory_predictor"]["lr"] == 0.01 and groups["pretrained"]["lr"] == mp.config.train.lr_pretrained
    # unset: the predictor is one of the new parameters, at train.lr
    plain = _pruned(0.3)
    groups = {g["name"]: g for g in build_optimizer(plain, plain.config, pretrained).param_groups}
    assert "memory_predictor" not in groups and groups["new"]["lr"] == plain.config.train.lr
    assert groups["new"]["param_names"] == ["decoder.memory_pruner.predictor.weight"]
