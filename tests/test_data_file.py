"""The data file (``data=PATH.yaml``): written by dset.data, read by every command, paths relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dset.config import ConfigError, resolve_config, with_values
from dset.data_file import read_data_file, write_data_file


def _dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (root / f"{split}.json").write_text("{}")
    return write_data_file(root / "data.yaml",
                           {s: (root / "images", root / f"{s}.json") for s in ("train", "val", "test")},
                           ["car", "person"], record={"split": {"by": "folder", "seed": 3}})


def test_written_paths_are_relative_and_read_back_absolute(tmp_path):
    path = _dataset(tmp_path / "my_data")
    raw = yaml.safe_load(path.read_text())
    assert raw["data"]["train"] == {"images": "images", "annotations": "train.json"}
    assert raw["data"]["classes"] == ["car", "person"]
    assert raw["dataset"]["split"] == {"by": "folder", "seed": 3}
    moved = tmp_path / "elsewhere"
    (tmp_path / "my_data").rename(moved)   # the folder moves: the file still describes it
    layer, record = read_data_file(moved / "data.yaml")
    assert layer["data"]["val"]["annotations"] == str(moved.resolve() / "val.json")
    assert layer["data"]["test"]["images"] == str(moved.resolve() / "images")
    assert record["split"]["seed"] == 3


def test_paths_outside_the_folder_stay_absolute(tmp_path):
    (tmp_path / "shared_images").mkdir()
    path = write_data_file(tmp_path / "d" / "data.yaml",
                           {"train": (tmp_path / "shared_images", tmp_path / "d" / "t.json"),
                            "val": (tmp_path / "shared_images", tmp_path / "d" / "v.json")}, ["a"])
    raw = yaml.safe_load(path.read_text())
    assert raw["data"]["train"]["images"] == str((tmp_path / "shared_images").resolve())
    assert raw["data"]["val"]["annotations"] == "v.json"


def test_write_refuses_a_data_set_without_val(tmp_path):
    with pytest.raises(ValueError, match="missing: \\['val'\\]"):
        write_data_file(tmp_path / "data.yaml", {"train": (tmp_path, tmp_path / "t.json")}, ["a"])


def test_data_equals_file_on_the_command_line_is_the_data_layer(tmp_path):
    path = _dataset(tmp_path / "ds")
    cfg = resolve_config("rtdetr_r18", overrides=[f"data={path}", "data.image_size=320"])
    assert cfg.data.name == "coco"
    assert cfg.data.classes == ["car", "person"]
    assert cfg.data.train.annotations == str((tmp_path / "ds").resolve() / "train.json")
    assert cfg.data.image_size == 320          # overrides after data= still apply on top of it
    assert cfg.run.budget == "none"            # user data: no synthetic CPU budget
    same = resolve_config("rtdetr_r18", data=path, overrides=["data.image_size=320"])
    assert same == cfg


def test_shipped_data_presets_keep_working_directory_paths(tmp_path, monkeypatch):
    root = tmp_path / "data" / "dair_v2x_coco"
    (root / "images").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"{split}.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config("rtdetr_r18", data="dair_v2x")
    assert cfg.data.train.annotations == "data/dair_v2x_coco/train.json"


@pytest.mark.parametrize("text, message", [
    ("name: coco\n", "a data file is a YAML mapping with a 'data' section"),
    ("data: {name: coco}\nsplits: {}\n", "unknown top-level key"),
    ("data: {name: coco}\ndataset: [1]\n", "'dataset' must be a mapping"),
    ("data: [\n", "not valid YAML"),
])
def test_malformed_data_files_are_errors_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        resolve_config("rtdetr_r18", overrides=[f"data={path}"])
    assert str(path) in str(info.value)


def test_a_missing_data_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="data file not found: .*nope.yaml"):
        resolve_config("rtdetr_r18", overrides=[f"data={tmp_path / 'nope.yaml'}"])


def test_class_map_is_a_typed_mapping():
    cfg = resolve_config("rtdetr_r18", overrides=["model.class_map={car: car, person: pedestrian}"])
    assert cfg.model.class_map == {"car": "car", "person": "pedestrian"}
    with pytest.raises(ConfigError, match="model.class_map: expected a mapping"):
        with_values(cfg, {"model.class_map": ["car"]})


def test_classes_of_the_data_file_must_match_the_annotations(tmp_path):
    from data_helpers import tiny_coco

    from dset.data.errors import DatasetError
    from dset.data.loaders import build_datasets

    images, annotations, _ = tiny_coco(tmp_path)   # categories 7 'dog' and 3 'cat': in id order cat, dog
    splits = {"train": (images, annotations), "val": (images, annotations)}
    good = write_data_file(tmp_path / "good.yaml", splits, ["cat", "dog"])
    bundle = build_datasets(resolve_config("rtdetr_r18", overrides=[f"data={good}"]), train=False)
    assert bundle.category_names == ["cat", "dog"]
    bad = write_data_file(tmp_path / "bad.yaml", splits, ["dog", "cat"])
    with pytest.raises(DatasetError, match=r"data.classes \['dog', 'cat'\] differ .* \['cat', 'dog'\]"):
        build_datasets(resolve_config("rtdetr_r18", overrides=[f"data={bad}"]), train=False)


def test_with_data_file_replaces_where_the_data_is_and_keeps_the_settings(tmp_path):
    from dset.config import with_data_file

    full = _dataset(tmp_path / "full")                 # train, val, test
    cfg = resolve_config("rtdetr_r18", overrides=[f"data={full}", "data.image_size=256", "data.batch_size=2"])
    other = tmp_path / "other"
    (other / "imgs").mkdir(parents=True)
    for split in ("train", "val"):
        (other / f"{split}.json").write_text("{}")
    path = write_data_file(other / "data.yaml", {s: (other / "imgs", other / f"{s}.json") for s in ("train", "val")},
                           ["bus"])
    moved = with_data_file(cfg, path)
    assert moved.data.val.annotations == str(other.resolve() / "val.json")
    assert moved.data.test.annotations is None and moved.data.test.images is None   # no stale test split
    assert moved.data.classes == ["bus"]
    assert (moved.data.image_size, moved.data.batch_size) == (256, 2)
