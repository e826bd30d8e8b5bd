"""A throw-away one-node SLURM cluster on 127.0.0.1 for tests: munged, slurmctld and slurmd, all in one folder.

Used by tests/conftest.py (fixture ``slurm_cluster``) and from the shell by .ci/run:

    eval "$(python -m tests.slurm_cluster start --dir DIR)"   # prints export lines, leaves the daemons running
    python -m tests.slurm_cluster stop --dir DIR              # stops what ``start`` left in DIR

``start`` exports SLURM_CONF (client commands -- sbatch, squeue, scancel, scontrol, sacct -- read the cluster's
address from it) and DSET_TEST_SLURM_CONF (the same path: the fixture uses that cluster instead of starting one).

Needs root and Debian's ``slurm-wlm`` and ``munge`` (22.05 here). Everything lives in DIR: slurm.conf, the
controller's state, slurmd's spool, pid and log files, and a private munged (DIR/munge, owned by the ``munge``
OS user, which runs it: munged refuses to run as root) whose socket slurm.conf names (AuthInfo=socket=...), so
the system's munged is neither needed nor touched. The node has 2 CPUs and SelectTypeParameters=CR_CPU: two
1-CPU tasks run at once. Jobs run as the user who submits them (root in the tests).

There is no slurmdbd: 22.05 has no file-based accounting storage any more, so ``sacct`` alone finds nothing.
Completed jobs are logged by JobCompType=jobcomp/filetxt to DIR/jobcomp.txt, which ``sacct -c`` (--completion)
reads; ``SlurmCluster.jobcomp_records()`` parses the same file.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from studies.processes import pid_alive

try:  # python -m tests.slurm_cluster
    from .services import ServiceError, _tail, free_port, run_cli
except ImportError:  # imported by tests/conftest.py, where tests/ is on sys.path
    from services import ServiceError, _tail, free_port, run_cli

MUNGE_USER = "munge"  # the OS user munged runs as (Debian's munge package makes it)
NODE = "dset-node"  # the node's name: slurmd -N NODE, reached at NodeAddr=127.0.0.1
PARTITION = "debug"
CLUSTER = "dset-test"
STATE_FILE = "slurm.json"  # what ``start`` leaves in DIR for ``stop``
SACCT_FIELDS = ("JobID", "JobName", "State", "ExitCode", "Elapsed", "NodeList")
INSTALL_HINT = "apt-get install slurm-wlm munge"


def _binary(name: str) -> str:
    for folder in (None, "/usr/sbin", "/usr/local/sbin"):  # daemons live in sbin, outside a user's PATH
        path = shutil.which(name, path=folder)
        if path:
            return path
    raise ServiceError(f"{name} not found: {INSTALL_HINT}")


def _write_conf(dir_: Path, munge_socket: Path, ctld_port: int, slurmd_port: int) -> Path:
    host = socket.gethostname().split(".")[0]  # slurmctld only runs on a host whose short name SlurmctldHost names
    conf = dir_ / "slurm.conf"
    lines = [
        f"ClusterName={CLUSTER}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        # our own munged. cred_expire is also how long a requeued job waits before it may start again
        # (BeginTime = requeue + cred_expire + 1 s; default 120 s): 22.05 rejects 2 ("AuthInfo=cred_expire=2
        # invalid" in the logs, and 120 applies), 5 works: a requeued job runs again about 7 s later
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket},cred_expire=5",
        f"StateSaveLocation={dir_ / 'state'}",
        f"SlurmdSpoolDir={dir_ / 'spool'}",
        f"SlurmctldPidFile={dir_ / 'slurmctld.pid'}",
        f"SlurmdPidFile={dir_ / 'slurmd.pid'}",
        f"SlurmctldLogFile={dir_ / 'slurmctld.log'}",
        f"SlurmdLogFile={dir_ / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # no cgroups needed; but a job process whose parent dies (the --wrap shell, on SIGTERM) is no longer
        # tracked: it escapes KillWait's SIGKILL and outlives its job (stop() kills such leftovers)
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",  # CPUs are the only resource: two 1-CPU tasks share the node
        "MpiDefault=none",
        "MailProg=/bin/true",  # no mail on this machine: without it slurmctld logs an error at each start
        "SwitchType=switch/none",
        "ReturnToService=2",
        "JobRequeue=1",
        "KillWait=10",  # scancel: SIGTERM, then SIGKILL 10 s later
        "MinJobAge=10",  # a finished job leaves squeue/scontrol 10 s after it ends (jobcomp keeps it)
        "InactiveLimit=0",
        "SlurmdTimeout=60",
        "SlurmctldTimeout=60",
        "MessageTimeout=10",
        # the scheduler runs on each submission and job end anyway; the periodic passes (default 60 s, backfill
        # 30 s) are what start a job whose begin time has passed, e.g. a requeued one
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=0",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={dir_ / 'jobcomp.txt'}",
        "AccountingStorageType=accounting_storage/none",
        # a test machine with fewer or other CPUs than configured keeps the node usable
        "SlurmdParameters=config_overrides",
        f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={host} CPUs=2 State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _conf_value(conf: Path, key: str) -> str | None:
    for line in conf.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip().lower() == key.lower():
            return value.strip()
    return None


# the daemons this process started, by pid: kept so that they are polled (reaped) through their Popen, which
# otherwise warns when garbage-collected while its process runs
_CHILDREN: dict[int, subprocess.Popen] = {}


def _alive(pid: int) -> bool:
    if pid in _CHILDREN:
        if _CHILDREN[pid].poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    if not pid_alive(pid):
        return False
    try:  # a zombie child of ours is gone for our purpose: reap it
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_pid(pid: int, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            return
        time.sleep(0.1)


def _job_processes(conf: Path) -> list[int]:
    """Pids of this cluster's slurmstepd and job processes: those whose environment names our slurm.conf
    and that are a slurmstepd or carry SLURM_JOB_ID (the shell that started the cluster has SLURM_CONF too,
    but no SLURM_JOB_ID)."""
    wanted = f"SLURM_CONF={conf}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if wanted in env and (comm == "slurmstepd" or any(v.startswith(b"SLURM_JOB_ID=") for v in env)):
            pids.append(int(entry.name))
    return pids


class SlurmCluster:
    """A SLURM cluster reached through its slurm.conf (``conf``).

    Made by ``start_slurm`` (owns the daemons: ``stop`` stops them) or ``SlurmCluster.from_conf`` (a cluster
    someone else started, e.g. .ci/run: ``stop`` does nothing)."""

    def __init__(self, conf: Path, pids: dict[str, int] | None = None):
        self.conf = Path(conf).resolve()
        self.pids = dict(pids or {})

    @classmethod
    def from_conf(cls, path: str | os.PathLike) -> SlurmCluster:
        path = Path(path)
        if not path.is_file():
            raise ServiceError(f"{path}: no such slurm.conf")
        return cls(path)

    @property
    def dir(self) -> Path:
        return self.conf.parent

    def env(self) -> dict[str, str]:
        """Environment variables that point SLURM's client commands (and the tests) at this cluster."""
        return {"SLURM_CONF": str(self.conf), "DSET_TEST_SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a client command (``run("squeue", "-h")``) against this cluster; its output as text."""
        env = {**os.environ, **self.env()}
        try:
            out = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ServiceError(f"{shlex.join(cmd)} did not answer in {timeout:.0f} s") from None
        except FileNotFoundError:
            raise ServiceError(f"{cmd[0]} not found: {INSTALL_HINT}") from None
        if check and out.returncode != 0:
            raise ServiceError(f"{shlex.join(cmd)} failed (exit {out.returncode}): {out.stdout}{out.stderr}".rstrip())
        return out

    def node_state(self) -> str:
        """The node's state as sinfo says it (idle, mixed, alloc, down*, ...); ServiceError when sinfo fails."""
        return self.run("sinfo", "-h", "-o", "%T", timeout=15).stdout.strip()

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until sinfo shows the node idle; ServiceError with the logs' tails on timeout or when a daemon
        we started has died."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            dead = [name for name, pid in self.pids.items() if not _alive(pid)]
            if dead:
                raise ServiceError(f"{', '.join(dead)} exited while the cluster started (last sinfo: {last!r})\n"
                                   + self.logs())
            try:
                last = self.node_state()
                if last == "idle":
                    return
            except ServiceError as e:  # slurmctld not listening yet
                last = str(e)
            if time.monotonic() > deadline:
                raise ServiceError(f"node {NODE} not idle after {timeout:.0f} s (sinfo: {last!r})\n" + self.logs())
            time.sleep(0.2)

    def logs(self, lines: int = 25) -> str:
        parts = []
        for log in (self.dir / "munge" / "munged.log", self.dir / "slurmctld.log", self.dir / "slurmd.log",
                    self.dir / "daemons.out"):
            if log.exists():
                parts.append(f"--- {log} (tail) ---\n{_tail(log, lines)}")
        return "\n".join(parts)

    def jobcomp_records(self, job_id: int | str | None = None) -> list[dict[str, str]]:
        """The job-completion log (jobcomp/filetxt), one dict per finished job or array task (JobId, JobState,
        ExitCode "0:0", NodeList, StartTime, EndTime, ...), oldest first; only those of array or plain job
        ``job_id`` when given (an array's tasks have their own JobId: ArrayJobId is the one sbatch printed,
        as ArrayJobId, and ArrayTaskId its index)."""
        path = Path(_conf_value(self.conf, "JobCompLoc") or self.dir / "jobcomp.txt")
        if not path.exists():
            return []
        records = []
        for line in path.read_text(errors="replace").splitlines():
            rec = {}
            for field in line.split():
                key, sep, value = field.partition("=")
                if sep:
                    rec[key] = value
            if rec:
                records.append(rec)
        if job_id is None:
            return records
        job_id = str(job_id)
        return [r for r in records if job_id in (r.get("JobId"), r.get("ArrayJobId"))]

    def sacct(self, job_id: int | str, fields: tuple[str, ...] = SACCT_FIELDS) -> list[dict[str, str]]:
        """sacct's records of finished job or array ``job_id``: one dict per job or array task, with ``fields``
        (JobID first) and ArrayTaskID ("" for a plain job), in the job-completion log's order.

        Without slurmdbd sacct reads that log (``sacct -c``), where an array task is known only by its own
        JobID (one of them keeps the array's) and ``-j ARRAY`` finds one task: the tasks' JobIDs and
        ArrayTaskIDs come from jobcomp_records."""
        if fields[0] != "JobID":
            raise ValueError(f"fields must start with JobID: {fields}")
        tasks = {r["JobId"]: r.get("ArrayTaskId", "") for r in self.jobcomp_records(job_id)}
        if not tasks:
            return []
        # stderr: 22.05's sacct -c warns about the ArrayJobId/ArrayTaskId fields its own jobcomp/filetxt writes
        out = self.run("sacct", "-c", "-P", "-n", "-j", ",".join(tasks), "-o", ",".join(fields))
        rows = []
        for line in out.stdout.splitlines():
            row = dict(zip(fields, line.split("|")))
            row["ArrayTaskID"] = tasks.get(row["JobID"], "")
            rows.append(row)
        return rows

    def sacct_table(self, job_id: int | str, fields: tuple[str, ...] = SACCT_FIELDS) -> str:
        """``sacct -c``'s table for job or array ``job_id`` (its tasks' own JobIDs), for messages and logs."""
        ids = [r["JobId"] for r in self.jobcomp_records(job_id)] or [str(job_id)]
        return self.run("sacct", "-c", "-j", ",".join(ids), "-o", ",".join(fields), check=False).stdout

    def stop(self) -> None:
        """Cancel what still runs, then stop slurmd, slurmctld and munged; no process of the cluster is left.
        Does nothing for a cluster someone else started (``from_conf``)."""
        if not self.pids:
            return
        if _alive(self.pids.get("slurmctld", 0) or -1):
            try:
                jobs = self.run("squeue", "-h", "-o", "%A", timeout=10).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=10)
                    deadline = time.monotonic() + 15  # KillWait=10: SIGKILL 10 s after SIGTERM
                    while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                        time.sleep(0.3)
            except ServiceError:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self.pids:
                _stop_pid(self.pids[name])
        # what SLURM did not end: with proctrack/linuxproc a job's process whose parent (the batch shell) died
        # is no longer tracked, outlives its job and would run on after the cluster is gone
        for pid in _job_processes(self.conf):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pids = {}

    def stop_quietly(self) -> None:
        try:
            self.stop()
        except Exception:
            pass


def _start_munged(dir_: Path, out) -> tuple[int, Path]:
    munged = _binary("munged")
    try:
        user = pwd.getpwnam(MUNGE_USER)
    except KeyError:
        raise ServiceError(f"there is no '{MUNGE_USER}' OS user to run munged as: {INSTALL_HINT}") from None
    mdir = dir_ / "munge"
    mdir.mkdir()
    os.chown(mdir, user.pw_uid, user.pw_gid)
    os.chmod(mdir, 0o711)  # munged: clients need x on the socket's folder; nobody else may write in it
    key = mdir / "munge.key"
    mungekey = shutil.which("mungekey", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if mungekey:  # a fresh key of our own, written by the munge user (munged wants it to own the key)
        made = subprocess.run([mungekey, "--create", f"--keyfile={key}"], capture_output=True, text=True,
                              user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd=mdir)
        if made.returncode != 0:
            raise ServiceError(f"mungekey failed (exit {made.returncode}): {made.stdout}{made.stderr}".rstrip())
    elif Path("/etc/munge/munge.key").is_file():
        shutil.copyfile("/etc/munge/munge.key", key)
        os.chown(key, user.pw_uid, user.pw_gid)
    else:
        raise ServiceError(f"neither mungekey nor /etc/munge/munge.key found: {INSTALL_HINT}")
    os.chmod(key, 0o400)
    sock = mdir / "munge.socket"
    cmd = [munged, "--foreground", f"--socket={sock}", f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}",
           f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}", "--num-threads=2"]
    # munged refuses root: run it as the munge user directly (no runuser, so that its pid is ours to stop)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=mdir,
                            user=user.pw_uid, group=user.pw_gid, extra_groups=[], start_new_session=True)
    _CHILDREN[proc.pid] = proc
    deadline = time.monotonic() + 20
    munge = shutil.which("munge")
    while True:
        if proc.poll() is not None:
            raise ServiceError(f"munged exited with {proc.returncode} while starting: {shlex.join(cmd)}\n"
                               f"--- {mdir / 'munged.log'} (tail) ---\n{_tail(mdir / 'munged.log')}\n"
                               f"--- {dir_ / 'daemons.out'} (tail) ---\n{_tail(dir_ / 'daemons.out')}")
        if sock.exists():
            if munge is None:
                break
            probe = subprocess.run([munge, "-n", f"--socket={sock}"], capture_output=True)
            if probe.returncode == 0:
                break
        if time.monotonic() > deadline:
            _stop_pid(proc.pid)
            raise ServiceError(f"munged did not open {sock} in 20 s\n{_tail(mdir / 'munged.log')}")
        time.sleep(0.1)
    return proc.pid, sock


def start_slurm(root: Path, timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and slurmd with everything in root (made if missing; must be fresh) and wait
    until the node is idle. root and its parents must be searchable by the munge OS user (chmod o+x): folders
    from mktemp/mkdtemp are 0700."""
    if os.geteuid() != 0:
        raise ServiceError("the test SLURM cluster needs root (munged runs as the munge user, slurmd as root)")
    slurmctld, slurmd = _binary("slurmctld"), _binary("slurmd")
    for client in ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "sacct", "srun"):
        _binary(client)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if (root / "slurm.conf").exists():
        raise ServiceError(f"{root / 'slurm.conf'} already exists: start_slurm needs a fresh folder")
    for sub in ("state", "spool"):
        (root / sub).mkdir(mode=0o755)
    out = open(root / "daemons.out", "ab")  # what the daemons print before their log files are open
    cluster = SlurmCluster(root / "slurm.conf")
    try:
        cluster.pids["munged"], sock = _start_munged(root, out)
        conf = _write_conf(root, sock, free_port(), free_port())
        env = {**os.environ, "SLURM_CONF": str(conf)}
        for name, cmd in (("slurmctld", [slurmctld, "-D", "-i", "-f", str(conf)]),
                          ("slurmd", [slurmd, "-D", "-N", NODE, "-f", str(conf)])):
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root,
                                    env=env, start_new_session=True)
            _CHILDREN[proc.pid] = proc
            cluster.pids[name] = proc.pid
        cluster.wait_idle(timeout)
    except BaseException:
        cluster.stop_quietly()
        raise
    finally:
        out.close()
    return cluster


# ------------------------------------------------------------------------------------------------- shell


def cli_start(dir_: Path) -> str:
    """Start the cluster with its state in dir_; return the shell lines that export SLURM_CONF."""
    dir_ = Path(dir_).resolve()
    dir_.mkdir(parents=True, exist_ok=True)
    os.chmod(dir_, 0o755)  # the munge OS user must reach dir_/munge (mktemp -d makes 0700)
    t0 = time.monotonic()
    cluster = start_slurm(dir_)
    (dir_ / STATE_FILE).write_text(json.dumps({"conf": str(cluster.conf), "pids": cluster.pids}, indent=1))
    print(f"slurm: cluster {CLUSTER} ({cluster.conf}) up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in cluster.env().items())


def cli_stop(dir_: Path) -> None:
    path = Path(dir_) / STATE_FILE
    if not path.exists():
        print(f"slurm: {path} is absent: nothing to stop", file=sys.stderr)
        return
    state = json.loads(path.read_text())
    SlurmCluster(Path(state["conf"]), {k: int(v) for k, v in state["pids"].items()}).stop()
    path.unlink()
    print("slurm: stopped", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, "python -m tests.slurm_cluster", __doc__.split("\n\n")[0], cli_start, cli_stop,
                   "cluster's config, state and logs")


if __name__ == "__main__":
    sys.exit(main())
