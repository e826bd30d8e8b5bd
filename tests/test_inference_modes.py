"""The precisions and modes a model is deployed in (dset/inference_modes.py), their latency on CPU
(dset.measure.measure_latency, ``python -m dset.profile --precisions/--modes/--batch-sizes``) and the accuracy of
what is deployed (dset/deployed_accuracy.py, ``python -m dset.evaluate --precisions/--modes``). The CUDA paths
(CUDA graphs, CUDA events) are in tests/test_cuda.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_HEADS, one_thread_for_module

import dset
from dset.deployed_accuracy import MARK_POINTS, compare_to_reference, deployed_accuracy
from dset.inference_modes import InferenceModeError, describe, inference_runner, parse_choices

_one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_thread_for_module)

TINY = ["model.decoder.num_queries=10"]


def tiny_model(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = dset.build_model(preset, TINY, load_weights=False).eval()
    model.set_deployed_epoch(None)
    return model


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_choices_are_parsed_and_bad_ones_named():
    assert parse_choices("fp32,bf16", ("fp32", "bf16", "fp16"), "--precisions") == ("fp32", "bf16")
    for bad, said in (("fp64", "'fp64' unknown"), ("fp32,fp32", "distinct"), ("", "''")):
        with pytest.raises(ValueError, match="--precisions") as exc:
            parse_choices(bad, ("fp32", "bf16", "fp16"), "--precisions")
        assert said in str(exc.value)
    assert describe("bf16", "compile") == "bf16 (autocast) compile" and describe("fp32", "eager") == "fp32 eager"


@pytest.mark.parametrize("preset", ["rtdetr_r18", "dset_r18"])
def test_eager_precisions_against_fp32(preset):
    """fp32 eager is the model itself; bf16 and fp16 run under autocast (the score head in that dtype) and their
    encoder maps stay within that dtype's rounding of fp32's (compared before the query selection, whose near-ties
    an untrained model resolves differently in another precision)."""
    model, x = tiny_model(preset), images()

    def run(runner):
        maps, dtypes = [], []
        hooks = [model.encoder.register_forward_hook(lambda m, i, out: maps.extend(t.float() for t in out)),
                 model.decoder.dec_score_head[-1].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))]
        try:
            out = runner(x)
        finally:
            for h in hooks:
                h.remove()
        return out, maps, set(dtypes)

    with torch.inference_mode():
        ref, ref_maps, ref_dtypes = run(model)
    fp32, _, _ = run(inference_runner(model, "fp32", "eager", x))
    assert ref_dtypes == {torch.float32}
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(fp32[key], ref[key])
    for precision, dtype, tolerance in (("bf16", torch.bfloat16, 0.05), ("fp16", torch.float16, 0.01)):
        out, maps, dtypes = run(inference_runner(model, precision, "eager", x))
        assert dtypes == {dtype} and out["pred_logits"].dtype == dtype, f"{precision}: the score head ran in {dtypes}"
        for level, (a, b) in enumerate(zip(maps, ref_maps)):
            error = ((a - b).abs().max() / b.abs().max()).item()
            # really another precision (not fp32), and still the same model
            assert 1e-5 < error < tolerance, (precision, level, error)


def test_cuda_graphs_on_a_cpu_model_are_refused_with_the_reason():
    model, x = tiny_model("rtdetr_r18"), images(1)
    with pytest.raises(InferenceModeError, match="CUDA graphs need a CUDA device; the model is on cpu"):
        inference_runner(model, "fp32", "cudagraphs", x)
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_runner(model, "int8", "eager", x)
    with pytest.raises(ValueError, match="eval mode"):
        inference_runner(model.train(), "fp32", "eager", x)


@pytest.mark.slow
def test_compile_agrees_with_eager_and_leaves_the_model_on_the_sparse_dispatch():
    """torch.compile of DSET on the static MoE dispatch: the eager outputs within float rounding. Marked slow: the
    first inductor compilation of the tiny model takes minutes on a 2-core CPU."""
    from dset.models.moe import MoEFFN

    model, x = tiny_model("dset_r18"), images(1)
    with torch.inference_mode():
        ref = model(x)
    runner = inference_runner(model, "fp32", "compile", x)
    out = runner(x)
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], atol=1e-4, rtol=1e-4)
    # the compiled copy is on the static dispatch, the caller's model is not (its eager runs stay sparse)
    assert not any(m.static_dispatch for m in model.modules() if isinstance(m, MoEFFN))
    compiled_layers = [m for m in runner._forward._orig_mod.modules() if isinstance(m, MoEFFN)]
    assert compiled_layers and all(m.static_dispatch for m in compiled_layers)
    runner.close()
    assert not any(m.static_dispatch for m in compiled_layers)


def test_measure_latency_times_every_combination_that_can_run():
    from dset.measure import measure_latency

    models = {"a": tiny_model("rtdetr_r18"), "b": tiny_model("dset_r18")}
    result = measure_latency(models, size=64, warmup=1, repeats=3, order_seed=0, precisions=("fp32", "bf16"),
                             modes=("eager", "cudagraphs"))
    assert set(result) == {f"{m} {describe(p, mode)}" for m in "ab" for p in ("fp32", "bf16")
                           for mode in ("eager", "cudagraphs")}
    for label, r in result.items():
        assert label.startswith(r["model"]) and r["precision"] in ("fp32", "bf16")
        if r["mode"] == "cudagraphs":
            assert r["not_timed"].startswith("CUDA graphs need a CUDA device") and "latency_ms" not in r
            continue
        assert len(r["latency_ms_rounds"]) == 3 and min(r["latency_ms_rounds"]) > 0
        assert r["latency_ms_p50"] == r["latency_ms"] == sorted(r["latency_ms_rounds"])[1]
        assert r["latency_ms_p50"] <= r["latency_ms_p90"] <= r["latency_ms_max"]
        assert r["timer"] == "time.perf_counter" and r["warmup"] == 1 and r["image_size"] == [64, 64]
    assert result["a bf16 (autocast) eager"]["precision_as_run"] == "bf16 (autocast)"


def test_profile_cli_times_the_protocol_in_two_processes(capsys):
    from dset.profile import main

    assert main(["rtdetr_r18", "dset_r18", "--size", "64", "--json", "--no-onnx", "--repeats", "2", "--processes", "2",
                 "--flops-inputs", "1", "--set", "model.decoder.num_queries=10", "--precisions", "fp32,bf16",
                 "--modes", "eager,cudagraphs", "--batch-sizes", "1,2"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("measured on cpu (") and "torch " + torch.__version__ in captured.err
    first, second = (json.loads(line) for line in captured.out.strip().splitlines())
    assert first["environment"]["torch"] == torch.__version__ and first["environment"]["threads"] >= 1
    for r in (first, second):
        timed = [e for e in r["inference"] if "not_timed" not in e]
        skipped = [e for e in r["inference"] if "not_timed" in e]
        assert sorted((e["batch_size"], e["precision"], e["mode"]) for e in timed) == [
            (1, "bf16", "eager"), (1, "fp32", "eager"), (2, "bf16", "eager"), (2, "fp32", "eager")]
        assert sorted((e["batch_size"], e["precision"]) for e in skipped) == [(1, "bf16"), (1, "fp32"),
                                                                             (2, "bf16"), (2, "fp32")]
        assert all(e["mode"] == "cudagraphs" and "CUDA device" in e["not_timed"] for e in skipped)
        for e in timed:
            m = e["measured"]
            # every number says what it was measured on; the CPU warm-up default is the small one
            assert (m["warmup"], m["rounds"], m["processes"], m["image_size"]) == (3, 2, 2, 64)
            assert m["device"].startswith("cpu (") and m["timer"] == "time.perf_counter"
            assert len(e["latency_ms_rounds"]) == 2 and e["latency_ms_p50"] <= e["latency_ms_p90"]
            assert e["fps"] == pytest.approx(1000 * e["batch_size"] / e["latency_ms_p50"])
    # the baseline is the first model's first combination; every other runner has its change against it
    base = next(e for e in first["inference"] if (e["batch_size"], e["precision"]) == (1, "fp32"))
    assert "vs_baseline" not in base
    other = next(e for e in second["inference"] if (e["batch_size"], e["precision"], e.get("not_timed")) ==
                 (2, "bf16", None))
    vs = other["vs_baseline"]
    assert vs["baseline"] == "rtdetr_r18 fp32 eager" and "between-process spread included" in vs["interval"]
    assert vs["latency_change_low_percent"] <= vs["latency_change_percent"] <= vs["latency_change_high_percent"]


@pytest.mark.parametrize("flag, value, said", [("--precisions", "fp64", "'fp64' unknown"),
                                               ("--modes", "eager,trt", "'trt' unknown"),
                                               ("--batch-sizes", "1,0", "positive integers")])
def test_profile_cli_bad_protocol_values_exit_2_naming_the_flag(flag, value, said, capsys):
    from dset.profile import main

    with pytest.raises(SystemExit) as exc:
        main(["rtdetr_r18", "--size", "64", flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and flag in err and repr(value) in err and said in err


# ------------------------------------------------------------------------------------ deployed accuracy
def test_the_mark_rule_in_points():
    rows = [{"precision": "fp32", "mode": "eager", "mAP": 0.5000},
            {"precision": "bf16", "mode": "eager", "mAP": 0.4991},     # -0.09 point: kept
            {"precision": "fp16", "mode": "eager", "mAP": 0.4988},     # -0.12 point: marked
            {"precision": "fp32", "mode": "compile", "mAP": 0.5020},   # a gain is never marked
            {"precision": "fp32", "mode": "cudagraphs", "not_run": "CUDA graphs need a CUDA device"}]
    out = compare_to_reference(rows)
    assert [r.get("marked") for r in out] == [False, False, True, False, None]
    assert [round(r.get("delta_points", 0), 6) for r in out] == [0.0, -0.09, -0.12, 0.2, 0.0]
    assert MARK_POINTS == 0.1 and compare_to_reference(rows, limit_points=0.08)[1]["marked"]
    with pytest.raises(ValueError, match="fp32 eager"):
        compare_to_reference(rows[1:])


@pytest.fixture(scope="module")
def tiny_run(module_tmp):
    """A DSET R18 run trained for 2 epochs on 8 synthetic 64 px images (4 validation images)."""
    from dset.engine.loop import fit

    root, out = module_tmp("synthetic"), module_tmp("run")
    cfg = dset.load_config("dset_r18", [
        "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.image_size=64",
        f"data.synthetic.root={root}", "data.image_size=64", "data.batch_size=3", "data.augment=flip",
        "model.eval_spatial_size=[64,64]", "model.decoder.num_queries=20", "model.decoder.num_denoising=8",
        "model.token_pruning.warmup_epochs=0", "model.token_pruning.ramp_epochs=0",
        "model.memory_pruning.warmup_epochs=0", *SMALL_HEADS, "train.epochs=2", "train.warmup_steps=3",
        "train.ema_warmup_steps=10", "train.profile=false", "run.progress=false"])
    fit(cfg, out)
    return out


def test_deployed_accuracy_of_a_trained_run(tiny_run):
    from dset.evaluate import evaluate_checkpoint, prepare_evaluation

    dtypes = []
    # every Linear's output dtype while the deployed combinations are evaluated: bf16 must really run in bf16
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, out: dtypes.append(out.dtype) if isinstance(m, torch.nn.Linear) else None)
    try:
        result = deployed_accuracy(prepare_evaluation(tiny_run), ("bf16",), ("eager", "cudagraphs"))
    finally:
        hook.remove()
    assert {torch.float32, torch.bfloat16} <= set(dtypes)
    plain = evaluate_checkpoint(tiny_run)
    reference = result["reference"]
    # fp32 eager is the plain evaluation, to the last digit (batch 3 of 4 images: a last batch of 1 as well)
    assert set(reference) == set(plain) - {"split", "epoch", "weights", "checkpoint"}
    for key, value in reference.items():
        assert value == pytest.approx(plain[key], rel=0, abs=0, nan_ok=True), key
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["fp32 eager", "bf16 (autocast) eager", "bf16 (autocast) cudagraphs"]
    assert rows["fp32 eager"]["mAP"] == plain["mAP"] and rows["fp32 eager"]["delta_points"] == 0
    bf16 = rows["bf16 (autocast) eager"]
    assert 0 <= bf16["mAP"] <= 1 and bf16["delta_points"] == pytest.approx(100 * (bf16["mAP"] - plain["mAP"]))
    assert bf16["marked"] == (bf16["delta_points"] < -0.1)
    assert "CUDA device" in rows["bf16 (autocast) cudagraphs"]["not_run"]


def test_evaluate_cli_prints_the_deployed_accuracy_table(tiny_run, tmp_path, capsys):
    from dset.evaluate import main

    out = tmp_path / "m.json"
    assert main([str(tiny_run), "--precisions", "fp16", "--modes", "eager,cudagraphs", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Accuracy of what is deployed (val split, cpu (" in text
    assert "fp16 (autocast) eager" in text and "fp16 (autocast) cudagraphs   not run: CUDA graphs need" in text
    saved = json.loads(out.read_text())
    assert [r["label"] for r in saved["rows"]] == ["fp32 eager", "fp16 (autocast) eager",
                                                   "fp16 (autocast) cudagraphs"]
    assert saved["rows"][0]["mAP"] == saved["mAP"]
    with pytest.raises(SystemExit) as exc:
        main([str(tiny_run), "--modes", "jit"])
    assert exc.value.code == 2 and "--modes" in capsys.readouterr().err
