"""Shared test set-up: where the parity fixture lives, and small helpers."""

from __future__ import annotations

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


def one_thread_for_module():
    """One intra-op thread for a test module (use as ``pytest.fixture(autouse=True, scope="module")``): on a
    small shared machine, OpenMP threads that wait for a busy core make tiny training steps 10x slower; with
    one thread a module takes seconds whatever else runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
