"""The command line of the harness's studies: ``python -m studies.run STUDY [key=value ...]`` runs a study end to
end (or ``--list``s them, or shows what one would do with ``--dry-run``) and exits 0, 1 (a run failed), 2 (usage or
configuration error) or 130 (interrupted). How to run studies, alone or across machines: docs/studies.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from dset.config import PRESET_DIR, ConfigError
from dset.data.errors import DatasetError

from . import stop_signals
from .console import say, table
from .dry_run import dry_run
from .execution.devices import DeviceError, Slot, plan_for_invocation
from .execution.grid_run import run_grid
from .execution.invocation import Invocation
from .execution.latency_step import benchmark_grid
from .execution.search_run import run_search
from .planning.cells import Cell, grid_cells, make_cell
from .planning.pretrain import PretrainError
from .planning.study import Study, StudyError, load_study, study_names
from .slurm.submit import array_id, dry_run_slurm, make_task, submit, unsharable_storage, wait_for_array
from .status import study_status
from .tracking.mlflow_store import quiet_mlflow, redact, tracking_uri

log = logging.getLogger("studies")

# the --help text (docs/studies.md says the same at length)
USAGE = ("Run a study end to end: ``python -m studies.run STUDY [key=value ...] [--workers N] [--devices 0,1] "
         "[--dry-run]\n[--storage URL]``.")
HELP_EPILOG = """\
Examples::

    python -m studies.run --list
    python -m studies.run ablation_grid --dry-run                 # the 16 cells and the budget
    python -m studies.run ablation_grid                           # CPU budget, about 15 minutes on 2 cores
    python -m studies.run ablation_grid seeds=[0,1,2] --workers 2
    python -m studies.run ablation_grid budget=paper run.device=cuda
    python -m studies.run optuna_search n_trials=20 --workers 2
    python -m studies.run optuna_search --storage postgresql://user:pw@host/optuna   # on several machines
    python -m studies.run baselines model.decoder.num_queries=50
    python -m studies.run ablation_grid --storage postgresql://... --slurm slurm.tasks=8 slurm.gpus_per_task=1

``key=value`` overrides are study settings (``seeds``, ``budget``, ``data``, ``n_trials``, ``out_dir``,
``presets``, ``name``, ``search.*``, ``slurm.*``) or run-configuration keys (``model.*``, ``data.*``, ``train.*``,
``run.*``), applied to every run.

MLflow: the store is ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the working directory (what
``mlflow ui`` opens there). One experiment per study, one parent run per invocation, one nested child
run per cell or trial (names in ``studies/tracking/schema.py``). Run outputs (checkpoints, metrics.jsonl)
stay in ``<out_dir>/<study>/<cell>-<fingerprint>/``.

Stage 1 (studies/planning/pretrain.py): every cell fine-tunes from its backbone's RT-DETR checkpoint, trained here
first and cached ($DSET_CACHE_DIR/pretrained) or published (budget=paper); ``--dry-run`` shows which.

Any number of invocations of one study share its work through a queue in Optuna's storage
(``studies/execution/queue.py``): the study's journal file on one machine, ``--storage postgresql://...`` across
machines that also share the MLflow store (``MLFLOW_TRACKING_URI=http://...`` of an ``mlflow server``), the
output folder and ``$DSET_CACHE_DIR``. Each cell, and each stage-1 training, runs exactly once; an invocation
ends when no cell is waiting or running anywhere, and takes over the cells of invocations that die (process
gone on this host, or no heartbeat for 4 x $DSET_QUEUE_HEARTBEAT_S seconds on any host). ``--workers N`` gives
each worker a GPU of its own (``--devices 0,2`` chooses them; ``studies/execution/devices.py``).

Re-running a study skips finished runs (same fingerprint: resolved configuration, seed, stage 1, code version
and data digest), continues interrupted ones from their last checkpoint in the same MLflow run, and retries
failed ones. A cell finished by other code or on other data is stale: ``--dry-run`` marks it, a run redoes it
(``--keep-stale`` keeps it instead).

Latency (a grid): once every cell of a backbone has finished, its variants and its RT-DETR baseline are timed side
by side, interleaved, in 3 separate processes, from the cells' checkpoints (studies/execution/latency_step.py); one MLflow
run per backbone (role "benchmark") holds each variant's latency change with a 95% interval, measured once per set
of cells. ``--no-latency-benchmark`` leaves it out; a benchmark that fails is printed and recorded in its run, and
does not change the exit code. Exit code:
0 when every run finished, 1 when some failed (listed at the end), 2 for a usage or configuration
error (before any work), 130 when interrupted.
"""  # noqa: E501 - the text of --help as it was, with the paths of the modules it names


def list_studies() -> int:
    rows = []
    for name in study_names():
        try:
            st = load_study(name)
            size = (f"{len(grid_cells(st))} runs" if st.kind == "grid" else f"{st.search.n_trials} trials")
            rows.append([name, st.kind, size, st.budget or "none", st.description])
        except (StudyError, ConfigError) as exc:
            rows.append([name, "?", "?", "?", f"(invalid: {exc})"])
    print(table(rows, ["study", "kind", "size", "budget", "description"]))
    budgets = sorted(p.stem[len("budget_"):] for p in PRESET_DIR.glob("budget_*.yaml"))
    print(f"\nbudgets (budget=NAME, dset/configs/budget_NAME.yaml): {', '.join(budgets)}")
    print("run one: python -m studies.run STUDY [key=value ...] [--workers N] [--dry-run] [--storage URL]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m studies.run", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=USAGE, epilog=HELP_EPILOG)
    ap.add_argument("args", nargs="*", metavar="STUDY [key=value ...]",
                    help=f"a study ({', '.join(study_names())}) or a study YAML file, then overrides")
    ap.add_argument("--list", action="store_true", help="list the shipped studies and budgets")
    ap.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process (default 1); with "
                    "GPUs each worker gets one of its own (round-robin, with a warning, when there are fewer GPUs)")
    ap.add_argument("--devices", default=None, metavar="0,2,...", help="the GPUs the workers use (indices among "
                    "the visible ones; default: all)")
    ap.add_argument("--dry-run", action="store_true", help="print the cells or the search space and the budget")
    ap.add_argument("--status", action="store_true", help="where the study stands in MLflow: each cell done, running "
                    "(where, how many epochs), interrupted, failed, stale or waiting (read-only)")
    ap.add_argument("--storage", default=None, help="Optuna storage URL holding the study's queue of cells and trials "
                    "(default: a journal file in the study's output folder, for one machine); "
                    "postgresql://user:pw@host/db shares a study between machines")
    ap.add_argument("--keep-stale", action="store_true", help="count a finished cell as done even when other code "
                    "or data made it (by default such a stale cell is run again; --dry-run marks it)")
    ap.add_argument("--no-latency-benchmark", action="store_true", help="a grid: do not time each backbone's "
                    "variants and baseline side by side once its cells have finished "
                    "(studies/execution/latency_step.py)")
    ap.add_argument("--slurm", action="store_true", help="submit the study's workers as a SLURM job array "
                    "(submitit): slurm.tasks invocations of the study, with the resources of the study's slurm: "
                    "section or slurm.KEY=VALUE overrides; needs --storage postgresql://... and an mlflow server "
                    "(docs/slurm.md)")
    ap.add_argument("--wait", action="store_true", help="with --slurm: follow the array until its tasks have ended, "
                    "then print where the study stands (exit 1 unless every cell is done)")
    ap.add_argument("-v", "--verbose", action="store_true", help="per-epoch log lines of every run")
    return ap


def _load(name: str, overrides: list[str]) -> tuple[Study, list[Cell] | None]:
    """The study and, for a grid, its cells; a search's base configuration is resolved too, since stage 1
    must be available before anything runs."""
    study = load_study(name, overrides)
    cells = grid_cells(study) if study.kind == "grid" else None
    if study.kind == "optuna":
        make_cell(study, "base", {}, study.seeds[0])
    return study, cells


def _nothing_can_run(study: Study, cells: list[Cell] | None) -> str | None:
    """The error when every cell (or a search's base configuration) is invalid: nothing is run then."""
    if cells is not None and cells and all(not c.ok for c in cells):
        return f"every cell of {study.name} is invalid (nothing was run): {cells[0].error}"
    if study.kind == "optuna":
        base = make_cell(study, "base", {}, study.seeds[0])
        if not base.ok:
            return f"the base configuration of {study.name} is invalid (nothing was run): {base.error}"
    return None


def run_study(study: Study, cells: list[Cell] | None, uri: str, workers: int, storage: str | None,
              keep_stale: bool, slots: list[Slot], latency_benchmark: bool = True) -> int:
    """Run the study's cells or trials (this invocation's share of them), then, for a grid, the latency benchmark
    of each backbone whose cells have all finished (unless ``latency_benchmark`` is false); the exit code."""
    stop_signals.install()
    if workers == 1:  # this process trains: its GPU is chosen before anything starts CUDA
        os.environ.update(slots[0].env)
    n = len(cells) if cells is not None else study.search.n_trials
    say(f"study {study.name}: {n} {'runs' if cells is not None else 'trials'}, {workers} worker(s), "
        f"budget {study.budget}; MLflow {uri}; outputs {study.study_dir}/")
    inv = Invocation(study, uri, workers, storage, keep_stale, slots)
    try:
        if cells is not None:
            run_grid(cells, inv.runs, inv.progress, inv.jobs, inv.queues, inv.scheduler)
            if latency_benchmark:
                benchmark_grid(cells, inv.runs)
        else:
            inv.optuna_study = run_search(study, inv.runs, inv.progress, inv.jobs, inv.queues, inv.scheduler)
    except KeyboardInterrupt:
        inv.interrupted()
        print(f"\ninterrupted; run the same command again to resume ({inv.progress.done}/{inv.progress.total} done)",
              file=sys.stderr)
        return 130
    return inv.finish()


def task_arguments(ns: argparse.Namespace, name: str, overrides: list[str]) -> list[str]:
    """The arguments of ``python -m studies.run`` that each SLURM task runs: this command's, less --slurm/--wait."""
    argv = [name, *overrides, "--workers", str(ns.workers)]
    if ns.storage:
        argv += ["--storage", ns.storage]
    if ns.devices:
        argv += ["--devices", ns.devices]
    argv += [flag for flag, on in (("--keep-stale", ns.keep_stale), ("--no-latency-benchmark",
             ns.no_latency_benchmark), ("--verbose", ns.verbose)) if on]
    return argv


def submit_to_slurm(ns: argparse.Namespace, study: Study, cells: list[Cell] | None, uri: str,
                    overrides: list[str]) -> int:
    """``--slurm``: submit (or, with --dry-run, show) the study's job array; with --wait, follow it to its end."""
    n_items = len(cells) if cells is not None else study.search.n_trials
    task = make_task(main, task_arguments(ns, ns.args[0], overrides), uri, study.slurm.requeue)
    if ns.dry_run:
        return dry_run_slurm(study, n_items, task, ns.storage, uri)
    problems = unsharable_storage(ns.storage, uri) + [e for e in [_nothing_can_run(study, cells)] if e]
    if problems:
        for problem in problems:
            print(f"error: cannot submit to SLURM: {problem}", file=sys.stderr)
        return 2
    try:
        jobs = submit(study, n_items, task)
    except Exception as exc:  # noqa: BLE001 - sbatch missing or refusing: say why, submit nothing
        print(f"error: SLURM refused the submission: {type(exc).__name__}: {str(exc).strip()}", file=sys.stderr)
        return 2
    job_id = array_id(jobs)
    say(f"submitted study {study.name} to SLURM: job array {job_id}, {len(jobs)} task(s); logs:")
    for job in jobs:
        print(f"  task {job.job_id}: {job.paths.stdout}")
    status = redact(shlex.join(["python", "-m", "studies.run", *ns.args, "--status"]
                               + (["--storage", ns.storage] if ns.storage else [])))
    print(f"where it stands: {status} (or squeue -j {job_id}); stop it: scancel {job_id}")
    if not ns.wait:
        return 0
    try:
        wait_for_array(job_id)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the array goes on (scancel {job_id} stops it)", file=sys.stderr)
        return 130
    return study_status(study, cells, uri, ns.keep_stale, unfinished_code=1, storage=ns.storage)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    ns = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("dset").setLevel(logging.INFO if ns.verbose else logging.WARNING)
    quiet_mlflow()
    if ns.list:
        return list_studies()
    if not ns.args:
        ap.error("STUDY is required (python -m studies.run --list shows them)")
    if ns.workers < 1:
        ap.error("--workers must be >= 1")
    name, overrides = ns.args[0], ns.args[1:]
    if "=" in name:
        ap.error(f"the study must come first, got {name!r}")
    try:
        study, cells = _load(name, overrides)
    except (StudyError, ConfigError, PretrainError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uri = tracking_uri()
    try:
        slots, device_warning = plan_for_invocation(ns.workers, ns.devices)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device_warning:
        log.warning("warning: %s", device_warning)
    if ns.status:
        return study_status(study, cells, uri, ns.keep_stale, storage=ns.storage)
    if ns.slurm:
        return submit_to_slurm(ns, study, cells, uri, overrides)
    if ns.wait:
        ap.error("--wait follows a SLURM submission: use it with --slurm")
    if ns.dry_run:
        code = dry_run(study, cells, uri, ns.storage, ns.workers, ns.keep_stale)
        print("devices: " + ", ".join(f"worker {i + 1}: {sl.label}" for i, sl in enumerate(slots)))
        return code
    error = _nothing_can_run(study, cells)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return run_study(study, cells, uri, ns.workers, ns.storage, ns.keep_stale, slots,
                     latency_benchmark=not ns.no_latency_benchmark)


if __name__ == "__main__":
    raise SystemExit(main())
