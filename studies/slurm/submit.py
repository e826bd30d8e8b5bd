"""``python -m studies.run STUDY --slurm``: the study's workers submitted as one SLURM job array through submitit.
Every task is one invocation of the same study against storage all nodes share (the queue in PostgreSQL, the runs
in an mlflow server); ``--dry-run --slurm`` shows the submission without making it, ``--wait`` follows the array to
its end and prints where the study stands. docs/slurm.md is the manual."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..planning.study import Study
from ..tracking.mlflow_store import local_store_path, redact
from .task import StudyTask

WAIT_POLL_S = 10.0                 # how often --wait asks squeue where the array stands
# what the tasks need from the submitting shell, whatever the site's --export default
FORWARDED_ENV = ("DSET_CACHE_DIR", "DSET_QUEUE_HEARTBEAT_S", "DSET_DATA_DIR", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def unsharable_storage(storage: str | None, uri: str) -> list[str]:
    """Why the tasks, on other nodes, could not share this study's queue or runs (empty: they can)."""
    problems = []
    if not storage or storage.startswith("sqlite"):
        where = "the default journal file in the study's output folder" if not storage else storage
        problems.append(f"the queue of cells: {where} cannot be shared safely by processes on several nodes; give "
                        "--storage postgresql://USER:PASSWORD@DBHOST/DB (a PostgreSQL server every node reaches)")
    if local_store_path(uri) is not None:
        problems.append(f"the MLflow store: {uri} is a file on this machine; start an mlflow server backed by "
                        "PostgreSQL and set MLFLOW_TRACKING_URI=http://HOST:PORT")
    return problems


def executor_parameters(study: Study, tasks: int) -> dict:
    """The parameters given to submitit's SlurmExecutor (its names; ``--dry-run --slurm`` prints them)."""
    s = study.slurm
    params = {"job_name": s.job_name or f"dset-{study.name}", "time": s.time_min, "nodes": 1,
              "ntasks_per_node": 1, "cpus_per_task": s.cpus_per_task, "signal_delay_s": s.signal_delay_s,
              "array_parallelism": tasks, "stderr_to_stdout": True}
    for key in ("partition", "mem", "account", "qos"):
        if getattr(s, key) is not None:
            params[key] = getattr(s, key)
    if s.gpus_per_task:
        params["gpus_per_task"] = s.gpus_per_task
    if s.setup:
        params["setup"] = list(s.setup)
    extra = dict(s.sbatch)
    if s.requeue:
        extra.setdefault("requeue", True)
    if extra:
        params["additional_parameters"] = extra
    return params


def sbatch_lines(params: dict, tasks: int) -> list[str]:
    """The sbatch options the submission amounts to, as ``#SBATCH`` lines (submitit writes the same script)."""
    shown = {"job-name": params["job_name"], "array": f"0-{tasks - 1}%{params['array_parallelism']}",
             "time": params["time"], "nodes": params["nodes"], "ntasks-per-node": params["ntasks_per_node"],
             "cpus-per-task": params["cpus_per_task"], "signal": f"USR2@{params['signal_delay_s']}"}
    for key in ("partition", "mem", "account", "qos", "gpus_per_task"):
        if key in params:
            shown[key.replace("_", "-")] = params[key]
    for key, value in params.get("additional_parameters", {}).items():
        shown[str(key).replace("_", "-")] = value
    return [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={v}" for k, v in shown.items()]


def log_folder(study: Study) -> Path:
    return Path(study.slurm.log_dir) if study.slurm.log_dir else study.study_dir / "slurm"


def make_task(entry, argv: list[str], uri: str, requeue: bool) -> StudyTask:
    """The task every array task runs: ``entry(argv)`` (studies.run.main) in the submission's folder, with the
    tracking URI and the variables of FORWARDED_ENV as they are here."""
    env = {"MLFLOW_TRACKING_URI": uri}
    for key in FORWARDED_ENV:
        if os.environ.get(key):
            value = os.environ[key]
            env[key] = str(Path(value).resolve()) if key.endswith("_DIR") else value
    return StudyTask(entry, argv, os.getcwd(), env, requeue)


def dry_run_slurm(study: Study, n_items: int, task: StudyTask, storage: str | None, uri: str) -> int:
    """Print what ``--slurm`` would submit; 2 when the storage cannot be shared (as the submission would)."""
    tasks = study.slurm.default_tasks(n_items)
    params = executor_parameters(study, tasks)
    print(f"SLURM job array of {tasks} task(s) for study {study.name} ({n_items} cells or trials), "
          f"logs in {log_folder(study)}/ (not submitted: --dry-run)")
    print("\n".join(sbatch_lines(params, tasks)))
    for line in params.get("setup", []):
        print(f"setup: {line}")
    env = " ".join(f"{k}={shlex.quote(redact(v))}" for k, v in sorted(task.env.items()))
    print(f"every task runs, in {task.cwd}:\n  {env} {sys.executable} -m studies.run "
          + redact(shlex.join(task.argv)))
    problems = unsharable_storage(storage, uri)
    for p in problems:
        print(f"error: cannot submit: {p}", file=sys.stderr)
    return 2 if problems else 0


def submit(study: Study, n_items: int, task: StudyTask) -> list:
    """Submit the array (the storage checked by the caller); submitit's jobs, one per task."""
    import submitit

    tasks = study.slurm.default_tasks(n_items)
    folder = log_folder(study).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, python=shlex.quote(sys.executable))
    executor.update_parameters(**executor_parameters(study, tasks))
    return executor.map_array(task, range(tasks))


def array_id(jobs: list) -> str:
    return str(jobs[0].job_id).split("_")[0]


def squeue_states(job_id: str) -> dict[str, str]:
    """``{task job id: state}`` of the array's tasks still queued or running (empty once all have ended)."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i %T %N"], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:   # the controller has forgotten the ended job (MinJobAge)
            return {}
        raise RuntimeError(f"squeue -j {job_id} failed (exit {out.returncode}): {out.stderr.strip()}")
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts:
            states[parts[0]] = " ".join(parts[1:])
    return states


def wait_for_array(job_id: str, poll_s: float | None = None) -> None:
    """Follow the array in squeue until none of its tasks is pending or running, printing each change."""
    poll_s = WAIT_POLL_S if poll_s is None else poll_s
    last = None
    while True:
        states = squeue_states(job_id)
        if states != last:
            print(f"{time.strftime('%H:%M:%S')} array {job_id}: "
                  + (", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "every task has ended"), flush=True)
            last = states
        if not states:
            return
        time.sleep(poll_s)
