"""The MLflow runs of one study invocation: its parent run (opened first, closed last), a nested child run
per cell or trial (new, or an unfinished one resumed: same run id), a "pretrain" run per stage-1 training,
and the failures recorded in them. Names of tags and metrics: ``studies/mlflow_schema.py``."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from dset.provenance import code_version, data_digest

from . import mlflow_schema as S
from . import mlflow_store, tracking
from .cell_state import classify_by_key, classify_cell, stale_reason
from .devices import Slot
from .jobs import RunResult
from .pretrain import Stage1
from .progress import say
from .spec import Cell, Study

log = logging.getLogger("studies")


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items() if v is not None}


class StudyRuns:
    """Opens the store and the invocation's parent run when made; :meth:`close` ends the parent run."""

    def __init__(self, study: Study, uri: str, slots: list[Slot], keep_stale: bool, host: str, pid: int) -> None:
        self.study = study
        self.uri = uri
        self.keep_stale = keep_stale
        self.host = host
        self.pid = pid
        self.commit = tracking.git_commit()
        self.optuna_name: str | None = None    # the Optuna study of a search (tagged on its trials' runs)
        mlflow_store.prepare_store(uri)
        self.c = mlflow_store.client(uri)
        self.exp_id = mlflow_store.get_experiment(self.c, study.name, uri)
        self.existing = tracking.find_child_runs(self.c, self.exp_id)         # child runs by fingerprint
        self.stale_candidates = tracking.find_stale_candidates(self.c, self.exp_id)
        self._mark_stale_parents()
        self.parent_id = self._open_parent(slots)

    # ----- the parent run
    def _open_parent(self, slots: list[Slot]) -> str:
        st = self.study
        tags = {S.TAG_ROLE: "parent", S.TAG_STUDY: st.name, S.TAG_GIT_COMMIT: self.commit,
                S.TAG_HOST: self.host, S.TAG_PID: str(self.pid), "mlflow.runName": f"{st.name} "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
                "dset.command": mlflow_store.redact(" ".join(["python -m studies.run", *sys.argv[1:]]))}
        run = mlflow_store.retry(self.c.create_run, self.exp_id, tags=_tags(tags))
        params = {"study.kind": st.kind, "study.budget": st.budget, "study.data": st.data, "study.seeds": st.seeds,
                  "study.presets": st.presets, "study.workers": len(slots), "study.file": str(st.path),
                  "study.overrides": " ".join(st.study_overrides + st.config_overrides) or "-",
                  "study.devices": ",".join(sl.label for sl in slots)}
        if st.search:
            params["study.n_trials"] = st.search.n_trials
        params.update(st.targets.params())  # targets.delta_map, ...: what the report judges the variants against
        tracking.log_params(self.c, run.info.run_id, params)
        try:
            mlflow_store.retry(self.c.log_artifact, run.info.run_id, str(st.path))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not log the study file: %s", exc)
        return run.info.run_id

    def _mark_stale_parents(self) -> None:
        running_parents = f"tags.`{S.TAG_ROLE}` = 'parent' and attributes.status = 'RUNNING'"
        runs = mlflow_store.retry(self.c.search_runs, [self.exp_id], filter_string=running_parents, max_results=1000)
        for r in runs:
            if tracking.is_stale(r.data.tags, self.host):
                mlflow_store.retry(self.c.set_terminated, r.info.run_id, status="KILLED")

    def tag_parent(self, tags: dict[str, Any]) -> None:
        tracking.set_tags(self.c, self.parent_id, tags)

    def tag_optuna_study(self, name: str, storage: str) -> None:
        """A search's Optuna study: tagged on the parent run, and on every trial's run from now on."""
        self.optuna_name = name
        self.tag_parent({S.TAG_OPTUNA_STUDY: name, "dset.optuna_storage": storage})

    def close(self, status: str, metrics: dict[str, float]) -> None:
        tracking.log_metrics(self.c, self.parent_id, metrics, 0)
        mlflow_store.retry(self.c.set_terminated, self.parent_id, status=status)

    def ui_link(self) -> str:
        return mlflow_store.ui_link(self.uri, self.exp_id)

    # ----- what a cell needs
    def classify(self, cell: Cell) -> tuple[str, Any]:
        """See :func:`~studies.cell_state.classify_cell`: finished, elsewhere, resume, stale (the old run) or new."""
        return classify_cell(cell, self.existing, self.stale_candidates, self.keep_stale,
                             alive=lambda run: not tracking.is_stale(run.data.tags, self.host))

    def classify_at_start(self, cell: Cell) -> tuple[str, Any]:
        """:func:`~studies.cell_state.classify_cell` on the runs read when this invocation started."""
        return classify_cell(cell, self.existing, self.stale_candidates, self.keep_stale)

    def lookup(self, cell: Cell) -> tuple[str, Any]:
        """What a claimed cell needs, read from MLflow now (another invocation may have finished it since this one
        started): ("finished", run), ("resume", run) (a run of its fingerprint that did not finish: this
        invocation holds the cell's claim, so nobody else runs it), ("stale", old run) or ("new", None)."""
        run = self.find_run(cell.fingerprint) if cell.fingerprint else None
        if run is not None:
            return ("finished" if run.info.status == "FINISHED" else "resume"), run
        return classify_by_key(cell, self.stale_candidates, self.keep_stale)

    def find_run(self, fingerprint: str):
        return tracking.find_run(self.c, self.exp_id, fingerprint)

    # ----- child runs
    def child_tags(self, cell: Cell) -> dict[str, Any]:
        lab = cell.labels()
        tags = {S.TAG_ROLE: "child", S.TAG_STUDY: self.study.name, S.TAG_CELL: cell.id, S.TAG_VARIANT: lab["variant"],
                S.TAG_BACKBONE: lab["backbone"], S.TAG_ENCODER_MOE: str(lab["encoder_moe"]).lower(),
                S.TAG_TOKEN_PRUNING: str(lab["token_pruning"]).lower(),
                S.TAG_DECODER_MOE: str(lab["decoder_moe"]).lower(),
                S.TAG_MEMORY_PRUNING: "false" if lab["memory_keep"] is None else f"{lab['memory_keep']:g}",
                S.TAG_SEED: str(cell.seed),
                S.TAG_GIT_COMMIT: self.commit, S.TAG_FINGERPRINT: cell.fingerprint, S.TAG_CELL_KEY: cell.cell_key,
                S.TAG_CODE_VERSION: cell.provenance.get("code"), S.TAG_DATA_DIGEST: cell.provenance.get("data"),
                S.TAG_HOST: self.host, S.TAG_PID: str(self.pid), "mlflow.runName": cell.id}
        if cell.stage1 is not None:
            tags[S.TAG_INIT_SOURCE] = cell.stage1.init_source()
            if cell.stage1.checkpoint is not None:
                tags[S.TAG_INIT_CHECKPOINT] = str(cell.stage1.checkpoint.resolve())
        if cell.out_dir is not None:
            tags[S.TAG_CHECKPOINT_DIR] = str((cell.out_dir / "checkpoints").resolve())
        if cell.trial is not None:
            tags[S.TAG_TRIAL] = str(cell.trial)
            tags[S.TAG_OPTUNA_STUDY] = self.optuna_name
        return tags

    def open_cell_run(self, cell: Cell, kind: str, run) -> str:
        """The MLflow run a cell trains into: ``run`` resumed, or a new one; a stale run it redoes is tagged
        as superseded by the new one (the report then skips it)."""
        if kind != "stale":
            return self.open_child(cell, run)
        rid = self.open_child(cell, None)
        tracking.set_tags(self.c, run.info.run_id, {S.TAG_SUPERSEDED_BY: rid})
        self.stale_candidates.pop(cell.cell_key, None)
        say(f"-> {cell.id}: earlier run {run.info.run_id[:8]} is stale ({stale_reason(cell, run)}): redone")
        return rid

    def open_child(self, cell: Cell, run) -> str:
        """The MLflow run of ``cell``: ``run`` (resumed: same run id) or a new nested run."""
        tags = self.child_tags(cell)
        if run is not None:
            rid = run.info.run_id
            tracking.delete_tag(self.c, rid, S.TAG_ERROR)
            tracking.delete_tag(self.c, rid, S.TAG_STATUS)
            tags.pop("mlflow.runName", None)
            tracking.set_tags(self.c, rid, tags)
            mlflow_store.retry(self.c.update_run, rid, status="RUNNING")
            return rid
        tags["mlflow.parentRunId"] = self.parent_id
        new = mlflow_store.retry(self.c.create_run, self.exp_id, tags=_tags(tags), run_name=cell.id)
        self.existing[cell.fingerprint] = mlflow_store.retry(self.c.get_run, new.info.run_id)
        return new.info.run_id

    def record_failure(self, cell: Cell, error: str) -> RunResult:
        """A cell that cannot run (invalid configuration, failed stage 1): a FAILED run with the error."""
        kind, run = self.lookup(cell)
        rid = self.open_cell_run(cell, kind, run) if kind != "finished" else self.open_child(cell, None)
        self.fail_run(rid, error)
        return RunResult(cell.id, "failed", error=error, run_id=rid, trial=cell.trial)

    def fail_run(self, run_id: str, error: str) -> None:
        tracking.set_tags(self.c, run_id, {S.TAG_STATUS: "failed", S.TAG_ERROR: error})
        mlflow_store.retry(self.c.set_terminated, run_id, status="FAILED")

    def result_of(self, cell: Cell, run, status: str) -> RunResult:
        """The summary row of a cell whose finished ``run`` this invocation found instead of running it."""
        return RunResult(cell.id, status, metrics=dict(run.data.metrics), run_id=run.info.run_id, trial=cell.trial)

    # ----- stage-1 runs
    def stage1_runs(self) -> dict[str, Any]:
        """The "pretrain" runs by stage-1 key."""
        return tracking.find_child_runs(self.c, self.exp_id, role="pretrain")

    def open_stage1_run(self, st: Stage1, run) -> str:
        """The MLflow run of a stage-1 training: an unfinished one of the same key resumed, or a new one."""
        tags = {S.TAG_ROLE: "pretrain", S.TAG_STUDY: self.study.name, S.TAG_CELL: st.cell_id,
                S.TAG_BACKBONE: f"R{st.depth}", S.TAG_VARIANT: f"RT-DETR R{st.depth} (stage 1)",
                S.TAG_FINGERPRINT: st.key, S.TAG_STAGE1_KEY: st.key, S.TAG_SEED: str(st.config.run.seed),
                S.TAG_GIT_COMMIT: self.commit, S.TAG_CODE_VERSION: code_version(),
                S.TAG_DATA_DIGEST: data_digest(st.config), S.TAG_HOST: self.host, S.TAG_PID: str(self.pid),
                S.TAG_CHECKPOINT_DIR: str(st.partial_folder / "checkpoints")}
        if run is not None and run.info.status != "FINISHED":
            tracking.set_tags(self.c, run.info.run_id, tags)
            mlflow_store.retry(self.c.update_run, run.info.run_id, status="RUNNING")
            return run.info.run_id
        tags["mlflow.parentRunId"] = self.parent_id
        return mlflow_store.retry(self.c.create_run, self.exp_id, tags=_tags(tags), run_name=st.cell_id).info.run_id

    def tag_run(self, run_id: str, tags: dict[str, Any]) -> None:
        tracking.set_tags(self.c, run_id, tags)
