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

Interrupted trials: a trial left RUNNING by a process of this host that no longer exists is marked FAIL
(listed in the study's user attribute ``dset.interrupted``; such trials do not count toward ``n_trials``)
and its parameters are enqueued again with the trial user attribute ``dset.retry_of``; the
re-run finds the same MLflow run and checkpoint (same fingerprint) and continues from the last epoch.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from dset.engine.train import Callback

from .spec import Param, Search, Study, search_fingerprint

log = logging.getLogger("studies")

ATTR_HOST = "dset.host"
ATTR_PID = "dset.pid"
ATTR_RETRY_OF = "dset.retry_of"
ATTR_INTERRUPTED = "dset.interrupted"
ATTR_CELL = "dset.cell"
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
    from .tracking import redact

    return redact(desc["url"])


def open_storage(desc: dict):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if "journal" in desc:
        path = Path(desc["journal"])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    url = desc["url"]
    if url.startswith(("sqlite:", "postgresql", "mysql", "oracle", "mssql")):
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite")
                                          else {"connect_args": {"timeout": 60}})
    return url  # anything else Optuna understands (e.g. a redis journal URL is not accepted: raise there)


def optuna_study_name(study: Study) -> str:
    return f"{study.name}-{search_fingerprint(study)}"


def make_sampler(search: Search, offset: int = 0):
    """The configured sampler; its seed is ``sampler.seed + offset`` (see :func:`create_study`)."""
    import optuna

    s = search.sampler
    name, seed = s.get("name", "auto"), s.get("seed")
    if seed is not None:
        seed = int(seed) + offset
    if name == "auto":
        name = "nsga2" if len(search.objectives) > 1 else "tpe"
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
    re-enqueued."""
    from optuna.trial import TrialState

    counted, running = 0, []
    interrupted = set(ostudy.user_attrs.get(ATTR_INTERRUPTED, []))
    for t in ostudy.get_trials(deepcopy=False):
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
    """Mark RUNNING trials of dead processes of this host as interrupted (FAIL) and enqueue their
    parameters again. Returns the trial numbers re-enqueued."""
    from optuna.trial import TrialState

    from .tracking import pid_alive

    requeued = []
    for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get(ATTR_HOST) not in (None, my_host):
            continue  # another machine's trial
        pid = attrs.get(ATTR_PID)
        if pid is not None and pid_alive(int(pid)):
            continue
        root = attrs.get(ATTR_RETRY_OF, t.number)
        interrupted = list(ostudy.user_attrs.get(ATTR_INTERRUPTED, []))
        ostudy.set_user_attr(ATTR_INTERRUPTED, interrupted + [t.number])
        ostudy.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        ostudy.enqueue_trial(dict(t.params), user_attrs={ATTR_RETRY_OF: root}, skip_if_exists=False)
        requeued.append(t.number)
    return requeued


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

    def __init__(self, desc: dict, study_name: str, trial_id: int, pruner: dict, metric_key: str = "mAP") -> None:
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


