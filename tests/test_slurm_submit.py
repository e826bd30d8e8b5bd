"""``--slurm`` without a cluster: the ``slurm:`` settings as read and refused, ``--dry-run --slurm`` (the sbatch
options and the command of every task), and the refusal to submit with storage other nodes cannot share."""

from __future__ import annotations

import signal

import pytest
import yaml

from studies.planning.slurm_settings import SlurmSettingsError, time_minutes
from studies.planning.study import StudyError, load_study
from studies.run import main

SERVER = "http://127.0.0.1:5999"
QUEUE = "postgresql://dset:s3cret@db.example/queue"


@pytest.mark.parametrize("text, minutes", [("90", 90), ("30:00", 30), ("1:30:00", 90), ("0:00:30", 1),
                                           ("2-00:00:00", 2880), ("1-12", 2160), ("45:30", 46)])
def test_slurm_time_formats(text, minutes):
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("override, error", [
    ("slurm.time=1:30:00", "quoted: YAML reads an unquoted 1:30:00 as the number 5400"),
    ("slurm.time=soon", "expected [D-]HH:MM:SS"),
    ("slurm.tasks=0", "slurm.tasks: expected an integer >= 1, got 0"),
    ("slurm.gpus_per_task=-1", "slurm.gpus_per_task: expected an integer >= 0"),
    ("slurm.requeue=maybe", "slurm.requeue: expected true or false"),
    ("slurm.partiton=gpu", "unknown keys ['partiton']"),
    ("slurm.sbatch=exclusive", "slurm.sbatch: expected a mapping"),
])
def test_bad_slurm_settings_are_refused_naming_the_key(override, error):
    with pytest.raises(StudyError, match=None) as info:
        load_study("smoke", [override])
    assert error in str(info.value)
    with pytest.raises(SlurmSettingsError):   # the settings' own error, for code that reads them directly
        time_minutes(5400)


def test_slurm_section_of_a_study_file_and_command_line_overrides(tmp_path):
    path = tmp_path / "on_cluster.yaml"
    study = yaml.safe_load(open(load_study("smoke").path))
    study["slurm"] = {"partition": "gpu", "time": "4:00:00", "gpus_per_task": 1, "mem": "32G",
                      "setup": ["module load cuda"], "sbatch": {"constraint": "a100"}}
    path.write_text(yaml.safe_dump(study))
    s = load_study(str(path), ["slurm.partition=debug", "slurm.tasks=3"]).slurm
    assert (s.partition, s.time_min, s.gpus_per_task, s.mem, s.tasks) == ("debug", 240, 1, "32G", 3)
    assert s.setup == ["module load cuda"] and s.sbatch == {"constraint": "a100"} and s.requeue


def test_dry_run_slurm_shows_the_submission_without_making_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)
    monkeypatch.setenv("DSET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))        # no sbatch: nothing can be submitted
    code = main(["smoke", "--slurm", "--dry-run", "--storage", QUEUE, f"out_dir={tmp_path / 'runs'}",
                 "slurm.partition=gpu", "slurm.time='1:30:00'", "slurm.gpus_per_task=1", "slurm.sbatch.qos=high",
                 "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "SLURM job array of 2 task(s) for study smoke (2 cells or trials)" in out   # one task per cell
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --time=90", "#SBATCH --partition=gpu",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --qos=high",
                 "#SBATCH --job-name=dset-smoke"):
        assert line + "\n" in out, line
    task_line = out.split("every task runs, in ")[1].splitlines()[1]
    assert f"MLFLOW_TRACKING_URI={SERVER}" in task_line and f"DSET_CACHE_DIR={tmp_path / 'cache'}" in task_line
    assert "-m studies.run smoke" in task_line and "--storage postgresql://dset:***@db.example/queue" in task_line
    assert "s3cret" not in out and "--slurm" not in task_line and "--dry-run" not in task_line
    assert not (tmp_path / "runs" / "smoke" / "slurm").exists()


def test_a_study_is_not_submitted_with_storage_other_nodes_cannot_share(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))        # were it submitted, sbatch would be missing
    assert main(["smoke", "--slurm", f"out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert ("cannot submit to SLURM: the queue of cells: the default journal file in the study's output folder "
            "cannot be shared safely by processes on several nodes; give --storage postgresql://") in err
    assert "the MLflow store: sqlite:///mlflow.db is a file on this machine" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)
    assert main(["smoke", "--slurm", "--storage", f"sqlite:///{tmp_path}/q.db", f"out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert f"the queue of cells: sqlite:///{tmp_path}/q.db cannot be shared" in err and "MLflow store" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_sbatch_failing_is_an_error_naming_it(tmp_path, monkeypatch, capsys):
    """A refused submission (here: no sbatch on PATH) exits 2 with submitit's reason, and nothing runs."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["smoke", "--slurm", "--storage", QUEUE, f"out_dir={tmp_path / 'runs'}"]) == 2
    assert "error: SLURM refused the submission:" in capsys.readouterr().err


def test_wait_needs_slurm(capsys):
    with pytest.raises(SystemExit) as info:
        main(["smoke", "--wait"])
    assert info.value.code == 2 and "--wait follows a SLURM submission" in capsys.readouterr().err


def test_the_signals_that_stop_a_study(monkeypatch):
    """SIGTERM (scancel, preemption) and SIGUSR2 (SLURM's warning before the time limit) stop a study as Ctrl-C
    does; the one that did is remembered, for a SLURM task to requeue itself after SIGUSR2 only."""
    from studies import stop_signals

    for sig in (signal.SIGTERM, signal.SIGUSR2):
        old = {s: signal.getsignal(s) for s in stop_signals.STOP_SIGNALS}
        try:
            stop_signals.install()
            assert stop_signals.stopped_by is None
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(sig)
            assert stop_signals.stopped_by == sig
            assert all(signal.getsignal(s) == signal.SIG_IGN for s in stop_signals.STOP_SIGNALS)  # then ignored
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            monkeypatch.setattr(stop_signals, "stopped_by", None)


def test_a_task_runs_the_study_where_it_was_submitted_and_requeues_only_after_sigusr2(tmp_path, monkeypatch):
    import os

    from studies import stop_signals
    from studies.slurm import task as task_module
    from studies.slurm.task import StudyTask, StudyTaskError

    monkeypatch.chdir("/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")   # the node's own setting loses
    monkeypatch.setattr(stop_signals, "stopped_by", None)
    requeued = []
    monkeypatch.setattr(task_module, "requeue_this_job", lambda: requeued.append(True))
    argv = ["smoke", "--storage", QUEUE]
    seen = []

    def study(args, code=0, signum=None):
        seen.append((args, os.getcwd(), os.environ["MLFLOW_TRACKING_URI"]))
        stop_signals.stopped_by = signum
        return code

    def make(entry):
        return StudyTask(entry, argv, str(tmp_path), {"MLFLOW_TRACKING_URI": SERVER}, requeue=True)

    assert make(study)(0) == 0
    assert seen == [(argv, str(tmp_path), SERVER)] and requeued == []
    # warned of its time limit: the study stopped (exit 130) and the task puts itself back in the queue
    assert make(lambda args: study(args, 130, signal.SIGUSR2))(1) == 130 and requeued == [True]
    # cancelled (SIGTERM) or failed: no requeue, and SLURM records the task as failed, the password hidden
    with pytest.raises(StudyTaskError, match=r"task 2: python -m studies.run smoke --storage "
                                             r"postgresql://dset:\*\*\*@db.example/queue exited with 130"):
        make(lambda args: study(args, 130, signal.SIGTERM))(2)
    assert requeued == [True]
