"""The MoE's options from the original DSET code, each off by default: patch-level routing (the tokens of one
k x k patch share one routing decision) and the balance loss's warm-up. (Router noise: tests/test_moe.py.)"""

from __future__ import annotations

import pytest
import torch

import dset
from dset.config import ConfigError
from dset.models.moe import MoEFFN, patch_groups

SMALL = ["model.num_classes=5", "model.decoder.num_queries=30", "model.decoder.num_denoising=0",
         "model.encoder_moe.num_experts=4", "model.encoder_moe.top_k=2", "model.decoder_moe.num_experts=4",
         "model.decoder_moe.top_k=2", "model.token_pruning.min_tokens=4"]
SIZE = 128  # a 4 x 4 stride-32 map: 16 AIFI tokens


def _moe(patch_size: int = 1, router_noise: float = 0.0) -> MoEFFN:
    torch.manual_seed(0)
    moe = MoEFFN(16, 24, 6, 2, router_noise=router_noise, patch_size=patch_size)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 1.0)  # decisive routing: no ties for rounding to decide
    return moe


def _expert(moe: MoEFFN, e: int, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ moe.w1[e].t() + moe.b1[e])
    return h @ moe.w2[e].t() + moe.b2[e]


def test_patch_groups_number_the_patches_of_each_image_apart():
    groups = patch_groups(4, 5, 2, batch=2)  # 2 x 3 patches an image, the last column's 1 wide
    assert groups.count == 12
    ids = groups.ids.view(2, 4, 5)
    assert ids[0].tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5], [3, 3, 4, 4, 5]]
    assert torch.equal(ids[1], ids[0] + 6)
    # the tokens at index (e.g. those token pruning kept) get the ids of their positions in the map
    index = torch.tensor([[0, 6, 19], [2, 3, 15]])
    kept = patch_groups(4, 5, 2, batch=2, index=index)
    assert kept.count == 12 and kept.ids.tolist() == [0, 0, 5, 6 + 1, 6 + 1, 6 + 3]


def test_tokens_of_a_patch_share_the_decision_taken_on_their_mean():
    moe = _moe(patch_size=2).eval()
    x = torch.randn(2, 16, 16)  # two 4 x 4 maps
    groups = patch_groups(4, 4, 2, batch=2)
    top_w, top_i, probs, _ = moe.route(x.reshape(-1, 16), groups)
    members = [groups.ids == g for g in range(groups.count)]
    for g, member in enumerate(members):
        assert (top_i[member] == top_i[member][0]).all() and (top_w[member] == top_w[member][0]).all()
        # the router is linear: the mean of the tokens' logits is the logits of their mean token
        mean_token = x.reshape(-1, 16)[member].mean(0)
        expected = moe.router(mean_token).softmax(-1).topk(2).indices
        assert set(top_i[member][0].tolist()) == set(expected.tolist()), g
    assert len({tuple(top_i[m][0].tolist()) for m in members}) > 1  # not one decision for everything
    # the output is each token's own experts' outputs under its patch's weights
    y = moe(x, groups).reshape(-1, 16)
    x2d = x.reshape(-1, 16)
    for t in (0, 5, 21):
        want = sum(top_w[t, k] * _expert(moe, int(top_i[t, k]), x2d[t]) for k in range(2))
        torch.testing.assert_close(y[t], want, rtol=1e-5, atol=1e-6)


def test_one_token_patches_route_as_without_groups():
    moe = _moe().eval()
    x = torch.randn(2, 16, 16)
    torch.testing.assert_close(moe(x, patch_groups(4, 4, 1, batch=2)), moe(x), rtol=0, atol=0)


def test_router_noise_is_drawn_per_patch():
    moe = _moe(patch_size=2, router_noise=5.0).train()
    x = torch.randn(1, 16, 16)
    groups = patch_groups(4, 4, 2, batch=1)
    torch.manual_seed(1)
    _, top_i, probs, _ = moe.route(x.reshape(-1, 16), groups)
    for g in range(groups.count):
        member = groups.ids == g
        assert (top_i[member] == top_i[member][0]).all()
        assert torch.equal(probs[member], probs[member][:1].expand_as(probs[member]))
    torch.manual_seed(1)
    noisy_twice = moe.route(x.reshape(-1, 16), groups)[2]
    assert torch.equal(noisy_twice, probs)  # the noise is the seeded generator's, nothing else
    assert not torch.allclose(moe.eval().route(x.reshape(-1, 16), groups)[2], probs)  # and it is there


@pytest.mark.parametrize("pruning", [False, True])
def test_the_encoder_routes_by_patch(pruning):
    model = dset.build_model("dset_r18", SMALL + ["model.encoder_moe.patch_size=2",
                                                  f"model.token_pruning.enabled={str(pruning).lower()}",
                                                  "model.decoder_moe.enabled=false"]).eval()
    model.set_deployed_epoch()  # pruning at its target: 12 of the 16 tokens
    moe = model.encoder_moe_layers()[0]
    assert moe.patch_size == 2 and "patch_size=2" in repr(moe)
    seen = {}
    moe.register_forward_hook(lambda _m, args, _out: seen.update(groups=args[1]))
    with torch.no_grad():
        model(torch.rand(2, 3, SIZE, SIZE))
    index = model.encoder.last_pruning["keep_index"] if pruning else None
    want = patch_groups(4, 4, 2, batch=2, index=index)
    assert seen["groups"].count == want.count == 8 and torch.equal(seen["groups"].ids, want.ids)
    assert seen["groups"].ids.numel() == 2 * (12 if pruning else 16)


def test_patch_routing_is_for_the_encoder_only():
    with pytest.raises(ConfigError, match=r"model\.decoder_moe\.patch_size.*queries have none"):
        dset.load_config("dset_r18", ["model.decoder_moe.patch_size=2"])
    with pytest.raises(ConfigError, match=r"model\.encoder_moe\.patch_size"):
        dset.load_config("dset_r18", ["model.encoder_moe.patch_size=0"])
    assert dset.load_config("dset_r18").model.encoder_moe.patch_size == 1  # off by default


def test_the_balance_loss_warms_up_linearly_then_stays():
    assert dset.load_config("dset_r18").model.decoder_moe.balance_warmup_epochs == 0  # off by default
    overrides = SMALL + ["model.token_pruning.enabled=false", "model.encoder_moe.balance_warmup_epochs=2",
                         "model.decoder_moe.balance_warmup_epochs=4"]
    model = dset.build_model("dset_r18", overrides).train()
    images = torch.rand(2, 3, SIZE, SIZE)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    seen = []
    for epoch in (0, 1, 2, 3, 8):
        model.set_epoch(epoch)
        torch.manual_seed(0)
        losses = model(images, targets)["extra_losses"]
        unscaled = {side: torch.stack([m.balance_loss for m in layers]).mean()
                    for side, layers in (("enc", model.encoder_moe_layers()), ("dec", model.decoder_moe_layers()))}
        seen.append(tuple(losses[f"loss_{side}_moe_balance"] / unscaled[side] for side in ("enc", "dec")))
        assert unscaled["enc"] > 0.5 and unscaled["dec"] > 0.5  # a real loss (1 for uniform routing), not a zero
    got = [(round(float(e), 6), round(float(d), 6)) for e, d in seen]
    assert got == [(0.0, 0.0), (0.5, 0.25), (1.0, 0.5), (1.0, 0.75), (1.0, 1.0)]
    plain = dset.build_model("dset_r18", SMALL + ["model.token_pruning.enabled=false"]).train()
    assert plain.balance_warmup_factor("enc") == plain.balance_warmup_factor("dec") == 1.0
