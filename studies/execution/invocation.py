"""One invocation of ``python -m studies.run`` once it runs: the collaborators that its job sources share (its
MLflow runs, its progress, its jobs, its queues, its scheduler), made when the study starts, and its end: the
summary printed and the parent run closed."""

from __future__ import annotations

import os
import time

from ..planning.study import Study
from ..processes import host
from ..tracking.invocation_runs import InvocationRuns
from .devices import Slot
from .jobs import JobMaker
from .optuna_storage import storage_descriptor
from .progress import Progress
from .queue import Queues
from .scheduler import Scheduler
from .workers import make_executor


class Invocation:
    """Made when the study starts to run (it opens the MLflow parent run); ended by :meth:`finish` or, on
    Ctrl-C or SIGTERM, by :meth:`interrupted`."""

    def __init__(self, study: Study, uri: str, workers: int, storage: str | None, keep_stale: bool = False,
                 slots: list[Slot] | None = None) -> None:
        self.study = study
        self.uri = uri
        slots = slots or [Slot(None, "CPU", workers)] * workers
        self.host = host()
        self.pid = os.getpid()
        self.jobs = JobMaker(study.name, uri, workers, self.pid)
        # the queues of grid cells and stage 1 live in the same Optuna storage as a search
        self.queues = Queues(storage_descriptor(study, storage), study.name, self.host, self.pid)
        self.progress = Progress(workers)
        self.scheduler = Scheduler(make_executor(slots))
        self.optuna_study = None                               # a search's Optuna study (for the summary)
        self.runs = InvocationRuns(study, uri, [slot.label for slot in slots], keep_stale, self.host, self.pid)

    def finish(self) -> int:
        """Print the summary and close the parent run; the exit code (1 when a run failed)."""
        self.progress.print_table()
        if self.optuna_study is not None:
            try:
                best = self.optuna_study.best_trials
                names = ", ".join(o.metric for o in self.study.search.objectives)
                print(f"\nOptuna '{self.runs.optuna_name}': best trials ({names}): "
                      + "; ".join(f"#{t.number} {[round(v, 4) for v in t.values]}" for t in best))
            except Exception:  # noqa: BLE001 - no completed trial yet
                pass
        code = self.progress.print_totals(f"MLflow experiment '{self.study.name}' at {self.uri}; its runs: "
                                          f"{self.runs.ui_link()}")
        self.close("FINISHED" if code == 0 else "FAILED")
        return code

    def interrupted(self) -> None:
        """Ctrl-C or SIGTERM: stop the workers, give the claims back, close the parent run as KILLED."""
        self.scheduler.stop()
        self.close("KILLED")

    def close(self, status: str) -> None:
        p = self.progress
        self.runs.close(status, {"runs_total": p.total, "runs_failed": len(p.failed), "runs_executed": p.executed,
                                 "wall_minutes": (time.time() - p.t0) / 60})
