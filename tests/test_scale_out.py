"""One study shared by several invocations (studies/execution/queue.py): each cell runs exactly once, a dead
invocation's cell is taken over and resumed into the same MLflow run, on PostgreSQL + ``mlflow server``
(several machines) and on the default SQLite store + journal file (one machine); and which GPU each worker
gets (studies/execution/devices.py).

The invocations are real ``python -m studies.run`` processes on the smoke budget (64 px, 2 steps an epoch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from dset import metric_names as M
from studies.execution.devices import DeviceError, Slot, parse_devices, plan_devices
from studies.run import main
from studies.tracking import schema

REPO = Path(__file__).resolve().parents[1]
GRID = {"backbone": {"r18": {"preset": "rtdetr_r18"}},
        "variant": {"off": {"model.encoder_moe.enabled": False, "model.token_pruning.enabled": False,
                            "model.decoder_moe.enabled": False},
                    "dmoe": {"model.encoder_moe.enabled": False, "model.token_pruning.enabled": False,
                             "model.decoder_moe.enabled": True},
                    "emoe": {"model.encoder_moe.enabled": True, "model.token_pruning.enabled": False,
                             "model.decoder_moe.enabled": False}}}
CELLS = ["r18-base-s0", "r18-dmoe-s0", "r18-emoe-s0"]

KILLER = """
import os, signal, sys
from studies.tracking.callback import MlflowCallback

original = MlflowCallback.on_epoch_end


def on_epoch_end(self, epoch, metrics):
    if epoch == 1 and "stage 1" not in self.title:   # a cell's epoch 1 is on disk: die without any clean-up
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, epoch, metrics)


MlflowCallback.on_epoch_end = on_epoch_end
from studies.run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
"""


def study_file(tmp_path: Path, grid: dict = GRID) -> Path:
    """A uniquely named grid study (one MLflow server serves every test of the session)."""
    path = tmp_path / f"shared_{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump({"kind": "grid", "budget": "smoke", "seeds": [0], "grid": grid}))
    return path


def invocation(tmp_path: Path, study: Path, tracking_uri: str, *extra: str, script: str | None = None,
               env: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, *([script] if script else ["-m", "studies.run"]), str(study),
            f"out_dir={tmp_path / 'runs'}", f"data.synthetic.root={tmp_path.parent / 'synthetic_shared'}",
            "train.profile=false", *extra]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": tracking_uri,
                "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", **(env or {})}
    return subprocess.Popen(args, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(*procs: subprocess.Popen, timeout: float = 600) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=timeout)
        out.append((p.returncode, text))
    return out


def runs_of(uri: str, experiment: str) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=500)


def epochs_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_each_cell_once(uri: str, study: Path, tmp_path: Path, epochs: int, invocations: int = 2) -> dict:
    """One FINISHED MLflow run per cell, trained once (each epoch in metrics.jsonl once), every invocation's
    parent run FINISHED. Returns the child runs by cell."""
    runs = runs_of(uri, study.stem)
    children = [r for r in runs if r.data.tags.get(schema.TAG_ROLE) == "child"]
    by_cell = {r.data.tags[schema.TAG_CELL]: r for r in children}
    assert sorted(r.data.tags[schema.TAG_CELL] for r in children) == CELLS            # no cell twice
    assert {r.info.status for r in children} == {"FINISHED"}
    parents = [r for r in runs if r.data.tags.get(schema.TAG_ROLE) == "parent"]
    assert len(parents) == invocations and {r.info.status for r in parents} == {"FINISHED"}
    assert len({r.data.tags[schema.TAG_PID] for r in children}) >= 2   # the work was shared, not done by one
    for r in children:
        run_dir = Path(r.data.tags[schema.TAG_CHECKPOINT_DIR]).parent
        assert epochs_logged(run_dir) == list(range(epochs)), r.data.tags[schema.TAG_CELL]
        m = r.data.metrics
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (m[M.TRAIN_IMAGES_PER_S] == pytest.approx(summary["metrics"][M.TRAIN_IMAGES_PER_S])
                and m[M.TRAIN_IMAGES_PER_S] > 0)
        assert m[M.EVAL_IMAGES_PER_S] > 0 and m[M.PEAK_HOST_MEMORY_MB] > 100   # torch alone takes more
        assert M.PEAK_GPU_MEMORY_MB not in m                                  # a CPU run
        assert "system/cpu_utilization_percentage" in m and "system/system_memory_usage_megabytes" in m
        assert r.data.tags[schema.TAG_DEVICE_SHARED] == "false"                    # one worker per invocation
    return by_cell


def queue_trials(storage: str, study: Path) -> list:
    """The trials of the study's cell queue in the Optuna storage (a URL or a journal file path)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    st = JournalStorage(JournalFileBackend(storage)) if not storage.startswith("postgresql") else storage
    names = [s.study_name for s in optuna.get_all_study_summaries(st)
             if s.study_name.startswith(f"{study.stem}-cells-")]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=st).get_trials(deepcopy=False)


def assert_one_complete_claim_per_cell(trials) -> None:
    from studies.execution.claims import ATTR_KEY, ATTR_LABEL

    complete = [t.user_attrs[ATTR_LABEL] for t in trials if t.state.name == "COMPLETE" and ATTR_KEY in t.user_attrs]
    assert sorted(complete) == CELLS


# ------------------------------------------------------------------------------ PostgreSQL + mlflow server
@pytest.mark.slow
def test_invocations_on_postgresql_started_together_and_3s_apart_run_each_cell_once(tmp_path, postgres,
                                                                                     mlflow_server):
    """Two invocations started at the same moment on a fresh queue, and a third 3 s later (one study: each
    case costs a whole study otherwise)."""
    storage = postgres.create_database(f"queue_{uuid.uuid4().hex[:8]}")
    study = study_file(tmp_path)
    together = [invocation(tmp_path, study, mlflow_server, "--storage", storage, "train.epochs=2") for _ in range(2)]
    time.sleep(3)
    later = invocation(tmp_path, study, mlflow_server, "--storage", storage, "train.epochs=2")
    for code, text in finish(*together, later):
        assert code == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    by_cell = assert_each_cell_once(mlflow_server, study, tmp_path, epochs=2, invocations=3)
    assert_one_complete_claim_per_cell(queue_trials(storage, study))
    # the report reads everything through the server, the evaluation artifacts too
    from analysis.compute.evaluations import evaluations
    from analysis.compute.loading import load_study_results

    evaluated = evaluations(load_study_results(study.stem, mlflow_server), [r.info.run_id for r in by_cell.values()])
    assert not [v for v in evaluated.values() if isinstance(v, str)], evaluated


@pytest.mark.slow
def test_a_killed_invocation_on_another_host_is_taken_over_by_heartbeat(tmp_path, postgres, mlflow_server):
    """kill -9 of an invocation mid-cell, on a 'machine' whose process ids nobody can check: its claim's
    heartbeat stops, and the other invocation resumes the cell from last.pt into the same MLflow run."""
    storage = postgres.create_database(f"queue_{uuid.uuid4().hex[:8]}")
    study = study_file(tmp_path, {"backbone": GRID["backbone"], "variant": {"off": GRID["variant"]["off"],
                                                                           "dmoe": GRID["variant"]["dmoe"]}})
    (tmp_path / "killer.py").write_text(KILLER)
    common = ["--storage", storage, "train.epochs=3", "train.checkpoint_every_minutes=1e-6"]
    beat = {"DSET_QUEUE_HEARTBEAT_S": "1"}
    doomed = invocation(tmp_path, study, mlflow_server, *common, script=str(tmp_path / "killer.py"),
                        env={**beat, "DSET_HOSTNAME": "other-machine"})
    deadline = time.time() + 300
    claimed = []
    while not claimed:   # wait until the doomed invocation has claimed a cell and opened its MLflow run
        claimed = [r for r in runs_of(mlflow_server, study.stem)
                   if r.data.tags.get(schema.TAG_HOST) == "other-machine"
                   and r.data.tags.get(schema.TAG_ROLE) == "child"]
        assert doomed.poll() is None and time.time() < deadline, doomed.communicate()[0][-3000:]
        time.sleep(0.5)
    cell, run_id = claimed[0].data.tags[schema.TAG_CELL], claimed[0].info.run_id
    survivor = invocation(tmp_path, study, mlflow_server, *common, env=beat)
    (code_doomed, text_doomed), (code, text) = finish(doomed, survivor)
    assert code_doomed == -9, text_doomed[-3000:]
    assert code == 0, text[-3000:]
    assert f"-> {cell}: resuming from" in text, text[-3000:]
    children = [r for r in runs_of(mlflow_server, study.stem) if r.data.tags.get(schema.TAG_ROLE) == "child"]
    assert sorted(r.data.tags[schema.TAG_CELL] for r in children) == ["r18-base-s0", "r18-dmoe-s0"]  # one run each
    assert {r.info.status for r in children} == {"FINISHED"}
    resumed = next(r for r in children if r.data.tags[schema.TAG_CELL] == cell)
    assert resumed.info.run_id == run_id                       # the same MLflow run
    run_dir = Path(resumed.data.tags[schema.TAG_CHECKPOINT_DIR]).parent
    assert epochs_logged(run_dir) == [0, 1, 2]                 # epochs 0 and 1 came from the killed invocation
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=mlflow_server).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2]       # all three epochs in that run, each once


# --------------------------------------------------------------------------- SQLite store + journal file
@pytest.mark.slow
def test_two_invocations_on_the_default_sqlite_store_and_journal(tmp_path):
    """The one-machine default: sqlite:///mlflow.db and the study's journal file, both created at the same
    moment by two invocations (MLflow's schema migration used to fail in the second), and a fresh stage 1,
    which only one of them trains."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = study_file(tmp_path)
    env = {"DSET_CACHE_DIR": str(tmp_path / "cache")}   # stage 1 not cached: the two must share its training
    first = invocation(tmp_path, study, uri, "train.epochs=2", env=env)
    second = invocation(tmp_path, study, uri, "train.epochs=2", env=env)
    for code, text in finish(first, second):
        assert code == 0, text[-3000:]
        assert "Traceback" not in text and "locked" not in text, text[-3000:]
    assert_each_cell_once(uri, study, tmp_path, epochs=2)
    pretrain = [r for r in runs_of(uri, study.stem) if r.data.tags.get(schema.TAG_ROLE) == "pretrain"]
    assert len(pretrain) == 1 and pretrain[0].info.status == "FINISHED"   # stage 1 trained once
    journal = tmp_path / "runs" / study.stem / "optuna_journal.log"
    assert_one_complete_claim_per_cell(queue_trials(str(journal), study))


# ---------------------------------------------------------------------------------------------- devices
def test_each_worker_gets_its_own_gpu():
    slots, warning = plan_devices(4, gpus=8)
    assert [s.env for s in slots] == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(4)]
    assert warning is None and not any(s.shared for s in slots)
    slots, _ = plan_devices(2, gpus=8, devices=parse_devices("2,5"))
    assert [s.visible for s in slots] == ["2", "5"]
    # indices count among the GPUs the invoking process may see
    slots, _ = plan_devices(2, gpus=2, devices=[1, 0], visible_env="4,6")
    assert [s.visible for s in slots] == ["6", "4"]


def test_more_workers_than_gpus_share_them_with_a_warning():
    slots, warning = plan_devices(3, gpus=2)
    assert [s.visible for s in slots] == ["0", "1", "0"]
    assert [s.sharers for s in slots] == [2, 1, 2]
    assert "shared round-robin" in warning
    assert slots[0].note() == "; GPU 0 shared by 2 workers while measured" and slots[1].note() == "; GPU 1 to itself"


def test_without_gpus_workers_share_the_cpu():
    slots, warning = plan_devices(2, gpus=0)
    assert slots == [Slot(None, "CPU", 2)] * 2 and warning is None
    assert slots[0].env == {} and "CPU shared by 2 workers" in slots[0].note()
    assert plan_devices(1, gpus=0)[0][0].note() == ""


@pytest.mark.parametrize("text,error", [("0,9", "GPU index 9 does not exist"), ("a,b", "expected GPU indices"),
                                        ("1,1", "distinct")])
def test_bad_devices_are_refused(text, error):
    with pytest.raises(DeviceError, match=error):
        plan_devices(2, gpus=2, devices=parse_devices(text))


def test_devices_on_the_command_line_with_a_faked_gpu_count(monkeypatch, capsys, tmp_path):
    from studies.execution import devices

    monkeypatch.setattr(devices, "gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["smoke", "--workers", "3", "--dry-run", f"out_dir={tmp_path}"]) == 0
    out = capsys.readouterr()
    assert "devices: worker 1: GPU 0, worker 2: GPU 1, worker 3: GPU 0" in out.out
    assert main(["smoke", "--devices", "4", "--dry-run"]) == 2
    assert "GPU index 4 does not exist" in capsys.readouterr().err
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)
    assert main(["smoke", "--devices", "0", "--dry-run"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_status_reads_the_queue_to_tell_a_dead_claim_elsewhere_from_a_live_one(tmp_path, postgres, monkeypatch):
    """A claim from another machine is alive while its heartbeat is renewed and dead once it has stopped for the
    grace period (4 beats): what ``--status`` says of a cell whose MLflow run still reads RUNNING there."""
    from studies.execution.queue import Queues, read_claims

    monkeypatch.setenv("DSET_QUEUE_HEARTBEAT_S", "1")
    desc = {"url": postgres.create_database(f"queue_{uuid.uuid4().hex[:8]}")}
    queue = Queues(desc, "claims", "other-machine", 4242).open("cells", ["cell-a", "cell-b"])
    queue.fill({"cell-a": "a", "cell-b": "b"})
    trial = queue.claim(["cell-a", "cell-b"])
    key = trial.user_attrs["dset.queue_key"]
    views = read_claims(desc, queue.name, "this-machine")
    assert views[key].state == "RUNNING" and not views[key].dead
    assert (views[key].host, views[key].pid) == ("other-machine", 4242)
    assert {k: v.state for k, v in views.items() if k != key} == {({"cell-a", "cell-b"} - {key}).pop(): "WAITING"}
    time.sleep(3)
    assert not read_claims(desc, queue.name, "this-machine")[key].dead        # beating: alive after 3 s
    queue.heartbeat.remove(trial._trial_id)                                   # the worker dies: no more beats
    time.sleep(5.5)
    assert read_claims(desc, queue.name, "this-machine")[key].dead
    assert read_claims(desc, "no-such-queue", "this-machine") == {}
