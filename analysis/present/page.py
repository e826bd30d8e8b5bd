"""The report's two pages: ``index.html`` (one self-contained page, the answer first, every plot embedded; its
structure is analysis/templates/index.html.j2) and ``report.md`` (every table in one file), each with the line that
says how and when the numbers were produced."""

from __future__ import annotations

import base64

import jinja2

from analysis.compute.loading import StudyResults
from analysis.compute.verdicts import study_targets
from studies.tracking import mlflow_store

from .table import Table, to_markdown


def provenance(study: StudyResults) -> str:
    """How and when the numbers were produced, and the targets the verdicts were judged against."""
    runs = study.runs
    children = study.children
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(children["status"].value_counts().items()))
    starts = runs["start_time"].dropna()
    when = "no start times logged" if starts.empty else (
        f"runs started between {starts.min():%Y-%m-%d %H:%M} and {starts.max():%Y-%m-%d %H:%M} UTC "
        f"(newest run: {starts.max():%Y-%m-%d})")
    return (f"Produced by analysis/make_report.py from MLflow (tracking URI {mlflow_store.redact(study.tracking_uri)}, "
            f"experiment '{study.experiment}', id {study.experiment_id}): {len(runs)} runs "
            f"({int((runs['role'] == 'parent').sum())} parent, "
            + (f"{len(study.pretrain)} stage-1 pretraining, " if len(study.pretrain) else "")
            + f"{len(children)} child: {statuses or 'none'}); {when}. "
            "Every number is one the runs logged (mlflow.search_runs; per-epoch curves via get_metric_history) or "
            "a mean, difference or test of them; the intervals are bootstrapped from the detections the runs logged "
            "(or Welch's over seeds where they logged none, as the tables say), and the error analysis (AP by size, "
            "per-class AP, precision-recall, confusion) is computed from those detections; the compute table's sites "
            "are closed-form and labelled so. " + study_targets(study).source + ".")


# the page's structure is analysis/templates/index.html.j2; autoescaped: every value goes in as text
PAGE = jinja2.Environment(loader=jinja2.PackageLoader("analysis"), autoescape=True, trim_blocks=True,
                          lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def _table_view(name: str, t: Table) -> dict:
    """What the page shows of a table: its text cells, title and notes."""
    text = t.text()
    return {"name": name, "title": t.title, "columns": list(text.columns), "rows": text.values.tolist(),
            "notes": t.notes, "lead": t.lead}


def render_html(study: StudyResults, tables: dict, images: dict, captions: dict, skipped: dict) -> str:
    """``images``: plot name -> its file name (``<name>.png`` or ``.jpg``) and bytes."""
    figures = [{"name": name, "file": file, "caption": captions[name],
                "mime": "image/jpeg" if file.endswith(".jpg") else "image/png",
                "base64": base64.b64encode(data).decode("ascii")} for name, (file, data) in images.items()]
    return PAGE.get_template("index.html.j2").render(
        experiment=study.experiment, provenance=provenance(study), skipped=skipped,
        answer_images=[f for f in figures if f["name"] in ANSWER_FIGURES],
        images=[f for f in figures if f["name"] not in ANSWER_FIGURES],
        tables=[_table_view(name, t) for name, t in tables.items()])


ANSWER_FIGURES = ("forest", "accuracy_vs_latency")  # the page opens on these, above the answer table


def render_markdown(study: StudyResults, tables: dict, skipped: dict) -> str:
    """Every table in one Markdown file, in the report's order (the answer first), with where they came from."""
    parts = [f"# DSET report: experiment {study.experiment}", ""]
    for t in tables.values():
        if t.lead:
            parts += [f"**{t.lead}**", ""]
        parts += [to_markdown(t)]
        if t.name == "answer":
            parts += [provenance(study), ""]
    if "answer" not in tables:
        parts.insert(2, provenance(study) + "\n")
    if skipped:
        parts += ["## Not produced", ""] + [f"- {n}: {why}" for n, why in skipped.items()]
    return "\n".join(parts) + "\n"
