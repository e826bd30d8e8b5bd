"""An Optuna search over a study's configuration: the Optuna study (named ``<study>-<hash>`` of everything that
defines the search but ``n_trials``), its sampler and pruner, sampling a trial's parameters, counting the trials
done, and the per-epoch pruning callback a worker runs. Pruning needs ONE objective: Optuna cannot prune
multi-objective studies. How a search is shared and resumed: docs/studies.md.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from dset import metric_names as M
from dset.engine.callbacks import Callback
from dset.run_folder import RunFolder

from ..planning.cells import search_fingerprint
from ..planning.study import Param, Search, Study
from .claims import ATTR_EMPTY, reap_dead, requeued_numbers
from .optuna_storage import open_storage, quiet_optuna

log = logging.getLogger("studies")

ATTR_INTERRUPTED = "dset.interrupted"
ATTR_RUN_ID = "dset.mlflow_run_id"


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
    re-enqueued (:func:`.claims.requeue`)."""
    from optuna.trial import TrialState

    counted, running = 0, []
    trials = ostudy.get_trials(deepcopy=False)
    # ATTR_INTERRUPTED: how journals written before the queues (studies/execution/queue.py) marked interrupted trials
    interrupted = set(ostudy.user_attrs.get(ATTR_INTERRUPTED, [])) | requeued_numbers(trials)
    for t in trials:
        if t.user_attrs.get(ATTR_EMPTY):
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
    Used only for single-objective studies (Optuna cannot prune multi-objective ones)."""

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
            for r in RunFolder(info["out_dir"]).records():
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
