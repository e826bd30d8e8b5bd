"""Each run's detections matched against its ground truth, for the bootstrap intervals and the error analysis:
the run's evaluation artifacts (``dset.run_folder.evaluation_files``: the test split's where logged, else the
validation split's) downloaded through the MLflow client once per run and report, and evaluated with pycocotools."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd

from dset import run_folder
from studies.tracking import mlflow_store

from .bootstrap import Evaluated, evaluate_run
from .detection_errors import ErrorAnalysis, mean_over_runs
from .loading import StudyResults


def evaluations(study: StudyResults, run_ids) -> dict[str, Evaluated | str]:
    """Each run's detections matched against its ground truth (:func:`analysis.compute.bootstrap.evaluate_run`), or,
    as a string, why there is none: a run from before these artifacts existed, or an unreadable one (the report then
    falls back on seeds alone and says why). The scoring split's artifacts (``run_folder.evaluation_files("test")``)
    where the run logged them, else the validation ones (``run_folder.evaluation_files("val")``: the images the model
    was selected on); the result's ``split`` says which ("test" or "val"). Downloaded and evaluated once per run and
    report (cached on ``study``)."""
    todo = [r for r in run_ids if r not in study.evaluation_cache]
    if todo:
        with mlflow_store.no_progress_bar(), tempfile.TemporaryDirectory(prefix="dset_report_") as tmp:
            client = mlflow_store.client(study.tracking_uri)
            for run_id in todo:
                study.evaluation_cache[run_id] = _evaluation(client, run_id, Path(tmp) / run_id)
    return {r: study.evaluation_cache[r] for r in run_ids}


def split_artifacts() -> list[tuple[str, str, str]]:
    """(split, detections artifact, ground-truth artifact) in the order the report prefers them: the scoring
    (test) split's, then the validation split's, on which the run was selected."""
    return [(split, *run_folder.evaluation_files(split)) for split in ("test", "val")]


def _evaluation(client, run_id: str, folder: Path) -> Evaluated | str:
    splits = split_artifacts()
    try:
        logged = {f.path for folder_name in sorted({d.rsplit("/", 1)[0] for _, d, _ in splits})
                  for f in client.list_artifacts(run_id, folder_name)}
    except Exception as exc:  # an artifact store that cannot be listed: the run is reported without them
        return f"artifacts not readable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    found = [(split, d, g) for split, d, g in splits if d in logged and g in logged]
    if not found:
        val = splits[-1]
        return f"no {' or '.join(a for a in val[1:] if a not in logged)} logged"
    split, det_name, gt_name = found[0]
    try:
        dets = json.loads(Path(client.download_artifacts(run_id, det_name, str(folder))).read_text())
        gt = json.loads(Path(client.download_artifacts(run_id, gt_name, str(folder))).read_text())
        if not isinstance(dets, dict) or "detections" not in dets or "image_ids" not in dets:
            raise ValueError(f"{det_name} needs 'image_ids' and 'detections'")
        ev = evaluate_run(gt, dets["detections"], dets["image_ids"], name=f"run {run_id}")
        ev.split = split
        return ev
    except Exception as exc:  # a malformed file: say which run and why, and report the run without it
        return f"{det_name} / {gt_name} unusable: {type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------- errors beyond mAP
def without_detections(evals: dict) -> str | None:
    """Why some of these runs (run id -> :class:`analysis.compute.bootstrap.Evaluated`, or why none) have no error
    analysis, naming one of them; None when every run has one."""
    missing = {r: why for r, why in evals.items() if isinstance(why, str)}
    if not missing:
        return None
    run, why = sorted(missing.items())[0]
    head = "no detections logged" if all(w.startswith("no ") for w in missing.values()) else "no usable detections"
    return f"{head} ({len(missing)} of {len(evals)} runs; run {run}: {why})"


def error_analyses(study: StudyResults, vs: pd.DataFrame) -> dict[str, ErrorAnalysis | str]:
    """Per variant (``group``) with included runs: the mean over its runs of their error analyses
    (:func:`analysis.compute.detection_errors.mean_over_runs`, from the detections each logged), or why there is
    none."""
    out: dict[str, ErrorAnalysis | str] = {}
    for _, v in vs[vs["n"] > 0].iterrows():
        evals = evaluations(study, tuple(v["run_ids"]))
        why = without_detections(evals)
        if why is None:
            try:
                out[v["group"]] = mean_over_runs([evals[r].errors for r in v["run_ids"]], v["label"])
                continue
            except ValueError as exc:  # e.g. seeds evaluated on different images: say so
                why = str(exc)
        out[v["group"]] = why
    return out
