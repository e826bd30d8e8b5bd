"""Access to an MLflow store, for ``studies/`` (which writes it) and ``analysis/`` (which reads it).

Which store (:func:`tracking_uri`), how to print its URI (:func:`redact`), a client on it (:func:`client`, MLflow's
logging kept quiet), its experiments (:func:`prepare_store`, :func:`get_experiment`, :func:`ui_link`) and its runs
as a pandas frame (:func:`search_runs_frame`). Calls that write go through :func:`retry`, so several worker
processes can share one SQLite store: a ``database is locked`` error is retried with back-off (MLflow already sets a
20 s busy timeout; the store is also switched to WAL journaling).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from . import schema

log = logging.getLogger("studies")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]*):[^@\s]+@")
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


# --------------------------------------------------------------------------------------------- where
def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory (what
    ``mlflow ui`` opens here)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store, or an in-memory one)."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        return None if path in ("", ":memory:") else Path(path)
    return None


def local_store_path(uri: str) -> Path | None:
    """The file or folder a local tracking URI points at (None for a server or a database server)."""
    if uri.startswith("sqlite:"):
        return sqlite_path(uri)
    if uri.startswith("file:"):
        return Path(urlsplit(uri).path)
    if "://" not in uri:
        return Path(uri)
    return None


def redact(text: str, uri: str | None = None) -> str:
    """``text`` with the password of every URL in it hidden (``postgresql://user:secret@host/db`` ->
    ``postgresql://user:***@host/db``) and, given ``uri``, that URI's password wherever it appears (a database
    driver's error message may quote it without the URL)."""
    password = urlsplit(uri).password if uri else None
    if password:
        text = text.replace(password, "***")
    return _URL_PASSWORD.sub(r"\1:***@", text)


# -------------------------------------------------------------------------------------------- client
def quiet_mlflow() -> None:
    """MLflow and alembic log at INFO on every store open; the harness's output is its own."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def retry(fn: Callable, *args, attempts: int = 40, **kwargs):
    """Call ``fn``; retry while SQLite reports the database locked/busy (back-off up to ~2 s a try)."""
    delay = 0.05
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - MLflow wraps SQLAlchemy errors in MlflowException
            text = str(exc).lower()
            if i == attempts - 1 or not ("database is locked" in text or "database is busy" in text
                                         or "sqlite_busy" in text):
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(2.0, delay * 2)
    return None  # pragma: no cover


def client(uri: str):
    """An ``MlflowClient`` on the store at ``uri``."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    return MlflowClient(tracking_uri=uri)


def search_runs_frame(uri: str, *, experiment_ids: list[str] | None = None,
                      experiment_names: list[str] | None = None):
    """Every run of the experiments (by id or by name) as ``mlflow.search_runs`` returns them (pandas:
    ``metrics.*``, ``params.*``, ``tags.*`` columns)."""
    import mlflow

    quiet_mlflow()
    # search_runs reads the global tracking URI (set_tracking_uri also sets $MLFLOW_TRACKING_URI):
    # point it at this store for the call, then put back what was there (None unsets both)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_ids=experiment_ids, experiment_names=experiment_names,
                                  output_format="pandas")
    finally:
        mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def no_progress_bar() -> Iterator[None]:
    """MLflow draws a progress bar per artifact download on stderr: not in the harness's output."""
    previous = os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_PROGRESS_BAR, None)
        else:
            os.environ[_PROGRESS_BAR] = previous


# ---------------------------------------------------------------------------------------- experiments
def prepare_store(uri: str) -> None:
    """Create the store's tables once, before workers start. A SQLite store is switched to WAL journaling, and
    its creation is serialised with an exclusive ``flock`` on the database file itself (SQLite's own locks are
    POSIX record locks, independent of it): several invocations started at once on a fresh folder would
    otherwise all run MLflow's schema migrations and all but one fail ("duplicate column name")."""
    path = sqlite_path(uri)
    if path is None:
        retry(client(uri).search_experiments, max_results=1)
        return
    import fcntl
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:  # an empty file is an empty SQLite database
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            retry(client(uri).search_experiments, max_results=1)
            try:
                con = sqlite3.connect(str(path), timeout=30)
                con.execute("PRAGMA journal_mode=WAL")
                con.close()
            except sqlite3.Error as exc:  # a read-only or network file system: keep the default journal
                log.debug("WAL not enabled on %s: %s", path, exc)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def get_experiment(c, name: str, uri: str) -> str:
    """The experiment's id (created when absent; for a SQLite store its artifacts go to ``mlruns/`` beside
    the database file, MLflow's default place for ``sqlite:///mlflow.db``), tagged so that ``mlflow ui`` opens it
    on its runs (``TAG_EXPERIMENT_KIND``)."""
    exp = retry(c.get_experiment_by_name, name)
    if exp is None:
        try:
            return retry(c.create_experiment, name, artifact_location=_artifact_location(name, uri),
                         tags={schema.TAG_EXPERIMENT_KIND: schema.EXPERIMENT_KIND})
        except Exception:  # noqa: BLE001 - created meanwhile by another process
            exp = retry(c.get_experiment_by_name, name)
            if exp is None:
                raise
    elif exp.lifecycle_stage != "active":
        retry(c.restore_experiment, exp.experiment_id)
    if exp.tags.get(schema.TAG_EXPERIMENT_KIND) != schema.EXPERIMENT_KIND:  # from before the tag, or another tool's
        retry(c.set_experiment_tag, exp.experiment_id, schema.TAG_EXPERIMENT_KIND, schema.EXPERIMENT_KIND)
    return exp.experiment_id


def _artifact_location(name: str, uri: str) -> str | None:
    """``mlruns/<name>`` beside a SQLite store's database file; None (the store's default) for other stores."""
    path = sqlite_path(uri)
    if path is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return (path.resolve().parent / "mlruns" / safe).as_uri()


def ui_link(uri: str, exp_id: str) -> str:
    """Where to see an experiment's runs in the MLflow UI. MLflow 3.17's UI opens every experiment on its GenAI
    overview while its sidebar switch is on "GenAI" (the default, kept in the browser); it then ignores
    ``TAG_EXPERIMENT_KIND``. The ``workflowType=machine_learning`` parameter opens the runs whatever the switch."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    link = f"{base}/#/experiments/{exp_id}?workflowType=machine_learning"
    return link if base != "http://127.0.0.1:5000" else f"`mlflow ui`, then {link}"
