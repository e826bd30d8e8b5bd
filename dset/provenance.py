"""What made a result: the version of the project's code and a digest of the data a run reads.

Both are hashes, cheap to compute and independent of git (a run from an unpacked archive or a working tree
with uncommitted changes gets an exact version too). A study counts a finished run as done only when the same
code and the same data made it (studies/planning/cells.py), and stage 1's cache is keyed by them
(studies/planning/pretrain.py). The git commit is recorded beside them, for people. Torch-free.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
# the packages whose sources make the code version (pyproject.toml installs these three)
PROJECT_PACKAGES = ("dset", "studies", "analysis")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of every Python source file of the project's packages (``dset``, ``studies``, ``analysis``: relative
    path and content) and of the torch and torchvision versions: any change to the code that trains, evaluates,
    measures, schedules or reports, or to the library underneath, gives another version. 16 hex digits."""
    h = hashlib.sha256()
    for package in PROJECT_PACKAGES:
        root = PROJECT_DIR / package
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(path.relative_to(PROJECT_DIR).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    for dist in ("torch", "torchvision"):
        h.update(f"{dist}=={_installed_version(dist)}".encode() + b"\0")
    return h.hexdigest()[:16]


def _installed_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (remembered per path, size and modification time within a process)."""
    p = Path(path)
    st = p.stat()
    return _file_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)


def data_digest(cfg) -> str:
    """Digest of the data a configuration trains and evaluates on, 16 hex digits.

    COCO-format data: the bytes of the annotation files of every split, the test split's when there is one (a
    changed label or box is another data set; image files are not read, for speed: an edited image under an
    unchanged JSON goes unnoticed). The synthetic set: its parameters and generator version, of which it is a
    pure function (the same key as its cache folder), so nothing has to be generated to know it."""
    d = cfg.data
    if d.name == "synthetic":
        from .data.synthetic import dataset_key

        s = d.synthetic
        parts = {"synthetic": dataset_key(num_train=s.num_train, num_val=s.num_val, image_size=s.image_size,
                                          seed=s.seed, num_classes=s.num_classes, max_objects=s.max_objects,
                                          min_object_size=s.min_object_size, num_test=s.num_test)}
    else:
        # the test split only when configured: data without one keeps its digest
        splits = ("train", "val", "test") if d.test.annotations is not None else ("train", "val")
        parts = {split: file_digest(getattr(d, split).annotations) for split in splits}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# configuration keys naming weight files a run starts from: their bytes are part of what made its result
WEIGHT_FILE_KEYS = ("model.checkpoint", "model.backbone.pretrained")


def weights_digest(cfg) -> str | None:
    """Digest of the weight files a configuration loads (``WEIGHT_FILE_KEYS``), 16 hex digits; None when it
    loads none. By content, not by path: a file replaced in place gives another digest."""
    values = cfg.flat()
    files = {key: file_digest(values[key]) for key in WEIGHT_FILE_KEYS if values.get(key)}
    if not files:
        return None
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    """The project's git commit (12 hex digits, ``-dirty`` with uncommitted changes to tracked files), recorded
    beside the code version for people reading a run; None outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
