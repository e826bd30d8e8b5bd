"""The Optuna storage that holds a study's queues and its search: by default a journal file in the study's output
folder (one machine), or any storage URL Optuna understands (``--storage postgresql://...``: several machines).
Workers get a picklable descriptor and open their own. Beside, not inside, the MLflow store
(:mod:`studies.tracking.mlflow_store`): the two are separate services.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..planning.study import Study
from ..tracking.mlflow_store import redact
from .claims import heartbeat_seconds, requeue

log = logging.getLogger("studies")


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_descriptor(study: Study, url: str | None) -> dict:
    """Picklable description of the storage (workers open their own)."""
    if url:
        return {"url": url}
    return {"journal": str((study.study_dir / "optuna_journal.log").resolve())}


def describe_storage(desc: dict) -> str:
    if "journal" in desc:
        return f"journal file {desc['journal']}"
    return redact(desc["url"])


def open_storage(desc: dict, heartbeat: bool = True):
    """The storage a descriptor names. RDB storages (PostgreSQL, ...) get Optuna's heartbeat, so that a trial
    whose worker died on any machine is found (:func:`.claims.reap_dead`); a journal file (one machine) is
    checked by process id instead. Creating an RDB storage's tables is retried: several invocations started
    at once on a fresh database race to create them."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if "journal" in desc:
        path = Path(desc["journal"])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    url = desc["url"]
    if not url.startswith(("sqlite:", "postgresql", "mysql", "oracle", "mssql")):
        return url  # anything else Optuna understands
    kwargs: dict[str, Any] = {"engine_kwargs": {"pool_pre_ping": True} if not url.startswith("sqlite")
                              else {"connect_args": {"timeout": 60}}}
    if heartbeat:
        kwargs.update(heartbeat_interval=heartbeat_seconds(), grace_period=4 * heartbeat_seconds(),
                      heartbeat_stale_trial_callback=requeue)
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:  # noqa: BLE001 - e.g. a UniqueViolation on pg_type while tables are made
            if attempt == 4 or "already exists" not in str(exc) and "duplicate key" not in str(exc):
                raise
            log.info("Optuna storage: tables being created by another process (%s); retrying", type(exc).__name__)
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")
