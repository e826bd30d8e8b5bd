"""ONNX export (dset.export): every switch combination exports, and ONNX Runtime gives eager PyTorch's outputs."""

from __future__ import annotations

import itertools
import json

import onnx
import pytest
import torch
from decisions import decision_margins, make_decisions_decisive

import dset
from dset.export import ExportError, compare_with_eager, comparison_images, export_onnx, main, onnxruntime_session
from dset.models.moe import MoEFFN

SIZE = 128  # a 4 x 4 stride-32 map: 16 AIFI tokens, 336 encoder tokens in all
SMALL = ["model.num_classes=5", "model.decoder.num_queries=40", "model.decoder.num_layers=2",
         "model.token_pruning.min_tokens=4", "model.encoder_moe.num_experts=4", "model.decoder_moe.num_experts=4",
         "model.encoder_moe.top_k=2", "model.decoder_moe.top_k=2"]
SWITCHES = ("encoder_moe", "token_pruning", "decoder_moe")


def small_model(encoder_moe: bool, token_pruning: bool, decoder_moe: bool) -> torch.nn.Module:
    flags = dict(zip(SWITCHES, (encoder_moe, token_pruning, decoder_moe)))
    model = dset.build_model("dset_r18", SMALL + [f"model.{k}.enabled={str(v).lower()}" for k, v in flags.items()])
    if model.token_pruner is not None:
        model.set_epoch(100)  # the end of the schedule: keep ratio 0.7, 12 of 16 tokens
    model.eval()
    # not ties that float rounding decides (tests/decisions.py), on compare_with_eager's inputs
    make_decisions_decisive(model, comparison_images(SIZE, (1, 3)))
    return model


def op_counts(path) -> dict[str, int]:
    graph = onnx.load(str(path)).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("switches", list(itertools.product((False, True), repeat=3)),
                         ids=lambda s: "-".join(n for n, on in zip(("enc_moe", "prune", "dec_moe"), s) if on)
                         or "rtdetr")
def test_every_switch_combination_exports_and_matches_eager(switches, tmp_path):
    torch.manual_seed(0)
    model = small_model(*switches)
    path = export_onnx(model, tmp_path / "model.onnx", SIZE)
    onnx.checker.check_model(str(path))
    # batch 1 and 3 from one file: the batch is dynamic; inputs other than the one the export traced
    diff = compare_with_eager(model, onnxruntime_session(path), SIZE, batch_sizes=(1, 3))
    # no decision is a tie that float rounding could flip: the two runtimes must agree on every one
    encoder_moe, token_pruning, decoder_moe = switches
    kinds = {"query_selection"} | ({"moe_routing"} if encoder_moe or decoder_moe else set())
    kinds |= {"token_pruning"} if token_pruning else set()
    margins = decision_margins(model, comparison_images(SIZE, (1, 3)))  # on compare_with_eager's inputs
    assert set(margins) == kinds and min(margins.values()) > 1e-5, margins  # 10x the runtimes' 1e-6
    assert diff["images"] == 4
    assert diff["pred_logits"] <= 1e-4 and diff["pred_boxes"] <= 1e-4, diff
    # tied queries may swap places, a few of the 40 per image at most; anything more is not a tie
    assert diff["reordered_queries"] <= 0.25 * 40 * 4, diff
    ops = op_counts(path)
    moe_layers = int(encoder_moe) * 1 + int(decoder_moe) * 2
    # the sparse dispatch is in the graph: one NonZero per expert of every MoE layer, decided at run time
    assert ops.get("NonZero", 0) == 4 * moe_layers
    # TopK: query selection, each MoE layer's routing, token pruning's selection and its sort back to spatial order
    assert ops.get("TopK", 0) == 1 + moe_layers + 2 * int(token_pruning)


@pytest.mark.slow
def test_patch_level_routing_exports_and_matches_eager(tmp_path):
    """The encoder MoE's patch-level routing (the group means are ScatterElements-adds) with token pruning on:
    a patch's decision is taken on its kept tokens, in the graph as in eager PyTorch."""
    model = dset.build_model("dset_r18", SMALL + ["model.encoder_moe.patch_size=2", "model.decoder_moe.enabled=false"])
    model.set_epoch(100)
    model.eval()
    make_decisions_decisive(model, comparison_images(SIZE, (1, 3)))
    path = export_onnx(model, tmp_path / "model.onnx", SIZE)
    diff = compare_with_eager(model, onnxruntime_session(path), SIZE, batch_sizes=(1, 3))
    margins = decision_margins(model, comparison_images(SIZE, (1, 3)))  # on compare_with_eager's inputs
    assert min(margins.values()) > 1e-5, margins
    assert diff["images"] == 4 and diff["pred_logits"] <= 1e-4 and diff["pred_boxes"] <= 1e-4, diff


def test_pruning_graph_keeps_the_scheduled_number_of_tokens(tmp_path):
    """The kept count is a constant of the graph: 12 of the 16 tokens at keep ratio 0.7 (ceil(0.7 * 16))."""
    model = small_model(False, True, False)
    path = export_onnx(model, tmp_path / "pruned.onnx", SIZE)
    graph = onnx.load(str(path)).graph
    consts = {}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    ks = [consts.get(n.input[1], inits.get(n.input[1])) for n in graph.node if n.op_type == "TopK"]
    ks = sorted(int(k.reshape(-1)[0]) for k in ks if k is not None)
    assert 12 in ks and 40 in ks and 16 not in ks  # pruning keeps 12 of 16; the decoder takes 40 queries


def test_moe_refuses_a_plain_onnx_export(tmp_path):
    """Exported without dset.export, the MoE's host-sized dispatch would be frozen at the traced routing: refused."""
    model = small_model(False, False, True)

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)["pred_logits"]

    with pytest.raises(Exception, match=r"dset\.export"):
        torch.onnx.export(Outputs().eval(), (torch.rand(1, 3, SIZE, SIZE),), str(tmp_path / "x.onnx"), dynamo=False)
    assert not any(m.export_dispatch for m in model.modules() if isinstance(m, MoEFFN))


def test_export_dispatch_equals_the_sparse_dispatch():
    """MoEFFN's export dispatch computes what its padded and per-expert paths compute."""
    torch.manual_seed(0)
    moe = MoEFFN(32, 64, num_experts=5, top_k=2, activation="gelu").eval()
    x = torch.randn(3, 50, 32)
    with torch.no_grad():
        reference = moe(x)
        moe.export_dispatch = True
        exported = moe(x)
    torch.testing.assert_close(exported, reference, rtol=1e-5, atol=1e-6)


def test_bad_size_is_an_export_error(tmp_path):
    with pytest.raises(ExportError, match="multiples of 32"):
        export_onnx(small_model(False, False, False), tmp_path / "x.onnx", 100)


def test_cli_exports_checks_and_reports(tmp_path, capsys):
    out = tmp_path / "d.onnx"
    code = main(["dset_r18", *SMALL, "--onnx", str(out), "--size", str(SIZE)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert out.is_file() and "12 of 16 tokens" in text.out and "checked with ONNX Runtime" in text.out
    # a bad override is a one-line error naming the key, and nothing is written
    code = main(["dset_r18", "model.decoder_moe.top_k=9", "--onnx", str(tmp_path / "bad.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "top_k" in err and "Traceback" not in err and not (tmp_path / "bad.onnx").exists()


def test_deployment_latency_times_eager_and_onnxruntime_side_by_side():
    from dset.measure import deployment_latency

    models = {"rtdetr": small_model(False, False, False), "dset": small_model(True, True, True)}
    result = deployment_latency(models, SIZE, batch_sizes=(1, 2), warmup=0, repeats=2)
    for _name, r in result.items():
        assert set(r["runtimes"]) == {"eager", "onnxruntime_cpu"}
        for _runtime, by_batch in r["runtimes"].items():
            assert sorted(by_batch) == [1, 2]
            for b, t in by_batch.items():
                assert t["batch_size"] == b and t["repeats"] == 2
                assert t["fps"] == pytest.approx(1000 * b / t["latency_ms"])
        assert r["runtimes"]["onnxruntime_cpu"][1]["device"].startswith("onnxruntime ")
        assert r["onnx_check"]["pred_logits"] <= 1e-4 and r["onnx_check"]["pred_boxes"] <= 1e-4
        assert "onnxruntime_tensorrt" in r["not_timed"]  # no GPU here: says why it was not timed
        json.dumps(r)  # plain data, ready for summary.json
