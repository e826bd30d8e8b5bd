"""The name of every metric a run records: in the training loop's ``metrics.jsonl`` and ``summary.json``, in
MLflow and in the report. One name per metric, used unchanged by every layer: ``dset/`` defines them and the
training loop writes them (:mod:`dset.engine.loop`); ``studies/`` logs them to MLflow as they are, without
renaming (:mod:`studies.tracking.callback`); ``analysis/`` reads them back.

- Per-epoch metrics: the keys of each ``metrics.jsonl`` record (the dict a callback's ``on_epoch_end`` gets),
  beside ``epoch`` (MLflow's step) and ``counts`` (images and steps of the epoch, not metrics); logged at
  ``step=epoch``.
- Final metrics: ``summary.json``'s ``metrics`` block; logged once per run (at step 0).

Names hold only the characters MLflow accepts (:func:`sanitise`: class names are made so).
"""

from __future__ import annotations

import re

MAX_KEY = 250                          # MLflow's limit on a metric (or parameter, tag) key
_BAD_CHARACTERS = re.compile(r"[^A-Za-z0-9_\-. /]")   # MLflow accepts letters, digits, _ - . space /

# ----------------------------------------------------------------------------- per-epoch metric prefixes
TRAIN_LOSS_PREFIX = "train/"           # train/loss (total), train/loss_vfl, train/loss_bbox, ... (epoch means)
LR_PREFIX = "lr/"                      # lr/<param group name>
VAL_PREFIX = "val/"                    # val/mAP, val/mAP50, val/mAP75, val/mAP_small, val/mAP_medium, val/mAP_large,
                                       # val/AR100
VAL_MAP = VAL_PREFIX + "mAP"           # what early stopping, the best epoch and Optuna's pruning follow
KEEP_RATIO = "sparse/keep_ratio"       # token keep ratio in force that epoch (measured: mean kept / tokens)
SCHEDULED_KEEP_RATIO = "sparse/scheduled_keep_ratio"  # the schedule's target keep ratio that epoch
MEMORY_KEEP_RATIO = "sparse/memory_keep_ratio"  # memory pruning: decoder memory tokens kept / tokens, that epoch
SCHEDULED_MEMORY_KEEP_RATIO = "sparse/scheduled_memory_keep_ratio"
VAL_AP_PREFIX = "val/AP/"              # val/AP/<class name>: per-class AP@[.5:.95] (characters MLflow rejects -> _)
EPOCH_TIME = "time/epoch_s"            # wall time of the epoch (training + evaluation), seconds
# expert usage share: sparse/<encoder_moe|decoder_moe>/layer<i>/expert<j>; entropy: .../layer<i>/entropy
# (entropy of the layer's usage shares in nats, natural log: ln(num_experts) when perfectly balanced);
# .../layer<i>/expert_cosine and .../layer<i>/router_entropy: expert_cosine_metric, router_entropy_metric
USAGE_PREFIX = "sparse/"

# ---------------------------------------------------------------------------------------- final metrics
BEST_MAP = "best/mAP"                  # mAP@0.5:0.95 of the best epoch (EMA weights)
BEST_MAP50 = "best/mAP50"
BEST_MAP75 = "best/mAP75"
BEST_EPOCH = "best/epoch"
# the reported checkpoint (best.pt's EMA weights) scored once on the test split, the scoring split (only runs whose
# data has one: data.test, data.synthetic.num_test); the val/ metrics are on the selection split, which chose it
TEST_PREFIX = "test/"                  # test/mAP, test/mAP50, test/mAP75, test/mAP_small, test/mAP_medium,
                                       # test/mAP_large, test/AR100
TEST_MAP = TEST_PREFIX + "mAP"
TEST_MAP50 = TEST_PREFIX + "mAP50"
TEST_MAP75 = TEST_PREFIX + "mAP75"
TEST_AP_PREFIX = "test/AP/"            # test/AP/<class name>, sanitised as val/AP/<class name>
PARAMS = "params"
ACTIVE_PARAMS = "active_params"
GFLOPS = "gflops"                      # 2 x multiply-adds, fvcore + attention/grid-sample handles
GFLOPS_COMPONENT_PREFIX = "gflops/"    # gflops/backbone, gflops/encoder, gflops/decoder
LATENCY_MS = "latency_ms"              # batch 1, median, on the tag dset.latency_device (studies.tracking.schema)
FPS = "fps"
FINAL_KEEP_RATIO = "final/keep_ratio"
# what the reported checkpoint's GFLOPs and latency were measured at: AIFI tokens in, tokens kept, their ratio
PROFILE_TOKENS = "profile/tokens"
PROFILE_KEPT_TOKENS = "profile/kept_tokens"
PROFILE_KEEP_RATIO = "profile/keep_ratio"
# and the decoder memory's tokens (all levels) in and kept (memory pruning; equal without it)
PROFILE_MEMORY_TOKENS = "profile/memory_tokens"
PROFILE_MEMORY_KEPT_TOKENS = "profile/memory_kept_tokens"
EPOCHS_RUN = "epochs_run"
TRAIN_MINUTES = "train_minutes"
# throughput and memory of the run's last attempt (a resumed run: the process that finished it)
TRAIN_IMAGES_PER_S = "perf/train_images_per_s"   # training images / seconds in training steps
EVAL_IMAGES_PER_S = "perf/eval_images_per_s"     # validation images / seconds in evaluation
PEAK_HOST_MEMORY_MB = "perf/peak_host_memory_mb"  # peak resident memory of the training process
PEAK_GPU_MEMORY_MB = "perf/peak_gpu_memory_mb"    # peak CUDA memory allocated by torch (GPU runs only)
# MLflow's own system metrics, sampled while a run trains (time series): system/cpu_utilization_percentage,
# system/system_memory_usage_megabytes, system/gpu_0_utilization_percentage, system/gpu_0_memory_usage_megabytes, ...
SYSTEM_PREFIX = "system/"

# deployed speed of the reported checkpoint (train.profile_deployment; dset.measure.deployment_latency): eager
# PyTorch and each ONNX Runtime provider, timed round-robin in one process at batch 1 and 8:
# deploy/<runtime>/latency_ms_b<batch> (median) and deploy/<runtime>/images_per_s_b<batch>, runtime "eager",
# "onnxruntime_cpu", "onnxruntime_tensorrt", "onnxruntime_cuda"; where each ran: the tag dset.deploy_devices
DEPLOY_PREFIX = "deploy/"
DEPLOY_ONNX_MAX_DIFF = "deploy/onnx_max_abs_diff"   # largest |ONNX Runtime - eager| of the outputs
                                                    # (tied queries paired)
EAGER = "eager"
ONNXRUNTIME_CPU = "onnxruntime_cpu"


def sanitise(name: str) -> str:
    """``name`` as MLflow accepts it: characters other than letters, digits, ``_ - . space /`` become ``_``,
    cut to :data:`MAX_KEY` characters."""
    return _BAD_CHARACTERS.sub("_", name)[:MAX_KEY]


def train_loss_metric(name: str) -> str:
    """``train/<name>``: the total loss (``loss``) or a weighted loss term (``loss_vfl``, ...), epoch mean."""
    return TRAIN_LOSS_PREFIX + name


def lr_metric(group: str) -> str:
    """``lr/<param group name>``."""
    return LR_PREFIX + group


def val_metric(name: str) -> str:
    """``val/<name>``: a COCO metric (``mAP``, ``mAP50``, ..., ``AR100``) of the epoch's evaluation."""
    return VAL_PREFIX + name


# (not named test_*: pytest would collect them where a test module imports them)
def metric_on_test(name: str) -> str:
    """``test/<name>``: a COCO metric (``mAP``, ``mAP50``, ..., ``AR100``) of the test-split evaluation."""
    return TEST_PREFIX + name


def per_class_ap_metric_on_test(class_name: str) -> str:
    """``test/AP/<class name>``, sanitised (:func:`sanitise`)."""
    return sanitise(TEST_AP_PREFIX + class_name)


def per_class_ap_metric(class_name: str) -> str:
    """``val/AP/<class name>``, sanitised (:func:`sanitise`)."""
    return sanitise(VAL_AP_PREFIX + class_name)


def deploy_metric(runtime: str, what: str, batch: int) -> str:
    """``deploy/<runtime>/<what>_b<batch>``, ``what`` "latency_ms" or "images_per_s"."""
    return f"{DEPLOY_PREFIX}{runtime}/{what}_b{batch}"


def usage_metric(where: str, layer: int, expert: int) -> str:
    return f"{USAGE_PREFIX}{where}/layer{layer}/expert{expert}"


def entropy_metric(where: str, layer: int) -> str:
    return f"{USAGE_PREFIX}{where}/layer{layer}/entropy"


def expert_cosine_metric(where: str, layer: int) -> str:
    """``sparse/<where>/layer<i>/expert_cosine``: the mean pairwise cosine similarity of the layer's experts'
    flattened weights at the epoch's end (1: identical experts, a mixture that is one FFN)."""
    return f"{USAGE_PREFIX}{where}/layer{layer}/expert_cosine"


def router_entropy_metric(where: str, layer: int) -> str:
    """``sparse/<where>/layer<i>/router_entropy``: the mean over the epoch's training tokens of the entropy (nats)
    of the router's probabilities (ln(num_experts): uniform routing; 0: one-hot)."""
    return f"{USAGE_PREFIX}{where}/layer{layer}/router_entropy"
