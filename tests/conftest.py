"""Shared test set-up: where the parity fixture lives, and small helpers."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PARITY = SHARED / "parity"


def shared_path(name: str) -> Path:
    """Path of a file under ../shared/parity; skip (or fail under CI=true) when it is absent."""
    path = PARITY / name
    if not path.exists():
        reason = f"{path} is absent: the RT-DETR parity fixture lives in ../shared beside the checkout"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: its absence is a failure)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """``module_tmp("name")`` makes a fresh folder that lives until the module's last test, then is deleted.
    Module fixtures train real runs whose checkpoints weigh hundreds of MB; pytest would keep them to the
    end of the session (function-scoped ``tmp_path`` folders go as each test passes: see pyproject.toml)."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _private_dset_cache(tmp_path_factory):
    """The tests' own DSET_CACHE_DIR (synthetic data sets, stage-1 checkpoints of studies): never the user's
    ~/.cache/dset, shared by the whole session (a stage 1 is trained once), deleted at its end."""
    root = tmp_path_factory.mktemp("dset_cache")
    before = os.environ.get("DSET_CACHE_DIR")
    os.environ["DSET_CACHE_DIR"] = str(root)
    yield root
    if before is None:
        os.environ.pop("DSET_CACHE_DIR", None)
    else:
        os.environ["DSET_CACHE_DIR"] = before
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store under tmp_path (its URI); the working directory is tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def random_targets(batch: int, num_classes: int, counts: list[int], generator: torch.Generator | None = None):
    """Random valid targets: normalised cx, cy, w, h boxes inside the image, labels in range."""
    g = generator or torch.Generator().manual_seed(0)
    targets = []
    for b in range(batch):
        n = counts[b]
        wh = torch.rand(n, 2, generator=g) * 0.4 + 0.05
        cxy = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
        targets.append({"boxes": torch.cat([cxy, wh], 1), "labels": torch.randint(0, num_classes, (n,), generator=g)})
    return targets


# a narrower encoder/decoder for training tests (the backbone is still PResNet-18): same code paths, a
# third fewer weights to train, average and checkpoint
SMALL_HEADS = ["model.encoder.hidden_dim=128", "model.encoder.dim_feedforward=256", "model.decoder.dim_feedforward=256"]


@contextlib.contextmanager
def one_thread():
    """One intra-op thread inside the block, the previous count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_thread_for_module():
    """One intra-op thread for a test module (use as ``pytest.fixture(autouse=True, scope="module")``): on a
    small shared machine, OpenMP threads that wait for a busy core make tiny training steps 10x slower; with
    one thread a module takes seconds whatever else runs."""
    with one_thread():
        yield


# ------------------------------------------------------------------ real services (tests/services.py)
# .ci/run starts PostgreSQL and an mlflow server once and exports DSET_TEST_POSTGRES_URL and
# DSET_TEST_MLFLOW_URI; without them the fixtures below start private ones for the session. When neither
# works they skip, or fail under CI=true (as shared_path does): CI must not pass by skipping them.


def _service_unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: an unavailable service is a failure)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server (tests/services.py's ``Postgres``): ``postgres.create_database("name")`` makes a
    fresh empty database (dropped first if it exists) and returns its SQLAlchemy URL
    (postgresql://postgres@127.0.0.1:PORT/name), usable by Optuna's RDBStorage and MLflow."""
    import tempfile

    from services import Postgres, ServiceError, start_postgres

    url = os.environ.get("DSET_TEST_POSTGRES_URL")
    if url:
        pg = Postgres.from_url(url)
        try:
            pg.wait_ready(timeout=10)
            error = None
        except ServiceError as e:
            error = e
        if error is not None:  # the variable was set on purpose: a dead server is an error, not a skip
            pytest.fail(f"DSET_TEST_POSTGRES_URL={url}: {error}", pytrace=False)
        yield pg
        return
    # not pytest's tmp_path: its folders are 0700 and, when we are root, the server runs as the postgres
    # OS user, which must reach the data folder
    root = Path(tempfile.mkdtemp(prefix="dset-test-pg-"))
    os.chmod(root, 0o755)
    try:
        pg, error = start_postgres(root), None
    except (ServiceError, OSError) as e:
        error = e
    if error is not None:  # skip/fail outside the except block: no "during handling..." traceback
        shutil.rmtree(root, ignore_errors=True)
        _service_unavailable(f"cannot start PostgreSQL: {error}")
    yield pg
    pg.stop_quietly()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(request, tmp_path_factory):
    """Tracking URI (str, http://127.0.0.1:PORT) of an ``mlflow server`` whose backend store is a database on
    the ``postgres`` fixture's server and whose artifacts it serves from a tmp folder (mlflow-artifacts:/)."""
    import urllib.request

    from services import ServiceError, start_mlflow_server

    uri = os.environ.get("DSET_TEST_MLFLOW_URI")
    if uri:
        try:
            urllib.request.urlopen(uri + "/health", timeout=10).close()
            error = None
        except Exception as e:
            error = e
        if error is not None:  # set on purpose: a dead server is an error, not a skip
            pytest.fail(f"DSET_TEST_MLFLOW_URI={uri}: GET /health failed: {error}", pytrace=False)
        yield uri
        return
    pg = request.getfixturevalue("postgres")  # only needed when we start the server ourselves
    root = tmp_path_factory.mktemp("mlflow_server")
    try:
        server, error = start_mlflow_server(pg.create_mlflow_database(), root / "artifacts"), None
    except (ServiceError, OSError) as e:
        error = e
    if error is not None:
        _service_unavailable(f"cannot start the mlflow server: {error}")
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM cluster on 127.0.0.1 (tests/slurm_cluster.py's ``SlurmCluster``, 2 CPUs): pass
    ``slurm_cluster.env()`` to sbatch/squeue/scancel/scontrol/sacct (it sets SLURM_CONF), or use
    ``slurm_cluster.run("squeue", ...)``; ``slurm_cluster.sacct(job_id)`` reads finished jobs (no slurmdbd:
    the job-completion log). .ci/run starts one and exports DSET_TEST_SLURM_CONF."""
    import tempfile

    from slurm_cluster import ServiceError, SlurmCluster, start_slurm

    conf = os.environ.get("DSET_TEST_SLURM_CONF")
    if conf:
        try:
            cluster = SlurmCluster.from_conf(conf)
            cluster.node_state()  # answers sinfo
            error = None
        except ServiceError as e:
            error = e
        if error is not None:  # set on purpose: a dead cluster is an error, not a skip
            pytest.fail(f"DSET_TEST_SLURM_CONF={conf}: {error}", pytrace=False)
        yield cluster
        return
    # not pytest's tmp_path: its folders are 0700, and munged runs as the munge OS user, which must reach
    # the cluster's munge/ folder
    root = Path(tempfile.mkdtemp(prefix="dset-test-slurm-"))
    os.chmod(root, 0o755)
    try:
        cluster, error = start_slurm(root), None
    except (ServiceError, OSError) as e:
        error = e
    if error is not None:
        shutil.rmtree(root, ignore_errors=True)
        _service_unavailable(f"cannot start the SLURM cluster: {error}")
    yield cluster
    cluster.stop_quietly()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def browser():
    """A headless Chromium page (tests/browser.py); skips without Chromium, or fails under CI=true (.ci/run
    installs Debian's chromium)."""
    from browser import Browser, BrowserError, chromium_path

    if chromium_path() is None:
        _service_unavailable("no Chromium to render pages (apt-get install chromium, or set $DSET_CHROMIUM)")
    try:
        b, error = Browser().__enter__(), None
    except BrowserError as e:
        error = e
    if error is not None:
        _service_unavailable(f"cannot start Chromium: {error}")
    yield b
    b.__exit__(None, None, None)
