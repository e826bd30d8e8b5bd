"""Report: the tables and plots that compare every variant of a study with RT-DETR R18/R34, from MLflow.

    python analysis/make_report.py [--experiment ablation_grid] [--out report/] [--tracking-uri URI]

(the same as ``dset-report`` or ``python -m analysis.make_report``; all three need the repository installed,
``pip install -e .``). Reads one MLflow experiment (one study) and writes into ``--out`` each table as Markdown, CSV
and LaTeX, each plot as PNG (pictures as JPEG), ``index.html``, ``report.md`` and ``report_files.txt``; the same store
gives byte-identical files. This module orchestrates: :mod:`analysis.compute` computes the numbers,
:mod:`analysis.present` lays out the tables, figures and pages. What each table and plot shows, where every number
comes from and how the report behaves: docs/report.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.compute.evaluations import error_analyses
from analysis.compute.latency import latency_by_variant
from analysis.compute.loading import StudyResults, load_study_results
from analysis.compute.report_error import ReportError
from analysis.compute.variants import optuna_trials, variants
from analysis.compute.verdicts import study_targets
from analysis.present import plots
from analysis.present.figures import build_figures
from analysis.present.page import provenance, render_html, render_markdown
from analysis.present.table import Table, markdown_grid, to_csv, to_latex, to_markdown
from analysis.present.tables_answer import answer_table, memory_pruning_table
from analysis.present.tables_cost import compute_table, deployment_table
from analysis.present.tables_detections import ap_by_size_table, class_ap_deltas_table
from analysis.present.tables_runs import optuna_importance_table, optuna_pareto_table, runs_table, stage1_table
from analysis.present.tables_variants import ablation_table, main_table, moe_diagnostics_table, reported_table
from studies.tracking import mlflow_store

MANIFEST = "report_files.txt"


def build_tables(study: StudyResults, vs: pd.DataFrame) -> tuple[dict, dict, dict]:
    """The tables in reading order (the answer first), why each absent one was not produced, and what the
    figures reuse: ``errors`` (the error analyses), ``trials``, and for an Optuna study ``importances``, ``method``."""
    tables: dict[str, Table] = {}
    skipped: dict[str, str] = {}
    extra: dict = {}

    def add(name: str, table: Table | None, why: str = "") -> None:
        if table is None:
            skipped[name] = why
        else:
            tables[name] = table

    extra["targets"] = study_targets(study)
    targets = extra["targets"].targets
    if vs.empty:
        for name in ("answer", "main", "ablation", "memory_pruning", "moe_diagnostics", "compute",
                     "reported_vs_measured", "ap_by_size", "class_ap_deltas"):
            skipped[name] = "no child runs (only study invocations) in this experiment"
    else:
        latency = latency_by_variant(study)
        extra["latency"] = latency
        add("answer", *answer_table(study, vs, targets, latency))
        add("main", main_table(study, vs))
        add("ablation", *ablation_table(study, vs, targets))
        add("memory_pruning", *memory_pruning_table(study, vs, targets, latency))
        add("moe_diagnostics", *moe_diagnostics_table(study, vs))
        add("compute", *compute_table(study, vs))
        add("reported_vs_measured", reported_table(study, vs))
        # errors beyond mAP, from the detections the runs logged (the plots reuse the analyses)
        extra["errors"] = error_analyses(study, vs)
        add("ap_by_size", *ap_by_size_table(study, vs, extra["errors"]))
        add("class_ap_deltas", *class_ap_deltas_table(study, vs))
    add("stage1", *stage1_table(study))
    extra["trials"] = optuna_trials(study)
    add("optuna_pareto", *optuna_pareto_table(study, extra["trials"]))
    if study.is_optuna:
        table, why, imp = optuna_importance_table(extra["trials"])
        extra.update(imp)
        add("optuna_importances", table, why)
    else:
        skipped["optuna_importances"] = "not an Optuna study (no run has a dset.trial tag)"
    add("deployment", *deployment_table(study, vs))
    add("runs", runs_table(study))
    return tables, skipped, extra


def _write(out: Path, files: dict[str, bytes]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    if manifest.is_file():  # remove what an earlier report wrote here and this one does not
        for name in manifest.read_text().split():
            stale = out / name
            if name not in files and "/" not in name and name != MANIFEST and stale.is_file():
                stale.unlink()
    for name, data in files.items():
        (out / name).write_bytes(data)
    manifest.write_text("".join(f"{n}\n" for n in sorted(files)))


def build_report(experiment: str = "ablation_grid", out_dir: str | Path = "report",
                 tracking_uri: str | None = None) -> dict:
    """Read ``experiment`` from MLflow and write the report into ``out_dir``. Returns ``out_dir``,
    ``tables`` (name -> :class:`analysis.present.table.Table`), ``plots`` (name -> PNG path), ``files`` (every
    path written), ``skipped`` (name -> why it was not produced), ``provenance``, ``study``, ``variants``
    (:func:`analysis.compute.variants.variants`) and ``trials`` (:func:`analysis.compute.variants.optuna_trials`).
    Raises :class:`analysis.compute.report_error.ReportError` for an unknown or empty experiment."""
    study = load_study_results(experiment, tracking_uri)
    vs = variants(study)
    tables, skipped, extra = build_tables(study, vs)
    figures, skipped_plots, captions = build_figures(study, vs, tables, extra)
    skipped.update(skipped_plots)
    # pictures of images are JPEG (a tenth of the PNG's bytes for photograph-like content); charts stay PNG
    images = {name: (f"{name}.jpg", plots.jpeg_bytes(fig)) if name.startswith("pictures_")
              else (f"{name}.png", plots.png_bytes(fig)) for name, fig in figures.items()}
    files: dict[str, bytes] = {}
    for name, t in tables.items():
        files[f"{name}.md"] = to_markdown(t).encode()
        files[f"{name}.csv"] = to_csv(t).encode()
        files[f"{name}.tex"] = to_latex(t).encode()
    for file, data in images.values():
        files[file] = data
    files["index.html"] = render_html(study, tables, images, captions, skipped).encode()
    files["report.md"] = render_markdown(study, tables, skipped).encode()
    out = Path(out_dir)
    _write(out, files)
    return {"out_dir": out, "tables": tables, "plots": {n: out / file for n, (file, _) in images.items()},
            "files": [out / n for n in sorted(files)] + [out / MANIFEST], "skipped": skipped,
            "provenance": provenance(study), "study": study, "variants": vs, "trials": extra["trials"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python analysis/make_report.py",
        description="Tables and plots comparing every variant of a study with RT-DETR, from MLflow.")
    parser.add_argument("--experiment", default="ablation_grid",
                        help="MLflow experiment (= study name); default ablation_grid")
    parser.add_argument("--out", default="report", help="output folder; default report/")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else "
                        f"{mlflow_store.DEFAULT_TRACKING_URI}")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        result = build_report(args.experiment, args.out, args.tracking_uri)
    except ReportError as exc:
        print(f"make_report: {exc}", file=sys.stderr)
        return exc.exit_code
    except MlflowException as exc:
        uri = mlflow_store.redact(mlflow_store.tracking_uri(args.tracking_uri))
        print(f"make_report: MLflow could not read {uri}: "
              f"{exc.message if hasattr(exc, 'message') else exc}", file=sys.stderr)
        return 2
    out = result["out_dir"]
    tables, plots = result["tables"], result["plots"]
    print(result["provenance"])
    print(f"\nWrote {len(result['files'])} files to {out}/: open {out / 'index.html'}")
    print(f"  tables (.md .csv .tex): {', '.join(tables)}")
    print(f"  plots (.png, pictures .jpg): {', '.join(plots) or 'none'}")
    for name, why in result["skipped"].items():
        print(f"  not produced: {name}: {why}")
    for name in ("answer", "main"):
        if name in tables:
            print(f"\n{tables[name].title}\n")
            if tables[name].lead:
                print(tables[name].lead + "\n")
            print(markdown_grid(tables[name].text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
