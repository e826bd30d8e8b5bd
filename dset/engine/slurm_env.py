"""The ``torchrun`` environment of a process that ``srun`` started as one task of a multi-task SLURM step, so that
``srun python -m dset.train ...`` inside ``sbatch --ntasks=N`` (one task per GPU, on one node or several) trains one
run with DDP: RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from SLURM's task variables, MASTER_ADDR the first
node of the step and MASTER_PORT one every task derives from the job id. docs/slurm.md shows the job script."""

from __future__ import annotations

import re
from collections.abc import Mapping

PORT_BASE, PORT_SPAN = 20000, 20000     # MASTER_PORT = PORT_BASE + job id % PORT_SPAN, unless MASTER_PORT is set


def first_host(hostlist: str) -> str:
    """The first host of a SLURM host list: ``node[03-05,9],gpu1`` -> ``node03`` (zero padding kept)."""
    m = re.match(r"^([^,\[]*)(?:\[([^\]]+)\])?([^,]*)", hostlist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ValueError(f"not a SLURM host list: {hostlist!r}")
    prefix, ranges, suffix = m.groups()
    if ranges is None:
        return prefix + suffix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def torch_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables ``torchrun`` would set, for a process srun started as one of several tasks of a step; empty
    when torchrun's variables are there already, or the process is not such a task (the batch script itself, a
    one-task step: then it trains alone)."""
    if "WORLD_SIZE" in environ or "RANK" in environ:
        return {}
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or 0)   # set by srun, for the tasks of its step only
    if tasks <= 1 or "SLURM_PROCID" not in environ:
        return {}
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise ValueError("a SLURM step of several tasks without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: cannot "
                         "tell which node holds rank 0")
    job = int(environ.get("SLURM_JOB_ID") or 0)
    env = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(tasks),
           "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
           "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodes),
           "MASTER_PORT": environ.get("MASTER_PORT") or str(PORT_BASE + job % PORT_SPAN)}
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", "")   # e.g. "4(x2)" or "2,1"
    m = re.match(r"^(\d+)", per_node)
    if m:
        env["LOCAL_WORLD_SIZE"] = m.group(1)
    return env
