"""``--dry-run``: what a study would do, read-only (it creates no MLflow store): its cells and their state
(new, finished, to resume, stale) or its search space, the budget, stage 1 and the queue."""

from __future__ import annotations

import sys
from pathlib import Path

from dset.config import BUDGET_AUTO, Config, budget_path, flatten, read_budget

from .console import table
from .execution.optuna_storage import describe_storage, storage_descriptor
from .execution.search import describe_pruning, optuna_study_name, sampler_name
from .planning.cells import Cell, make_cell, study_data_check
from .planning.pretrain import cache_root
from .planning.study import STUDY_DIR, Study
from .tracking import mlflow_runs, mlflow_store, schema
from .tracking.cell_state import classify_cell, stale_reason


def _existing_runs_readonly(uri: str, experiment: str) -> tuple[dict, dict] | None:
    """Child runs by fingerprint and stale candidates by cell key when a local store exists (a dry run never
    creates one)."""
    path = mlflow_store.sqlite_path(uri)
    if path is None or not path.exists():
        return None
    try:
        c = mlflow_store.client(uri)
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            return {}, {}
        return (mlflow_runs.find_child_runs(c, exp.experiment_id),
                mlflow_runs.find_stale_candidates(c, exp.experiment_id))
    except Exception:  # noqa: BLE001 - a dry run only informs
        return None


def _state(cell: Cell, existing: tuple[dict, dict] | None, keep_stale: bool) -> str:
    if not cell.ok:
        return "INVALID: " + (cell.error or "")
    if existing is None:
        return "new"
    kind, run = classify_cell(cell, *existing, keep_stale)
    if kind == "new":
        return "new"
    if kind == "stale":
        return f"STALE ({stale_reason(cell, run)}) -> rerun"
    if kind == "finished":
        if run.data.tags.get(schema.TAG_FINGERPRINT) != cell.fingerprint:
            return f"stale ({stale_reason(cell, run)}), kept (--keep-stale)"
        return "finished (skipped)"
    return f"{run.info.status.lower()} -> resume"


def describe_budget(study: Study, cfg: Config | None) -> list[str]:
    """Human-readable lines: what the budget file is and what the runs train on."""
    applied = cfg.run.budget if cfg is not None else study.budget
    path = budget_path(applied) if applied not in (None, BUDGET_AUTO) else None
    lines = [f"budget: {applied or 'none'}" + (f" ({_rel(path)})" if path else "")
             + (" (auto)" if study.budget == BUDGET_AUTO else "")]
    if study.data:
        where = _rel(study.data_path())
        lines.append(f"data: {study.data}" + (f" ({where})" if where != study.data else ""))
    if cfg is None:  # the runs' configuration is invalid: show what the budget file sets
        if path is not None:
            flat = flatten(read_budget(path)[0])
            lines += [f"  {k} = {v}" for k, v in flat.items()]
        return lines
    d, t, m = cfg.data, cfg.train, cfg.model
    if d.name == "synthetic":
        n_train = min(d.synthetic.num_train, d.max_train_images or d.synthetic.num_train)
        n_val = min(d.synthetic.num_val, d.max_val_images or d.synthetic.num_val)
        source = f"synthetic shapes ({d.synthetic.num_classes} classes, drawn at {d.synthetic.image_size} px)"
    else:
        n_train = d.max_train_images or "all"
        n_val = d.max_val_images or "all"
        source = "COCO-format " + " / ".join(str(getattr(d, s).annotations) for s in ("train", "val", "test")
                                             if getattr(d, s).annotations is not None)
    lines.append(f"  data: {source}; {n_train} train / {n_val} val images at {d.image_size} px, batch {d.batch_size}, "
                 f"augment {d.augment}")
    lines += describe_data_check(study, cfg)
    lines.append(f"  train: {t.epochs} epochs, lr {t.lr:g} (pretrained {t.lr_pretrained:g}), warm-up {t.warmup_steps} "
                 f"steps, eval every {t.eval_every}, early stop "
                 f"{'patience ' + str(t.early_stop_patience) if t.early_stop_patience else 'off'}, "
                 f"profile {'on' if t.profile else 'off'}, device {cfg.run.device}")
    lines.append(f"  model: {m.decoder.num_queries} queries, {m.decoder.num_denoising} denoising, "
                 f"token pruning warm-up {m.token_pruning.warmup_epochs} + ramp {m.token_pruning.ramp_epochs} epochs, "
                 f"min tokens {m.token_pruning.min_tokens}")
    return lines


def describe_data_check(study: Study, cfg: Config) -> list[str]:
    """The data check of COCO data in a few lines: the splits, the problems by severity and the suggestion with
    whether the study applies it (the cells' configuration already holds it, under the study's own settings)."""
    check = study_data_check(study, cfg)
    if check is None:
        return []
    o = check.overview
    splits = ", ".join(f"{name} {st['images']} images / {st['boxes']} boxes" for name, st in o["splits"].items()
                       if st is not None)
    counts = {sev: sum(p.severity == sev for p in check.problems) for sev in ("error", "warning", "note")}
    problems = ", ".join(f"{n} {sev}{'s' if n != 1 else ''}" for sev, n in counts.items() if n) or "none"
    classes = ", ".join(o["classes"][:8]) + (", ..." if len(o["classes"]) > 8 else "")
    lines = [f"  data check: {splits}; {len(o['classes'])} classes ({classes}); problems: {problems} "
             "(python -m dset.data check shows them)"]
    s = check.suggestion
    if s is not None:
        how = ("applied under the study's set, the cells' values and the command line" if study.data_suggestion
               else "not applied (data_suggestion=false)")
        lines.append(f"  data check's suggestion: {s.overrides()} -- {how}")
    return lines


def _rel(path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        return str(path.resolve().relative_to(STUDY_DIR.parent))
    except ValueError:
        return str(path)


def describe_stage1(cells: list[Cell]) -> list[str]:
    """Lines on stage 1 for the cells: per backbone, where its checkpoint comes from and whether it is cached."""
    stages = {id(c.stage1): c.stage1 for c in cells if c.ok and c.stage1 is not None}
    lines = ["stage 1 (the RT-DETR checkpoint every cell fine-tunes from):"]
    lines += [f"  {st.describe()}" for st in sorted(stages.values(), key=lambda st: st.depth)]
    if any(st.kind == "train" for st in stages.values()):
        lines.append(f"  cache: {cache_root()} ($DSET_CACHE_DIR/pretrained moves it)")
    lines.append("stage 2: the cells below, each fine-tuned from its backbone's stage-1 checkpoint")
    return lines


def dry_run(study: Study, cells: list[Cell] | None, uri: str, storage: str | None, workers: int,
            keep_stale: bool = False) -> int:
    """Print what the study would do; 2 when nothing could run (every cell, or the base configuration, is
    invalid), 0 otherwise."""
    print(f"study {study.name} ({study.kind}) from {study.path}")
    if study.description:
        print(f"  {study.description}")
    if study.kind == "grid":
        n_base = len(cells) // len(study.seeds)
        print(f"  {n_base} cells x {len(study.seeds)} seed(s) {study.seeds} = {len(cells)} runs; "
              f"{workers} worker(s) at a time")
    sample_cfg = next((c.config for c in cells or [] if c.ok), None)
    if study.kind == "optuna":
        sample_cfg = make_cell(study, "base", {}, study.seeds[0]).config
    for line in describe_budget(study, sample_cfg):
        print(line)
    if study.config_overrides:
        print(f"overrides for every run: {' '.join(study.config_overrides)}")
    local = mlflow_store.sqlite_path(uri)
    store = uri if local is None or local.exists() else f"{uri} (created by the first run)"
    print(f"MLflow: {store}, experiment '{study.name}'; outputs in {study.study_dir}/")
    base_cell = cells if study.kind == "grid" else [make_cell(study, "base", {}, study.seeds[0])]
    for line in describe_stage1(base_cell):
        print(line)
    if study.kind == "grid":
        return _dry_run_grid(study, cells, uri, storage, keep_stale)
    return _dry_run_search(study, storage, workers, sample_cfg is not None)


def _dry_run_grid(study: Study, cells: list[Cell], uri: str, storage: str | None, keep_stale: bool) -> int:
    print(f"queue of cells: {describe_storage(storage_descriptor(study, storage))} (every invocation of this "
          "study shares it; --storage postgresql://... for several machines)")
    existing = _existing_runs_readonly(uri, study.name)
    rows, errors = [], []
    for i, c in enumerate(cells, 1):
        lab = c.labels()
        if c.ok:
            state = _state(c, existing, keep_stale)
        else:
            if c.error not in errors:
                errors.append(c.error)
            state = f"INVALID [{errors.index(c.error) + 1}]"
        rows.append([str(i), c.id, lab["variant"], str(c.seed), "-" if not c.ok else c.fingerprint[:8], state])
    print(table(rows, ["#", "cell", "variant", "seed", "fp", "state"]))
    for i, e in enumerate(errors, 1):
        print(f"[{i}] {e}")
    if errors and all(not c.ok for c in cells):
        print("\nerror: every cell is invalid: nothing would run", file=sys.stderr)
        return 2
    return 0


def _dry_run_search(study: Study, storage: str | None, workers: int, base_ok: bool) -> int:
    s = study.search
    print(f"Optuna: {s.n_trials} trials, study '{optuna_study_name(study)}' in "
          f"{describe_storage(storage_descriptor(study, storage))}; seed {study.seeds[0]}; "
          f"{workers} worker(s) at a time")
    print("objectives: " + ", ".join(f"{o.direction} {o.metric}" for o in s.objectives))
    print(f"sampler: {sampler_name(s)} (seed {s.sampler.get('seed')})")
    print(describe_pruning(s))
    print("search space:")
    print(table([[p.key, p.describe()] for p in s.space], ["parameter", "range"]))
    if not base_ok:
        err = make_cell(study, "base", {}, study.seeds[0]).error
        print(f"\nerror: the base configuration is invalid: {err}", file=sys.stderr)
        return 2
    return 0
