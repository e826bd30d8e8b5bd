"""Optuna for studies: storage, sampler and pruner, sampling a trial's configuration, and the per-epoch
pruning callback.

Storage: by default a journal file ``<out_dir>/<study>/optuna_journal.log`` (``JournalStorage`` with
``JournalFileBackend``: safe for several local processes); ``--storage URL`` passes any Optuna storage URL
through (``postgresql://...``, ``mysql://...``, ``sqlite:///...``): workers on several machines then share one
search, the way Optuna distributes. The Optuna study is named ``<study>-<hash>``, the hash covering
everything that defines the search except ``n_trials`` (more trials continue the same search; a different
budget or space starts a new one).

The invoking process asks for trials and tells their results; a worker process only reports per-epoch
values (and asks ``should_prune``) through the same storage. Pruning is used only when the study has ONE
objective: Optuna does not support pruning in multi-objective studies (``Trial.report`` raises there).

Interrupted trials: a trial left RUNNING by a dead worker (a process of this host that no longer exists, or,
with an RDB storage, a trial without a heartbeat for the grace period on any host; ``studies.queue``) is
marked FAIL (it does not count toward ``n_trials``) and its parameters are enqueued again with the trial
user attributes ``dset.retry_of`` and ``dset.requeued_from``; the re-run finds the same MLflow run and
checkpoint (same fingerprint) and continues from the last epoch.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from dset import metric_names as M
from dset.engine.callbacks import Callback

from .spec import Param, Search, Study, search_fingerprint

log = logging.getLogger("studies")

ATTR_INTERRUPTED = "dset.interrupted"
ATTR_RUN_ID = "dset.mlflow_run_id"


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
    from .mlflow_store import redact

    return redact(desc["url"])


def open_storage(desc: dict, heartbeat: bool = True):
    """The storage a descriptor names. RDB storages (PostgreSQL, ...) get Optuna's heartbeat, so that a trial
    whose worker died on any machine is found (``studies.queue.reap_dead``); a journal file (one machine) is
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
    from .queue import heartbeat_seconds, requeue

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


def optuna_study_name(study: Study) -> str:
    return f"{study.name}-{search_fingerprint(study)}"


def sampler_name(search: Search) -> str:
    """The configured sampler; ``auto``: NSGA-II for several objectives, TPE for one."""
    name = search.sampler.get("name", "auto")
    if name == "auto":
        name = "nsga2" if len(search.objectives) > 1 else "tpe"
    return name


def make_sampler(search: Search, offset: int = 0):
    """The configured sampler; its seed is ``sampler.seed + offset`` (see :func:`create_study`)."""
    import optuna

    s = search.sampler
    name, seed = sampler_name(search), s.get("seed")
    if seed is not None:
        seed = int(seed) + offset
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                          n_startup_trials=int(s.get("n_startup_trials", 5)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=int(s.get("population_size", 8)))
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(search: Search):
    import optuna

    if not search.prunable:
        return optuna.pruners.NopPruner()
    return pruner_from(search.pruner)


def pruner_from(p: dict):
    """The pruner a ``search.pruner`` mapping describes (Optuna's storage does not keep the pruner, so a
    worker builds it again from this)."""
    import optuna

    if p.get("name", "none") == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=int(p.get("n_startup_trials", 3)),
                                       n_warmup_steps=int(p.get("n_warmup_steps", 1)))


def describe_pruning(search: Search) -> str:
    if len(search.objectives) > 1:
        return ("pruning: off -- Optuna does not support pruning for multi-objective studies "
                f"({len(search.objectives)} objectives); configure one objective to prune per epoch")
    if not search.prunable:
        return "pruning: off (search.pruner.name: none)"
    p = search.pruner
    return (f"pruning: per epoch on val/mAP with the median rule (after {p.get('n_startup_trials', 3)} trials "
            f"and {p.get('n_warmup_steps', 1)} warm-up epochs); pruned trials end with status 'stopped'")


def create_study(study: Study, desc: dict, worker_key: str = ""):
    """Create or load the Optuna study. The sampler's seed is offset by the number of trials already in
    the study, so that continuing a search draws new parameters instead of repeating the first ones (a
    fresh search is reproducible); with a shared ``--storage`` also by ``worker_key`` (host:pid), so that
    invocations on several machines do not draw the same values."""
    import zlib

    import optuna

    quiet_optuna()
    directions = [o.direction for o in study.search.objectives]
    ostudy = optuna.create_study(study_name=optuna_study_name(study), storage=open_storage(desc),
                                 directions=directions, sampler=make_sampler(study.search),
                                 pruner=make_pruner(study.search), load_if_exists=True)
    offset = len(ostudy.get_trials(deepcopy=False))
    if "url" in desc and worker_key:
        offset += zlib.crc32(worker_key.encode()) % 1_000_003
    if offset:
        ostudy.sampler = make_sampler(study.search, offset)
    return ostudy


def sample(trial, space: list[Param]) -> dict[str, Any]:
    """Suggest every parameter of the space (define-by-run); ``at_most`` bounds by an earlier value."""
    values: dict[str, Any] = {}
    for p in space:
        if p.type == "categorical":
            values[p.key] = trial.suggest_categorical(p.key, p.choices)
            continue
        high = p.high
        if p.at_most is not None:
            high = min(high, values[p.at_most])
        if p.type == "int":
            values[p.key] = trial.suggest_int(p.key, int(p.low), int(high), step=int(p.step or 1), log=p.log)
        else:
            values[p.key] = trial.suggest_float(p.key, float(p.low), float(high),
                                                step=None if p.log else p.step, log=p.log)
    return values


def trial_counts(ostudy) -> tuple[int, list]:
    """(trials that count toward n_trials, RUNNING trials). Interrupted trials do not count: they are
    re-enqueued (``studies.queue.requeue``)."""
    from optuna.trial import TrialState

    from .queue import requeued_numbers

    counted, running = 0, []
    trials = ostudy.get_trials(deepcopy=False)
    # ATTR_INTERRUPTED: how journals written before studies.queue marked interrupted trials
    interrupted = set(ostudy.user_attrs.get(ATTR_INTERRUPTED, [])) | requeued_numbers(trials)
    for t in trials:
        if t.user_attrs.get("dset.empty_claim"):
            continue
        if t.state == TrialState.RUNNING:
            running.append(t)
            counted += 1
        elif t.state == TrialState.WAITING:
            counted += 1
        elif t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            counted += 1
        elif t.state == TrialState.FAIL and t.number not in interrupted:
            counted += 1
    return counted, running


def requeue_stale(ostudy, my_host: str) -> list[int]:
    """Fail the RUNNING trials of dead workers (a gone process of this host; with an RDB storage also a
    missing heartbeat, any host) and enqueue their parameters again. Returns the trial numbers re-enqueued."""
    from .queue import reap_dead

    return reap_dead(ostudy, my_host)


def objective_values(search: Search, metrics: dict[str, float]) -> list[float] | None:
    values = []
    for o in search.objectives:
        v = metrics.get(o.metric)
        if v is None or not math.isfinite(v):
            return None
        values.append(float(v))
    return values


class PruningCallback(Callback):
    """Reports val/mAP of each evaluated epoch to the trial and stops the run when the pruner says so.
    Used only for single-objective studies (see the module docstring)."""

    def __init__(self, desc: dict, study_name: str, trial_id: int, pruner: dict, metric_key: str = M.VAL_MAP) -> None:
        import optuna

        quiet_optuna()
        self.study = optuna.load_study(study_name=study_name, storage=open_storage(desc), pruner=pruner_from(pruner))
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.metric_key = metric_key
        self.pruned = False

    def on_train_start(self, info: dict) -> None:
        start = int(info.get("start_epoch", 0))
        if start > 0:  # a resumed trial: re-report the finished epochs to this (new) trial
            from .tracking import read_records

            for r in read_records(Path(info["out_dir"]) / "metrics.jsonl"):
                if r.get("epoch", start) < start and r.get(self.metric_key) is not None:
                    self._report(r[self.metric_key], int(r["epoch"]))

    def _report(self, value: float, epoch: int) -> None:
        self.trial.report(float(value), epoch)

    def on_epoch_end(self, epoch: int, metrics: dict) -> bool | None:
        value = metrics.get(self.metric_key)
        if value is None or not math.isfinite(value):
            return None
        self._report(value, epoch)
        if self.trial.should_prune():
            self.pruned = True
            return True
        return None


