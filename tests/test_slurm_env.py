"""DDP under srun: the torchrun variables read from SLURM's, as srun sets them for each task of a step."""

from __future__ import annotations

import pytest

from dset.engine.slurm_env import first_host, torch_env_from_slurm

# what srun sets for task 5 of `sbatch --nodes=2 --ntasks-per-node=4` then `srun python -m dset.train ...`
TASK_5_OF_8 = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
               "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
               "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "8"}


@pytest.mark.parametrize("hostlist, first", [("node01", "node01"), ("gpu[07-08]", "gpu07"),
                                             ("a[3,1-2]-ib,b5", "a3-ib"), ("n[001-004],m1", "n001"),
                                             ("x1,y2", "x1")])
def test_first_host_of_a_slurm_host_list(hostlist, first):
    assert first_host(hostlist) == first


def test_a_task_of_a_multi_task_step_gets_its_rank_world_and_rendezvous():
    env = torch_env_from_slurm(TASK_5_OF_8)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242)}
    # every task derives the same rendezvous; a user's MASTER_PORT/MASTER_ADDR win
    other = torch_env_from_slurm({**TASK_5_OF_8, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert (other["MASTER_ADDR"], other["MASTER_PORT"]) == (env["MASTER_ADDR"], env["MASTER_PORT"])
    assert torch_env_from_slurm({**TASK_5_OF_8, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"


@pytest.mark.parametrize("change", [
    {"SLURM_STEP_NUM_TASKS": "1"},                       # a one-task step (a study's array task): trains alone
    {"SLURM_STEP_NUM_TASKS": None},                      # the batch script itself, python run without srun
    {"WORLD_SIZE": "2", "RANK": "0"},                    # torchrun inside the job: its variables are kept
])
def test_no_torch_variables_where_the_process_is_not_one_of_several_srun_tasks(change):
    environ = {k: v for k, v in {**TASK_5_OF_8, **change}.items() if v is not None}
    assert torch_env_from_slurm(environ) == {}


def test_setup_distributed_reads_slurm_variables(monkeypatch):
    """The training command's process group comes from SLURM's variables (the group's creation is recorded, not
    made: a world of two would wait for rank 1)."""
    import os

    import torch.distributed as dist

    from dset.engine.distributed import setup_distributed, teardown_distributed

    # a private copy of the environment: setup_distributed writes the torchrun variables into it
    environ = {k: v for k, v in os.environ.items()
               if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    environ.update(TASK_5_OF_8, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="2",
                   SLURM_STEP_NODELIST="localhost", MASTER_ADDR="127.0.0.1")
    monkeypatch.setattr(os, "environ", environ)
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend: seen.update(
        backend=backend, **{k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}))
    info = setup_distributed("cpu")
    teardown_distributed(info)
    assert seen == {"backend": "gloo", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(20000 + 4242)}
    assert info.created_group
