"""The MoE layers' static-shape dispatch (``moe_dispatch(model, "static")``, for CUDA graphs and torch.compile): the
same routing, statistics, outputs and gradients as the default sparse dispatch, with no shape that depends on the
routing (torch.export traces it without a data-dependent size, which the sparse path's host read would need)."""

from __future__ import annotations

import itertools

import pytest
import torch
from decisions import make_decisions_decisive

import dset
from dset.export import paired_query_differences
from dset.models.moe import MoEFFN, moe_dispatch, patch_groups

STATS = ("balance_loss", "z_loss", "usage", "router_entropy")


def _layer(num_experts: int, top_k: int, activation: str) -> MoEFFN:
    torch.manual_seed(0)
    moe = MoEFFN(32, 48, num_experts, top_k, activation=activation)
    with torch.no_grad():   # routing decided well apart from ties, as a trained router's
        moe.router.weight.normal_(0.0, 1.0)
    return moe


def _run(moe: MoEFFN, x: torch.Tensor, mode: str, groups=None) -> tuple[torch.Tensor, dict, dict]:
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    with moe_dispatch(moe, mode):
        y = moe(x, groups)
    (y.square().sum() + moe.balance_loss + moe.z_loss).backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in moe.named_parameters()}}
    return y.detach(), {k: getattr(moe, k).detach() for k in STATS}, grads


@pytest.mark.parametrize("num_experts,top_k,activation", [(4, 1, "relu"), (4, 2, "gelu"), (6, 3, "relu"),
                                                          (8, 2, "gelu"), (3, 3, "relu")])
def test_static_dispatch_equals_sparse_dispatch_in_outputs_statistics_and_gradients(num_experts, top_k, activation):
    moe = _layer(num_experts, top_k, activation).train()   # no noise, no dropout: both paths are deterministic
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1))
    y_sparse, stats_sparse, grads_sparse = _run(moe, x, "sparse")
    assert moe.last_dispatch in ("padded", "loop")
    y_static, stats_static, grads_static = _run(moe, x, "static")
    assert moe.last_dispatch == "static"
    torch.testing.assert_close(y_static, y_sparse, rtol=1e-5, atol=1e-5)
    for k in STATS:
        torch.testing.assert_close(stats_static[k], stats_sparse[k], rtol=1e-6, atol=1e-7, msg=k)
    for name, g in grads_sparse.items():
        torch.testing.assert_close(grads_static[name], g, rtol=1e-4, atol=1e-5, msg=name)
    # every expert got some tokens: the comparison exercised all of them
    assert (stats_sparse["usage"] > 0).all()


def test_static_dispatch_with_patch_level_routing_and_no_tokens():
    moe = _layer(4, 2, "gelu").eval()
    x = torch.randn(2, 5 * 6, 32, generator=torch.Generator().manual_seed(2))
    groups = patch_groups(5, 6, 2, batch=2)
    with torch.no_grad():
        y_sparse = moe(x, groups)
        with moe_dispatch(moe, "static"):
            y_static = moe(x, groups)
            empty = moe(x[:, :0], None)
    torch.testing.assert_close(y_static, y_sparse, rtol=1e-5, atol=1e-5)
    assert empty.shape == (2, 0, 32) and float(moe.usage.sum()) == 0.0


@pytest.mark.filterwarnings("ignore:The tensor attributes:UserWarning")   # the statistics, set as attributes
def test_static_dispatch_has_no_data_dependent_shape():
    """torch.export refuses a graph whose sizes depend on tensor values (the sparse path's counts.tolist());
    the static path exports, and the exported program gives the eager output on another input."""
    moe = _layer(4, 2, "relu").eval()
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(3))
    with moe_dispatch(moe, "static"):
        program = torch.export.export(moe, (x,))
    other = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = moe(other)
    torch.testing.assert_close(program.module()(other), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="cannot be exported"):
        torch.export.export(moe, (x,))   # the sparse path says why it cannot be traced


def test_moe_dispatch_restores_the_layers_and_refuses_an_unknown_mode():
    moe = _layer(4, 2, "relu")
    with moe_dispatch(moe, "static"):
        assert moe.static_dispatch and not moe.export_dispatch
        with moe_dispatch(moe, "export"):
            assert moe.export_dispatch and not moe.static_dispatch
        assert moe.static_dispatch
    assert not moe.static_dispatch and not moe.export_dispatch
    with pytest.raises(ValueError, match="one of .*'sparse', 'static', 'export'.*got 'dense'"):
        with moe_dispatch(moe, "dense"):
            pass


SIZE = 128
SMALL = ["model.num_classes=5", "model.decoder.num_queries=40", "model.decoder.num_layers=2",
         "model.token_pruning.min_tokens=4", "model.encoder_moe.num_experts=4", "model.decoder_moe.num_experts=6",
         "model.encoder_moe.top_k=2", "model.decoder_moe.top_k=3", "model.memory_pruning.keep_ratio=0.5"]
SWITCHES = ("encoder_moe", "token_pruning", "decoder_moe", "memory_pruning")


@pytest.mark.parametrize("switches", [s for s in itertools.product((False, True), repeat=4) if s[0] or s[2]],
                         ids=lambda s: "-".join(n for n, on in zip(SWITCHES, s) if on))
def test_every_switch_combination_gives_the_same_detections_with_the_static_dispatch(switches):
    flags = [f"model.{k}.enabled={str(on).lower()}" for k, on in zip(SWITCHES, switches)]
    torch.manual_seed(0)
    model = dset.build_model("dset_r18", SMALL + flags + (["model.encoder_moe.patch_size=2"] if switches[1] else []))
    model.set_deployed_epoch(None)
    model.eval()
    images = [torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))]
    # untrained memory features lie close together (tests/decisions.py): the two dispatches differ by ~1e-7
    make_decisions_decisive(model, images, floor=1e-6)
    with torch.no_grad():
        sparse = model(images[0])
        with moe_dispatch(model, "static"):
            static = model(images[0])
        layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert layers and {m.last_dispatch for m in layers} == {"static"}
    # queries whose selection scores tie may come out in another order (as between ONNX Runtime and PyTorch)
    diff = paired_query_differences(sparse, static)
    assert diff["pred_logits"] <= 1e-4 and diff["pred_boxes"] <= 1e-4, diff
    assert diff["reordered_queries"] <= 0.25 * 40 * 2, diff


HOST_READS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "bincount")   # .item()/.tolist() and
# ops whose output size depends on values: each needs the host, and a CUDA graph cannot capture it


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_whole_model_with_every_switch_has_no_host_read_on_the_static_dispatch():
    """What CUDA graphs need of the whole detector (dset.inference_modes' cudagraphs mode), checked on CPU: with
    every switch on, patch routing and memory pruning included, torch.export's graph has no operation that reads a
    value back to the host, and it gives the eager outputs."""
    overrides = SMALL + ["model.memory_pruning.enabled=true", "model.encoder_moe.patch_size=2"]
    model = dset.build_model("dset_r18", overrides)
    model.set_deployed_epoch(None)
    model.eval()
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    with moe_dispatch(model, "static"), torch.no_grad():
        program = torch.export.export(model, (x,), strict=False)
        expected = model(x)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.topk.default" in ops and "aten.grid_sampler.default" in ops   # pruning, routing, attention are in
    assert not [op for op in ops if any(r in op for r in HOST_READS)], sorted(ops)
    got = program.module()(x)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="cannot be exported"), torch.no_grad():
        torch.export.export(model, (x,), strict=False)   # the sparse dispatch's host read: refused, with why
