"""Running a study: its invocation (:mod:`.invocation`), the job sources (a grid's cells, stage 1, an Optuna
search's trials), the scheduler and the workers that train the runs on their devices, the queues that any number of
invocations share in Optuna's storage, and the latency step. Imports :mod:`studies.planning`,
:mod:`studies.tracking` and ``dset``."""
