"""Reading and writing MLflow runs: the runs of a study by role and fingerprint, and params, tags and metrics
written in batches. Every call goes through :func:`studies.tracking.mlflow_store.retry`, so several worker
processes can share one SQLite store; names of tags: :mod:`studies.tracking.schema`.
"""

from __future__ import annotations

import math
import time
from typing import Any

from dset import metric_names as M

from ..processes import pid_alive
from . import schema
from .mlflow_store import retry

MAX_PARAM_VALUE = 6000       # MLflow's limit on a parameter value
MAX_KEY = M.MAX_KEY          # ... on a parameter / metric / tag key
MAX_TAG_VALUE = 8000


def is_stale(tags: dict, my_host: str) -> bool:
    """A RUNNING run is stale when the process that ran it (same host) is gone; runs of other hosts are
    never taken for stale."""
    if tags.get(schema.TAG_HOST) != my_host:
        return tags.get(schema.TAG_HOST) is None
    try:
        return not pid_alive(int(tags.get(schema.TAG_PID, "0")))
    except ValueError:
        return True


# -------------------------------------------------------------------------------------------- runs
def find_child_runs(c, exp_id: str, role: str = "child") -> dict[str, Any]:
    """Runs of the experiment with ``role`` (cells and trials: "child"; stage 1: "pretrain") by fingerprint (the
    newest when, by accident, there are several)."""
    out: dict[str, Any] = {}
    for r in _runs_with_role(c, exp_id, role):
        fp = r.data.tags.get(schema.TAG_FINGERPRINT)
        if fp:
            out[fp] = r
    return out


def find_run(c, exp_id: str, fingerprint: str, role: str = "child"):
    """The newest active run with ``role`` and this fingerprint, read now (another invocation may have made or
    finished it since this one started), or None."""
    from mlflow.entities import ViewType

    runs = retry(c.search_runs, [exp_id], filter_string=f"tags.`{schema.TAG_ROLE}` = '{role}' and "
                 f"tags.`{schema.TAG_FINGERPRINT}` = '{fingerprint}'", run_view_type=ViewType.ACTIVE_ONLY,
                 max_results=100)
    return max(runs, key=lambda r: r.info.start_time or 0) if runs else None


def find_stale_candidates(c, exp_id: str) -> dict[str, Any]:
    """Finished child runs by cell key (config + seed + stage 1, without code and data), the newest of each,
    leaving out those already redone (``TAG_SUPERSEDED_BY``): where a cell's fingerprint finds nothing, a run
    here is the same cell made by other code or data."""
    out: dict[str, Any] = {}
    for r in _runs_with_role(c, exp_id, "child"):
        key = r.data.tags.get(schema.TAG_CELL_KEY)
        if key and r.info.status == "FINISHED" and schema.TAG_SUPERSEDED_BY not in r.data.tags:
            out[key] = r
    return out


def _runs_with_role(c, exp_id: str, role: str) -> list:
    """Active runs with ``dset.role == role``, oldest first."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = retry(c.search_runs, [exp_id], filter_string=f"tags.`{schema.TAG_ROLE}` = '{role}'",
                     run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def log_params(c, run_id: str, params: dict[str, Any], existing: dict[str, str] | None = None) -> list[str]:
    """Log params not yet on the run (params are immutable: a differing value is not re-logged, but
    returned so the caller can warn)."""
    from mlflow.entities import Param

    existing = existing or {}
    items, differing = [], []
    for k, v in params.items():
        key, value = str(k)[:MAX_KEY], str(v)[:MAX_PARAM_VALUE]
        if key in existing:
            if existing[key] != value:
                differing.append(key)
            continue
        items.append(Param(key, value))
    for i in range(0, len(items), 100):
        retry(c.log_batch, run_id, params=items[i:i + 100])
    return differing


def set_tags(c, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(str(k)[:MAX_KEY], str(v)[:MAX_TAG_VALUE]) for k, v in tags.items() if v is not None]
    for i in range(0, len(items), 100):
        retry(c.log_batch, run_id, tags=items[i:i + 100])


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k[:MAX_KEY], float(v), ts, int(step)) for k, v in metrics.items()
             if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))]
    for i in range(0, len(items), 1000):
        retry(c.log_batch, run_id, metrics=items[i:i + 1000])


def delete_tag(c, run_id: str, key: str) -> None:
    try:
        retry(c.delete_tag, run_id, key)
    except Exception:  # noqa: BLE001 - the tag was not there
        pass
