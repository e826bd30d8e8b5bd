"""The latency a report compares: each variant against its RT-DETR baseline as the study's latency benchmark
measured them side by side (``studies/execution/latency_step.py``: interleaved in one process, repeated in several,
a 95% interval that includes the between-process spread), read from the study's benchmark runs (role ``benchmark``)
in MLflow. Each cell's own ``latency_ms`` metric, timed alone in its own process, stays that run's metadata."""

from __future__ import annotations

import json

import pandas as pd

from studies.tracking import mlflow_store, schema

from .loading import StudyResults
from .normalise import BACKBONE_ORDER
from .report_error import ReportError

COLUMNS = ("variant", "baseline", "latency_ms", "baseline_latency_ms", "delta_percent", "delta_low", "delta_high",
           "processes", "rounds", "device", "image_size", "batch", "precision")


def benchmark_runs(study: StudyResults) -> list:
    """The study's finished benchmark runs, the newest of each backbone, in backbone order."""
    from mlflow.entities import ViewType

    c = mlflow_store.client(study.tracking_uri)
    runs = mlflow_store.retry(
        c.search_runs, [study.experiment_id],
        filter_string=f"tags.`{schema.TAG_ROLE}` = '{schema.ROLE_BENCHMARK}' and attributes.status = 'FINISHED'",
        run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
    newest: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        newest[run.data.tags.get(schema.TAG_BACKBONE, "?")] = run
    return [newest[b] for b in sorted(newest, key=lambda b: (BACKBONE_ORDER.get(b, len(BACKBONE_ORDER)), b))]


def side_by_side_latency(study: StudyResults) -> pd.DataFrame:
    """One row per variant of each backbone's newest benchmark run: its latency and its baseline's (ms, the median
    of every timed call), the change in % with its 95% interval (``delta_low``, ``delta_high``), and what they were
    measured on. Empty (these columns) when the study has no benchmark run."""
    rows = []
    for run in benchmark_runs(study):
        tags = run.data.tags
        try:
            slugs = json.loads(tags[schema.TAG_BENCHMARK_VARIANTS])
            baseline = tags[schema.TAG_BENCHMARK_BASELINE]
            values = {(slug, q): run.data.metrics[schema.BENCHMARK_METRIC.format(variant=slug, quantity=q)]
                      for slug, label in slugs.items() for q in schema.BENCHMARK_QUANTITIES
                      if label != baseline or q == "latency_ms"}
            baseline_ms = values[next(s for s, label in slugs.items() if label == baseline), "latency_ms"]
            for slug, label in slugs.items():
                if label == baseline:
                    continue
                rows.append({"variant": label, "baseline": baseline, "latency_ms": values[slug, "latency_ms"],
                             "baseline_latency_ms": baseline_ms, "delta_percent": values[slug, "change_percent"],
                             "delta_low": values[slug, "change_low_percent"],
                             "delta_high": values[slug, "change_high_percent"],
                             "processes": int(tags[schema.TAG_BENCHMARK_PROCESSES]),
                             "rounds": int(tags[schema.TAG_BENCHMARK_ROUNDS]),
                             "device": tags[schema.TAG_BENCHMARK_DEVICE],
                             "image_size": int(tags[schema.TAG_BENCHMARK_IMAGE_SIZE]),
                             "batch": int(tags[schema.TAG_BENCHMARK_BATCH]),
                             "precision": tags[schema.TAG_BENCHMARK_PRECISION]})
        except (KeyError, StopIteration, ValueError) as exc:
            raise ReportError(f"benchmark run {run.info.run_id} of {study.experiment!r} lacks or garbles a tag or "
                              f"metric ({type(exc).__name__}: {exc})") from None
    return pd.DataFrame(rows, columns=list(COLUMNS))


def latency_by_variant(study: StudyResults) -> pd.DataFrame:
    """The study's side-by-side latency deltas (:func:`side_by_side_latency`), indexed by variant label; an empty
    frame where the study has no side-by-side benchmark."""
    return side_by_side_latency(study).set_index("variant", drop=False)
