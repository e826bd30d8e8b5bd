"""A mixture of experts is a mixture from its first step: expert initialisation (upcycle, Drop-Upcycling, random),
routers that learn from the detection loss, experts that differ, and the per-epoch MoE diagnostics (expert cosine
similarity, router entropy)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SMALL_HEADS, one_thread_for_module
from torch import nn

import dset
from dset import metric_names as M
from dset.config import ConfigError
from dset.engine.initial_weights import build_training_model
from dset.engine.loop import fit
from dset.engine.optim import build_optimizer
from dset.models.criterion import build_criterion, total_loss
from dset.models.detector import build_model
from dset.models.moe import ExpertInit, MoEFFN

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_for_module)

SMALL = ["model.num_classes=3", "model.decoder.num_queries=10", "model.decoder.num_denoising=0"]
# the detection loss alone: no balance or z loss, whose gradients reach the router whatever the experts
DETECTION_LOSS_ONLY = ["model.encoder_moe.balance_loss_weight=0", "model.decoder_moe.balance_loss_weight=0",
                       "model.encoder_moe.z_loss_weight=0", "model.decoder_moe.z_loss_weight=0"]
# measured (random RT-DETR checkpoints, 2 images of 64 px): with the presets' Drop-Upcycling every router's gradient
# norm is 3.9e-3..2.6e-2 (dset_r18) and 2.2e-4..4.5e-4 (dset_r34); with plain upcycling (each expert the dense FFN)
# at most 2.0e-9 and 3.0e-10: rounding
ROUTER_GRAD_FLOOR = 1e-5
ROUTER_GRAD_NOISE = 1e-6


@pytest.fixture(scope="module")
def rtdetr_checkpoints(module_tmp):
    """An RT-DETR checkpoint (random weights, the project's own builder) per backbone, as stage 1 would give."""
    folder = module_tmp("rtdetr")
    paths = {}
    for depth in (18, 34):
        torch.manual_seed(depth)
        model = build_model(dset.load_config(f"rtdetr_r{depth}", SMALL), load_weights=False)
        paths[depth] = folder / f"rtdetr_r{depth}.pth"
        torch.save({"model": model.state_dict()}, paths[depth])
    return paths


def _images_and_targets():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return images, targets


def _moe_layers(model):
    return model.encoder_moe_layers() + model.decoder_moe_layers()


def _router_grad_norms(preset: str, checkpoint, *overrides: str) -> list[float]:
    """Every router's gradient norm after one training forward and backward of the detection loss alone."""
    torch.manual_seed(0)
    cfg = dset.load_config(preset, SMALL + DETECTION_LOSS_ONLY + [f"model.checkpoint={checkpoint}", *overrides])
    model, _, _ = build_training_model(cfg)
    model.train()
    images, targets = _images_and_targets()
    loss_dict = build_criterion(cfg)(model(images, targets), targets)
    assert not any("moe" in k and float(v.detach()) != 0 for k, v in loss_dict.items())   # balance and z weights are 0
    total_loss(loss_dict).backward()
    return [float(m.router.weight.grad.norm()) for m in _moe_layers(model)]


@pytest.mark.parametrize("preset", ["dset_r18", "dset_r34"])
def test_every_router_learns_from_the_detection_loss_at_the_first_step(rtdetr_checkpoints, preset):
    """The preset's expert initialisation gives every router a detection-loss gradient from step 0, far above
    float noise; plain upcycling (the contrast, measured beside it) gives rounding only."""
    depth = int(preset[-2:])
    assert dset.load_config(preset).model.encoder_moe.expert_init == "drop_upcycle"
    preset_norms = _router_grad_norms(preset, rtdetr_checkpoints[depth])
    upcycle_norms = _router_grad_norms(preset, rtdetr_checkpoints[depth], "model.encoder_moe.expert_init=upcycle",
                                       "model.decoder_moe.expert_init=upcycle")
    print(f"{preset} router gradient norms: preset {preset_norms}, plain upcycle {upcycle_norms}")
    assert len(preset_norms) == 1 + len(dset.build_model(preset, SMALL).decoder_moe_layers())
    assert min(preset_norms) > ROUTER_GRAD_FLOOR, preset_norms
    assert max(upcycle_norms) < ROUTER_GRAD_NOISE, upcycle_norms


def test_experts_of_a_layer_differ_and_train_as_new_parts_after_a_few_steps(rtdetr_checkpoints):
    """Three optimizer steps of dset_r18 from an RT-DETR checkpoint: the drop-upcycled experts are new parts at
    train.lr, every expert moved, each differently, and the experts of each layer are far from identical."""
    torch.manual_seed(0)
    cfg = dset.load_config("dset_r18", SMALL + [f"model.checkpoint={rtdetr_checkpoints[18]}", "train.lr=1e-4",
                                                "train.lr_pretrained=1e-5"])
    model, pretrained, _ = build_training_model(cfg)
    optimizer = build_optimizer(model, cfg, pretrained)
    lr_of = {n: g["lr"] for g in optimizer.param_groups for n in g["param_names"]}
    names = {id(p): n for n, p in model.named_parameters()}
    layers = _moe_layers(model)
    assert all(lr_of[names[id(m.w1)]] == 1e-4 and lr_of[names[id(m.router.weight)]] == 1e-4 for m in layers)
    before = [m.w1.detach().clone() for m in layers]
    criterion = build_criterion(cfg)
    model.train()
    images, targets = _images_and_targets()
    for _ in range(3):
        optimizer.zero_grad()
        total_loss(criterion(model(images, targets), targets)).backward()
        optimizer.step()
    for m, w1 in zip(layers, before):
        moved = (m.w1.detach() - w1).flatten(1)                         # [E, hidden * d]
        assert (moved.abs().amax(dim=1) > 1e-5).all()                   # every expert trained (3 steps at 1e-4)
        between = (moved[:, None] - moved[None]).abs().amax(dim=-1)     # how differently each pair moved
        assert between[~torch.eye(m.num_experts, dtype=torch.bool)].min() > 1e-6   # rounding: ~1e-9
        assert float(m.expert_cosine()) < 0.5                           # plain upcycling: 1.0


def _dense_ffn(d: int, hidden: int, seed: int = 0):
    torch.manual_seed(seed)
    linear1, linear2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
    with torch.no_grad():   # means far from 0, so that a re-initialisation at mean 0 would show
        linear1.weight.add_(0.3)
        linear1.bias.sub_(0.2)
        linear2.weight.add_(0.1)
    return linear1, linear2


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_drop_upcycling_reinitialises_that_share_of_each_experts_hidden_units(ratio):
    d, hidden, E = 64, 256, 4
    linear1, linear2 = _dense_ffn(d, hidden)
    m = MoEFFN(d, hidden, E, 2).upcycle_from_dense(linear1, linear2, generator=torch.Generator().manual_seed(3),
                                                   drop_ratio=ratio)
    count = round(ratio * hidden)
    w1, b1, w2 = linear1.weight.detach(), linear1.bias.detach(), linear2.weight.detach()
    unit_sets = []
    m.requires_grad_(False)
    for e in range(E):
        rows = (m.w1[e] != w1).any(dim=1)
        assert int(rows.sum()) == count
        # the same units: their rows of w1 and b1 and their columns of w2, and nothing else
        assert torch.equal((m.b1[e] != b1), rows) and torch.equal((m.w2[e] != w2).any(dim=0), rows)
        assert torch.equal(m.w2[e][:, rows].ne(w2[:, rows]), torch.ones(d, count, dtype=torch.bool))
        assert torch.equal(m.b2[e], linear2.bias.detach())
        unit_sets.append(rows)
        # the new values have the statistics of the dense tensor they replace (the paper's choice)
        for new, dense in ((m.w1[e][rows], w1), (m.w2[e][:, rows], w2)):
            assert abs(float(new.mean() - dense.mean())) < 0.1 * float(dense.std())
            assert float(new.std()) == pytest.approx(float(dense.std()), rel=0.1)
    if ratio < 1:   # each expert its own units
        assert all(not torch.equal(unit_sets[a], unit_sets[b]) for a in range(E) for b in range(a + 1, E))


def test_expert_init_modes_and_their_router():
    d, hidden = 16, 32
    linear1, linear2 = _dense_ffn(d, hidden)
    fresh = MoEFFN(d, hidden, 3, 2)
    kept = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.init_experts_from_dense(linear1, linear2, ExpertInit("random"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in kept.items())   # random: its own init, untouched
    plain = MoEFFN(d, hidden, 3, 2).init_experts_from_dense(linear1, linear2, ExpertInit("upcycle"))
    assert all(torch.equal(plain.w1[e], linear1.weight) for e in range(3))
    assert float(plain.expert_cosine()) == pytest.approx(1.0, abs=1e-6)
    noisy = MoEFFN(d, hidden, 3, 2).init_experts_from_dense(linear1, linear2, ExpertInit("upcycle", noise=0.5))
    assert 0.5 < float(noisy.expert_cosine()) < 0.99
    with pytest.raises(ValueError, match="expert_init must be one of"):
        plain.init_experts_from_dense(linear1, linear2, ExpertInit("copy"))


def test_reset_parameters_is_the_original_dset_initialisation():
    """xavier-uniform expert weights, zero biases, router N(0, 0.01) with zero bias (DSET's SpecialistNetwork and
    AdaptiveRouter); nn.Linear's Kaiming init would give w2 a bound of 1/sqrt(hidden) = 0.031 here, not 0.068."""
    torch.manual_seed(0)
    m = MoEFFN(256, 1024, 6, 3).requires_grad_(False)
    bound = math.sqrt(6 / (256 + 1024))
    for w in (m.w1, m.w2):
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    assert float(m.b1.abs().max()) == 0 and float(m.b2.abs().max()) == 0 and float(m.router.bias.abs().max()) == 0
    assert float(m.router.weight.std()) == pytest.approx(0.01, rel=0.05)
    assert float(m.expert_cosine()) == pytest.approx(0.0, abs=0.01)   # independent experts


def test_expert_cosine_and_router_entropy_values():
    m = MoEFFN(4, 2, 3, 1)
    with torch.no_grad():
        m.w1.zero_()
        m.w2.zero_()
        m.w1[0, 0, 0], m.w1[1, 0, 1], m.w1[2, 0, 0] = 1.0, 1.0, -1.0   # expert 0 orthogonal to 1, opposite to 2
        m.router.weight.zero_()
        m.router.bias.copy_(torch.tensor([math.log(2.0), 0.0, 0.0]))   # probabilities (1/2, 1/4, 1/4) for any token
    assert float(m.expert_cosine()) == pytest.approx((0 - 1 + 0) / 3, abs=1e-6)
    m(torch.rand(5, 4))
    assert float(m.router_entropy) == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), abs=1e-6)
    with torch.no_grad():
        m.router.bias.zero_()
    m(torch.rand(5, 4))
    assert float(m.router_entropy) == pytest.approx(math.log(3), abs=1e-6)   # uniform


@pytest.mark.parametrize("override, message", [
    ("model.encoder_moe.expert_init=copy", "model.encoder_moe.expert_init: must be one of upcycle, drop_upcycle"),
    ("model.decoder_moe.drop_upcycle_ratio=0", r"model.decoder_moe.drop_upcycle_ratio: must be in \(0, 1\]"),
    ("model.decoder_moe.drop_upcycle_ratio=1.5", r"model.decoder_moe.drop_upcycle_ratio: must be in \(0, 1\]"),
    ("model.encoder_moe.upcycle_noise=0.1", "model.encoder_moe.upcycle_noise: applies to expert_init 'upcycle'"),
    ("model.encoder_moe.upcycle_noise=-1", "model.encoder_moe.upcycle_noise: must be >= 0"),
])
def test_expert_init_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        dset.load_config("dset_r18", [override])
    dset.load_config("dset_r18", ["model.encoder_moe.expert_init=upcycle", "model.encoder_moe.upcycle_noise=0.1"])


def test_training_records_expert_cosine_and_router_entropy_per_layer(module_tmp, rtdetr_checkpoints, tmp_path):
    """One tiny epoch from an RT-DETR checkpoint: the encoder MoE plainly upcycled with its copies frozen
    (lr_pretrained 0) stays one FFN (cosine 1); the decoder MoE, drop-upcycled, is a mixture (about 0.25: two
    experts share the dense values of about a quarter of the units). The routers start near uniform (ln 6)."""
    root = module_tmp("synthetic")
    torch.manual_seed(0)
    checkpoint = module_tmp("rtdetr_heads") / "rtdetr.pth"
    torch.save({"model": build_model(dset.load_config("rtdetr_r18", SMALL_HEADS + ["model.num_classes=4",
                                                                              "model.decoder.num_denoising=0"]),
                                     load_weights=False).state_dict()}, checkpoint)
    cfg = dset.load_config("dset_r18", [
        "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
        f"data.synthetic.root={root}", "data.image_size=64", "data.batch_size=2", "model.eval_spatial_size=[64,64]",
        "model.decoder.num_queries=10", "model.decoder.num_denoising=0", *SMALL_HEADS, "model.num_classes=4",
        "model.token_pruning.enabled=false",
        f"model.checkpoint={checkpoint}", "model.encoder_moe.expert_init=upcycle", "train.lr_pretrained=0",
        "train.epochs=1", "train.warmup_steps=0", "train.profile=false", "run.progress=false"])
    fit(cfg, tmp_path)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    print({k: v for k, v in record.items() if k.endswith(("expert_cosine", "router_entropy"))})
    assert record[M.expert_cosine_metric("encoder_moe", 0)] == pytest.approx(1.0, abs=1e-5)
    for layer in range(3):
        assert 0.15 < record[M.expert_cosine_metric("decoder_moe", layer)] < 0.35
    for kind, layers in (("encoder_moe", 1), ("decoder_moe", 3)):
        for layer in range(layers):
            assert math.log(6) - 0.05 < record[M.router_entropy_metric(kind, layer)] <= math.log(6) + 1e-6
        assert M.router_entropy_metric(kind, layers) not in record
        assert M.expert_cosine_metric(kind, layers) not in record
    assert M.expert_cosine_metric("encoder_moe", 0) == "sparse/encoder_moe/layer0/expert_cosine"
    assert M.router_entropy_metric("decoder_moe", 2) == "sparse/decoder_moe/layer2/router_entropy"
