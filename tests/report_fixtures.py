"""A tiny MLflow store, logged the way ``studies/`` logs (``studies/tracking/schema.py``), for the report tests.

Everything is logged directly through the MLflow API with known, hand-picked numbers so that the
tests can recompute every table value by hand. Parameters are the real flat configuration
(``dset.config.load_config(...).flat()``), so the report sees the same keys a study writes.

Experiments:
- ``ablation_grid``: a parent run and child runs over R18/R34 x some switch combinations x seeds 0, 1
  (see ``ABLATION_RUNS``), one of them FAILED with ``dset.error``; 3 epochs of per-epoch metrics;
  expert usage shares and MoE diagnostics (expert cosine, router entropy) for the MoE variants.
- ``optuna_search``: a parent run and trials 0-4 (``OPTUNA_TRIALS``) with ``dset.trial`` tags, plus a
  failed trial 5 and a trial 6 that Optuna pruned (finished, with numbers that would dominate the front).
- ``crashed_study``: a FAILED parent, a child that failed before logging any param, and a child still
  RUNNING (interrupted) with one epoch of metrics and no final ones: nothing finished.
- ``two_stage``: runs that log their detections and ground truth (``ARTIFACT_DETECTIONS``,
  ``ARTIFACT_GROUND_TRUTH``) on one synthetic validation set, with one seed unless said (``TWO_STAGE_RUNS``):
  a stage-1 pretraining run (``dset.role`` = pretrain) the R18 cells start from, RT-DETR R18, DSET R18
  (E+P+D) clearly better, (E) with two seeds of RT-DETR's quality (indistinguishable), (P) worse, (D) a run
  without the artifacts (an old run: the report falls back on Welch), and R34 cells whose mAPs are both
  below the noise floor. Their best/mAP and best/mAP50 are pycocotools' numbers on those detections, and
  they log profile/tokens, profile/kept_tokens and profile/keep_ratio. Its parent run logs the study's targets
  (``TWO_STAGE_TARGETS``, δ 0.05) as studies/tracking/invocation_runs.py does; the other experiments' parents log
  none (a store from before targets: the defaults).
- ``scored_on_test``: RT-DETR R18, DSET R18 (E+P+D) and DSET R18 (M0.3), one seed each (``SCORED_RUNS``), whose runs
  log their detections on both splits (``ARTIFACT_DETECTIONS`` on ``SCORED_VAL_IMAGES`` validation images and
  ``ARTIFACT_TEST_DETECTIONS`` on ``SCORED_TEST_IMAGES`` test images, tag ``dset.score_split`` "test") of opposite
  qualities: the variants' verdicts on the test split are the reverse of those on the validation split. Its per-run
  latency_ms would give both variants +50%; a side-by-side benchmark run (role ``benchmark``, logged as
  studies/execution/latency_step.py logs it, ``SCORED_BENCHMARK``) gives them other changes, with intervals.
- ``empty_study``: no runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from dset import metric_names as M
from dset.config import load_config
from studies.planning.study import Targets
from studies.tracking import schema

EPOCHS = 3
T0_MS = 1_700_000_000_000  # fixed start times: the report's "newest run" date is then known

# (backbone, encoder_moe, token_pruning, decoder_moe, seed, best mAP) -- or best mAP None: a FAILED run
ABLATION_RUNS = [
    ("R18", False, False, False, 0, 0.500),
    ("R18", False, False, False, 1, 0.510),
    ("R18", True, False, False, 0, 0.520),
    ("R18", True, False, False, 1, 0.530),
    ("R18", False, False, True, 0, 0.515),      # only one seed: "n=1, no test"
    ("R18", True, True, True, 0, 0.480),
    ("R18", True, True, True, 1, 0.600),        # large seed spread: within noise
    ("R34", False, False, False, 0, 0.550),
    ("R34", False, False, False, 1, 0.552),
    ("R34", True, True, True, 0, 0.600),
    ("R34", True, True, True, 1, 0.602),        # tight: distinguishable from seed noise
    ("R34", False, True, False, 0, None),       # FAILED
]
FAILED_ERROR = "RuntimeError: CUDA out of memory (fixture)"
MAP50_OFFSET, MAP75_OFFSET = 0.25, 0.05
ROUTER_ENTROPY = [1.2, 1.79, 1.3, 1.4]   # per MoE layer, nats (6 experts: ln 6 = 1.7918 is uniform routing)

BASE_GFLOPS = {"R18": (8.5, 4.3, 2.2), "R34": (16.0, 4.3, 3.2)}   # backbone, encoder, decoder
BASE_LATENCY = {"R18": 20.0, "R34": 30.0}
BASE_PARAMS = {"R18": 20_184_464, "R34": 31_441_668}

# Optuna trials: (trial, encoder experts, top_k, keep_ratio, best mAP, GFLOPs). Pareto (max mAP, min GFLOPs): 0, 1, 3.
OPTUNA_TRIALS = [
    (0, 4, 1, 0.5, 0.30, 10.0),
    (1, 6, 2, 0.7, 0.35, 12.0),
    (2, 8, 2, 0.6, 0.32, 13.0),
    (3, 8, 3, 0.9, 0.40, 15.0),
    (4, 4, 2, 0.8, 0.28, 11.0),
]
OPTUNA_PARETO = [0, 1, 3]


# ------------------------------------------------------------------------- detections and ground truth
def synthetic_ground_truth(n_images: int = 40, n_classes: int = 4, seed: int = 0, size: int = 128,
                           extra_category: bool = False) -> dict:
    """A COCO ground truth of ``n_images`` images (ids from 1001) with 0-4 boxes each (some images have none),
    classes 1..n_classes; ``extra_category`` lists a class n_classes + 1 that has no box."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n_images):
        iid = 1001 + i
        images.append({"id": iid, "file_name": f"{iid}.png", "width": size, "height": size})
        for _ in range(int(rng.integers(0, 5))):
            w, h = rng.uniform(12, 48, size=2)
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": int(rng.integers(1, n_classes + 1)),
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, n_classes + 1 + extra_category)]
    return {"images": images, "annotations": anns, "categories": cats}


def synthetic_detections(gt: dict, recall: float, jitter: float, false_per_image: float, seed: int) -> list[dict]:
    """Detections of a model of a given quality: each box found with probability ``recall``, its corners moved
    by ``jitter`` x its size (normal), score higher for closer boxes; plus Poisson(``false_per_image``) false
    positives per image of any category, lower scores. Continuous scores: no ties."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    out = []
    for a in gt["annotations"]:
        if rng.random() >= recall:
            continue
        x, y, w, h = a["bbox"]
        dx, dy, dw, dh = rng.normal(0, jitter, size=4)
        box = [x + dx * w, y + dy * h, max(1.0, w * (1 + dw)), max(1.0, h * (1 + dh))]
        score = float(np.clip(0.95 - 2 * abs(dx * dy + dw * dh) - 0.3 * rng.random(), 0.05, 0.99))
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": box, "score": score})
    for im in gt["images"]:
        for _ in range(int(rng.poisson(false_per_image))):
            w, h = rng.uniform(8, 60, size=2)
            x, y = rng.uniform(0, im["width"] - w), rng.uniform(0, im["height"] - h)
            out.append({"image_id": im["id"], "category_id": int(rng.choice(cats)),
                        "bbox": [float(x), float(y), float(w), float(h)], "score": float(rng.uniform(0.01, 0.7))})
    return out


def cocoeval(gt: dict, detections: list[dict]):
    """pycocotools on its own (default parameters, evaluated, accumulated, summarised): the reference numbers."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(detections)), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def coco_stats(gt: dict, detections: list[dict]) -> tuple[float, float]:
    """pycocotools' own mAP@[.5:.95] and mAP@0.5 (``stats[0]``, ``stats[1]``)."""
    ev = cocoeval(gt, detections)
    return float(ev.stats[0]), float(ev.stats[1])


def combo_code(e: bool, p: bool, d: bool) -> str:
    return "+".join(c for c, on in zip("EPD", (e, p, d)) if on)


def variant_label(backbone: str, e: bool, p: bool, d: bool) -> str:
    code = combo_code(e, p, d)
    return f"RT-DETR {backbone}" if not code else f"DSET {backbone} ({code})"


def gflops_of(backbone: str, e: bool, p: bool, d: bool) -> tuple[float, float, float]:
    b, enc, dec = BASE_GFLOPS[backbone]
    return b, enc + 0.3 * e - 0.1 * p, dec + 0.2 * d


def usage_shares(layer: int, num_experts: int = 6) -> list[float]:
    raw = [(j + layer) % num_experts + 1 for j in range(num_experts)]
    return [r / sum(raw) for r in raw]


def _config_params(backbone: str, e: bool, p: bool, d: bool, seed: int, extra: list[str] = ()) -> dict:
    preset = f"rtdetr_{backbone.lower()}"
    overrides = [f"model.encoder_moe.enabled={str(e).lower()}", f"model.token_pruning.enabled={str(p).lower()}",
                 f"model.decoder_moe.enabled={str(d).lower()}", f"run.seed={seed}", "data.image_size=320",
                 f"train.epochs={EPOCHS}", "model.num_classes=4", "model.token_pruning.warmup_epochs=1",
                 "model.token_pruning.ramp_epochs=2", *extra]  # the keep ratio logged per epoch: 1.0, 0.85, 0.7
    return {k: str(v) for k, v in load_config(preset, overrides).flat().items()}


def _log_run(client, exp_id: str, parent_id: str, *, start_ms: int, tags: dict, params: dict, status: str,
             metrics: list | None = None) -> str:
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(exp_id, start_time=start_ms, tags={"mlflow.parentRunId": parent_id, **tags})
    rid = run.info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(rid, params=items[i:i + 100])
    if metrics:
        ms = [Metric(k, float(v), start_ms + 1000 * (step + 1), step) for k, v, step in metrics]
        for i in range(0, len(ms), 500):
            client.log_batch(rid, metrics=ms[i:i + 500])
    client.log_batch(rid, tags=[RunTag("dset.fixture", "1")])
    client.set_terminated(rid, status=status, end_time=start_ms + 60_000)
    return rid


def _child_tags(study: str, cell: str, backbone: str, e: bool, p: bool, d: bool, seed: int, status: str) -> dict:
    return {schema.TAG_ROLE: "child", schema.TAG_STUDY: study, schema.TAG_CELL: cell,
            schema.TAG_VARIANT: variant_label(backbone, e, p, d), schema.TAG_BACKBONE: backbone,
            schema.TAG_ENCODER_MOE: str(e).lower(), schema.TAG_TOKEN_PRUNING: str(p).lower(),
            schema.TAG_DECODER_MOE: str(d).lower(), schema.TAG_SEED: str(seed), schema.TAG_DEVICE: "cpu",
            schema.TAG_LATENCY_DEVICE: "cpu (2 threads), batch 1", schema.TAG_GIT_COMMIT: "abc1234",
            schema.TAG_STATUS: status}


def _final_metrics(backbone: str, e: bool, p: bool, d: bool, best_map: float, latency: float, gflops=None) -> list:
    b, enc, dec = gflops_of(backbone, e, p, d)
    total = b + enc + dec if gflops is None else gflops
    n_moe = 6 * 2 * 256 * 1024 + 6 * 1024 + 6 * 256 + 256 * 6 + 6   # per MoE layer (order of magnitude only)
    params = BASE_PARAMS[backbone] + e * n_moe + d * 3 * n_moe
    active = params - (e + 3 * d) * 3 * (2 * 256 * 1024 + 1024 + 256)
    out = [(M.BEST_MAP, best_map, 0), (M.BEST_MAP50, best_map + MAP50_OFFSET, 0),
           (M.BEST_MAP75, best_map + MAP75_OFFSET, 0), (M.BEST_EPOCH, EPOCHS - 1, 0), (M.PARAMS, params, 0),
           (M.ACTIVE_PARAMS, active, 0), (M.GFLOPS, total, 0), (M.LATENCY_MS, latency, 0),
           (M.FPS, 1000.0 / latency, 0), (M.EPOCHS_RUN, EPOCHS, 0), (M.TRAIN_MINUTES, 1.5, 0)]
    if gflops is None:
        out += [(M.GFLOPS_COMPONENT_PREFIX + "backbone", b, 0), (M.GFLOPS_COMPONENT_PREFIX + "encoder", enc, 0),
                (M.GFLOPS_COMPONENT_PREFIX + "decoder", dec, 0)]
    if p:
        out.append((M.FINAL_KEEP_RATIO, 0.7, 0))
    return out


def _epoch_metrics(e: bool, p: bool, d: bool, seed: int, best_map: float, num_dec_layers: int) -> list:
    out = []
    for ep in range(EPOCHS):
        frac = (ep + 1) / EPOCHS
        out += [(M.TRAIN_LOSS_PREFIX + "loss", 10.0 - ep - 0.1 * seed, ep), (M.TRAIN_LOSS_PREFIX + "loss_vfl", 1.0, ep),
                (M.LR_PREFIX + "default", 1e-4, ep), (M.VAL_PREFIX + "mAP", best_map * frac, ep),
                (M.VAL_PREFIX + "mAP50", (best_map + MAP50_OFFSET) * frac, ep),
                (M.VAL_PREFIX + "mAP75", (best_map + MAP75_OFFSET) * frac, ep)]
        if p:
            out.append((M.KEEP_RATIO, [1.0, 0.85, 0.7][ep], ep))
        for where, on, layers in (("encoder_moe", e, 1), ("decoder_moe", d, num_dec_layers)):
            if not on:
                continue
            for layer in range(layers):
                # earlier epochs uniform; the final epoch carries the shares the heatmap must show
                shares = usage_shares(layer) if ep == EPOCHS - 1 else [1 / 6] * 6
                out += [(M.usage_metric(where, layer, j), s, ep) for j, s in enumerate(shares)]
                out.append((M.entropy_metric(where, layer), 1.5, ep))
                # MoE diagnostics: the report reads the final epoch's; layer 0 ends with near-identical experts,
                # layer 1 with a near-uniform router (entropy within 1% of ln 6 = 1.7918)
                cosine = [0.5, 0.7, 0.995 if layer == 0 else 0.6][min(ep, 2)]
                out += [(f"{M.USAGE_PREFIX}{where}/layer{layer}/expert_cosine", cosine, ep),
                        (f"{M.USAGE_PREFIX}{where}/layer{layer}/router_entropy", ROUTER_ENTROPY[layer], ep)]
    return out


def log_ablation(client, name: str = "ablation_grid") -> str:
    exp_id = client.create_experiment(name)
    parent = client.create_run(exp_id, start_time=T0_MS, tags={schema.TAG_ROLE: "parent", schema.TAG_STUDY: name})
    for i, (bb, e, p, d, seed, best) in enumerate(ABLATION_RUNS):
        start = T0_MS + 3_600_000 * (i + 1)
        cell = f"{bb.lower()}-{combo_code(e, p, d) or 'base'}-s{seed}"
        # seeds of a variant may differ in result-neutral keys (a re-run with more loader workers): still one variant
        params = _config_params(bb, e, p, d, seed, [f"data.num_workers={seed % 3}",
                                                    f"train.keep_last_checkpoint={str(seed % 2 == 0).lower()}"])
        n_dec = int(params["model.decoder.num_layers"])
        if best is None:
            _log_run(client, exp_id, parent.info.run_id, start_ms=start, params=params, status="FAILED",
                     tags={**_child_tags(name, cell, bb, e, p, d, seed, "failed"), schema.TAG_ERROR: FAILED_ERROR})
            continue
        latency = BASE_LATENCY[bb] + 1.0 * e + 0.5 * d - 2.0 * p
        metrics = _final_metrics(bb, e, p, d, best, latency) + _epoch_metrics(e, p, d, seed, best, n_dec)
        _log_run(client, exp_id, parent.info.run_id, start_ms=start, params=params, status="FINISHED",
                 tags=_child_tags(name, cell, bb, e, p, d, seed, "completed"), metrics=metrics)
    client.set_terminated(parent.info.run_id, status="FAILED", end_time=T0_MS + 3_600_000 * (len(ABLATION_RUNS) + 1))
    return exp_id


def newest_ablation_start_ms() -> int:
    return T0_MS + 3_600_000 * len(ABLATION_RUNS)


def log_optuna(client, name: str = "optuna_search") -> str:
    exp_id = client.create_experiment(name)
    parent = client.create_run(exp_id, start_time=T0_MS, tags={schema.TAG_ROLE: "parent", schema.TAG_STUDY: name})
    for trial, experts, top_k, keep, best, gflops in OPTUNA_TRIALS + [(5, 6, 1, 0.5, None, None)]:
        extra = [f"model.encoder_moe.num_experts={experts}", f"model.encoder_moe.top_k={top_k}",
                 f"model.token_pruning.keep_ratio={keep}"]
        params = _config_params("R18", True, True, True, 0, extra)
        tags = {**_child_tags(name, f"trial-{trial}", "R18", True, True, True, 0,
                              "completed" if best is not None else "failed"), schema.TAG_TRIAL: str(trial)}
        start = T0_MS + 60_000 * (trial + 1)
        if best is None:
            tags[schema.TAG_ERROR] = "ValueError: diverged (fixture)"
            _log_run(client, exp_id, parent.info.run_id, start_ms=start, params=params, status="FAILED", tags=tags)
            continue
        metrics = _final_metrics("R18", True, True, True, best, 20.0 + gflops, gflops=gflops)
        metrics += _epoch_metrics(True, True, True, 0, best, 3)
        _log_run(client, exp_id, parent.info.run_id, start_ms=start, params=params, status="FINISHED",
                 tags=tags, metrics=metrics)
    # trial 6: pruned by Optuna after one epoch; its (meaningless) numbers would dominate every other trial
    extra = ["model.encoder_moe.num_experts=6", "model.encoder_moe.top_k=1", "model.token_pruning.keep_ratio=0.5"]
    tags = {**_child_tags(name, "trial-6", "R18", True, True, True, 0, "stopped"), schema.TAG_TRIAL: "6",
            "dset.stop_reason": "optuna_pruned"}
    metrics = _final_metrics("R18", True, True, True, 0.99, 21.0, gflops=1.0)
    metrics += _epoch_metrics(True, True, True, 0, 0.99, 3)
    _log_run(client, exp_id, parent.info.run_id, start_ms=T0_MS + 60_000 * 7, status="FINISHED", tags=tags,
             params=_config_params("R18", True, True, True, 0, extra), metrics=metrics)
    client.set_terminated(parent.info.run_id, status="FINISHED", end_time=T0_MS + 600_000)
    return exp_id


CRASH_ERROR = "KeyboardInterrupt (fixture)"


def log_crashed(client, name: str = "crashed_study") -> str:
    from mlflow.entities import Metric

    exp_id = client.create_experiment(name)
    parent = client.create_run(exp_id, start_time=T0_MS, tags={schema.TAG_ROLE: "parent", schema.TAG_STUDY: name})
    pid = parent.info.run_id
    tags = {**_child_tags(name, "r18-base-s0", "R18", False, False, False, 0, "failed"), schema.TAG_ERROR: CRASH_ERROR}
    _log_run(client, exp_id, pid, start_ms=T0_MS + 1000, params={}, status="FAILED", tags=tags)
    running = client.create_run(exp_id, start_time=T0_MS + 2000, tags={
        "mlflow.parentRunId": pid, **_child_tags(name, "r34-base-s0", "R34", False, False, False, 0, "running")})
    client.log_batch(running.info.run_id, metrics=[Metric(M.VAL_PREFIX + "mAP", 0.1, T0_MS + 3000, 0)])
    client.set_terminated(pid, status="FAILED", end_time=T0_MS + 5000)
    return exp_id


# two_stage: (backbone, e, p, d, seed, detections quality (recall, jitter, false positives per image) or None
# for RT-DETR's quality, detections logged as artifacts)
QUALITY = {"rtdetr": (0.7, 0.1, 3.0), "good": (0.9, 0.05, 1.0), "poor": (0.35, 0.25, 5.0), "noise": (0.3, 0.35, 12.0)}
TWO_STAGE_RUNS = [
    ("R18", False, False, False, 0, "rtdetr", True),
    ("R18", True, True, True, 0, "good", True),          # clearly better with one seed: interval above 0
    ("R18", True, False, False, 0, "rtdetr", True),      # RT-DETR's quality, other draws: no difference detected
    ("R18", True, False, False, 1, "rtdetr", True),
    ("R18", False, True, False, 0, "poor", True),        # worse: interval below 0
    ("R18", False, False, True, 0, "good", False),       # no artifacts (an old run): Welch, "n=1, no test"
    ("R34", False, False, False, 0, "noise", True),      # both mAPs below the noise floor: no relative %
    ("R34", True, True, True, 0, "noise", True),
]
TWO_STAGE_IMAGES = 48
TWO_STAGE_TARGETS = Targets(delta_map=0.05, gflops_percent=-5.0, latency_percent=-4.0, learning_floor_map=0.05,
                            min_scored_images=30)
STAGE1_DIR = "runs/two_stage/stage1-r18/checkpoints"
STAGE1_INIT = "weights/presnet18vd_imagenet.pth"
R34_INIT = "weights/rtdetr_r34vd_published.pth"


def two_stage_ground_truth() -> dict:
    return synthetic_ground_truth(TWO_STAGE_IMAGES, 4, seed=10)


def two_stage_detections(i: int) -> list[dict]:
    """The detections of ``TWO_STAGE_RUNS[i]`` (deterministic)."""
    bb, e, p, d, seed, quality, _ = TWO_STAGE_RUNS[i]
    return synthetic_detections(two_stage_ground_truth(), *QUALITY[quality], seed=100 + i)


def log_two_stage(client, artifact_root: Path, name: str = "two_stage") -> str:
    from mlflow.entities import RunTag

    exp_id = client.create_experiment(name, artifact_location=(artifact_root / name).as_uri())
    parent = client.create_run(exp_id, start_time=T0_MS, tags={schema.TAG_ROLE: "parent", schema.TAG_STUDY: name})
    # the study file's targets, as studies/tracking/invocation_runs.py logs them (a margin other than the default's)
    for key, value in TWO_STAGE_TARGETS.params().items():
        client.log_param(parent.info.run_id, key, value)
    gt = two_stage_ground_truth()
    image_ids = sorted(im["id"] for im in gt["images"])
    stage1 = {schema.TAG_ROLE: "pretrain", schema.TAG_STUDY: name, schema.TAG_CELL: "r18-stage1",
              schema.TAG_BACKBONE: "R18", schema.TAG_STATUS: "completed", schema.TAG_CHECKPOINT_DIR: STAGE1_DIR,
              schema.TAG_INIT_CHECKPOINT: STAGE1_INIT, schema.TAG_INIT_SOURCE: "published"}
    _log_run(client, exp_id, parent.info.run_id, start_ms=T0_MS + 1000, tags=stage1, status="FINISHED",
             params=_config_params("R18", False, False, False, 0),
             metrics=_final_metrics("R18", False, False, False, 0.2, BASE_LATENCY["R18"]))
    for i, (bb, e, p, d, seed, _quality, artifacts) in enumerate(TWO_STAGE_RUNS):
        dets = two_stage_detections(i)
        best, best50 = coco_stats(gt, dets)
        latency = BASE_LATENCY[bb] + 1.0 * e + 0.5 * d - 2.0 * p
        metrics = [m for m in _final_metrics(bb, e, p, d, best, latency) if m[0] != M.BEST_MAP50]
        kept = 70 if p else 100
        metrics += [(M.BEST_MAP50, best50, 0), (M.PROFILE_TOKENS, 100, 0), (M.PROFILE_KEPT_TOKENS, kept, 0),
                    (M.PROFILE_KEEP_RATIO, kept / 100, 0)]
        init = {schema.TAG_INIT_CHECKPOINT: f"{STAGE1_DIR}/best.pt",
                schema.TAG_INIT_SOURCE: "stage 1 (cached, key 1a2b3c)"}
        if bb == "R34":
            init = {schema.TAG_INIT_CHECKPOINT: R34_INIT, schema.TAG_INIT_SOURCE: "published"}
        cell = f"{bb.lower()}-{combo_code(e, p, d) or 'base'}-s{seed}"
        rid = _log_run(client, exp_id, parent.info.run_id, start_ms=T0_MS + 3_600_000 * (i + 1),
                       params=_config_params(bb, e, p, d, seed), status="FINISHED", metrics=metrics,
                       tags={**_child_tags(name, cell, bb, e, p, d, seed, "completed"), **init})
        if artifacts:
            client.log_dict(rid, {"image_ids": image_ids, "detections": dets}, schema.ARTIFACT_DETECTIONS)
            client.log_dict(rid, gt, schema.ARTIFACT_GROUND_TRUTH)
    client.log_batch(parent.info.run_id, tags=[RunTag("dset.fixture", "1")])
    client.set_terminated(parent.info.run_id, status="FINISHED", end_time=T0_MS + 3_600_000 * 10)
    return exp_id


# scored_on_test: (variant label, e, p, d, memory keep ratio or None, quality of its validation detections, of its
# test detections, per-run latency_ms, GFLOPs or None for gflops_of's)
SCORED_RUNS = [
    ("RT-DETR R18", False, False, False, None, "rtdetr", "rtdetr", 20.0, None),
    ("DSET R18 (E+P+D)", True, True, True, None, "good", "poor", 30.0, None),     # better on val, worse on test
    ("DSET R18 (M0.3)", False, False, False, 0.3, "poor", "good", 30.0, 13.2),   # worse on val, better on test
]
SCORED_VAL_IMAGES, SCORED_TEST_IMAGES = 48, 64
# the side-by-side benchmark of R18: variant label -> (latency ms, change %, 95% interval low, high); the per-run
# latencies above would read +50% for both variants
SCORED_BENCHMARK = {"RT-DETR R18": (25.0, None, None, None), "DSET R18 (E+P+D)": (24.0, -4.0, -5.8, -2.2),
                    "DSET R18 (M0.3)": (22.0, -12.0, -14.5, -9.5)}
SCORED_BENCHMARK_SETTINGS = {"device": "cpu (x86_64, 2 threads)", "image_size": 320, "batch": 1, "processes": 3,
                             "rounds": 10, "warmup": 2}


def scored_ground_truth(split: str) -> dict:
    """The ``scored_on_test`` study's ground truth of one split ("val" or "test"): other images, other boxes."""
    if split == "val":
        return synthetic_ground_truth(SCORED_VAL_IMAGES, 4, seed=20)
    return synthetic_ground_truth(SCORED_TEST_IMAGES, 4, seed=21)


def scored_detections(i: int, split: str) -> list[dict]:
    """The detections of ``SCORED_RUNS[i]`` on one split (deterministic)."""
    quality = SCORED_RUNS[i][5 if split == "val" else 6]
    return synthetic_detections(scored_ground_truth(split), *QUALITY[quality], seed=200 + 10 * i + (split == "test"))


def _scored_cell(e: bool, p: bool, d: bool, keep: float | None) -> str:
    return f"r18-{combo_code(e, p, d) or 'base'}" + (f"-m{keep:g}" if keep is not None else "") + "-s0"


def _log_benchmark(client, exp_id: str, parent_id: str, study: str, start_ms: int) -> str:
    """R18's side-by-side latency benchmark run, tagged as studies/execution/latency_step.benchmark_backbone tags it
    and logged by its own log_result (a result shaped like dset.latency_benchmark.run_benchmark's,
    ``SCORED_BENCHMARK``)."""
    from dset.latency_benchmark import INTERVAL_PROCESSES, PRECISION
    from studies.execution.latency_step import log_result, variant_slug

    labels = list(SCORED_BENCHMARK)
    baseline, st = labels[0], SCORED_BENCHMARK_SETTINGS
    slugs = {variant_slug(label): label for label in labels}
    cells = {label: _scored_cell(e, p, d, keep) for label, e, p, d, keep, *_ in SCORED_RUNS}
    tags = {schema.TAG_ROLE: schema.ROLE_BENCHMARK, schema.TAG_STUDY: study, schema.TAG_BACKBONE: "R18",
            schema.TAG_BENCHMARK_KEY: "0123abcd",
            schema.TAG_BENCHMARK_BASELINE: baseline, schema.TAG_BENCHMARK_CELLS: json.dumps(cells),
            schema.TAG_BENCHMARK_VARIANTS: json.dumps(slugs), schema.TAG_BENCHMARK_IMAGE_SIZE: str(st["image_size"]),
            schema.TAG_BENCHMARK_BATCH: str(st["batch"]), schema.TAG_BENCHMARK_PROCESSES: str(st["processes"]),
            schema.TAG_BENCHMARK_ROUNDS: str(st["rounds"]), schema.TAG_BENCHMARK_WARMUP: str(st["warmup"]),
            schema.TAG_GIT_COMMIT: "abc1234", "mlflow.parentRunId": parent_id, "mlflow.runName": "latency R18"}
    rid = client.create_run(exp_id, start_time=start_ms, tags=tags, run_name="latency R18").info.run_id
    result = {"device": st["device"], "threads": 2, "precision": PRECISION, "interval": INTERVAL_PROCESSES,
              "processes": st["processes"], "rounds": st["rounds"], "baseline": baseline, "seconds": 61.0,
              "models": {label: {"latency_ms": ms} for label, (ms, *_) in SCORED_BENCHMARK.items()},
              "changes": {label: {"latency_change_percent": ch, "latency_change_low_percent": low,
                                  "latency_change_high_percent": high, "baseline": baseline}
                          for label, (_, ch, low, high) in SCORED_BENCHMARK.items() if label != baseline}}
    log_result(client, rid, result, slugs)
    client.set_terminated(rid, status="FINISHED", end_time=start_ms + 61_000)
    return rid


def log_scored_on_test(client, artifact_root: Path, name: str = "scored_on_test") -> str:
    from mlflow.entities import RunTag

    exp_id = client.create_experiment(name, artifact_location=(artifact_root / name).as_uri())
    parent = client.create_run(exp_id, start_time=T0_MS, tags={schema.TAG_ROLE: "parent", schema.TAG_STUDY: name})
    gts = {split: scored_ground_truth(split) for split in ("val", "test")}
    for i, (label, e, p, d, keep, _val, _test, latency, gflops) in enumerate(SCORED_RUNS):
        dets = {split: scored_detections(i, split) for split in gts}
        best, best50 = coco_stats(gts["val"], dets["val"])      # the selection split's best/mAP, as a run logs it
        test_map, test_map50 = coco_stats(gts["test"], dets["test"])
        metrics = [m for m in _final_metrics("R18", e, p, d, best, latency, gflops) if m[0] != M.BEST_MAP50]
        metrics += [(M.BEST_MAP50, best50, 0), (M.TEST_MAP, test_map, 0), (M.TEST_MAP50, test_map50, 0)]
        extra = [] if keep is None else ["model.memory_pruning.enabled=true", f"model.memory_pruning.keep_ratio={keep}"]
        tags = _child_tags(name, _scored_cell(e, p, d, keep), "R18", e, p, d, 0, "completed")
        tags.update({schema.TAG_VARIANT: label, schema.TAG_MEMORY_PRUNING: "false" if keep is None else f"{keep:g}",
                     schema.TAG_SCORE_SPLIT: "test"})
        rid = _log_run(client, exp_id, parent.info.run_id, start_ms=T0_MS + 3_600_000 * (i + 1), tags=tags,
                       params=_config_params("R18", e, p, d, 0, extra), status="FINISHED", metrics=metrics)
        for split, det_name, gt_name in (("val", schema.ARTIFACT_DETECTIONS, schema.ARTIFACT_GROUND_TRUTH),
                                         ("test", schema.ARTIFACT_TEST_DETECTIONS, schema.ARTIFACT_TEST_GROUND_TRUTH)):
            image_ids = sorted(im["id"] for im in gts[split]["images"])
            client.log_dict(rid, {"image_ids": image_ids, "detections": dets[split]}, det_name)
            client.log_dict(rid, gts[split], gt_name)
    _log_benchmark(client, exp_id, parent.info.run_id, name, T0_MS + 3_600_000 * (len(SCORED_RUNS) + 1))
    client.log_batch(parent.info.run_id, tags=[RunTag("dset.fixture", "1")])
    client.set_terminated(parent.info.run_id, status="FINISHED", end_time=T0_MS + 3_600_000 * 10)
    return exp_id


def make_store(uri: str) -> float:
    """Create the experiments in the (empty) tracking store at ``uri`` (a ``sqlite:///`` file; run artifacts go
    into ``artifacts/`` beside it); returns the seconds it took."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    t = time.perf_counter()
    log_ablation(client)
    log_optuna(client)
    log_crashed(client)
    artifacts = Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts"
    log_two_stage(client, artifacts)
    log_scored_on_test(client, artifacts)
    client.create_experiment("empty_study")
    return time.perf_counter() - t
