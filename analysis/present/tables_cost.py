"""The tables of cost: ``compute`` (GFLOPs by component, and the share the sparse mechanisms act on, in closed form)
and ``deployment`` (eager PyTorch next to ONNX Runtime at batch 1 and 8, as each run timed them)."""

from __future__ import annotations

import math

import pandas as pd

from analysis.compute import stats
from analysis.compute.loading import StudyResults
from analysis.compute.stats import missing
from analysis.compute.variants import baseline_of, deployment_runtimes, image_size, run_config
from dset import metric_names as M

from .formatting import F1, F2, SIGNED2, fmt, integer, profiled_at
from .notes import PROFILE_NOTE
from .table import Table

# ../shared/parity/README.md, measured on the reference RT-DETR R18 at 640 px (multiply-adds)
REFERENCE_R18_MACS = {"aifi": 0.40e9, "dec_ffn": 0.47e9, "total": 30.87e9}


def compute_table(study: StudyResults, vs: pd.DataFrame) -> tuple[Table | None, str]:
    """GFLOPs by component (measured) and the share of the sites the sparse mechanisms act on (closed form)."""
    rows, sizes = [], set()
    for _, v in vs[vs["n"] > 0].iterrows():
        gflops = v[f"{M.GFLOPS}_mean"]
        if missing(gflops):
            continue
        parts = [v[f"{M.GFLOPS_COMPONENT_PREFIX}{c}_mean"] for c in ("backbone", "encoder", "decoder")]
        # rounded: the remainder of logged values carries float noise (1e-15), not information
        other = round(gflops - sum(parts), 6) + 0.0 if not any(missing(x) for x in parts) else math.nan
        cfg = run_config(study, v["first_run"])
        size = image_size(cfg)
        row = {"model": v["label"], "backbone": v["backbone"], "GFLOPs": gflops,
               "GFLOPs backbone": parts[0], "GFLOPs encoder": parts[1], "GFLOPs decoder": parts[2],
               "GFLOPs other": other, "GFLOPs/latency at": profiled_at(v)}
        for name, x in zip(("backbone", "encoder", "decoder"), parts):
            row[f"{name} %"] = x / gflops * 100 if gflops else math.nan
        if size:
            sizes.add(size)
            keep = next((k for k in (v[f"{M.PROFILE_KEEP_RATIO}_mean"], v[f"{M.FINAL_KEEP_RATIO}_mean"])
                         if not missing(k)), None)
            m = stats.sparse_site_macs(study.config(v["first_run"]), size, keep)
            dense = 2 * (m["aifi_dense"] + m["dec_ffn_dense"]) / 1e9
            as_run = 2 * (m["aifi"] + m["dec_ffn"]) / 1e9
            row.update({"sites dense GFLOPs": dense, "sites as run GFLOPs": as_run,
                        "sites share (%)": as_run / gflops * 100 if gflops else math.nan,
                        "AIFI tokens kept": f"{m['kept_tokens']}/{m['tokens']}"})
        else:
            row.update({"sites dense GFLOPs": math.nan, "sites as run GFLOPs": math.nan, "sites share (%)": math.nan,
                        "AIFI tokens kept": None})
        rows.append(row)
    if not rows:
        return None, "no finished run logged gflops"
    ref = stats.sparse_site_macs({}, 640)
    ref_aifi, ref_dec, ref_total = (REFERENCE_R18_MACS[k] / 1e9 for k in ("aifi", "dec_ffn", "total"))
    notes = [
        "GFLOPs = 2 × multiply-adds as measured by the runs (fvcore + attention and grid-sample handles), total and "
        "by component (gflops/backbone, gflops/encoder, gflops/decoder); other = total − the three; % of the total.",
        "Sites = what the switches act on: the AIFI encoder layer(s) on the stride-32 map (token pruning, encoder MoE) "
        "and the decoder layers' FFNs over the queries (decoder MoE). Computed in closed form (not measured) from each "
        "variant's logged configuration at data.image_size = " + ", ".join(f"{s} px" for s in sorted(sizes))
        + " (the resolution dset profiles at), eval mode (no denoising queries): projections, attention "
        "products and FFN/expert matmuls, ×2; norms, softmax, biases and the pruning predictor not counted.",
        "sites dense = the same configuration with every switch off; sites as run = top-k experts (+ router) and "
        "the keep ratio the GFLOPs were measured at (profile/keep_ratio, else final/keep_ratio, else the configured "
        "target); share = sites as run / measured total.",
        PROFILE_NOTE,
        "Reference figure (../shared/parity/README.md, reference RT-DETR R18 at 640 px): AIFI layer "
        f"{ref_aifi:.2f} G and the three decoder FFNs {ref_dec:.2f} G multiply-adds of {ref_total:.2f} G, about "
        f"{(ref_aifi + ref_dec) / ref_total * 100:.1f}% of the model; "
        f"the closed form here gives {ref['aifi_dense'] / 1e9:.2f} G and {ref['dec_ffn_dense'] / 1e9:.2f} G for it.",
    ]
    fm = {c: F2 for c in ("GFLOPs", "GFLOPs backbone", "GFLOPs encoder", "GFLOPs decoder", "GFLOPs other",
                          "sites dense GFLOPs", "sites as run GFLOPs")}
    fm.update({c: F1 for c in ("backbone %", "encoder %", "decoder %")})
    fm["sites share (%)"] = F2
    return Table("compute", "Compute breakdown: where the GFLOPs go, and the share the sparse mechanisms act on",
                 pd.DataFrame(rows), None, None, fm, notes), ""


def deployment_table(study: StudyResults, vs: pd.DataFrame) -> tuple[Table | None, str]:
    """Every variant's deployed speed: eager PyTorch and ONNX Runtime at batch 1 and 8 (seed means of what each run
    timed side by side in its own process), ONNX Runtime's speed-up over eager, and its latency against RT-DETR of
    the same backbone."""
    pairs = deployment_runtimes(study)
    if vs.empty or not pairs:
        return None, "no run logged deploy/ metrics (train.profile_deployment off, or runs from before it existed)"
    inc = study.included
    rows = []
    for _, v in vs.iterrows():
        runs = inc[inc["group"] == v["group"]]
        row = {"model": v["label"], "backbone": v["backbone"], "n": v["n"]}
        for runtime, batch in pairs:
            ms = study.metric(runs, M.deploy_metric(runtime, "latency_ms", batch)).dropna()
            ips = study.metric(runs, M.deploy_metric(runtime, "images_per_s", batch)).dropna()
            row[f"{runtime} b{batch} (ms)"] = float(ms.mean()) if len(ms) else math.nan
            row[f"{runtime} b{batch} (images/s)"] = float(ips.mean()) if len(ips) else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    ort_b1, eager_b1 = f"{M.ONNXRUNTIME_CPU} b1 (ms)", f"{M.EAGER} b1 (ms)"
    if ort_b1 in df and eager_b1 in df:
        df["ONNX Runtime speed-up b1 (×)"] = df[eager_b1] / df[ort_b1]
        base_ms = {bb: df.loc[(df["model"] == baseline_of(vs, bb)["label"]), ort_b1].iloc[0]
                   for bb in set(vs["backbone"].dropna()) if baseline_of(vs, bb) is not None}
        df["ONNX Runtime b1 vs RT-DETR same backbone (%)"] = [
            (ms / base_ms[bb] - 1) * 100 if bb in base_ms and base_ms[bb] > 0 else math.nan
            for ms, bb in zip(df[ort_b1], df["backbone"])]
    diff = f"{M.DEPLOY_ONNX_MAX_DIFF}_mean"
    df["max |ONNX − eager|"] = [float(v[diff]) if not missing(v[diff]) else math.nan for _, v in vs.iterrows()]
    devices = sorted({d for d in vs["deploy_devices"] if isinstance(d, str) and d})  # None/NaN: nothing logged
    if len(devices) > 1:  # one machine for all: said once in the notes
        df["measured on"] = list(vs["deploy_devices"])
    # images/s at batch 1 is 1000 / ms: keep the batch-8 throughput and the batch-1 latency only
    df = df[[c for c in df.columns if not (c.endswith("(images/s)") and " b1 " in c)
             and not (c.endswith("(ms)") and " b1 " not in c)]]
    formats = {c: (F1 if "images/s" in c or c.endswith("(ms)") else F2) for c in df.columns if "(" in c}
    formats.update({"n": integer, "ONNX Runtime b1 vs RT-DETR same backbone (%)": SIGNED2,
                    "max |ONNX − eager|": fmt(".1e")})
    notes = [
        "Deployed speed of each run's reported checkpoint (train.profile_deployment, dset.measure.deployment_latency): "
        "the model exported to ONNX (dset.export, every switch included) and run by ONNX Runtime with as many threads "
        "as PyTorch, timed round-robin with eager PyTorch on the same random images in the run's own process, at the "
        "run's image size; warm-up 2, median of 5 timed runs per batch size. ms: batch-1 latency; images/s: batch-8 "
        "throughput = 8000 / batch-8 latency (ms). With n > 1 seeds: mean of the runs' medians.",
        "No interval: each run is one timing session on the machine the study ran on, so a latency difference here "
        "is indicative only; python -m dset.profile times variants side by side in one process for a comparison.",
        "max |ONNX − eager|: largest difference of the outputs (logits, boxes) between ONNX Runtime and eager "
        "PyTorch on random inputs, queries paired where tied scores reorder them (dset.export.compare_with_eager).",
        "Runtimes: eager = PyTorch fp32 eager (no autocast, no torch.compile or CUDA graphs; the MoE layers on "
        "their default sparse dispatch) on the run's device, a GPU for a run that trained on one (named under "
        "measured on); python -m dset.profile --precisions/--modes times bf16/fp16 and compiled modes; "
        "onnxruntime_cpu = ONNX Runtime's CPUExecutionProvider; "
        "onnxruntime_tensorrt / onnxruntime_cuda appear where the run had a GPU and an onnxruntime build with them.",
    ] + ([f"Measured on, for every run: {devices[0]}."] if len(devices) == 1 else [])
    text = [c for c in df.columns]
    return Table("deployment", "Deployed speed: eager PyTorch and ONNX Runtime, batch 1 and 8", df, text, text,
                 formats, notes), ""
