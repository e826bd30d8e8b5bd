"""JSON files of the data sets, read with an error that names the file and written atomically (a reader never
sees half a file); torch-free, for the converters' command lines."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import DatasetError

__all__ = ["read_json", "write_json_atomic"]


def read_json(path: Path, problem: str) -> Any:
    """The JSON in ``path``; a file that cannot be read or parsed is a DatasetError naming it and ``problem``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: {problem} ({e})") from e


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as JSON in ``path``, through a temporary file renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)
