"""The final metrics of a run: ``summary.json``'s ``metrics`` block, under the names of :mod:`dset.metric_names`
(those MLflow and the report use).

The loop fills the block (:class:`dset.engine.loop.TrainingRun`): ``params`` when the run starts; at its end the best
epoch (:func:`best_epoch_metrics`), ``final/keep_ratio``, ``epochs_run``, ``train_minutes``
(:func:`train_minutes`), throughput and peak memory; the reported checkpoint's profile adds its measurements
(:func:`dset.engine.reported_checkpoint.profile_entries`, with :func:`deployment_metrics`). A metric that was not
measured is absent, or None (``null`` in the file) where the run measured nothing (``perf/peak_gpu_memory_mb``
off CUDA).
"""

from __future__ import annotations

from .. import metric_names as M

__all__ = ["best_epoch_metrics", "train_minutes", "deployment_metrics"]


def best_epoch_metrics(record: dict | None, epoch: int | None) -> dict:
    """``best/mAP``, ``best/mAP50``, ``best/mAP75`` and ``best/epoch`` from the best epoch's record (none when no
    epoch was best)."""
    if record is None or epoch is None:
        return {}
    out = {best: record.get(M.val_metric(name))
           for best, name in ((M.BEST_MAP, "mAP"), (M.BEST_MAP50, "mAP50"), (M.BEST_MAP75, "mAP75"))}
    out[M.BEST_EPOCH] = epoch
    return {k: v for k, v in out.items() if v is not None}


def train_minutes(epoch_times: list[float], train_time_s: float | None) -> dict:
    """``train_minutes``: the epochs' ``time/epoch_s`` summed (also those of an earlier, interrupted process of the
    run), else the attempt's training time; none when neither is known."""
    if epoch_times:
        return {M.TRAIN_MINUTES: sum(epoch_times) / 60.0}
    if train_time_s is not None:
        return {M.TRAIN_MINUTES: train_time_s / 60.0}
    return {}


def deployment_metrics(deployment: dict | None) -> dict[str, float]:
    """A profile's ``deployment`` block (:func:`dset.measure.deployment_latency`) as the ``deploy/`` metrics:
    ``deploy/<runtime>/latency_ms_b<batch>``, ``deploy/<runtime>/images_per_s_b<batch>`` and
    ``deploy/onnx_max_abs_diff``. Batch keys may be ints (in memory) or strings (read back from JSON)."""
    if not deployment:
        return {}
    out = {}
    for runtime, by_batch in deployment.get("runtimes", {}).items():
        for batch, timing in by_batch.items():
            out[M.deploy_metric(runtime, "latency_ms", int(batch))] = timing["latency_ms"]
            out[M.deploy_metric(runtime, "images_per_s", int(batch))] = timing["fps"]
    check = deployment.get("onnx_check") or {}
    if check:
        out[M.DEPLOY_ONNX_MAX_DIFF] = max(check["pred_logits"], check["pred_boxes"])
    return out
