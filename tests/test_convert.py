"""``python -m dset.data convert``: Pascal VOC, YOLO and COCO sources read into COCO data sets, on files the tests
write (tiny images), with the errors each reader gives; the CLI's exit codes; the VOC demo script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from data_helpers import write_image
from make_voc_dataset import make_voc

from dset.config_checks import ConfigError
from dset.data.__main__ import main
from dset.data.check import COCO_91_IDS
from dset.data.coco_reindex import read_coco
from dset.data.convert import convert
from dset.data.errors import DatasetError
from dset.data.split import SplitRule
from dset.data.voc import read_voc
from dset.data.yolo import read_yolo


def load(dst: Path, split: str) -> dict:
    return json.loads((dst / f"{split}.json").read_text())


def boxes_of(source, file_name: str) -> list[tuple]:
    """``(category name, bbox, iscrowd)`` of one image, in file order."""
    names = {c["id"]: c["name"] for c in source.categories}
    image_id = next(img["id"] for img in source.images if img["file_name"] == file_name)
    return [(names[a["category_id"]], a["bbox"], a["iscrowd"]) for a in source.annotations
            if a["image_id"] == image_id]


# ------------------------------------------------------------------------------------------------------ VOC
def voc_object(name: str, box: tuple, difficult: int = 0) -> str:
    x0, y0, x1, y1 = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")


def voc_xml(filename: str, objects: list[str], size: tuple | None = (64, 48)) -> str:
    sz = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><filename>{filename}</filename>{sz}{''.join(objects)}</annotation>"


def tiny_voc(root: Path, splits: dict | None = None) -> Path:
    """a.jpg (64x48): a dog, a difficult cat, a box over the whole image and one crossing its corner;
    b.jpg (80x60, no <size>): a bird; c.xml: its image is missing."""
    write_image(root / "JPEGImages" / "a.jpg", 64, 48)
    write_image(root / "JPEGImages" / "b.jpg", 80, 60)
    ann = root / "Annotations"
    ann.mkdir(parents=True)
    (ann / "a.xml").write_text(voc_xml("a.jpg", [
        voc_object("dog", (11, 6, 30, 20)),
        voc_object("cat", (2, 2, 9, 9), difficult=1),
        voc_object("dog", (1, 1, 64, 48)),         # the whole image, touching every border
        voc_object("dog", (50, 40, 70, 60)),       # crosses the bottom-right corner
        voc_object("dog", (70, 10, 90, 20)),       # wholly outside: no area left
    ]))
    (ann / "b.xml").write_text(voc_xml("b.jpg", [voc_object("bird", (1, 1, 10, 10))], size=None))
    (ann / "c.xml").write_text(voc_xml("c.jpg", [voc_object("dog", (1, 1, 5, 5))]))
    for name, stems in (splits or {}).items():
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(stems) + "\n")
    return root


def test_voc_corners_are_one_based_and_clipped_difficult_becomes_an_ignore_region(tmp_path):
    src = read_voc(tiny_voc(tmp_path / "voc"))
    assert [c["name"] for c in src.categories] == ["bird", "cat", "dog"]          # sorted names
    assert [c["id"] for c in src.categories] == [1, 2, 3]
    assert boxes_of(src, "a.jpg") == [
        ("dog", [10.0, 5.0, 20.0, 15.0], 0),       # pixels 11..30 are [10, 30)
        ("cat", [1.0, 1.0, 8.0, 8.0], 1),
        ("dog", [0.0, 0.0, 64.0, 48.0], 0),
        ("dog", [49.0, 39.0, 15.0, 9.0], 0),
    ]
    assert boxes_of(src, "b.jpg") == [("bird", [0.0, 0.0, 10.0, 10.0], 0)]
    sizes = {img["file_name"]: (img["width"], img["height"]) for img in src.images}
    assert sizes == {"a.jpg": (64, 48), "b.jpg": (80, 60)}                      # b's from the file header
    assert src.dropped == {"XML files whose image file is missing": 1, "boxes with no area inside the image": 1}
    assert src.noted["boxes clipped to the image"] == 1     # the corner one; the whole image fits
    assert src.options == {"difficult": "ignore"}


def test_voc_difficult_keep_or_drop_and_classes_choose_and_order(tmp_path):
    root = tiny_voc(tmp_path / "voc")
    kept = read_voc(root, difficult="keep")
    assert ("cat", [1.0, 1.0, 8.0, 8.0], 0) in boxes_of(kept, "a.jpg")
    dropped = read_voc(root, difficult="drop")
    assert [c["name"] for c in dropped.categories] == ["bird", "dog"]   # cat only ever appeared difficult
    assert dropped.dropped["difficult objects (--difficult drop)"] == 1
    chosen = read_voc(root, classes=["dog", "cat"])
    assert chosen.categories == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]
    assert chosen.dropped["objects of class 'bird' (not in --classes)"] == 1
    assert boxes_of(chosen, "b.jpg") == []                              # b.jpg stays, without boxes
    assert {a["category_id"] for a in chosen.annotations} == {1, 2}


def test_voc_image_sets_are_the_source_split_unless_resplit(tmp_path):
    root = tiny_voc(tmp_path / "voc", splits={"train": ["a", "c"], "val": ["b"]})
    result = convert("voc", root, tmp_path / "out")
    assert result.written.split == {"by": "source", "from": "ImageSets/Main/train.txt, val.txt"}
    assert [i["file_name"] for i in load(tmp_path / "out", "train")["images"]] == ["a.jpg"]
    assert [i["file_name"] for i in load(tmp_path / "out", "val")["images"]] == ["b.jpg"]
    assert result.dropped["ids in ImageSets/Main/train.txt without a usable XML and image"] == 1
    with pytest.raises(ConfigError, match="already split.*--resplit"):
        convert("voc", root, tmp_path / "out2", rule=SplitRule(val=0.5))
    again = convert("voc", root, tmp_path / "out3", resplit=True)
    assert again.written.split["by"] == "image"


def test_labelimg_layout_finds_images_beside_their_xml_in_subfolders(tmp_path):
    root = tmp_path / "labelimg"
    for folder, stem in (("day", "x"), ("night", "y")):
        write_image(root / folder / f"{stem}.png", 64, 48)
        # <filename> without its suffix: found by the XML's stem
        (root / folder / f"{stem}.xml").write_text(voc_xml(stem, [voc_object("car", (5, 5, 20, 20))]))
    src = read_voc(root)
    assert src.layout == "images with an XML beside each"
    assert [i["file_name"] for i in src.images] == ["day/x.png", "night/y.png"]
    assert src.source_split is None and len(src.annotations) == 2


@pytest.mark.parametrize("xml, message", [
    ("<annotation><object>", "a.xml: cannot read the VOC XML"),
    ("<root/>", "a.xml: a VOC file's root element is <annotation>, got <root>"),
    (voc_xml("a.jpg", ["<object><name>dog</name></object>"]), r"a.xml: <object> 1 \('dog'\) has no <bndbox>"),
    (voc_xml("a.jpg", [voc_object("dog", (1, "x", 5, 5))]),
     r"a.xml: <object> 1 \('dog'\) <ymin> must be a number, got 'x'"),
    (voc_xml("a.jpg", [voc_object("dog", (1, 1, 5, 5), difficult=2)]), "<difficult> must be 0 or 1, got '2'"),
])
def test_voc_malformed_files_name_file_and_element(tmp_path, xml, message):
    write_image(tmp_path / "JPEGImages" / "a.jpg", 64, 48)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text(xml)
    with pytest.raises(DatasetError, match=message):
        read_voc(tmp_path)


# ----------------------------------------------------------------------------------------------------- YOLO
def tiny_yolo(root: Path, prefix: str = "") -> Path:
    """a.png (64x48): a centred box and one over the right border; b.png: empty label file; c.png: no label."""
    for stem in "abc":
        write_image(root / "images" / prefix / f"{stem}.png", 64, 48)
    labels = root / "labels" / prefix
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n\n1 0.95 0.5 0.2 0.2\n")
    (labels / "b.txt").write_text("")
    return root


def test_yolo_normalised_boxes_become_pixels_and_empty_images_are_kept(tmp_path):
    root = tiny_yolo(tmp_path / "yolo")
    (root / "data.yaml").write_text(yaml.safe_dump({"names": {0: "cat", 1: "dog"}}))
    src = read_yolo(root)
    assert src.categories == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]   # class k -> id k + 1
    assert boxes_of(src, "images/a.png") == [
        ("cat", [24.0, 12.0, 16.0, 24.0], 0),      # cx 32, cy 24, w 16, h 24
        ("dog", [54.4, 19.2, 9.6, 9.6], 0),        # x 54.4..67.2 clipped at 64
    ]
    assert boxes_of(src, "images/b.png") == [] and boxes_of(src, "images/c.png") == []
    assert [i["file_name"] for i in src.images] == ["images/a.png", "images/b.png", "images/c.png"]
    assert src.noted == {"images without a label file (kept without boxes)": 1}
    assert src.options == {"classes_from": str(root / "data.yaml")}
    assert src.source_split is None


def test_yolo_class_names_from_classes_txt_or_the_command_line(tmp_path):
    root = tiny_yolo(tmp_path / "yolo")
    (root / "classes.txt").write_text("person\ncar\n\n")
    assert [c["name"] for c in read_yolo(root).categories] == ["person", "car"]
    assert [c["name"] for c in read_yolo(root, classes=["x", "y", "z"]).categories] == ["x", "y", "z"]
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="no class names: give --classes"):
        read_yolo(root)


def test_yolo_split_folders_are_the_source_split(tmp_path):
    root = tiny_yolo(tmp_path / "yolo", "train")
    write_image(root / "images" / "val" / "v.png", 64, 48)
    (root / "labels" / "val" / "v.txt").parent.mkdir(parents=True)
    (root / "labels" / "val" / "v.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    result = convert("yolo", root, tmp_path / "out", classes=["cat", "dog"])
    assert result.written.split["by"] == "source"
    val = load(tmp_path / "out", "val")
    assert [i["file_name"] for i in val["images"]] == ["images/val/v.png"]
    assert [(a["category_id"], a["bbox"]) for a in val["annotations"]] == [(2, [16.0, 12.0, 32.0, 24.0])]
    assert len(load(tmp_path / "out", "train")["images"]) == 3
    write_image(root / "images" / "loose.png", 64, 48)
    with pytest.raises(DatasetError, match="some images are in train / val / test folders"):
        read_yolo(root, classes=["cat", "dog"])


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5", r"labels/a.txt:2: a label line is 'class cx cy w h'.*got 3 fields"),
    ("0 0.5 0.5 x 0.1", r"labels/a.txt:2: not a number"),
    ("2 0.5 0.5 0.1 0.1", r"labels/a.txt:2: class index 2 is out of range; there are 2 class names"),
    ("-1 0.5 0.5 0.1 0.1", r"labels/a.txt:2: class index -1 is out of range"),
    ("0 32 24 16 24", r"labels/a.txt:2: coordinates must be fractions of the image size"),
    ("0 0.5 0.5 -0.1 0.1", r"labels/a.txt:2: width and height must not be negative"),
])
def test_yolo_bad_lines_name_file_and_line(tmp_path, line, message):
    root = tiny_yolo(tmp_path / "yolo")
    (root / "labels" / "a.txt").write_text(f"0 0.5 0.5 0.25 0.5\n{line}\n")
    with pytest.raises(DatasetError, match=message):
        read_yolo(root, classes=["cat", "dog"])


def test_yolo_polygon_lines_give_their_bounding_box(tmp_path):
    root = tiny_yolo(tmp_path / "yolo")
    (root / "labels" / "a.txt").write_text("1 0.25 0.25 0.5 0.25 0.5 0.75 0.25 0.75\n")
    assert boxes_of(read_yolo(root, classes=["cat", "dog"]), "images/a.png") == [("dog", [16.0, 12.0, 16.0, 24.0], 0)]


# ----------------------------------------------------------------------------------------------------- COCO
def coco_file(root: Path, categories: list[dict], annotations: list[dict], images: list[dict] | None = None) -> Path:
    write_image(root / "images" / "a.png", 64, 48)
    write_image(root / "images" / "b.png", 80, 60)
    data = {"images": images or [{"id": 5, "file_name": "a.png", "width": 64, "height": 48, "seq": "s1"},
                                 {"id": 9, "file_name": "b.png"}],
            "annotations": annotations, "categories": categories, "licenses": [{"id": 1, "name": "CC"}]}
    (root / "instances.json").write_text(json.dumps(data))
    return root / "instances.json"


def ann(image_id: int, category_id: int, bbox: list, **extra) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def test_coco_categories_1_3_7_become_1_2_3_with_names_kept(tmp_path):
    path = coco_file(tmp_path, [{"id": 7, "name": "dog"}, {"id": 1, "name": "person", "supercategory": "p"},
                                {"id": 3, "name": "car"}],
                     [ann(5, 7, [1, 2, 10, 10], id=40, iscrowd=1, area=50.0), ann(5, 3, [50, 40, 30, 30]),
                      ann(9, 1, [0, 0, 5, 5]), ann(9, 99, [0, 0, 5, 5]), ann(9, 1, [90, 0, 5, 5])])
    src = read_coco(path)
    assert src.categories == [{"id": 1, "name": "person", "supercategory": "p"}, {"id": 2, "name": "car"},
                              {"id": 3, "name": "dog"}]
    assert [(a["id"], a["image_id"], a["category_id"], a["bbox"], a["area"], a["iscrowd"])
            for a in src.annotations] == [(1, 5, 3, [1.0, 2.0, 10.0, 10.0], 50.0, 1),
                                          (2, 5, 2, [50.0, 40.0, 14.0, 8.0], 112.0, 0),   # clipped to 64x48
                                          (3, 9, 1, [0.0, 0.0, 5.0, 5.0], 25.0, 0)]
    assert src.dropped == {"annotations with category_id 99, which is not in 'categories'": 1,
                           "boxes with no area inside the image": 1}
    assert src.images[0] == {"id": 5, "file_name": "a.png", "width": 64, "height": 48, "seq": "s1"}
    assert (src.images[1]["width"], src.images[1]["height"]) == (80, 60)      # from the file header
    assert src.options["category_ids"] == {1: 1, 3: 2, 7: 3}
    assert src.licenses == [{"id": 1, "name": "CC"}]


def test_coco_zero_based_and_91_id_categories(tmp_path):
    zero = read_coco(coco_file(tmp_path / "zero", [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}],
                               [ann(5, 0, [1, 1, 4, 4]), ann(9, 1, [1, 1, 4, 4])]))
    assert [(a["category_id"]) for a in zero.annotations] == [1, 2]
    ids = sorted(COCO_91_IDS)
    cats = [{"id": i, "name": f"c{i}"} for i in reversed(ids)]
    full = read_coco(coco_file(tmp_path / "full", cats, [ann(5, 90, [1, 1, 4, 4]), ann(9, 13, [1, 1, 4, 4])]))
    assert len(full.categories) == 80 and full.categories[-1] == {"id": 80, "name": "c90"}
    assert full.categories[11] == {"id": 12, "name": "c13"}                   # 12 is a gap in COCO's ids
    assert [a["category_id"] for a in full.annotations] == [80, 12]


def test_coco_classes_keep_and_order_a_subset(tmp_path):
    path = coco_file(tmp_path, [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}],
                     [ann(5, 7, [1, 1, 4, 4]), ann(5, 3, [1, 1, 4, 4]), ann(9, 1, [1, 1, 4, 4])])
    src = read_coco(path, classes=["dog", "person"])
    assert [c["name"] for c in src.categories] == ["dog", "person"]
    assert [a["category_id"] for a in src.annotations] == [1, 2]
    assert src.dropped == {"annotations of categories not in --classes": 1}
    with pytest.raises(ConfigError, match=r"--classes \['cow'\] not among the categories"):
        read_coco(path, classes=["cow"])


def test_coco_missing_image_files_are_dropped_with_their_boxes(tmp_path):
    path = coco_file(tmp_path, [{"id": 1, "name": "a"}], [ann(5, 1, [1, 1, 4, 4]), ann(6, 1, [1, 1, 4, 4])],
                     images=[{"id": 5, "file_name": "a.png"}, {"id": 6, "file_name": "gone.png"}])
    src = read_coco(path)
    assert [i["id"] for i in src.images] == [5] and [a["image_id"] for a in src.annotations] == [5]
    assert src.dropped == {"images whose file is missing": 1}


@pytest.mark.parametrize("categories, annotations, message", [
    ([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], [], "categories share the id 1"),
    ([{"id": 1, "name": "a"}, {"id": 2, "name": "a"}], [], "categories share the name 'a'"),
    ([{"id": "x", "name": "a"}], [], r"categories\[0\] needs a numeric 'id'"),
    ([{"id": 1, "name": "a"}], [ann(5, 1, [1, 1, 4])], r"annotations\[0\] \(id None\) 'bbox' must be four numbers"),
    ([{"id": 1, "name": "a"}], [ann(77, 1, [1, 1, 4, 4])], r"annotations\[0\] has image_id 77, which is not in"),
])
def test_coco_malformed_files_name_the_key(tmp_path, categories, annotations, message):
    with pytest.raises(DatasetError, match=message):
        read_coco(coco_file(tmp_path, categories, annotations))


# ----------------------------------------------------------------------------------------------- command line
def test_cli_converts_and_prints_the_next_command(tmp_path, capsys):
    root = tiny_voc(tmp_path / "voc")
    write_image(root / "JPEGImages" / "d.jpg", 64, 48)
    (root / "Annotations" / "d.xml").write_text(voc_xml("d.jpg", [voc_object("dog", (3, 3, 9, 9))]))
    dst = tmp_path / "out"
    assert main(["convert", "--from", "voc", str(root), str(dst), "--val", "0.34", "--seed", "1",
                 "--difficult", "keep"]) == 0
    out = capsys.readouterr().out
    assert f"next: python -m dset.data check {dst / 'data.yaml'}" in out
    assert "dropped: 1 XML files whose image file is missing" in out
    data = yaml.safe_load((dst / "data.yaml").read_text())
    assert data["data"]["classes"] == ["bird", "cat", "dog"]
    assert data["dataset"]["source"]["difficult"] == "keep"
    assert (dst / "images").resolve() == (root / "JPEGImages").resolve()
    assert main(["check", str(dst / "data.yaml")]) == 0


@pytest.mark.parametrize("args, message", [
    (["--from", "yolo", "--difficult", "drop"], "--difficult applies to --from voc only"),
    (["--from", "voc", "--images", "x"], "--images applies to --from coco only"),
    (["--from", "voc", "--classes", "a,,b"], "--classes must be names separated by commas"),
    (["--from", "voc", "--val", "1.5"], "--val must be above 0 and below 1"),
])
def test_cli_errors_exit_2_with_the_problem_named(tmp_path, capsys, args, message):
    root = tiny_voc(tmp_path / "voc")
    assert main(["convert", *args, str(root), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_source_exits_2(tmp_path, capsys):
    assert main(["convert", "--from", "coco", str(tmp_path / "none.json"), str(tmp_path / "out")]) == 2
    assert "COCO annotation file not found" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- the demo data set
def test_demo_voc_set_is_deterministic_and_converts_with_its_problems_reported(tmp_path):
    one, two = make_voc(tmp_path / "one", images=12, seed=3), make_voc(tmp_path / "two", images=12, seed=3)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 12 + 13     # 12 images, 13 XMLs (one names a missing image)
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    result = convert("voc", one, tmp_path / "out", rule=SplitRule(
        val=0.25, group_by="prefix"))
    assert result.dropped == {"XML files whose image file is missing": 1}
    assert result.noted["difficult objects made ignore regions (iscrowd 1)"] == 1
    assert result.noted["boxes clipped to the image"] >= 1
    counts = result.written.counts
    assert sum(c.images for c in counts.values()) == 12
    assert sum(c.empty_images for c in counts.values()) >= 1
    assert result.written.classes == ["bicycle", "car", "dog", "person"]
    for split in counts:   # each 4-frame sequence on one side
        prefixes = {i["file_name"].split("_")[0] for i in load(tmp_path / "out", split)["images"]}
        others = [s for s in counts if s != split]
        assert not prefixes & {i["file_name"].split("_")[0] for s in others
                               for i in load(tmp_path / "out", s)["images"]}
