"""Parameter groups and the learning rate every parameter actually gets across warm-up and cosine."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import one_thread_for_module

import dset
from dset.engine.initial_weights import build_training_model
from dset.engine.optim import build_optimizer
from dset.engine.schedule import WarmupCosine, build_scheduler
from dset.models.detector import build_model

SMALL = ["model.num_classes=3", "model.decoder.num_queries=10", "model.decoder.num_denoising=0"]


one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_for_module)


def test_warmup_cosine_factor_values():
    f = WarmupCosine(warmup_steps=4, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0                                     # cosine starts at its peak
    assert f(8) == pytest.approx(0.5)                      # half-way through the 8 cosine steps
    assert f(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 8)))
    assert f(12) == pytest.approx(0.0)
    g = WarmupCosine(warmup_steps=0, total_steps=10, min_ratio=0.1)
    assert g(0) == 1.0 and g(10) == pytest.approx(0.1) and g(5) == pytest.approx(0.55)


@pytest.fixture(scope="module")
def backbone_file(module_tmp):
    path = module_tmp("weights") / "presnet18.pth"
    model = build_model(dset.load_config("rtdetr_r18", SMALL), load_weights=False)
    torch.save(model.backbone.state_dict(), path)
    return path


def _groups_by_param(optimizer):
    return {name: g for g in optimizer.param_groups for name in g["param_names"]}


def test_param_groups_pretrained_backbone_and_no_decay(backbone_file):
    cfg = dset.load_config("rtdetr_r18", SMALL + [f"model.backbone.pretrained={backbone_file}", "train.lr=1e-4",
                                                  "train.lr_pretrained=1e-5", "train.weight_decay=0.05"])
    model, pretrained, _ = build_training_model(cfg)
    opt = build_optimizer(model, cfg, pretrained)
    groups = _groups_by_param(opt)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(groups) == sorted(names)                    # every trainable parameter exactly once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    assert {g["name"] for g in opt.param_groups} == {"pretrained", "pretrained_no_decay", "new", "new_no_decay"}
    for name in names:
        g = groups[name]
        assert g["lr"] == (1e-5 if name.startswith("backbone.") else 1e-4), name
    # weight decay: none on norms and biases, 0.05 on conv / linear weights and embeddings
    assert groups["backbone.conv1.conv1_1.conv.weight"]["weight_decay"] == 0.05
    assert groups["backbone.conv1.conv1_1.norm.weight"]["weight_decay"] == 0.0
    assert groups["backbone.conv1.conv1_1.norm.bias"]["weight_decay"] == 0.0
    assert groups["decoder.dec_score_head.0.weight"]["weight_decay"] == 0.05
    assert groups["decoder.dec_score_head.0.bias"]["weight_decay"] == 0.0
    assert groups["decoder.enc_output.1.weight"]["weight_decay"] == 0.0      # a LayerNorm
    assert groups["encoder.input_proj.0.1.weight"]["weight_decay"] == 0.0    # a BatchNorm
    assert groups["decoder.query_pos_head.layers.0.weight"]["weight_decay"] == 0.05
    assert groups["encoder.encoder.0.layers.0.self_attn.in_proj_weight"]["weight_decay"] == 0.05
    assert groups["encoder.encoder.0.layers.0.self_attn.in_proj_bias"]["weight_decay"] == 0.0


def test_from_scratch_everything_at_lr():
    cfg = dset.load_config("rtdetr_r18", SMALL + ["train.lr=3e-4", "train.lr_pretrained=1e-5"])
    model, pretrained, _ = build_training_model(cfg)
    opt = build_optimizer(model, cfg, pretrained)
    assert pretrained == set()
    assert {g["name"] for g in opt.param_groups} == {"new", "new_no_decay"}
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)


@pytest.mark.parametrize("expert_init", ["upcycle", "drop_upcycle", "random"])
def test_rtdetr_checkpoint_into_dset_new_components_at_lr(tmp_path, expert_init):
    """Loading an RT-DETR checkpoint into DSET: every loaded tensor is pretrained, and so are the MoE experts
    plainly upcycled from the pretrained FFNs (with the FFN's weight decay: none on the stacked biases);
    drop-upcycled and random experts are new parts (train.lr), as the original DSET trains its experts; routers and
    the importance predictor are new."""
    dense = build_model(dset.load_config("rtdetr_r18", SMALL), load_weights=False)
    path = tmp_path / "rtdetr.pth"
    torch.save({"model": dense.state_dict()}, path)
    cfg = dset.load_config("dset_r18", SMALL + [f"model.checkpoint={path}", "model.encoder_moe.expert_hidden_dim=1024",
                                                "model.decoder_moe.expert_hidden_dim=1024",
                                                f"model.encoder_moe.expert_init={expert_init}",
                                                f"model.decoder_moe.expert_init={expert_init}"])
    model, pretrained, reports = build_training_model(cfg)
    assert len(reports[0].expert_init) == 4                # every MoE layer made from its dense FFN's slot
    assert bool(reports[0].upcycled) == (expert_init == "upcycle")   # plain copies of the dense FFNs
    opt = build_optimizer(model, cfg, pretrained)
    groups = _groups_by_param(opt)
    new = {n for n, g in groups.items() if g["name"].startswith("new")}
    experts = {n for n in groups if n.endswith((".moe.w1", ".moe.b1", ".moe.w2", ".moe.b2"))}
    assert new and all(".moe.router." in n or "token_pruner" in n or n in experts for n in new)
    assert any(".moe.router" in n for n in new) and any("token_pruner" in n for n in new)
    pretrained_experts = expert_init == "upcycle"
    assert experts and all(groups[n]["name"].startswith("pretrained") == pretrained_experts for n in experts)
    assert all(groups[n]["lr"] == (1e-5 if pretrained_experts else 1e-4) for n in experts)
    # the MoE experts' stacked biases get no weight decay, their weights do
    assert all(groups[n]["weight_decay"] == 0.0 for n in experts if n.endswith((".moe.b1", ".moe.b2")))
    assert all(groups[n]["weight_decay"] > 0 for n in experts if n.endswith((".moe.w1", ".moe.w2")))
    dense_names = {n for n in groups if ".moe." not in n and "token_pruner" not in n}
    assert dense_names and all(groups[n]["name"].startswith("pretrained") for n in dense_names)


# an upcycled expert tensor and the dense FFN tensor it was copied from
_EXPERT_SOURCE = {"w1": "linear1.weight", "b1": "linear1.bias", "w2": "linear2.weight", "b2": "linear2.bias"}


def _dense_name(name: str) -> str:
    """The all-off model's name of a cell's parameter (an upcycled expert -> the FFN tensor it came from)."""
    head, _, last = name.rpartition(".moe.")
    return f"{head}.{_EXPERT_SOURCE[last]}" if head and last in _EXPERT_SOURCE else name


@pytest.mark.parametrize("switches", [(e, p, d) for e in (False, True) for p in (False, True) for d in (False, True)
                                      if (e, p, d) != (False, False, False)])
def test_every_switch_keeps_the_optimizer_groups_of_the_all_off_cell(tmp_path, switches):
    """DSET's protocol: every cell fine-tunes from the same RT-DETR checkpoint, and turning a switch on changes
    nothing else. Parameter by parameter, each cell's rate and weight decay equal the all-off cell's, except the
    presets' drop-upcycled experts: new parts at train.lr, with the weight decay of the FFN tensor they were made
    from; the only other parameters are new ones (routers, the importance predictor) at train.lr."""
    dense = build_model(dset.load_config("rtdetr_r18", SMALL), load_weights=False)
    path = tmp_path / "rtdetr.pth"
    torch.save({"model": dense.state_dict()}, path)
    common = SMALL + [f"model.checkpoint={path}", "train.lr=1e-4", "train.lr_pretrained=1e-5",
                      "train.weight_decay=0.05", "model.encoder_moe.expert_hidden_dim=1024",
                      "model.decoder_moe.expert_hidden_dim=1024"]

    def groups_of(e, p, d):
        cfg = dset.load_config("dset_r18", common + [f"model.encoder_moe.enabled={e}",
                                                     f"model.token_pruning.enabled={p}",
                                                     f"model.decoder_moe.enabled={d}"])
        model, pretrained, _ = build_training_model(cfg)
        return {n: (g["lr"], g["weight_decay"]) for n, g in _groups_by_param(build_optimizer(model, cfg,
                                                                                            pretrained)).items()}

    base = groups_of(False, False, False)
    cell = groups_of(*switches)
    mapped = {}
    for name, setting in cell.items():
        source = _dense_name(name)
        if source in base:
            mapped[source] = setting
            expected = (1e-4, base[source][1]) if source != name else base[source]   # an expert: train.lr
            assert setting == expected, f"{name} (from {source}): {setting} != {expected} (all-off {base[source]})"
        else:
            assert ".moe.router." in name or ".token_pruner." in name, f"unexpected new parameter {name}"
            assert setting[0] == 1e-4, name
    # every all-off parameter is still there (as itself or as the experts copied from it)
    assert set(mapped) == set(base)


def test_lr_each_parameter_actually_gets(backbone_file):
    """Drive AdamW with a constant gradient of 1: then Adam's normalised step is exactly 1, so a parameter
    without weight decay moves by exactly its learning rate at every step, and one with weight decay by
    lr * (1 + wd * p). Checks warm-up and cosine for a pretrained and a new parameter of each kind: a
    schedule that wrote one absolute rate into every group (the original bug) moves the pretrained
    parameters 10x too far."""
    lr, lr_pre, wd, warmup, total = 1e-4, 1e-5, 0.05, 3, 9
    cfg = dset.load_config("rtdetr_r18", SMALL + [f"model.backbone.pretrained={backbone_file}", f"train.lr={lr}",
                                                  f"train.lr_pretrained={lr_pre}", f"train.weight_decay={wd}"])
    model, pretrained, _ = build_training_model(cfg)
    model.double()  # float64, so that the float32 rounding of p - lr does not blur lr (~1e-6)
    opt = build_optimizer(model, cfg, pretrained)
    sched = build_scheduler(opt, warmup_steps=warmup, total_steps=total)
    params = dict(model.named_parameters())
    watched = {  # name -> (base lr, weight decay)
        "backbone.conv1.conv1_1.norm.bias": (lr_pre, 0.0),
        "backbone.res_layers.0.blocks.0.branch2a.conv.weight": (lr_pre, wd),
        "decoder.dec_score_head.0.bias": (lr, 0.0),
        "encoder.encoder.0.layers.0.linear1.weight": (lr, wd),
    }
    factor = WarmupCosine(warmup, total)
    for step in range(total):
        for p in model.parameters():
            p.grad = None
        before = {}
        for name in watched:
            params[name].grad = torch.ones_like(params[name])
            before[name] = params[name].detach().clone()
        opt.step()
        sched.step()
        for name, (base, decay) in watched.items():
            expected_lr = base * factor(step)
            moved = before[name] - params[name].detach()
            expected = expected_lr * (1 + decay * before[name])
            torch.testing.assert_close(moved, expected, rtol=1e-6, atol=1e-13,
                                       msg=lambda m, n=name, s=step: f"{n} at step {s}: {m}")
