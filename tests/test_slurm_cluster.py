"""The test SLURM cluster (tests/slurm_cluster.py, fixture ``slurm_cluster``) runs a real job array: both
tasks run on its node, and sacct (the job-completion log: there is no slurmdbd) shows them COMPLETED
with exit code 0:0."""

from __future__ import annotations

import socket
import time

from slurm_cluster import NODE


def wait_gone(cluster, job_id: str, timeout: float = 60) -> None:
    """Poll ``squeue -h -j JOB`` until it lists nothing (once the record is purged squeue fails and prints
    nothing on stdout, which also means done)."""
    deadline = time.monotonic() + timeout
    while cluster.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout:.0f} s:\n" + \
            cluster.run("squeue", "-j", job_id, check=False).stdout
        time.sleep(0.2)


def test_array_of_two_tasks_completes(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = f'echo "$SLURM_ARRAY_TASK_ID $(hostname)" > {out}/task_$SLURM_ARRAY_TASK_ID.txt'
    submitted = slurm_cluster.run("sbatch", "--parsable", "--array=0-1", "--job-name=dset-array",
                                  f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%A_%a.out", "--wrap", script)
    job = submitted.stdout.strip().split(";")[0]  # "JOBID" or "JOBID;CLUSTER"
    wait_gone(slurm_cluster, job)

    for task in (0, 1):
        path = out / f"task_{task}.txt"
        assert path.exists(), f"task {task} wrote nothing; {sorted(p.name for p in tmp_path.rglob('*'))}"
        assert path.read_text().split() == [str(task), socket.gethostname()]

    records = slurm_cluster.sacct(job)
    table = slurm_cluster.sacct_table(job)
    assert sorted(r["ArrayTaskID"] for r in records) == ["0", "1"], table
    for r in records:
        assert (r["State"], r["ExitCode"], r["NodeList"], r["JobName"]) == \
            ("COMPLETED", "0:0", NODE, "dset-array"), table
