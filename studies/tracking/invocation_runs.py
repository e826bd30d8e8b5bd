"""The MLflow runs of one study invocation: its parent run (opened first, closed last), a nested child run
per cell or trial (new, or an unfinished one resumed: the same run id when its logged epochs end where the cell's
resume state does, else a new attempt run), a "pretrain" run per stage-1 training, and the failures recorded in
them. Names of tags and metrics: :mod:`studies.tracking.schema`."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from dset import metric_names as M
from dset.engine.checkpoint import resume_state_epoch
from dset.provenance import code_version, data_digest, git_commit
from dset.run_folder import RunFolder

from ..console import say
from ..planning.cells import Cell
from ..planning.pretrain import Stage1
from ..planning.study import Study
from ..processes import slurm_job
from . import mlflow_runs, mlflow_store, schema
from .cell_state import classify_by_key, classify_cell, stale_reason

log = logging.getLogger("studies")


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items() if v is not None}


class InvocationRuns:
    """The MLflow bookkeeping of one invocation: opens the store and the invocation's parent run when made;
    :meth:`close` ends the parent run. ``devices``: each worker's device label ("GPU 1", "CPU")."""

    def __init__(self, study: Study, uri: str, devices: list[str], keep_stale: bool, host: str, pid: int) -> None:
        self.study = study
        self.uri = uri
        self.keep_stale = keep_stale
        self.host = host
        # where the runs this invocation opens or resumes are running (--status, and claims of dead processes)
        self.where = {schema.TAG_HOST: host, schema.TAG_PID: str(pid), schema.TAG_SLURM_JOB: slurm_job()}
        self.pid = pid
        self.commit = git_commit()
        self.optuna_name: str | None = None    # the Optuna study of a search (tagged on its trials' runs)
        mlflow_store.prepare_store(uri)
        self.c = mlflow_store.client(uri)
        self.exp_id = mlflow_store.get_experiment(self.c, study.name, uri)
        self.existing = mlflow_runs.find_child_runs(self.c, self.exp_id)         # child runs by fingerprint
        self.stale_candidates = mlflow_runs.find_stale_candidates(self.c, self.exp_id)
        self._mark_stale_parents()
        self.parent_id = self._open_parent(devices)

    # ----- the parent run
    def _open_parent(self, devices: list[str]) -> str:
        st = self.study
        tags = {schema.TAG_ROLE: "parent", schema.TAG_STUDY: st.name, schema.TAG_GIT_COMMIT: self.commit,
                **self.where, "mlflow.runName": f"{st.name} "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
                "dset.command": mlflow_store.redact(" ".join(["python -m studies.run", *sys.argv[1:]]))}
        run = mlflow_store.retry(self.c.create_run, self.exp_id, tags=_tags(tags))
        params = {"study.kind": st.kind, "study.budget": st.budget, "study.data": st.data, "study.seeds": st.seeds,
                  "study.presets": st.presets, "study.workers": len(devices), "study.file": str(st.path),
                  "study.overrides": " ".join(st.study_overrides + st.config_overrides) or "-",
                  "study.devices": ",".join(devices)}
        if st.search:
            params["study.n_trials"] = st.search.n_trials
        params.update(st.targets.params())  # targets.delta_map, ...: what the report judges the variants against
        mlflow_runs.log_params(self.c, run.info.run_id, params)
        try:
            mlflow_store.retry(self.c.log_artifact, run.info.run_id, str(st.path))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not log the study file: %s", exc)
        return run.info.run_id

    def _mark_stale_parents(self) -> None:
        running_parents = f"tags.`{schema.TAG_ROLE}` = 'parent' and attributes.status = 'RUNNING'"
        runs = mlflow_store.retry(self.c.search_runs, [self.exp_id], filter_string=running_parents, max_results=1000)
        for r in runs:
            if mlflow_runs.is_stale(r.data.tags, self.host):
                mlflow_store.retry(self.c.set_terminated, r.info.run_id, status="KILLED")

    def tag_parent(self, tags: dict[str, Any]) -> None:
        mlflow_runs.set_tags(self.c, self.parent_id, tags)

    def tag_optuna_study(self, name: str, storage: str) -> None:
        """A search's Optuna study: tagged on the parent run, and on every trial's run from now on."""
        self.optuna_name = name
        self.tag_parent({schema.TAG_OPTUNA_STUDY: name, "dset.optuna_storage": storage})

    def close(self, status: str, metrics: dict[str, float]) -> None:
        mlflow_runs.log_metrics(self.c, self.parent_id, metrics, 0)
        mlflow_store.retry(self.c.set_terminated, self.parent_id, status=status)

    def ui_link(self) -> str:
        return mlflow_store.ui_link(self.uri, self.exp_id)

    # ----- what a cell needs
    def classify(self, cell: Cell) -> tuple[str, Any]:
        """See :func:`~studies.tracking.cell_state.classify_cell`: finished, elsewhere, resume, stale (the old run)
        or new."""
        return classify_cell(cell, self.existing, self.stale_candidates, self.keep_stale,
                             alive=lambda run: not mlflow_runs.is_stale(run.data.tags, self.host))

    def classify_at_start(self, cell: Cell) -> tuple[str, Any]:
        """:func:`~studies.tracking.cell_state.classify_cell` on the runs read when this invocation started."""
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
        return mlflow_runs.find_run(self.c, self.exp_id, fingerprint)

    # ----- child runs
    def child_tags(self, cell: Cell) -> dict[str, Any]:
        lab = cell.labels()
        tags = {schema.TAG_ROLE: "child", schema.TAG_STUDY: self.study.name, schema.TAG_CELL: cell.id,
                schema.TAG_VARIANT: lab["variant"], schema.TAG_BACKBONE: lab["backbone"],
                schema.TAG_ENCODER_MOE: str(lab["encoder_moe"]).lower(),
                schema.TAG_TOKEN_PRUNING: str(lab["token_pruning"]).lower(),
                schema.TAG_DECODER_MOE: str(lab["decoder_moe"]).lower(),
                schema.TAG_MEMORY_PRUNING: "false" if lab["memory_keep"] is None else f"{lab['memory_keep']:g}",
                schema.TAG_SEED: str(cell.seed), schema.TAG_GIT_COMMIT: self.commit,
                schema.TAG_FINGERPRINT: cell.fingerprint, schema.TAG_CELL_KEY: cell.cell_key,
                schema.TAG_CODE_VERSION: cell.provenance.get("code"),
                schema.TAG_DATA_DIGEST: cell.provenance.get("data"),
                **self.where, "mlflow.runName": cell.id}
        if cell.stage1 is not None:
            tags[schema.TAG_INIT_SOURCE] = cell.stage1.init_source()
            if cell.stage1.checkpoint is not None:
                tags[schema.TAG_INIT_CHECKPOINT] = str(cell.stage1.checkpoint.resolve())
        if cell.out_dir is not None:
            tags[schema.TAG_CHECKPOINT_DIR] = str(RunFolder(cell.out_dir).checkpoints.resolve())
        if cell.trial is not None:
            tags[schema.TAG_TRIAL] = str(cell.trial)
            tags[schema.TAG_OPTUNA_STUDY] = self.optuna_name
        return tags

    def open_cell_run(self, cell: Cell, kind: str, run) -> str:
        """The MLflow run a cell trains into: ``run`` resumed, or a new one; a stale run it redoes is tagged
        as superseded by the new one (the report then skips it)."""
        if kind != "stale":
            return self.open_child(cell, run)
        rid = self.open_child(cell, None)
        mlflow_runs.set_tags(self.c, run.info.run_id, {schema.TAG_SUPERSEDED_BY: rid})
        self.stale_candidates.pop(cell.cell_key, None)
        say(f"-> {cell.id}: earlier run {run.info.run_id[:8]} is stale ({stale_reason(cell, run)}): redone")
        return rid

    def open_child(self, cell: Cell, run) -> str:
        """The MLflow run of ``cell``: ``run`` (resumed: same run id) or a new nested run. A run that logged epochs
        past the cell's resume state (killed after logging an epoch, before writing last.pt) is replaced by a new
        attempt run, so that no epoch is logged twice (:meth:`_replace_attempt`)."""
        tags = self.child_tags(cell)
        if run is not None and self._would_log_twice(cell, run):
            return self._replace_attempt(cell, run, tags)
        if run is not None:
            rid = run.info.run_id
            mlflow_runs.delete_tag(self.c, rid, schema.TAG_ERROR)
            mlflow_runs.delete_tag(self.c, rid, schema.TAG_STATUS)
            tags.pop("mlflow.runName", None)
            mlflow_runs.set_tags(self.c, rid, tags)
            mlflow_store.retry(self.c.update_run, rid, status="RUNNING")
            return rid
        return self._new_child(cell, tags)

    def _new_child(self, cell: Cell, tags: dict[str, Any]) -> str:
        """A new nested run of ``cell`` with ``tags``, known from now on as its run; its id."""
        tags = {**tags, "mlflow.parentRunId": self.parent_id}
        new = mlflow_store.retry(self.c.create_run, self.exp_id, tags=_tags(tags), run_name=cell.id)
        self.existing[cell.fingerprint] = mlflow_store.retry(self.c.get_run, new.info.run_id)
        return new.info.run_id

    def _would_log_twice(self, cell: Cell, run) -> bool:
        """Whether resuming ``cell`` into ``run`` would log an epoch again: ``run`` holds an epoch at or past the
        one the resume state continues from (last.pt's epoch + 1; 0 without one)."""
        if cell.out_dir is None:
            return False
        held = resume_state_epoch(RunFolder(cell.out_dir).resume_state)
        start = 0 if held is None else held + 1
        logged = mlflow_store.retry(self.c.get_metric_history, run.info.run_id, M.train_loss_metric("loss"))
        return any(m.step >= start for m in logged)

    def _replace_attempt(self, cell: Cell, run, tags: dict[str, Any]) -> str:
        """A new run for ``cell``'s new attempt, linked to the interrupted one (``TAG_ATTEMPT_OF``), which is marked
        KILLED, tagged superseded by it and deleted (MLflow keeps deleted runs until ``mlflow gc``:
        ``mlflow runs restore`` brings one back), so that the cell has one run with one value per epoch. The
        epochs the resume state keeps are logged into the new run from the run folder at the start of training
        (:class:`~studies.tracking.callback.MlflowCallback`)."""
        old = run.info.run_id
        new = self._new_child(cell, {**tags, schema.TAG_ATTEMPT_OF: old})
        mlflow_runs.set_tags(self.c, old, {schema.TAG_SUPERSEDED_BY: new, schema.TAG_STATUS: "interrupted"})
        mlflow_store.retry(self.c.set_terminated, old, status="KILLED")
        mlflow_store.retry(self.c.delete_run, old)
        say(f"-> {cell.id}: run {old[:8]} logged epochs past its resume state: continued in a new run {new[:8]} "
            f"(the old one deleted; `mlflow runs restore --run-id {old}` brings it back)")
        return new

    def record_failure(self, cell: Cell, error: str) -> str:
        """A cell that cannot run (invalid configuration, failed stage 1): a FAILED run with the error; its id."""
        kind, run = self.lookup(cell)
        rid = self.open_cell_run(cell, kind, run) if kind != "finished" else self.open_child(cell, None)
        self.fail_run(rid, error)
        return rid

    def fail_run(self, run_id: str, error: str) -> None:
        mlflow_runs.set_tags(self.c, run_id, {schema.TAG_STATUS: "failed", schema.TAG_ERROR: error})
        mlflow_store.retry(self.c.set_terminated, run_id, status="FAILED")

    # ----- stage-1 runs
    def stage1_runs(self) -> dict[str, Any]:
        """The "pretrain" runs by stage-1 key."""
        return mlflow_runs.find_child_runs(self.c, self.exp_id, role="pretrain")

    def open_stage1_run(self, st: Stage1, run) -> str:
        """The MLflow run of a stage-1 training: an unfinished one of the same key resumed, or a new one."""
        tags = {schema.TAG_ROLE: "pretrain", schema.TAG_STUDY: self.study.name, schema.TAG_CELL: st.cell_id,
                schema.TAG_BACKBONE: f"R{st.depth}", schema.TAG_VARIANT: f"RT-DETR R{st.depth} (stage 1)",
                schema.TAG_FINGERPRINT: st.key, schema.TAG_STAGE1_KEY: st.key,
                schema.TAG_SEED: str(st.config.run.seed), schema.TAG_GIT_COMMIT: self.commit,
                schema.TAG_CODE_VERSION: code_version(), schema.TAG_DATA_DIGEST: data_digest(st.config),
                **self.where,
                schema.TAG_CHECKPOINT_DIR: str(RunFolder(st.partial_folder).checkpoints)}
        if run is not None and run.info.status != "FINISHED":
            mlflow_runs.set_tags(self.c, run.info.run_id, tags)
            mlflow_store.retry(self.c.update_run, run.info.run_id, status="RUNNING")
            return run.info.run_id
        tags["mlflow.parentRunId"] = self.parent_id
        return mlflow_store.retry(self.c.create_run, self.exp_id, tags=_tags(tags), run_name=st.cell_id).info.run_id

    def tag_run(self, run_id: str, tags: dict[str, Any]) -> None:
        mlflow_runs.set_tags(self.c, run_id, tags)

    def learning_risks(self, run_id: str) -> str | None:
        """The likely causes a run recorded of a budget that may not learn its data (its learning-risks tag)."""
        run = mlflow_store.retry(self.c.get_run, run_id)
        return run.data.tags.get(schema.TAG_LEARNING_RISKS)
