"""Real services for tests: a throw-away PostgreSQL server and an ``mlflow server`` backed by it.

Used by tests/conftest.py (fixtures ``postgres`` and ``mlflow_server``) and from the shell by .ci/run:

    eval "$(python -m tests.services start --dir DIR)"   # prints export lines, leaves both running
    python -m tests.services stop --dir DIR              # stops what ``start`` left in DIR

``start`` exports DSET_TEST_POSTGRES_URL (the server, database ``postgres``), DSET_TEST_MLFLOW_URI and
DSET_TEST_SERVICES_DIR; the fixtures use the first two instead of starting their own servers.

PostgreSQL never runs as root: when we are root, initdb/pg_ctl run as the ``postgres`` OS user through
``runuser``, so that user must be able to reach the data folder (every parent searchable). The binaries are
taken from $DSET_PG_BINDIR when set, else ``pg_config --bindir``, else /usr/lib/postgresql/*/bin.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

PG_USER = "postgres"  # the database superuser made by initdb (-U), and the OS user the server runs as when we are root
MLFLOW_DB = "mlflow_server"  # the database behind the mlflow server; create_database refuses to replace it
_PROTECTED_DBS = {"postgres", "template0", "template1", MLFLOW_DB}
STATE_FILE = "services.json"  # what ``start`` leaves in DIR for ``stop``


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message says which step failed and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


# ---------------------------------------------------------------------------------------------- PostgreSQL


def pg_bindir() -> Path:
    """The folder holding initdb, pg_ctl and postgres."""
    wanted = ("initdb", "pg_ctl", "postgres")
    override = os.environ.get("DSET_PG_BINDIR")
    if override:
        missing = [b for b in wanted if not (Path(override) / b).is_file()]
        if missing:
            raise ServiceError(f"PostgreSQL binaries {missing} not found in DSET_PG_BINDIR={override}")
        return Path(override)
    candidates = []
    if shutil.which("pg_config"):
        # Debian's pg_config (libpq-dev) names the server's bindir, e.g. /usr/lib/postgresql/15/bin
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(out.stdout.strip())
    # Debian installs the server outside PATH: newest major version first
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(re.sub(r"\D", "", p) or 0),
                         reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for c in candidates:
        if all((Path(c) / b).is_file() for b in wanted):
            return Path(c)
    raise ServiceError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: looked in "
        f"{candidates or 'pg_config --bindir, /usr/lib/postgresql/*/bin and PATH'}; install the server "
        "(Debian: apt-get install postgresql) or set DSET_PG_BINDIR"
    )


def _as_server_user(cmd: list[str]) -> list[str]:
    """The server refuses to run as root: when we are root, run its tools as the postgres OS user."""
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        raise ServiceError(f"running as root but there is no '{PG_USER}' OS user to run PostgreSQL as") from None
    if not shutil.which("runuser"):
        raise ServiceError("running as root but 'runuser' (util-linux) is missing: cannot drop to the postgres user")
    return ["runuser", "-u", PG_USER, "--", *cmd]


def _run(cmd: list[str], what: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ServiceError(f"{what} did not finish in {timeout:.0f} s: {shlex.join(cmd)}") from None
    if out.returncode != 0:
        raise ServiceError(
            f"{what} failed (exit {out.returncode}): {shlex.join(cmd)}\n{out.stdout}{out.stderr}".rstrip())
    return out


class Postgres:
    """A PostgreSQL server reached as the trust-authenticated superuser ``postgres`` on 127.0.0.1.

    Made by ``start_postgres`` (owns the server: ``stop`` stops it) or ``Postgres.from_url`` (a server
    someone else started: ``stop`` does nothing)."""

    def __init__(self, host: str, port: int, user: str = PG_USER, pgdata: Path | None = None,
                 bindir: Path | None = None):
        self.host, self.port, self.user = host, port, user
        self.pgdata, self.bindir = pgdata, bindir

    @classmethod
    def from_url(cls, url: str) -> Postgres:
        parts = urlsplit(url)
        if parts.scheme.split("+")[0] not in ("postgresql", "postgres") or not parts.hostname:
            raise ServiceError(f"not a postgresql://user@host:port/ URL: {url!r}")
        return cls(parts.hostname, parts.port or 5432, parts.username or PG_USER)

    def url(self, dbname: str = "postgres") -> str:
        # plain postgresql://, as users write it: SQLAlchemy 2.1 reads it with psycopg 3 (a dependency)
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres"):
        import psycopg  # only needed once a server exists; importing here keeps ``stop`` usable without it

        return psycopg.connect(host=self.host, port=self.port, user=self.user, dbname=dbname, connect_timeout=5)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect().close()
                return
            except Exception as e:  # psycopg.OperationalError while the server starts
                if time.monotonic() > deadline:
                    raise ServiceError(f"PostgreSQL at {self.url()} does not accept connections after "
                                       f"{timeout:.0f} s: {e}") from e
                time.sleep(0.2)

    def create_database(self, name: str) -> str:
        """A fresh, empty database ``name`` (dropped first if it exists); returns its URL."""
        if name in _PROTECTED_DBS:
            raise ValueError(f"database name {name!r} is reserved ({sorted(_PROTECTED_DBS)})")
        return self._create(name)

    def create_mlflow_database(self) -> str:
        """A fresh database MLFLOW_DB for an mlflow server's backend store; returns its URL."""
        return self._create(MLFLOW_DB)

    def _create(self, name: str) -> str:
        # plain lower-case identifiers only: no quoting or URL encoding to get wrong
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: use [a-z_][a-z0-9_]*, at most 63 characters")
        conn = self.connect()
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
        try:
            with conn.cursor() as cur:
                # WITH (FORCE): connections an earlier test left open must not block the drop
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        if self.pgdata is None:
            return  # not ours
        bindir = self.bindir or pg_bindir()
        if not (self.pgdata / "postmaster.pid").exists():
            return  # already stopped
        _run([str(bindir / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60", "stop"],
             "pg_ctl stop", cwd=self.pgdata.parent)

    def stop_quietly(self) -> None:
        """stop() on a failed start-up, where the first error is the one to report."""
        try:
            self.stop()
        except Exception:
            pass


def start_postgres(root: Path) -> Postgres:
    """initdb a cluster in root/pgdata and start it on a free port of 127.0.0.1 (socket and log in root too).

    When we are root, root must be reachable by the postgres OS user (pytest's and mktemp's folders are
    private: 0700); root itself is made if missing."""
    bindir = pg_bindir()
    root = Path(root).resolve()
    pgdata, sockdir, log = root / "pgdata", root / "pgsocket", root / "postgres.log"
    root.mkdir(parents=True, exist_ok=True)
    if pgdata.exists():
        raise ServiceError(f"{pgdata} already exists: start_postgres needs a fresh folder")
    pgdata.mkdir(mode=0o700)
    sockdir.mkdir(exist_ok=True)
    log.touch()
    if os.geteuid() == 0:
        _as_server_user([])  # checks that the postgres OS user and runuser exist
        user = pwd.getpwnam(PG_USER)
        for p in (pgdata, sockdir, log):
            os.chown(p, user.pw_uid, user.pw_gid)
        probe = subprocess.run(_as_server_user(["test", "-w", str(pgdata)]), cwd="/")
        if probe.returncode != 0:
            raise ServiceError(
                f"the '{PG_USER}' OS user cannot write {pgdata}: every parent folder of {root} must be searchable "
                "by it (chmod o+x), e.g. use a folder made under /tmp with mode 0755"
            )

    # --no-sync and the fsync/commit settings below: a throw-away test cluster needs no durability, and
    # fsyncs are slow on a shared disk; --locale=C: no dependence on which locales the machine has
    _run([str(bindir / "initdb"), "-D", str(pgdata), "-U", PG_USER, "--auth=trust", "--encoding=UTF8",
          "--locale=C", "--no-sync"], "initdb", cwd=root)
    port = free_port()
    opts = " ".join([
        "-c listen_addresses=127.0.0.1", f"-p {port}", f"-c unix_socket_directories={shlex.quote(str(sockdir))}",
        "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
    ])
    pg = Postgres("127.0.0.1", port, PG_USER, pgdata=pgdata, bindir=bindir)
    try:
        _run([str(bindir / "pg_ctl"), "-D", str(pgdata), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"],
             "pg_ctl start", cwd=root, timeout=90)
        pg.wait_ready()
    except ServiceError as e:
        pg.stop_quietly()
        raise ServiceError(f"{e}\n--- {log} (tail) ---\n{_tail(log)}") from None
    return pg


# ----------------------------------------------------------------------------------------------- MLflow


def _stop_group(pid: int, timeout: float = 20) -> None:
    """Stop the process group that ``start_new_session`` made for ``pid`` (mlflow server and its uvicorn
    workers): SIGTERM, then SIGKILL after ``timeout`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child, so that the group can vanish
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Server:
    """A running ``mlflow server``: ``uri`` is its tracking URI, ``stop()`` ends it and its workers."""

    def __init__(self, uri: str, pid: int, log: Path):
        self.uri, self.pid, self.log = uri, pid, log

    def stop(self) -> None:
        _stop_group(self.pid)


def start_mlflow_server(backend_url: str, artifacts_dir: Path, timeout: float = 90) -> Server:
    """Start ``mlflow server`` on a free port of 127.0.0.1 with the given backend store, serving artifacts
    stored in artifacts_dir (clients upload and download through the server: mlflow-artifacts:/ URIs), and
    wait until GET /health answers. Its log is artifacts_dir/../mlflow-server.log."""
    artifacts_dir = Path(artifacts_dir).resolve()
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    log = artifacts_dir.parent / "mlflow-server.log"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_url,
           "--serve-artifacts", "--artifacts-destination", str(artifacts_dir),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # mlflow 3's security middleware accepts Host: localhost and private addresses by default; clients
    # here always say 127.0.0.1:PORT, so the default is enough and we do not widen it.
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the server must not inherit a client setting
    # mlflow 3 also starts a job runner and seven huey consumers (GenAI scorers, trace roll-ups) by
    # default: tests only track runs, and those processes slow start-up on a small shared machine
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log, "ab") as out:
        # own session: stop() can end the server and the uvicorn workers it forks as one group
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=artifacts_dir.parent, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if proc.poll() is not None:
            raise ServiceError(f"mlflow server exited with {proc.returncode} while starting: {shlex.join(cmd)}\n"
                               f"--- {log} (tail) ---\n{_tail(log)}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return Server(uri, proc.pid, log)
                last = f"HTTP {r.status}"
        except Exception as e:  # connection refused until uvicorn listens
            last = str(e)
        if time.monotonic() > deadline:
            _stop_group(proc.pid)
            raise ServiceError(f"mlflow server did not answer {uri}/health within {timeout:.0f} s ({last}): "
                               f"{shlex.join(cmd)}\n--- {log} (tail) ---\n{_tail(log)}")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------- shell


def cli_start(dir_: Path) -> str:
    """Start both services with their state in dir_; return the shell lines that export their addresses."""
    dir_ = Path(dir_).resolve()
    dir_.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(dir_, 0o755)  # the postgres OS user must reach dir_/postgres (mktemp -d makes 0700)
    t0 = time.monotonic()
    pg = start_postgres(dir_ / "postgres")
    t_pg = time.monotonic() - t0
    state = {"pgdata": str(pg.pgdata), "pg_bindir": str(pg.bindir), "postgres_url": pg.url("postgres")}
    (dir_ / STATE_FILE).write_text(json.dumps(state, indent=1))
    try:
        t0 = time.monotonic()
        server = start_mlflow_server(pg.create_mlflow_database(), dir_ / "mlflow" / "artifacts")
        t_ml = time.monotonic() - t0
    except Exception:
        pg.stop_quietly()
        raise
    state.update(mlflow_pid=server.pid, mlflow_uri=server.uri)
    (dir_ / STATE_FILE).write_text(json.dumps(state, indent=1))
    print(f"services: postgres {pg.url()} up in {t_pg:.1f} s, mlflow server {server.uri} up in {t_ml:.1f} s",
          file=sys.stderr)
    return "\n".join([
        f"export DSET_TEST_POSTGRES_URL={shlex.quote(state['postgres_url'])}",
        f"export DSET_TEST_MLFLOW_URI={shlex.quote(server.uri)}",
        f"export DSET_TEST_SERVICES_DIR={shlex.quote(str(dir_))}",
    ])


def cli_stop(dir_: Path) -> None:
    """Stop what ``cli_start`` left running in dir_ (mlflow first: it holds connections to postgres)."""
    path = Path(dir_) / STATE_FILE
    if not path.exists():
        print(f"services: {path} is absent: nothing to stop", file=sys.stderr)
        return
    state = json.loads(path.read_text())
    if "mlflow_pid" in state:
        _stop_group(int(state["mlflow_pid"]))
    if "pgdata" in state:
        pg = Postgres.from_url(state["postgres_url"])
        pg.pgdata, pg.bindir = Path(state["pgdata"]), Path(state["pg_bindir"])
        pg.stop()
    path.unlink()
    print("services: stopped", file=sys.stderr)


def run_cli(argv: list[str] | None, prog: str, description: str, start, stop, what: str) -> int:
    """The ``start --dir DIR`` / ``stop --dir DIR`` command line of a test service: ``start(dir)`` returns the
    export lines to print, ``stop(dir)`` stops what start left there; a ServiceError is one line and exit 1."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, type=Path, help=f"folder for the {what}")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            print(start(args.dir))
        else:
            stop(args.dir)
    except ServiceError as e:
        print(f"{prog.split('.')[-1]}: {args.action} failed: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, "python -m tests.services", __doc__.split("\n\n")[0], cli_start, cli_stop,
                   "services' data, logs and state")


if __name__ == "__main__":
    sys.exit(main())
