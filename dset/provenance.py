"""What made a result: the version of this package's code and a digest of the data a run reads.

Both are hashes, cheap to compute and independent of git (a run from an unpacked archive or a working tree
with uncommitted changes gets an exact version too). A study counts a finished run as done only when the same
code and the same data made it (studies/spec.py), and stage 1's cache is keyed by them (studies/pretrain.py).
Torch-free.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of every Python source file of the ``dset`` package (relative path and content): any change to
    the library that trains, evaluates or measures gives another version. 16 hex digits."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


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

    COCO-format data: the bytes of both annotation files (a changed label or box is another data set; image
    files are not read, for speed: an edited image under an unchanged JSON goes unnoticed). The synthetic set:
    its parameters and generator version, of which it is a pure function (the same key as its cache folder),
    so nothing has to be generated to know it."""
    d = cfg.data
    if d.name == "synthetic":
        from .data.synthetic import dataset_key

        s = d.synthetic
        parts = {"synthetic": dataset_key(num_train=s.num_train, num_val=s.num_val, image_size=s.image_size,
                                          seed=s.seed, num_classes=s.num_classes, max_objects=s.max_objects,
                                          min_object_size=s.min_object_size)}
    else:
        parts = {split: file_digest(getattr(d, split).annotations) for split in ("train", "val")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
