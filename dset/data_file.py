"""A data file: one YAML file that describes a COCO-format data set for every command (``data=PATH.yaml``).

    data:                      # a configuration layer (dset.config.DataConfig)
      name: coco
      classes: [car, person]
      train: {images: images, annotations: train.json}
      val: {images: images, annotations: val.json}
      test: {images: images, annotations: test.json}
    dataset:                   # a record of where the data came from and how it was split (not configuration)
      source: {format: voc, path: /data/voc}
      split: {by: folder, seed: 0, fractions: {train: 0.7, val: 0.15, test: 0.15}}

Relative paths under ``data`` are relative to the file's folder, so a data set folder can move. The shipped
``dset/configs/data_*.yaml`` presets are the exception: their paths are relative to the working directory, as
their comments say. ``python -m dset.data convert`` and ``split`` write the file; ``dset.config.resolve_config``
reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .config_checks import ConfigError

DATA_FILE_NAME = "data.yaml"
SPLITS = ("train", "val", "test")
_KEYS = ("data", "dataset")
_HEADER = ("# A data set for dset: data={path} with dset.train, dset.evaluate and studies.run.\n"
           "# Paths are relative to this file's folder. Written by python -m dset.data; check it with\n"
           "#   python -m dset.data check {path}\n")


def write_data_file(path: str | Path, splits: dict[str, tuple[str | Path, str | Path]], classes: list[str],
                    record: dict[str, Any] | None = None) -> Path:
    """Write ``path``: ``splits`` maps train / val (/ test) to (images folder, annotations JSON); paths inside
    the file's folder are written relative to it. ``record`` (source, split) goes under ``dataset``."""
    path = Path(path)
    missing = [s for s in ("train", "val") if s not in splits]
    if missing:
        raise ValueError(f"a data file needs the train and val splits; missing: {missing}")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; splits are {list(SPLITS)}")
    # abspath, not resolve: DST/images is often a link to the source images, and the file should say "images"
    folder = Path(os.path.abspath(path.parent))

    def rel(p: str | Path) -> str:
        p = Path(os.path.abspath(p))
        return str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p)

    data: dict[str, Any] = {"name": "coco", "classes": list(classes)}
    for split in SPLITS:
        if split in splits:
            images, annotations = splits[split]
            data[split] = {"images": rel(images), "annotations": rel(annotations)}
    body: dict[str, Any] = {"data": data}
    if record:
        body["dataset"] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _HEADER.format(path=path) + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=110)
    path.write_text(text, encoding="utf-8")
    return path


def read_data_file(path: str | Path, relative_to_file: bool = True) -> tuple[dict, dict]:
    """The configuration layer (``{"data": {...}}``, relative paths made absolute against the file's folder
    unless ``relative_to_file`` is False) and the ``dataset`` record of the data file ``path``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the data file ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
        raise ConfigError(f"{path}: a data file is a YAML mapping with a 'data' section "
                          "(data: {name: coco, train: {images: ..., annotations: ...}, val: {...}})")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown} in a data file; allowed: {list(_KEYS)}")
    record = raw.get("dataset") or {}
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: 'dataset' must be a mapping (the data set's source and split), got {record!r}")
    data = dict(raw["data"])
    if relative_to_file:
        folder = path.parent.resolve()
        for split in SPLITS:
            entry = data.get(split)
            if not isinstance(entry, dict):
                continue
            entry = dict(entry)
            for part in ("images", "annotations"):
                value = entry.get(part)
                if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                    entry[part] = str(folder / value)
                elif isinstance(value, str):
                    entry[part] = str(Path(value).expanduser())
            data[split] = entry
    return {"data": data}, record
