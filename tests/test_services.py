"""The real services of tests/services.py work for what the studies need: an Optuna RDBStorage shared by two
processes' worth of connections on PostgreSQL, and an mlflow server that keeps runs and serves artifacts."""

from __future__ import annotations

import uuid

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState


def test_postgres_serves_optuna_rdb_storage(postgres):
    url = postgres.create_database("test_optuna_rdb")
    study = optuna.create_study(study_name="s", storage=url, direction="minimize")
    study.enqueue_trial({"x": 1.5})

    # a second, independent handle (as another worker would open) takes the enqueued trial ...
    other = optuna.load_study(study_name="s", storage=url)
    trial = other.ask()
    assert trial.suggest_float("x", 0, 2) == 1.5
    # ... and the first handle sees it RUNNING through the database
    (seen,) = study.get_trials(deepcopy=False)
    assert seen.number == trial.number and seen.state == TrialState.RUNNING


def test_mlflow_server_keeps_runs_and_artifacts(mlflow_server, tmp_path):
    client = MlflowClient(tracking_uri=mlflow_server)
    # a unique name: a server started by .ci/run (or by hand) outlives this session and keeps experiments
    experiment_id = client.create_experiment(f"test_services_{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "0.001")
    client.log_metric(run_id, "loss", 0.25, step=3)
    note = tmp_path / "note.txt"
    note.write_text("hello from test_services\n")
    client.log_artifact(run_id, str(note))
    client.set_terminated(run_id)

    got = client.get_run(run_id)
    assert got.data.params == {"lr": "0.001"} and got.data.metrics == {"loss": 0.25}
    assert got.info.status == "FINISHED"
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    back = client.download_artifacts(run_id, "note.txt", str(tmp_path / "down"))
    assert open(back).read() == "hello from test_services\n"
