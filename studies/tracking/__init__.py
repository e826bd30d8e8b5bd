"""What a study records in MLflow: the store (:mod:`.mlflow_store`), the names of tags, metrics and artifacts
(:mod:`.schema`), reading and writing runs (:mod:`.mlflow_runs`), logging a training run (:mod:`.callback`), the
runs of one invocation (:mod:`.invocation_runs`) and what a cell's earlier runs mean for it (:mod:`.cell_state`).
Imports ``dset`` and :mod:`studies.planning`."""
