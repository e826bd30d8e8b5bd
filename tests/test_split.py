"""The split of one annotation set into train / val / test (dset.data.split): whole groups on one side, the
fractions met as nearly as whole groups allow, the same bytes for the same seed, and the rule written down in
each JSON's ``info.split``, the data file's ``dataset.split`` and so in the data digest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from data_helpers import write_image

from dset.config import resolve_config
from dset.config_checks import ConfigError
from dset.data.__main__ import main
from dset.data.errors import DatasetError
from dset.data.split import SplitRule, group_key, split_coco_file, split_images
from dset.provenance import data_digest

# 12 sequences of 3..8 frames: 66 images
SEQUENCE_LENGTHS = [3, 8, 5, 4, 7, 6, 3, 8, 5, 6, 4, 7]


def sequence_images() -> list[dict]:
    images = []
    for s, n in enumerate(SEQUENCE_LENGTHS):
        for f in range(n):
            images.append({"id": len(images) + 1, "file_name": f"cam{s % 2}/street{s}_{f:04d}.png", "seq": s})
    return images


def write_sequence_set(root: Path) -> Path:
    """The sequence images as a COCO file (one 8x8 PNG each, one box each) under ``root``."""
    images = sequence_images()
    for img in images:
        write_image(root / "images" / img["file_name"], 8, 8)
        img.update(width=8, height=8)
    anns = [{"id": i["id"], "image_id": i["id"], "category_id": 4 + i["id"] % 2, "bbox": [1, 1, 4, 4],
             "area": 16, "iscrowd": 0} for i in images]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 4, "name": "a"}, {"id": 5, "name": "b"}]}))
    return path


def groups_of(parts: dict[str, list[dict]], by: str) -> dict[str, set[str]]:
    return {s: {group_key(i, by) for i in imgs} for s, imgs in parts.items()}


def test_group_keys():
    img = {"id": 1, "file_name": "cam0/street1_0004.png", "seq": 7}
    assert group_key(img, "image") == "cam0/street1_0004.png"
    assert group_key(img, "folder") == "cam0"
    assert group_key(img, "prefix") == "cam0/street1"
    assert group_key({"file_name": "a-12.jpg"}, "prefix") == "a"
    assert group_key({"file_name": "frame.jpg"}, "prefix") == "frame.jpg"    # no _NNNN: its own group
    assert group_key(img, "field:seq") == "7"
    with pytest.raises(DatasetError, match=r"x.json: image 1 \('cam0/street1_0004.png'\) has no 'scene' key"):
        group_key(img, "field:scene", where="x.json")


@pytest.mark.parametrize("by", ["prefix", "field:seq"])
def test_groups_stay_on_one_side_and_fractions_are_roughly_met(by):
    images = sequence_images()
    parts, record = split_images(images, SplitRule(val=0.2, test=0.2, group_by=by, seed=5))
    groups = groups_of(parts, by)
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert sorted(i["id"] for imgs in parts.values() for i in imgs) == list(range(1, len(images) + 1))
    for split in ("val", "test"):   # within the largest group of the target (66 * 0.2 = 13.2)
        assert abs(len(parts[split]) - 0.2 * len(images)) <= max(SEQUENCE_LENGTHS) / 2
    assert record == {"by": by, "seed": 5, "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "groups": 12}
    for imgs in parts.values():   # input order kept inside each split
        assert [i["id"] for i in imgs] == sorted(i["id"] for i in imgs)


def test_by_image_meets_fractions_exactly_and_seeds_differ():
    images = sequence_images()
    parts, _ = split_images(images, SplitRule(val=0.25, seed=0))
    assert (len(parts["train"]), len(parts["val"])) == (50, 16)   # 66 * 0.25 = 16.5: 17 is no closer than 16
    other, _ = split_images(images, SplitRule(val=0.25, seed=1))
    assert {i["id"] for i in other["val"]} != {i["id"] for i in parts["val"]}
    again, _ = split_images(images, SplitRule(val=0.25, seed=0))
    assert again == parts


def test_by_folder_with_too_few_groups_is_a_clear_error():
    with pytest.raises(DatasetError, match=r"66 image\(s\) form 2 group\(s\) by folder, and train / val / test "
                                           r"need at least 3"):
        split_images(sequence_images(), SplitRule(val=0.2, test=0.2, group_by="folder"), where="x.json")
    parts, _ = split_images(sequence_images(), SplitRule(val=0.4, group_by="folder"))
    assert groups_of(parts, "folder") in ({"train": {"cam0"}, "val": {"cam1"}}, {"train": {"cam1"}, "val": {"cam0"}})


@pytest.mark.parametrize("rule, message", [
    (SplitRule(val=0.0), "--val must be above 0 and below 1"),
    (SplitRule(val=0.5, test=0.5), "leave nothing for train"),
    (SplitRule(test=-0.1), r"--test must be in \[0, 1\)"),
    (SplitRule(group_by="scene"), "--group-by must be image, folder, prefix or field:NAME, got 'scene'"),
])
def test_bad_rules_are_config_errors(rule, message):
    with pytest.raises(ConfigError, match=message):
        split_images(sequence_images(), rule)


def test_split_files_are_reproducible_byte_for_byte_and_record_the_rule(tmp_path):
    path = write_sequence_set(tmp_path / "src")
    rule = SplitRule(val=0.2, test=0.15, group_by="prefix", seed=3)
    one = split_coco_file(path, tmp_path / "src" / "images", tmp_path / "one", rule)
    two = split_coco_file(path, tmp_path / "src" / "images", tmp_path / "two", rule)
    for name in ("train.json", "val.json", "test.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    expected = {"by": "prefix", "seed": 3, "fractions": {"train": 0.65, "val": 0.2, "test": 0.15}, "groups": 12}
    assert one.split == two.split == expected
    data = yaml.safe_load((tmp_path / "one" / "data.yaml").read_text())
    assert data["dataset"]["split"] == expected
    assert data["data"]["classes"] == ["a", "b"]
    assert data["data"]["test"]["annotations"] == "test.json"
    assert (tmp_path / "one" / data["data"]["test"]["images"]).resolve() == (tmp_path / "src" / "images").resolve()
    total = 0
    for name in ("train", "val", "test"):
        coco = json.loads((tmp_path / "one" / f"{name}.json").read_text())
        assert coco["info"]["split"] == expected
        assert coco["categories"] == [{"id": 4, "name": "a"}, {"id": 5, "name": "b"}]   # ids kept by split
        assert {a["image_id"] for a in coco["annotations"]} == {i["id"] for i in coco["images"]}
        total += len(coco["images"])
        assert one.counts[name].images == len(coco["images"]) == one.counts[name].boxes
    assert total == sum(SEQUENCE_LENGTHS)
    assert (tmp_path / "one" / "images").resolve() == (tmp_path / "src" / "images").resolve()


def test_the_data_digest_follows_the_split(tmp_path):
    path = write_sequence_set(tmp_path / "src")
    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        split_coco_file(path, tmp_path / "src" / "images", tmp_path / name, SplitRule(group_by="prefix", seed=seed))
        cfg = resolve_config("rtdetr_r18", overrides=[f"data={tmp_path / name / 'data.yaml'}"])
        digests.append(data_digest(cfg))
    assert digests[0] == digests[1] != digests[2]


def test_split_command_and_copy(tmp_path, capsys):
    path = write_sequence_set(tmp_path / "src")
    dst = tmp_path / "out"
    assert main(["split", str(path), "--images", str(tmp_path / "src" / "images"), str(dst), "--val", "0.3",
                 "--group-by", "folder", "--copy"]) == 0
    out = capsys.readouterr().out
    assert "split: by folder, seed 0, 2 groups; asked train 0.7, val 0.3" in out
    assert not (dst / "images").is_symlink()
    val = json.loads((dst / "val.json").read_text())
    assert all((dst / "images" / i["file_name"]).is_file() for i in val["images"])
    assert main(["split", str(path), "--images", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "images folder not found" in capsys.readouterr().err


def test_convert_splits_a_source_without_its_own_split_by_the_rule(tmp_path, capsys):
    path = write_sequence_set(tmp_path / "src")
    dst = tmp_path / "out"
    assert main(["convert", "--from", "coco", str(path), str(dst), "--group-by", "field:seq", "--val", "0.25",
                 "--seed", "2"]) == 0
    data = yaml.safe_load((dst / "data.yaml").read_text())
    assert data["dataset"]["split"] == {"by": "field:seq", "seed": 2, "fractions": {"train": 0.75, "val": 0.25},
                                        "groups": 12}
    assert data["dataset"]["source"]["format"] == "coco"
    train, val = (json.loads((dst / f"{s}.json").read_text()) for s in ("train", "val"))
    assert not {i["seq"] for i in train["images"]} & {i["seq"] for i in val["images"]}
    assert train["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]     # convert re-indexes
    assert {a["category_id"] for a in train["annotations"]} == {1, 2}
