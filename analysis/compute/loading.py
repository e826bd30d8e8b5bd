"""A study's runs, read from MLflow (the only source) for the report: :func:`load_study_results` returns a
:class:`StudyResults`, one experiment's runs normalised (:mod:`analysis.compute.normalise`); the per-epoch curves
(:func:`histories`) and the pictures a run logged (:func:`pictures`) are fetched on demand and cached on it.
What is read, and the columns of the runs frame, are described in docs/report.md."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dset import run_folder
from dset.config import Config
from studies.tracking import mlflow_store

from .logged_params import config_from_params
from .normalise import normalise
from .report_error import EmptyExperiment, UnknownExperiment


# ------------------------------------------------------------------------------------------- study
@dataclass
class StudyResults:
    """A study's runs as logged in MLflow (one experiment), normalised: what the report is built from. The caches
    hold what is fetched run by run on demand (per-epoch histories, evaluations, pictures), once per report."""

    experiment: str
    experiment_id: str
    tracking_uri: str
    runs: pd.DataFrame                         # every run (parents too), normalised, in a stable order
    history_cache: dict = field(default_factory=dict, repr=False)
    evaluation_cache: dict = field(default_factory=dict, repr=False)
    picture_cache: dict = field(default_factory=dict, repr=False)

    @property
    def children(self) -> pd.DataFrame:
        return self.runs[self.runs["role"] == "child"]

    @property
    def pretrain(self) -> pd.DataFrame:
        return self.runs[self.runs["role"] == "pretrain"]

    @property
    def benchmarks(self) -> pd.DataFrame:
        """The side-by-side latency benchmark runs (role "benchmark"; :mod:`analysis.compute.latency` reads them)."""
        return self.runs[self.runs["role"] == "benchmark"]

    @property
    def parents(self) -> pd.DataFrame:
        return self.runs[self.runs["role"] == "parent"]

    @property
    def included(self) -> pd.DataFrame:
        return self.runs[self.runs["included"]]

    @property
    def is_optuna(self) -> bool:
        return bool(self.children["trial"].notna().any())

    def metric(self, frame: pd.DataFrame, name: str) -> pd.Series:
        """The final value of MLflow metric ``name`` for each row of ``frame`` (NaN where not logged)."""
        return frame[name].astype(float) if name in frame else pd.Series(np.nan, index=frame.index)

    def config(self, run_id: str) -> Config:
        """The dset configuration run ``run_id`` trained with, rebuilt from its logged params."""
        row = self.runs[self.runs["run_id"] == run_id].iloc[0]
        return config_from_params({k[len("params."):]: v for k, v in row.items()
                                   if k.startswith("params.") and isinstance(v, str)}, run_id)


def load_study_results(experiment: str = "ablation_grid", tracking_uri: str | None = None) -> StudyResults:
    """Every run of ``experiment`` in the store at ``tracking_uri``, normalised (:mod:`analysis.compute.normalise`).
    Raises :class:`UnknownExperiment` (no such store or experiment) or :class:`EmptyExperiment`."""
    uri = mlflow_store.tracking_uri(tracking_uri)
    local = mlflow_store.local_store_path(uri)
    if local is not None and not local.exists():
        raise UnknownExperiment(
            f"no MLflow store at {uri} ({local} does not exist): run a study first "
            f"(python -m studies.run {experiment}) or pass --tracking-uri / set MLFLOW_TRACKING_URI")
    try:
        client = mlflow_store.client(uri)
        exp = client.get_experiment_by_name(experiment)
    except Exception as exc:  # no driver, no server, not an MLflow database: say so in one line
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise UnknownExperiment(f"could not open the MLflow store at {mlflow_store.redact(uri)}: "
                                f"{type(exc).__name__}: {mlflow_store.redact(message, uri)}") from None
    if exp is None or exp.lifecycle_stage != "active":
        known = sorted(e.name for e in client.search_experiments())
        state = "not found" if exp is None else "deleted"
        raise UnknownExperiment(
            f"experiment '{experiment}' {state} in {mlflow_store.redact(uri)}; "
            f"experiments there: {', '.join(known) if known else '(none)'}")
    raw = mlflow_store.search_runs_frame(uri, experiment_ids=[exp.experiment_id])
    if raw.empty:
        raise EmptyExperiment(f"experiment '{experiment}' in {mlflow_store.redact(uri)} has no runs yet: "
                              "nothing to report")
    return StudyResults(experiment, str(exp.experiment_id), uri, normalise(raw))


def histories(study: StudyResults, keys: tuple[str, ...], runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-epoch values of metrics ``keys`` for ``runs`` (default: the included runs), from
    ``MlflowClient.get_metric_history``: columns run_id, group, label, key, step, value. When a step
    was logged more than once (a resumed run), the last value logged wins."""
    runs = study.included if runs is None else runs
    rows = []
    client = mlflow_store.client(study.tracking_uri)
    for _, run in runs.iterrows():
        for key in keys:
            if key not in run or pd.isna(run[key]):
                continue
            cache_key = (run["run_id"], key)
            if cache_key not in study.history_cache:
                study.history_cache[cache_key] = [(m.step, m.timestamp, m.value)
                                               for m in client.get_metric_history(run["run_id"], key)]
            for step, ts, value in study.history_cache[cache_key]:
                rows.append({"run_id": run["run_id"], "group": run["group"], "label": run["label"],
                             "sort_key": run["sort_key"], "backbone": run["backbone"], "key": key,
                             "step": int(step), "timestamp": int(ts), "value": float(value)})
    cols = ["run_id", "group", "label", "sort_key", "backbone", "key", "step", "timestamp", "value"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows, columns=cols)
    df = df.sort_values(["sort_key", "run_id", "key", "step", "timestamp"], kind="mergesort")
    df = df.drop_duplicates(["run_id", "key", "step"], keep="last").drop(columns="timestamp")
    return df.reset_index(drop=True)


def pictures(study: StudyResults, run_id: str) -> tuple[dict, dict[str, bytes]] | str:
    """A run's pictures (``run_folder.PICTURES_DIR``, :mod:`dset.pictures`): its ``pictures.json`` and every PNG it
    lists (file name -> bytes), or, as a string, why there are none. Downloaded once per run and report."""
    if run_id not in study.picture_cache:
        with mlflow_store.no_progress_bar(), tempfile.TemporaryDirectory(prefix="dset_report_") as tmp:
            study.picture_cache[run_id] = _download_pictures(mlflow_store.client(study.tracking_uri), run_id, Path(tmp))
    return study.picture_cache[run_id]


def _download_pictures(client, run_id: str, folder: Path) -> tuple[dict, dict[str, bytes]] | str:
    try:
        logged = {f.path for f in client.list_artifacts(run_id, run_folder.PICTURES_DIR)}
        if run_folder.PICTURES_INDEX not in logged:
            return f"no {run_folder.PICTURES_INDEX} logged"
        local = Path(client.download_artifacts(run_id, run_folder.PICTURES_DIR, str(folder)))
        index = json.loads((local / Path(run_folder.PICTURES_INDEX).name).read_text())
        files = {p["file"]: (local / Path(p["file"]).name).read_bytes() for p in index["pictures"]}
        return index, files
    except Exception as exc:  # an unreadable store or file: the report says why and goes on
        return f"pictures unusable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
