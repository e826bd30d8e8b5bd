"""How studies log to MLflow: the names that ``studies/`` writes and ``analysis/`` reads.

One experiment per study (named after it). One parent run per invocation of ``python -m studies.run``
and one nested child run per grid cell or Optuna trial (``mlflow.parentRunId`` tag).

Child runs carry:
- params: the full resolved configuration, flat dotted keys (``model.decoder_moe.top_k`` ...);
- tags (below), all strings; switches are "true"/"false";
- metrics, named in :mod:`dset.metric_names` and logged under the names the training loop wrote them with (no
  renaming, :mod:`studies.tracking.callback`): per-epoch metrics (each ``metrics.jsonl`` record's numbers but ``epoch``)
  at ``step=epoch``; final metrics (``summary.json``'s ``metrics`` block) once;
- artifacts: config.yaml, metrics.jsonl, summary.json, per_class_ap.csv, expert_usage.png (DSET only), and the
  reported checkpoint's detections on the validation images with their ground truth (``ARTIFACT_DETECTIONS``,
  ``ARTIFACT_GROUND_TRUTH``) and, with a test split, on the test images (``ARTIFACT_TEST_DETECTIONS``,
  ``ARTIFACT_TEST_GROUND_TRUTH``), from which the report bootstraps intervals over images;
- pictures of the reported checkpoint on the first validation images (``ARTIFACT_PICTURES``, see
  :mod:`dset.pictures`): ``pictures/detections_<image id>.png`` and, with the switches on,
  ``pictures/kept_tokens_<id>.png``, ``pictures/encoder_experts_<id>.png``, ``pictures/decoder_experts_<id>.png``,
  captioned by ``ARTIFACT_PICTURES_INDEX``. The same PNGs are also logged with ``MlflowClient.log_image`` (key: the
  file name without ``.png``, step: the checkpoint's epoch), which MLflow keeps under ``images/`` and shows on
  the run page.
A failed child run has MLflow status FAILED and the tag ``dset.error`` with the error message.
"""

from dset import run_folder

# ------------------------------------------------------------------------------------------ experiments
# MLflow 3's UI opens an experiment on its GenAI overview (traces, sessions, judges) unless this experiment tag
# says it holds model training; ours do, so it opens on the runs
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# ----------------------------------------------------------------------------------------------- tags
TAG_ROLE = "dset.role"                 # "parent", "child" (a cell or trial) or "pretrain" (a stage-1 run)
TAG_STUDY = "dset.study"               # study name, e.g. "ablation_grid"
TAG_CELL = "dset.cell"                 # cell id, e.g. "r18-enc_moe-prune-dec_moe-s0" or "trial-12"
TAG_VARIANT = "dset.variant"           # human label, e.g. "RT-DETR R18" or "DSET R18 (E+P+D)"
TAG_BACKBONE = "dset.backbone"         # "R18" or "R34"
TAG_ENCODER_MOE = "dset.encoder_moe"   # "true" / "false"
TAG_TOKEN_PRUNING = "dset.token_pruning"
TAG_DECODER_MOE = "dset.decoder_moe"
TAG_MEMORY_PRUNING = "dset.memory_pruning"  # "false", or the memory keep ratio, e.g. "0.3"
TAG_SEED = "dset.seed"
TAG_DEVICE = "dset.device"             # device the run trained on, e.g. "cpu" or "NVIDIA H100"
TAG_LATENCY_DEVICE = "dset.latency_device"  # device and threads of the latency measurement
TAG_GIT_COMMIT = "dset.git_commit"
TAG_FINGERPRINT = "dset.fingerprint"   # hash of the resolved config + seed + stage 1 + code version + data digest
                                       # (resume / dedup: a finished run with it is the cell, done)
TAG_TRIAL = "dset.trial"               # Optuna trial number (Optuna studies)
TAG_ERROR = "dset.error"               # error message of a failed run
TAG_STATUS = "dset.status"             # "completed", "failed", "stopped" (early stop or pruned)
TAG_CHECKPOINT_DIR = "dset.checkpoint_dir"
TAG_INIT_CHECKPOINT = "dset.init_checkpoint"  # the weights a run started from (stage 1's best.pt, a published file)
TAG_INIT_SOURCE = "dset.init_source"   # what those weights are, e.g. "stage 1 (cached, key 1a2b...)" or "published"
TAG_CELL_KEY = "dset.cell_key"         # hash of config + seed + stage 1 without code and data: the same cell
                                       # made by other code or data has the same key and another fingerprint
TAG_SUPERSEDED_BY = "dset.superseded_by"  # on a stale run: the run id that redid its cell (the report skips it);
                                          # on an interrupted attempt: the run of the attempt that replaced it
TAG_ATTEMPT_OF = "dset.attempt_of"     # on a cell's run: the run of the interrupted attempt it replaced (deleted)
TAG_STAGE1_KEY = "dset.stage1_key"     # a stage-1 run's cache key (role "pretrain")
TAG_CODE_VERSION = "dset.code_version" # hash of the dset/ package sources that trained the run
TAG_DATA_DIGEST = "dset.data_digest"   # hash of the annotation files it trained and was evaluated on
# added by studies/ (the report does not need them):
TAG_STOP_REASON = "dset.stop_reason"   # why a run stopped early: "early_stopping: ...", "callback", "optuna_pruned"
TAG_OPTUNA_STUDY = "dset.optuna_study" # Optuna study name (parent and trial runs of Optuna studies)
TAG_QUEUE = "dset.queue"               # on a grid's parent run: the Optuna study holding its queue of cells, and where
TAG_FLOPS_TOOL = "dset.flops_tool"     # what counted the GFLOPs (dset.measure's FLOPS_TOOL)
TAG_PROFILE_ERROR = "dset.profile_error"  # why params/GFLOPs/latency are missing from a finished run
TAG_PICTURES_ERROR = "dset.pictures_error"  # why the pictures are missing from a finished run
TAG_HOST = "dset.host"                 # host and process id of the invocation running the run: a RUNNING run
TAG_PID = "dset.pid"                   # whose process is gone is resumed by the next invocation
TAG_SLURM_JOB = "dset.slurm_job"       # and its SLURM job (ARRAY_TASK), "none" outside SLURM
TAG_DEPLOY_DEVICES = "dset.deploy_devices"  # where each deploy/<runtime> metric ran, e.g. "eager: cpu (x86_64,
                                       # 2 threads); onnxruntime_cpu: onnxruntime 1.32.0 CPUExecutionProvider
                                       # (2 threads)"
TAG_DEPLOY_ERROR = "dset.deploy_error"  # why a finished run has no deploy/ metrics (an ONNX export problem, ...)
TAG_DEVICE_SHARED = "dset.device_shared"  # "true" when other workers of the invocation used the run's device
                                       # (a GPU shared round-robin, or the CPU with --workers > 1)
TAG_SCORE_SPLIT = "dset.score_split"   # the split the run's reported checkpoint is scored on (summary.json's
                                       # score_split): "test", or "val" when its data has no test split (then the
                                       # images that selected it score it); the selection split is always "val"
TAG_LEARNING_RISKS = "dset.learning_risks"  # why the run's budget may not learn its data ("; "-joined, summary.json's
                                       # learning_risks, dset.data.preflight): quoted where a baseline has not learned

SWITCH_TAGS = (TAG_ENCODER_MOE, TAG_TOKEN_PRUNING, TAG_DECODER_MOE)

# the run folder's files, logged under the same relative paths (dset.run_folder names them and their formats):
# COCO detections of the reported checkpoint on the validation images and their ground truth, the same two on the
# test images (the scoring split; runs whose data has one, TAG_SCORE_SPLIT "test"), and the pictures of the reported
# checkpoint (dset.pictures: a folder of PNGs and the JSON that describes them)
ARTIFACT_DETECTIONS = run_folder.DETECTIONS
ARTIFACT_GROUND_TRUTH = run_folder.GROUND_TRUTH
ARTIFACT_TEST_DETECTIONS = run_folder.TEST_DETECTIONS
ARTIFACT_TEST_GROUND_TRUTH = run_folder.TEST_GROUND_TRUTH
ARTIFACT_PICTURES = run_folder.PICTURES_DIR
ARTIFACT_PICTURES_INDEX = run_folder.PICTURES_INDEX
# written when a run is logged (studies.tracking.callback), not in the run folder
ARTIFACT_PER_CLASS_AP = "per_class_ap.csv"
ARTIFACT_EXPERT_USAGE = "expert_usage.png"
ARTIFACT_IMAGES = "images"   # where MlflowClient.log_image puts the same pictures for the run page
ARTIFACTS = (run_folder.CONFIG, run_folder.METRICS, run_folder.SUMMARY, ARTIFACT_PER_CLASS_AP, ARTIFACT_EXPERT_USAGE,
             ARTIFACT_DETECTIONS, ARTIFACT_GROUND_TRUTH, ARTIFACT_TEST_DETECTIONS, ARTIFACT_TEST_GROUND_TRUTH,
             ARTIFACT_PICTURES)

# ---------------------------------------------------------------------------------- latency benchmark runs
# One run per backbone of a grid study, nested under the parent run of the invocation that measured it: the
# backbone's variants and its RT-DETR baseline timed side by side by dset.latency_benchmark (interleaved in one
# process, repeated in several processes) from the cells' reported checkpoints (studies/execution/latency_step.py).
# It is the latency the report compares; each cell's own latency metric stays as that run's metadata.
ROLE_BENCHMARK = "benchmark"                        # its TAG_ROLE; TAG_STUDY and TAG_BACKBONE as on the cells
TAG_BENCHMARK_KEY = "dset.benchmark_key"            # hash of the timed cells' fingerprints and the settings below:
                                                    # a finished benchmark run with it is not measured again
TAG_BENCHMARK_CELLS = "dset.benchmark_cells"        # JSON {variant label: cell id} of the cells timed
TAG_BENCHMARK_BASELINE = "dset.benchmark_baseline"  # the baseline's variant label, e.g. "RT-DETR R18"
TAG_BENCHMARK_VARIANTS = "dset.benchmark_variants"  # JSON {metric name part: variant label}, see BENCHMARK_METRIC
TAG_BENCHMARK_DEVICE = "dset.benchmark_device"      # e.g. "cpu (x86_64, 2 threads)"
TAG_BENCHMARK_THREADS = "dset.benchmark_threads"    # torch intra-op threads of each process
TAG_BENCHMARK_PRECISION = "dset.benchmark_precision"  # "fp32"
TAG_BENCHMARK_IMAGE_SIZE = "dset.benchmark_image_size"  # square input size in pixels (the cells' data.image_size)
TAG_BENCHMARK_BATCH = "dset.benchmark_batch"        # batch size
TAG_BENCHMARK_PROCESSES = "dset.benchmark_processes"  # separate processes, one after the other
TAG_BENCHMARK_ROUNDS = "dset.benchmark_rounds"      # timed rounds per process, each model once per round
TAG_BENCHMARK_WARMUP = "dset.benchmark_warmup"      # untimed rounds per process before them
TAG_BENCHMARK_INTERVAL = "dset.benchmark_interval"  # how the 95% interval was made (dset.latency_benchmark)
# per variant: BENCHMARK_METRIC.format(variant=<its part of TAG_BENCHMARK_VARIANTS>, quantity=<one of
# BENCHMARK_QUANTITIES>): median latency of all timed calls; change against the baseline in %, 95% interval
BENCHMARK_METRIC = "benchmark/{variant}/{quantity}"
BENCHMARK_QUANTITIES = ("latency_ms", "change_percent", "change_low_percent", "change_high_percent")
BENCHMARK_SECONDS = "benchmark/seconds"             # wall time of the benchmark, every process included
ARTIFACT_BENCHMARK = "latency_benchmark.json"       # dset.latency_benchmark.run_benchmark's result, every round
