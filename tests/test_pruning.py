"""TokenPruner: schedule, K formula, gather/scatter, importance target map and loss, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from dset.models.pruning import (
    TokenPruner,
    importance_target_map,
    keep_count,
    scheduled_keep_ratio,
    set_epoch_all,
)


def _channel0_pruner(C: int, **kw) -> TokenPruner:
    """Predictor whose score is GELU(token[..., 0]): monotonic in channel 0 for positive values."""
    p = TokenPruner(C, **kw)
    with torch.no_grad():
        lin1, lin2 = p.predictor[0], p.predictor[2]
        lin1.weight.zero_()
        lin1.bias.zero_()
        lin1.weight[0, 0] = 1.0
        lin2.weight.zero_()
        lin2.bias.zero_()
        lin2.weight[0, 0] = 1.0
    return p


# ----------------------------------------------------------------------------- schedule and K
def test_schedule_values():
    p = TokenPruner(8, keep_ratio=0.6, warmup_epochs=2, ramp_epochs=4)
    expected = {0: 1.0, 1: 1.0, 2: 0.9, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.6, 50: 0.6}
    for epoch, ratio in expected.items():
        p.set_epoch(epoch)
        assert p.current_keep_ratio() == pytest.approx(ratio), epoch
    assert scheduled_keep_ratio(3, 0.5, warmup_epochs=3, ramp_epochs=0) == 0.5
    assert scheduled_keep_ratio(2, 0.5, warmup_epochs=3, ramp_epochs=0) == 1.0
    # defaults: 10 warm-up epochs, 10 ramp epochs, 0.7
    d = TokenPruner(8)
    assert d.current_keep_ratio() == 1.0
    d.set_epoch(10)
    assert d.current_keep_ratio() == pytest.approx(0.97)
    d.set_epoch(19)
    assert d.current_keep_ratio() == pytest.approx(0.7)


def test_keep_count_formula():
    assert keep_count(400, 0.7, 100) == 280  # ceil(0.7 * 400) even though 0.7 * 400 is inexact
    assert keep_count(10, 0.7, 1) == 7
    assert keep_count(10, 0.25, 1) == 3  # ceil(2.5)
    assert keep_count(120, 0.5, 100) == 100  # min_tokens wins
    assert keep_count(50, 0.5, 100) == 50  # N < min_tokens: keep all
    assert keep_count(400, 1.0, 100) == 400
    p = TokenPruner(8, keep_ratio=0.5, min_tokens=3, warmup_epochs=0, ramp_epochs=0)
    assert p.num_kept(10) == 5 and p.num_kept(4) == 3 and p.num_kept(2) == 2


# ----------------------------------------------------------------------------- select / merge
def test_no_pruning_returns_inputs_unchanged():
    p = TokenPruner(8, keep_ratio=0.5, min_tokens=1)  # epoch 0 < warm-up: ratio 1.0
    x, pos = torch.randn(2, 12, 8), torch.randn(1, 12, 8)
    kept, kept_pos, idx, scores = p.select(x, pos)
    assert kept is x and kept_pos is pos
    assert torch.equal(idx, torch.arange(12).expand(2, 12))
    assert scores.shape == (2, 12)
    processed = kept * 3
    assert p.merge(x, processed, idx) is processed
    assert p.last_stats == {"tokens_before": 12, "tokens_after": 12, "keep_ratio": 1.0, "scheduled_keep_ratio": 1.0}
    # keep_ratio=1.0 after the schedule too
    q = TokenPruner(8, keep_ratio=1.0, min_tokens=1, warmup_epochs=0, ramp_epochs=0)
    assert q.select(x, pos)[0] is x


@pytest.mark.parametrize("train", [True, False])
def test_select_keeps_top_scores_in_spatial_order(train):
    B, N, C, K = 2, 10, 4, 4
    p = _channel0_pruner(C, keep_ratio=0.4, min_tokens=1, warmup_epochs=0, ramp_epochs=0)
    p.train(train)  # eval mode prunes at the scheduled ratio as well
    x = torch.randn(B, N, C)
    x[..., 0] = torch.rand(B, N) + 0.1  # positive, distinct
    pos = torch.randn(1, N, C)
    kept, kept_pos, idx, scores = p.select(x, pos)
    torch.testing.assert_close(scores, F.gelu(x[..., 0]))
    expected = x[..., 0].topk(K, dim=1).indices.sort(dim=1).values
    assert torch.equal(idx, expected)
    assert torch.all(idx[:, 1:] > idx[:, :-1])  # ascending = spatial order
    for b in range(B):
        assert torch.equal(kept[b], x[b, idx[b]])  # straight-through factor is exactly 1.0
        assert torch.equal(kept_pos[b], pos[0, idx[b]])
    assert kept.shape == (B, K, C) and kept_pos.shape == (B, K, C)
    assert p.last_stats == {"tokens_before": N, "tokens_after": K, "keep_ratio": 0.4, "scheduled_keep_ratio": 0.4}


def test_select_per_image_pos_and_none():
    p = TokenPruner(4, keep_ratio=0.5, min_tokens=1, warmup_epochs=0, ramp_epochs=0)
    x, pos = torch.randn(3, 8, 4), torch.randn(3, 8, 4)
    kept, kept_pos, idx, _ = p.select(x, pos)
    assert torch.equal(kept_pos, pos.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4)))
    assert p.select(x, None)[1] is None


@pytest.mark.parametrize("fill", ["identity", "zero"])
def test_merge_fill(fill):
    B, N, C = 2, 6, 3
    p = TokenPruner(C, keep_ratio=0.5, min_tokens=1, warmup_epochs=0, ramp_epochs=0, fill=fill)
    x = torch.randn(B, N, C)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
    processed = torch.full((B, 3, C), 7.0)
    out = p.merge(x, processed, idx)
    for b in range(B):
        for n in range(N):
            if n in idx[b].tolist():
                assert torch.all(out[b, n] == 7.0)
            elif fill == "identity":
                assert torch.equal(out[b, n], x[b, n])
            else:
                assert torch.all(out[b, n] == 0.0)


# ----------------------------------------------------------------------------- importance target and loss
def test_importance_target_map_by_hand():
    H, W = 4, 5  # cell centres x: .1 .3 .5 .7 .9 ; y: .125 .375 .625 .875
    big = torch.tensor([[0.5, 0.5, 0.45, 0.5]])  # x in [.275, .725], y in [.25, .75]
    tiny = torch.tensor([[0.05, 0.95, 0.02, 0.02]])  # covers no cell centre; its centre is in cell (3, 0)
    targets = [
        {"boxes": torch.cat([big, tiny])},
        {"boxes": torch.zeros(0, 4)},
        {"boxes": tiny},
    ]
    expected0 = torch.zeros(H, W)
    expected0[1:3, 1:4] = 1.0
    no_centre = importance_target_map((H, W), targets, include_centre_cell=False)
    assert no_centre.shape == (3, H * W)
    assert torch.equal(no_centre[0], expected0.flatten())
    assert torch.all(no_centre[1:] == 0)
    with_centre = importance_target_map((H, W), targets)
    expected0[3, 0] = 1.0
    assert torch.equal(with_centre[0], expected0.flatten())
    assert torch.all(with_centre[1] == 0)
    assert with_centre[2].sum() == 1 and with_centre[2, 3 * W + 0] == 1
    # no boxes anywhere
    assert torch.equal(importance_target_map((2, 3), [{"boxes": torch.zeros(0, 4)}]), torch.zeros(1, 6))


def test_importance_loss_value():
    p = TokenPruner(4)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.45, 0.5]])}]
    zero = p.importance_loss(torch.zeros(1, 20), (4, 5), targets)
    assert zero.item() == pytest.approx(math.log(2))
    target = importance_target_map((4, 5), targets)
    perfect = p.importance_loss((target * 2 - 1) * 20, (4, 5), targets)
    assert perfect.item() < 1e-6
    with pytest.raises(ValueError, match="spatial_shape"):
        p.importance_loss(torch.zeros(1, 21), (4, 5), targets)


# ----------------------------------------------------------------------------- gradients
def _predictor_grads(p):
    return [q.grad for q in p.predictor.parameters()]


def test_predictor_gets_gradient_from_importance_loss():
    p = TokenPruner(8, keep_ratio=0.5, min_tokens=1)
    x = torch.randn(2, 20, 8)
    _, _, _, scores = p.select(x)
    p.importance_loss(scores, (4, 5), [{"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}] * 2).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _predictor_grads(p))


def test_predictor_gets_gradient_through_merge_from_downstream_loss():
    p = TokenPruner(8, keep_ratio=0.5, min_tokens=1, warmup_epochs=0, ramp_epochs=0)
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 20, 8, requires_grad=True)
    kept, _, idx, _ = p.select(x)
    out = p.merge(x, torch.tanh(layer(kept)), idx)
    (out * torch.randn_like(out)).sum().backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _predictor_grads(p))
    assert layer.weight.grad.abs().sum() > 0
    # identity fill: pruned positions pass their gradient straight to the input
    kept, _, idx, _ = p.select(x)
    g = torch.autograd.grad(p.merge(x, kept, idx).sum(), x)[0]
    assert torch.all(g != 0)


# ----------------------------------------------------------------------------- state, args
def test_state_dict_holds_epoch():
    p = TokenPruner(8, keep_ratio=0.5, warmup_epochs=1, ramp_epochs=1)
    p.set_epoch(7)
    sd = p.state_dict()
    assert "epoch" in sd and int(sd["epoch"]) == 7
    q = TokenPruner(8, keep_ratio=0.5, warmup_epochs=1, ramp_epochs=1)
    assert q.current_keep_ratio() == 1.0
    q.load_state_dict(sd)
    assert int(q.epoch) == 7 and q.current_keep_ratio() == 0.5
    assert set(sd) == {"epoch", "predictor.0.weight", "predictor.0.bias", "predictor.2.weight", "predictor.2.bias"}


def test_set_epoch_all_and_deepcopy():
    import copy

    model = torch.nn.Sequential(TokenPruner(8, warmup_epochs=0, ramp_epochs=1), torch.nn.Linear(8, 8),
                                torch.nn.ModuleList([TokenPruner(8, keep_ratio=0.5, warmup_epochs=0, ramp_epochs=0)]))
    ema = copy.deepcopy(model)
    assert set_epoch_all(model, 3) == 2
    assert model[0].current_keep_ratio() == pytest.approx(0.7) and int(model[2][0].epoch) == 3
    assert int(ema[0].epoch) == 0  # copies are independent: the trainer updates both
    set_epoch_all(ema, 3)
    assert ema[0].current_keep_ratio() == pytest.approx(0.7)


def test_merge_keeps_the_wider_dtype():
    p = TokenPruner(4, keep_ratio=0.5, min_tokens=1, warmup_epochs=0, ramp_epochs=0)
    x = torch.randn(1, 4, 4)
    out = p.merge(x, torch.ones(1, 2, 4, dtype=torch.float16), torch.tensor([[0, 3]]))
    assert out.dtype == torch.float32 and torch.equal(out[0, 1], x[0, 1])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(keep_ratio=0.0), "keep_ratio"),
        (dict(keep_ratio=1.2), "keep_ratio"),
        (dict(min_tokens=0), "min_tokens"),
        (dict(warmup_epochs=-1), "warmup_epochs"),
        (dict(ramp_epochs=-2), "ramp_epochs"),
        (dict(fill="mean"), "fill"),
    ],
)
def test_invalid_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TokenPruner(8, **kwargs)
    with pytest.raises(ValueError, match="epoch"):
        TokenPruner(8).set_epoch(-1)
