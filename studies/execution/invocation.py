"""One invocation of ``python -m studies.run`` once it runs: its MLflow runs, its workers, its progress, and
what the grid (``studies/grid_run.py``) and the search (``studies/search_run.py``) paths share: making a
cell's job, preparing data, the summary and stopping."""

from __future__ import annotations

import logging
import os
import sys
import time

from dset.config import load_config

from . import tracking
from .devices import Slot
from .jobs import Job
from .progress import Progress, say
from .scheduler import JobSource, QueueSource, run_jobs
from .search import storage_descriptor
from .spec import Cell, Study
from .study_runs import StudyRuns
from .workers import make_executor

log = logging.getLogger("studies")


class Invocation:
    """Made when the study starts to run (it opens the MLflow parent run); ended by :meth:`finish` or, on
    Ctrl-C or SIGTERM, by :meth:`interrupted`."""

    def __init__(self, study: Study, uri: str, workers: int, storage: str | None, keep_stale: bool = False,
                 slots: list[Slot] | None = None) -> None:
        self.study = study
        self.uri = uri
        self.workers = workers
        self.storage = storage
        self.slots = slots or [Slot(None, "CPU", workers)] * workers
        self.host = tracking.host()
        self.pid = os.getpid()
        self.threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
        self.queue_desc = storage_descriptor(study, storage)   # the queues of grid cells and stage 1 live here
        self.progress = Progress(workers)
        self.executor = make_executor(self.slots)
        self.queue_source: QueueSource | None = None           # the queue whose items this invocation claims now
        self.optuna_study = None                               # a search's Optuna study (for the summary)
        self.runs = StudyRuns(study, uri, self.slots, keep_stale, self.host, self.pid)

    # ----- running jobs
    def run(self, source: JobSource) -> None:
        if isinstance(source, QueueSource):
            self.queue_source = source
        run_jobs(self.executor, source)

    def job(self, cell_id: str, config: dict, out_dir: str, run_id: str, resume: bool, title: str,
            optuna: dict | None = None) -> Job:
        return Job(cell_id=cell_id, config=config, out_dir=out_dir, run_id=run_id, tracking_uri=self.uri,
                   resume=resume, title=f"{self.study.name} / {title}", threads=self.threads,
                   progress=self.workers == 1 and sys.stderr.isatty(), optuna=optuna, parent_pid=self.pid)

    def cell_job(self, cell: Cell, run_id: str, optuna: dict | None = None) -> Job:
        """The job of a cell (stage 2: fine-tuned from its stage-1 checkpoint); says that it starts."""
        resume = (cell.out_dir / "checkpoints" / "last.pt").is_file()
        cfg = cell.config
        if cell.stage1 is not None and cell.stage1.checkpoint is not None:  # stage 2: fine-tune from stage 1
            cfg = load_config(cfg, [f"model.checkpoint={cell.stage1.checkpoint.resolve()}"])
        job = self.job(cell.id, cfg.to_dict(), str(cell.out_dir), run_id, resume,
                       f"{cell.id}: {cell.labels()['variant']}", optuna=optuna)
        trial = f" (trial {cell.trial})" if cell.trial is not None and cell.id != f"trial-{cell.trial}" else ""
        if job.resume:
            say(f"-> {cell.id}{trial}: resuming from {cell.out_dir / 'checkpoints' / 'last.pt'}")
        elif sys.stdout.isatty() or self.workers > 1:
            say(f"-> {cell.id}{trial}: {cell.labels()['variant']}, started")
        return job

    def prepare_data(self, cells: list[Cell]) -> None:
        """Generate each synthetic data set the runs use once, here, before workers start (they would
        otherwise all build the same one at the same time)."""
        from dset.data.loaders import data_paths

        seen = set()
        for cell in cells:
            if not cell.ok or cell.config.data.name != "synthetic":
                continue
            key = repr(cell.config.data.synthetic)
            if key in seen:
                continue
            seen.add(key)
            try:
                data_paths(cell.config)
            except Exception as exc:  # noqa: BLE001 - the runs report it themselves
                log.warning("synthetic data for %s: %s", cell.id, exc)

    # ----- the end
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
        self.executor.terminate()
        if self.queue_source is not None:
            self.queue_source.release_claims()
        self.close("KILLED")

    def close(self, status: str) -> None:
        p = self.progress
        self.runs.close(status, {"runs_total": p.total, "runs_failed": len(p.failed), "runs_executed": p.executed,
                                 "wall_minutes": (time.time() - p.t0) / 60})
