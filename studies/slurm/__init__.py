"""A study on a SLURM cluster: its submission as a job array through submitit (:mod:`.submit`) and what each
array task runs (:mod:`.task`); the ``slurm:`` settings are read with the study (studies/planning/slurm_settings.py).
How to use it: docs/slurm.md."""
