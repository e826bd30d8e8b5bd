"""Measurement: FLOPs against the reference's published counts and analytic formulas, parameters."""

from __future__ import annotations

import json

import pytest
import torch

import dset
from dset.analytic import aifi_layer_macs
from dset.measure import count_active_params, count_flops, count_params, measure_latency


@pytest.mark.parametrize("preset,total,parts", [
    ("rtdetr_r18", 61.73, {"backbone": 33.85, "encoder": 17.33, "decoder": 10.56}),
    ("rtdetr_r34", 93.89, {"backbone": 64.09, "encoder": 17.33, "decoder": 12.48}),
])
def test_gflops_match_the_reference_at_640(preset, total, parts):
    """Values from shared/parity/README.md (fvcore with attention counted, x2). The reference runs the encoder's
    box head (an MLP 256-256-256-4) on all 8,400 memory tokens, then keeps the 300 selected; every model here runs
    it on the 300 alone (the same boxes), so our count is the reference's less the other 8,100 tokens' head."""
    head_on_unselected = 2 * (8400 - 300) * (256 * 256 + 256 * 256 + 256 * 4) / 1e9     # 2.14 GFLOPs
    flops = count_flops(dset.build_model(preset), 640)
    assert flops["gflops"] + head_on_unselected == pytest.approx(total, rel=0.01)
    for name, value in parts.items():
        ours = flops["gflops_by_component"][name] + (head_on_unselected if name == "decoder" else 0.0)
        assert ours == pytest.approx(value, rel=0.01)
    assert sum(flops["gflops_by_component"].values()) == pytest.approx(flops["gflops"], rel=1e-6)


@pytest.mark.parametrize("keep_ratio,top_k", [(0.5, 3), (0.7, 2), (1.0, 1)])
def test_counted_encoder_layer_flops_follow_the_analytic_formula(keep_ratio, top_k):
    """Only kept tokens and only active experts are counted."""
    model = dset.build_model("dset_r18", [f"model.token_pruning.keep_ratio={keep_ratio}",
                                          "model.token_pruning.min_tokens=10", f"model.encoder_moe.top_k={top_k}",
                                          "model.decoder.num_queries=50"])
    model.set_epoch(100)  # the end of the pruning schedule: the target keep ratio is in force
    size = 256
    tokens = (size // 32) ** 2
    kept = max(10, round(keep_ratio * tokens))
    counted = count_flops(model, size, num_inputs=1)["gflops_by_module"]["encoder.encoder.0.layers.0"]
    analytic = 2 * aifi_layer_macs(kept, 256, 1024, num_experts=6, top_k=top_k) / 1e9
    assert counted == pytest.approx(analytic, rel=0.02)
    # and the dense layer of RT-DETR on all tokens
    dense = count_flops(dset.build_model("rtdetr_r18", ["model.decoder.num_queries=50"]), size)["gflops_by_module"]
    assert dense["encoder.encoder.0.layers.0"] == pytest.approx(2 * aifi_layer_macs(tokens) / 1e9, rel=0.02)


def test_active_parameters_count_top_k_experts():
    model = dset.build_model("dset_r18")
    per_expert = 2 * 256 * 1024 + 1024 + 256
    moe_layers = 1 + 3  # AIFI + 3 decoder layers
    assert count_active_params(model) == count_params(model) - moe_layers * (6 - 3) * per_expert
    dense = dset.build_model("rtdetr_r18")
    assert count_active_params(dense) == count_params(dense) == 20_184_464


def test_latency_is_measured_for_every_model_round_robin():
    models = {"a": dset.build_model("rtdetr_r18", ["model.decoder.num_queries=20"]),
              "b": dset.build_model("dset_r18", ["model.decoder.num_queries=20"])}
    result = measure_latency(models, size=64, warmup=1, repeats=2)
    for name in models:
        r = result[name]
        assert r["latency_ms"] > 0 and r["fps"] == pytest.approx(1000 / r["latency_ms"])
        assert r["latency_ms"] == r["latency_ms_p50"] <= r["latency_ms_p90"] <= r["latency_ms_max"]
        assert (r["model"], r["precision"], r["mode"]) == (name, "fp32", "eager")
        assert r["repeats"] == 2 and r["batch_size"] == 1 and r["device"].startswith("cpu")
        assert models[name].training  # built in train mode; measuring leaves the mode as it found it


def test_profile_cli_prints_one_json_object_per_model(capsys):
    from dset.profile import main

    assert main(["rtdetr_r18", "dset_r18", "--size", "128", "--json", "--warmup", "0", "--repeats", "1",
                 "--flops-inputs", "1", "--set", "model.decoder.num_queries=20", "--deploy-batch-sizes", "1,2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["model"] for r in lines] == ["rtdetr_r18", "dset_r18"]
    for r in lines:
        assert {"params", "active_params", "gflops", "gflops_by_component", "latency_ms", "fps", "device"} <= set(r)
        # the deployed speed: eager PyTorch next to ONNX Runtime at the two batch sizes asked for
        runtimes = r["deployment"]["runtimes"]
        assert set(runtimes) == {"eager", "onnxruntime_cpu"}
        assert all(sorted(by_batch) == ["1", "2"] for by_batch in runtimes.values())  # JSON keys
        cpu_batch_2 = runtimes["onnxruntime_cpu"]["2"]
        assert cpu_batch_2["fps"] == pytest.approx(2000 / cpu_batch_2["latency_ms"])
    assert lines[1]["active_params"] < lines[1]["params"]
    assert lines[1]["sparse"]["token_pruning"]["keep_ratio_in_force"] == pytest.approx(0.7)


def test_profile_cli_bad_sizes_are_one_line_errors(capsys):
    from dset.profile import main

    # 300 queries cannot be selected from the 84 encoder tokens of a 64 px input
    assert main(["rtdetr_r18", "--size", "64", "--warmup", "0", "--repeats", "1", "--flops-inputs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "num_queries (300)" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["rtdetr_r18", "--size", "100"])
    assert exc.value.code == 2 and "multiple of 32" in capsys.readouterr().err


def test_what_latency_is_measured_on(tmp_path, monkeypatch):
    """The environment printed above every latency: on a CPU its threads; the GPU driver from nvidia-smi where it
    is present (a stand-in here prints a version), else "unknown"."""
    from dset.measure import environment, environment_line, gpu_driver_version

    env = environment("cpu")
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert environment_line(env).startswith(f"measured on {env['device']}; torch {torch.__version__}, CUDA ")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_driver_version() == "unknown"
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --query-gpu=driver_version ] && printf '550.54.15\\n550.54.15\\n'\n")
    fake.chmod(0o755)
    assert gpu_driver_version() == "550.54.15"
    line = environment_line({**env, "device": "NVIDIA H200", "driver": gpu_driver_version()})
    assert line.startswith("measured on NVIDIA H200, driver 550.54.15; torch ")
