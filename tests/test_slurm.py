"""Studies on a real SLURM cluster (tests/slurm_cluster.py: slurmctld and slurmd on 127.0.0.1, a node of 2 CPUs),
submitted with ``--slurm`` through submitit against PostgreSQL (the queue) and an mlflow server: a two-task
array runs a grid with each cell once; a cancelled task's cell is resumed by the other task; a task signalled
before its time limit requeues itself and resumes its cell. Each epoch is logged once, in one run per cell.

The cells are tiny (the smoke budget: 64 px, 2 steps an epoch) and start from their own initial weights
(``pretrain=none``), so each test takes well under a minute."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import pytest
import yaml

from studies.run import main
from studies.slurm import submit
from studies.tracking import schema

pytestmark = pytest.mark.slow

BASE = {"model.encoder_moe.enabled": False, "model.token_pruning.enabled": False, "model.decoder_moe.enabled": False}
DMOE = {**BASE, "model.decoder_moe.enabled": True}
EMOE = {**BASE, "model.encoder_moe.enabled": True}


@pytest.fixture
def on_cluster(tmp_path, monkeypatch, postgres, mlflow_server, slurm_cluster):
    """A study file, its arguments and the environment of a submission to the test cluster (the tasks inherit it:
    sbatch exports the submitting environment)."""
    def setup(variants: dict, *extra: str) -> tuple[str, list[str], str]:
        name = f"slurm_{uuid.uuid4().hex[:8]}"   # one mlflow server serves every test of the session
        study = tmp_path / f"{name}.yaml"
        study.write_text(yaml.safe_dump({"kind": "grid", "budget": "smoke", "seeds": [0], "pretrain": "none",
                                         "grid": {"backbone": {"r18": {"preset": "rtdetr_r18"}},
                                                  "variant": variants}}))
        storage = postgres.create_database(f"q_{name}")
        args = [str(study), f"out_dir={tmp_path / 'runs'}", f"data.synthetic.root={tmp_path / 'synthetic'}",
                "train.profile=false", "slurm.cpus_per_task=1", "--storage", storage, "--no-latency-benchmark",
                "--slurm", *extra]
        return name, args, storage

    monkeypatch.chdir(tmp_path)
    for key, value in {**slurm_cluster.env(), "MLFLOW_TRACKING_URI": mlflow_server, "OMP_NUM_THREADS": "1",
                       "DSET_QUEUE_HEARTBEAT_S": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(submit, "WAIT_POLL_S", 1.0)
    return setup


def children(uri: str, experiment: str) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    runs = [] if exp is None else c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=100)
    return [r for r in runs if r.data.tags.get(schema.TAG_ROLE) == "child"]


def steps(uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def submitted_array(out: str) -> str:
    line = next(ln for ln in out.splitlines() if "submitted study" in ln)
    return line.split("job array ")[1].split(",")[0]


def task_logs(experiment: str) -> str:
    return "\n".join(f"--- {log}\n{log.read_text()[-2000:]}"
                     for log in sorted((Path(os.getcwd()) / "runs" / experiment / "slurm").glob("*_log.out")))


def wait_for_cell_at_epoch(uri: str, experiment: str, job: str, epochs: int, timeout: float = 180):
    """The first RUNNING cell with ``epochs`` epochs logged in MLflow (its run); fails at once when the array
    has ended (with its tasks' logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in children(uri, experiment):
            if r.info.status == "RUNNING" and len(steps(uri, r.info.run_id)) >= epochs:
                return r
        if not submit.squeue_states(job):
            raise AssertionError(f"array {job} ended before a cell logged {epochs} epochs:\n{task_logs(experiment)}")
        time.sleep(0.3)
    raise AssertionError(f"no cell of {experiment} reached {epochs} logged epochs in {timeout:.0f} s:\n"
                         + task_logs(experiment))


def assert_one_clean_run_per_cell(uri: str, experiment: str, cells: list[str], epochs: int) -> dict:
    runs = children(uri, experiment)
    live = [r for r in runs if r.info.lifecycle_stage == "active"]
    assert sorted(r.data.tags[schema.TAG_CELL] for r in live) == sorted(cells)      # one run per cell
    assert {r.info.status for r in live} == {"FINISHED"}
    for r in live:
        for key in ("train/loss", "val/mAP"):
            assert steps(uri, r.info.run_id, key) == list(range(epochs)), (r.data.tags[schema.TAG_CELL], key)
    return {r.data.tags[schema.TAG_CELL]: r for r in live}


def test_a_two_task_array_runs_each_cell_once(on_cluster, mlflow_server, slurm_cluster, capsys):
    name, args, _ = on_cluster({"off": BASE, "dmoe": DMOE, "emoe": EMOE}, "train.epochs=2", "slurm.tasks=2",
                               "--wait")
    t0 = time.monotonic()
    code = main(args)
    out = capsys.readouterr().out
    assert code == 0, out + task_logs(name)
    assert f"study {name}: 3 done of 3 cells" in out, out                 # --wait ends with the study's status
    job = submitted_array(out)
    by_cell = assert_one_clean_run_per_cell(mlflow_server, name, ["r18-base-s0", "r18-dmoe-s0", "r18-emoe-s0"], 2)
    assert {r.data.tags[schema.TAG_SLURM_JOB] for r in by_cell.values()} <= {f"{job}_0", f"{job}_1"}
    tasks = slurm_cluster.sacct(job)
    assert sorted(t["ArrayTaskID"] for t in tasks) == ["0", "1"], slurm_cluster.sacct_table(job)
    assert {(t["State"], t["ExitCode"]) for t in tasks} == {("COMPLETED", "0:0")}, slurm_cluster.sacct_table(job)
    print(f"\n[two-task array, 3 cells x 2 epochs: {time.monotonic() - t0:.0f} s]\n{slurm_cluster.sacct_table(job)}")


def test_a_cancelled_task_has_its_cell_resumed_by_the_other(on_cluster, mlflow_server, slurm_cluster, capsys):
    """scancel of one task mid-cell: SIGTERM saves the cell's resume state, marks its run KILLED and gives its
    claim back; the other task resumes the cell from last.pt into the same run."""
    name, args, _ = on_cluster({"off": BASE, "dmoe": DMOE}, "train.epochs=6", "train.checkpoint_every_minutes=1e-6",
                               "slurm.tasks=2")
    assert main(args) == 0
    job = submitted_array(capsys.readouterr().out)
    victim = wait_for_cell_at_epoch(mlflow_server, name, job, 2)
    task = victim.data.tags[schema.TAG_SLURM_JOB]
    assert task in (f"{job}_0", f"{job}_1")
    status = [a for a in args if a != "--slurm"] + ["--status"]
    assert main(status) == 0                                  # where the study stands, from MLflow and the queue
    out = capsys.readouterr().out
    cell = victim.data.tags[schema.TAG_CELL]
    assert re.search(rf"{cell}\s+running\s+on \S+ \(pid \d+, SLURM job {task}\), \d epoch\(s\) logged", out), out
    slurm_cluster.run("scancel", task)
    submit.wait_for_array(job, poll_s=1.0)
    by_cell = assert_one_clean_run_per_cell(mlflow_server, name, ["r18-base-s0", "r18-dmoe-s0"], 6)
    resumed = by_cell[victim.data.tags[schema.TAG_CELL]]
    assert resumed.info.run_id == victim.info.run_id                       # the same MLflow run, resumed
    other = f"{job}_1" if task.endswith("_0") else f"{job}_0"
    assert resumed.data.tags[schema.TAG_SLURM_JOB] == other                 # finished by the other task
    states = {t["ArrayTaskID"]: t["State"] for t in slurm_cluster.sacct(job)}
    assert states == {task.split("_")[1]: "CANCELLED", other.split("_")[1]: "COMPLETED"}, \
        slurm_cluster.sacct_table(job)
    assert main(status) == 0
    assert f"study {name}: 2 done of 2 cells" in capsys.readouterr().out
    print(f"\n[cancelled {task}]\n{slurm_cluster.sacct_table(job)}")


def test_a_task_signalled_before_its_time_limit_requeues_and_resumes(on_cluster, mlflow_server, slurm_cluster,
                                                                      capsys):
    """SIGUSR2 (what ``--signal=USR2@S`` sends S seconds before the time limit): the task saves its cell's resume
    state, gives its claim back and requeues itself; running again, it resumes the cell into the same run."""
    name, args, _ = on_cluster({"off": BASE}, "train.epochs=4", "train.checkpoint_every_minutes=1e-6",
                               "slurm.tasks=1")
    assert main(args) == 0
    job = submitted_array(capsys.readouterr().out)
    victim = wait_for_cell_at_epoch(mlflow_server, name, job, 2)
    task = victim.data.tags[schema.TAG_SLURM_JOB]
    assert task == job                                 # submitit submits one task as a plain job, not an array
    slurm_cluster.run("scancel", "--signal=USR2", task)
    submit.wait_for_array(job, poll_s=1.0)
    by_cell = assert_one_clean_run_per_cell(mlflow_server, name, ["r18-base-s0"], 4)
    assert by_cell["r18-base-s0"].info.run_id == victim.info.run_id
    log = (Path(os.getcwd()) / "runs" / name / "slurm" / f"{job}_0_log.out").read_text()
    assert f"slurm: job {job}" in log and "requeued; its cell resumes from its last checkpoint" in log, log[-3000:]
    assert "resuming from" in log, log[-3000:]
    # the job-completion log: the signalled instance ended requeued (logged as PENDING), then the job completed
    assert [r["JobState"] for r in slurm_cluster.jobcomp_records(job)] == ["PENDING", "COMPLETED"], \
        slurm_cluster.sacct_table(job)
    print(f"\n[USR2 to {job}]\n{slurm_cluster.sacct_table(job)}")
