"""``python -m dset.data check``: every problem it names, its summary numbers, its suggestion, and its agreement
with what training (CocoDetection, the loaders) accepts and refuses. Tiny COCO sets written here, 40x30 PNGs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
from PIL import Image

from dset.data.__main__ import main
from dset.data.check import check_splits
from dset.data.coco import CocoDetection
from dset.data.errors import DatasetError
from dset.data.transforms import eval_transforms
from dset.data_file import write_data_file

W, H = 40, 30


def write_set(root: Path, images: list[dict], annotations: list[dict], categories=None, name="train",
              sizes: dict[str, tuple[int, int]] | None = None, skip=()) -> tuple[Path, Path]:
    """``root/images/`` with a PNG per image record (its JSON size unless ``sizes`` says otherwise, none for the
    names in ``skip``) and ``root/NAME.json``; returns (images folder, JSON)."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for img in images:
        file = folder / img["file_name"]
        if img["file_name"] in skip or file.exists():
            continue
        Image.new("RGB", (sizes or {}).get(img["file_name"], (img["width"], img["height"])), (90, 90, 90)).save(file)
    if categories is None:
        categories = [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}]
    path = root / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return folder, path


def img(iid: int, file: str | None = None, w: int = W, h: int = H) -> dict:
    return {"id": iid, "file_name": file or f"{iid}.png", "width": w, "height": h}


def ann(aid: int, iid: int, bbox, cid: int = 1, **extra) -> dict:
    return {"id": aid, "image_id": iid, "category_id": cid, "bbox": list(bbox), **extra}


def good_set(root: Path) -> tuple[Path, Path]:
    """Two images, a box each: nothing to say."""
    return write_set(root, [img(1), img(2)], [ann(1, 1, [2, 2, 10, 8]), ann(2, 2, [5, 5, 12, 10], cid=2)])


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["check", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def check_json(capsys, folder: Path, path: Path, *more) -> tuple[int, dict, str]:
    """Exit code, the --json report and the printed report of checking one COCO JSON."""
    out = path.parent / f"{path.stem}_report.json"
    rc, text, _ = run_cli(capsys, path, "--images", folder, "--json", out, *more)
    return rc, json.loads(out.read_text()), text


def problem(report: dict, code: str) -> dict:
    found = [p for p in report["problems"] if p["code"] == code]
    assert len(found) == 1, f"{code} not reported once: {[p['code'] for p in report['problems']]}"
    return found[0]


def codes(report: dict) -> set[str]:
    return {p["code"] for p in report["problems"]}


def coco_refuses(folder: Path, path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CocoDetection(folder, path)
    except DatasetError:
        return True
    return False


# ------------------------------------------------------------------------------------------ summary numbers
def test_summary_numbers_per_split_histogram_and_box_sizes(tmp_path, capsys):
    # train: 3 images 200x150; boxes 10x10 (small, 100 px^2), 40x40 (medium, 1600), 100x100 (large, 10000),
    # 20x10 (small); image 3 has none. val: one image with one 50x50 box (medium).
    train_images = [img(1, w=200, h=150), img(2, w=200, h=150), img(3, w=200, h=150)]
    train_anns = [ann(1, 1, [0, 0, 10, 10]), ann(2, 1, [20, 20, 40, 40], cid=2), ann(3, 2, [10, 10, 100, 100]),
                  ann(4, 2, [150, 100, 20, 10])]
    root = tmp_path / "set"
    write_set(root, train_images, train_anns)
    write_set(root, [img(10, w=120, h=90)], [ann(1, 10, [0, 0, 50, 50], cid=2)], name="val")
    splits = {s: (root / "images", root / f"{s}.json") for s in ("train", "val")}
    data_file = write_data_file(root / "data.yaml", splits, ["car", "person"])
    out = tmp_path / "report.json"
    rc, text, err = run_cli(capsys, root, "--json", out)   # a folder holding data.yaml
    assert rc == 0, text + err
    report = json.loads(out.read_text())
    assert report["usable"] is True
    tr, va, both = (report["summary"]["splits"]["train"], report["summary"]["splits"]["val"],
                    report["summary"]["all"])
    assert (tr["images"], tr["annotations"], tr["boxes"], tr["images_without_boxes"]) == (3, 4, 4, 1)
    assert (va["images"], va["boxes"]) == (1, 1)
    assert tr["boxes_per_class"] == {"car": 3, "person": 1}
    assert both["boxes_per_class"] == {"car": 3, "person": 2}
    assert {k: both["box_sizes"][k] for k in ("small", "medium", "large")} == {"small": 2, "medium": 2, "large": 1}
    # sqrt(area) over the five boxes: 10, 40, 100, sqrt(200), 50 -> median 40
    assert both["box_sizes"]["sqrt_area_px"]["median"] == 40.0
    assert both["image_sizes"]["width"] == {"min": 120, "median": 200.0, "max": 200}
    assert tr["objects_per_image"]["max"] == 2
    assert report["summary"]["classes"] == ["car", "person"]
    assert codes(report) == {"images-without-boxes"}
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["train", "3", "images", "4", "boxes"]
    assert lines[1].split()[:5] == ["val", "1", "images", "1", "boxes"]
    assert "classes: car 3, person 2" in text
    assert "small 2 / medium 2 / large 1" in text
    assert lines[-1] == "usable: yes"
    # the same through the data file itself
    assert main(["check", str(data_file)]) == 0


# ------------------------------------------------------------------------------------------ errors (exit 2)
def test_missing_image_file_is_an_error(tmp_path, capsys):
    folder, path = write_set(tmp_path, [img(1), img(2, "lost.png")], [ann(1, 1, [1, 1, 5, 5])], skip={"lost.png"})
    rc, report, text = check_json(capsys, folder, path)
    p = problem(report, "image-file-missing")
    assert (rc, p["severity"], p["count"]) == (2, "error", 1)
    assert "image 2" in p["examples"][0] and "lost.png" in p["examples"][0]
    assert "usable: NO" in text


def test_read_images_finds_unreadable_files_and_wrong_sizes(tmp_path, capsys):
    folder, path = write_set(tmp_path, [img(1), img(2, "broken.png"), img(3, "big.png")],
                             [ann(1, 1, [1, 1, 5, 5])], sizes={"big.png": (64, 48)}, skip={"broken.png"})
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    rc, report, _ = check_json(capsys, folder, path)
    assert rc == 0 and not codes(report) & {"image-unreadable", "image-size-mismatch"}  # not opened by default
    rc, report, _ = check_json(capsys, folder, path, "--read-images")
    unreadable, mismatch = problem(report, "image-unreadable"), problem(report, "image-size-mismatch")
    assert rc == 2 and unreadable["severity"] == mismatch["severity"] == "error"
    assert "image 2" in unreadable["examples"][0] and "broken.png" in unreadable["examples"][0]
    assert "image 3 big.png: 64x48, the JSON says 40x30" in mismatch["examples"][0]


def test_unknown_category_id_is_an_error_that_says_why(tmp_path, capsys):
    # categories 1, 2 but the annotations use 0 and 1: 0-based labels
    folder, path = write_set(tmp_path, [img(1), img(2)], [ann(5, 1, [1, 1, 5, 5], cid=0), ann(6, 2, [1, 1, 9, 9])])
    rc, report, _ = check_json(capsys, folder, path)
    p = problem(report, "unknown-category")
    assert (rc, p["severity"], p["count"]) == (2, "error", 1)
    assert "0-based labels?" in p["description"]
    assert "id 5, image 1 1.png" in p["examples"][0] and "category_id 0" in p["examples"][0]
    assert coco_refuses(folder, path)


@pytest.mark.parametrize(("used", "hint"), [
    ([1, 18, 44], "ids [1, 18, 44] but categories 2..4: COCO's 91-id space (1..90 with gaps) against 3 categories?"),
    ([0, 1, 2], "ids 0..2 but categories 2..4: label positions 0..2 instead of category ids?"),
    ([3, 4, 5], "ids 3..5 but categories 2..4: ids one too high?"),
    ([1, 5], "ids [1, 5] but categories 2..4"),   # no known slip: no guess
])
def test_unknown_category_ids_say_the_likely_slip(tmp_path, capsys, used, hint):
    anns = [ann(i + 1, 1, [1, 1, 5, 5], cid=c) for i, c in enumerate(used)]
    cats = [{"id": 2, "name": "a"}, {"id": 3, "name": "b"}, {"id": 4, "name": "c"}]
    folder, path = write_set(tmp_path, [img(1)], anns, categories=cats)
    rc, report, _ = check_json(capsys, folder, path)
    assert rc == 2 and problem(report, "unknown-category")["description"] == f"category_id not in 'categories' ({hint})"


def test_duplicate_category_ids_are_an_error(tmp_path, capsys):
    folder, path = write_set(tmp_path, [img(1)], [ann(1, 1, [1, 1, 5, 5])],
                             categories=[{"id": 1, "name": "car"}, {"id": 1, "name": "truck"}])
    rc, report, _ = check_json(capsys, folder, path)
    p = problem(report, "duplicate-category-id")
    assert (rc, p["severity"]) == (2, "error") and "categories[1] id 1" in p["examples"][0]


def test_duplicate_image_ids_are_an_error(tmp_path, capsys):
    folder, path = write_set(tmp_path, [img(1), img(1, "again.png")], [ann(1, 1, [1, 1, 5, 5])])
    rc, report, _ = check_json(capsys, folder, path)
    p = problem(report, "duplicate-image-id")
    assert (rc, p["severity"]) == (2, "error") and "id 1 (again.png)" in p["examples"][0]


def test_a_split_without_any_usable_box_is_an_error(tmp_path, capsys):
    # one box of no area, one crowd region: CocoDetection accepts it, training would learn nothing
    folder, path = write_set(tmp_path, [img(1)], [ann(1, 1, [1, 1, 0, 5]), ann(2, 1, [1, 1, 9, 9], iscrowd=1)])
    rc, report, _ = check_json(capsys, folder, path)
    assert rc == 2 and problem(report, "no-usable-box")["severity"] == "error"
    assert report["suggestion"] is None


@pytest.mark.parametrize("case", ["unknown category", "duplicate image id", "duplicate category id",
                                  "missing file", "duplicate annotation id", "image_id not in images",
                                  "bbox of three numbers", "width not a number", "no categories", "no images",
                                  "no images folder"])
def test_what_coco_detection_refuses_is_exit_2(tmp_path, capsys, case):
    images, anns, cats, skip = [img(1), img(2)], [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [3, 3, 6, 6])], None, ()
    if case == "unknown category":
        anns[1]["category_id"] = 9
    elif case == "duplicate image id":
        images[1]["id"] = 1
    elif case == "duplicate category id":
        cats = [{"id": 1, "name": "car"}, {"id": 1, "name": "car2"}]
    elif case == "missing file":
        skip = {"2.png"}
    elif case == "duplicate annotation id":
        anns[1]["id"] = 1
    elif case == "image_id not in images":
        anns[1]["image_id"] = 77
    elif case == "bbox of three numbers":
        anns[1]["bbox"] = [1, 2, 3]
    elif case == "width not a number":
        images[1]["width"] = "40"
    elif case == "no categories":
        cats = []
    elif case == "no images":
        images, anns = [], []
    folder, path = write_set(tmp_path, images, anns, categories=cats, skip=skip, sizes={"2.png": (W, H)})
    if case == "no images folder":
        folder = tmp_path / "elsewhere"
    assert coco_refuses(folder, path)
    rc, report, _ = check_json(capsys, folder, path)
    assert rc == 2 and not report["usable"]


def test_what_coco_detection_accepts_is_exit_0(tmp_path, capsys):
    # every warning and note at once: clipped, dropped, crowd, 0-based ids, duplicate file name, no boxes
    images = [img(1), img(2), img(3, "1.png"), img(4)]
    anns = [ann(1, 1, [30, 20, 20, 20], cid=0), ann(2, 2, [5, 5, 0, 4], cid=1), ann(3, 2, [2, 2, 8, 8], cid=1),
            ann(4, 2, [0, 0, 40, 30], cid=0, iscrowd=1)]
    folder, path = write_set(tmp_path, images, anns, categories=[{"id": 0, "name": "a"}, {"id": 1, "name": "b"}])
    assert not coco_refuses(folder, path)
    rc, report, _ = check_json(capsys, folder, path)
    assert rc == 0 and report["usable"]
    assert codes(report) == {"box-outside-image", "degenerate-box", "crowd-boxes", "category-ids",
                             "duplicate-file-name", "images-without-boxes"}
    assert {p["severity"] for p in report["problems"]} == {"warning", "note"}


# ------------------------------------------------------------------------------------------ warnings and notes
def test_box_outside_the_image_is_clipped_with_a_warning(tmp_path, capsys):
    folder, path = write_set(tmp_path, [img(1)], [ann(7, 1, [30, 20, 20, 20]), ann(8, 1, [1, 1, 5, 5])])
    rc, report, _ = check_json(capsys, folder, path)
    p = problem(report, "box-outside-image")
    assert (rc, p["severity"], p["count"]) == (0, "warning", 1)
    assert "id 7, image 1 1.png" in p["examples"][0] and "[30, 20, 20, 20] in 40x30" in p["examples"][0]
    # counted as training sees it: clipped to 10x10, so sqrt(area) 10 and 5 -> p90 at 9.5
    assert report["summary"]["all"]["box_sizes"]["sqrt_area_px"]["p90"] == 9.5


@pytest.mark.parametrize("bbox", [[5, 5, 0, 4], [5, 5, 6, -1], [45, 5, 5, 5], [-9, 2, 9, 5]])
def test_boxes_without_area_are_dropped_with_a_warning(tmp_path, capsys, bbox):
    folder, path = write_set(tmp_path, [img(1)], [ann(3, 1, bbox), ann(4, 1, [1, 1, 5, 5])])
    rc, report, _ = check_json(capsys, folder, path)
    p = problem(report, "degenerate-box")
    assert (rc, p["severity"]) == (0, "warning") and "id 3, image 1 1.png" in p["examples"][0]
    assert report["summary"]["all"]["boxes"] == 1 and report["summary"]["all"]["dropped"] == 1
    with pytest.warns(UserWarning, match="dropped 1 degenerate"):
        assert CocoDetection(folder, path).num_dropped_boxes == 1


@pytest.mark.parametrize(("ids", "said"), [([0, 1], "ids 0..1 -> labels 0..1"), ([3, 7], "ids [3, 7] -> labels 0..1")])
def test_zero_based_or_gapped_category_ids_are_a_note(tmp_path, capsys, ids, said):
    anns = [ann(1, 1, [1, 1, 5, 5], cid=ids[0]), ann(2, 1, [8, 8, 5, 5], cid=ids[1])]
    categories = [{"id": ids[1], "name": "b"}, {"id": ids[0], "name": "a"}]
    folder, path = write_set(tmp_path, [img(1)], anns, categories=categories)
    rc, report, _ = check_json(capsys, folder, path)
    p = problem(report, "category-ids")
    assert (rc, p["severity"]) == (0, "note") and said in p["examples"][0]
    assert report["summary"]["classes"] == ["a", "b"]   # ascending id order, as CocoDetection's labels


def test_contiguous_one_based_ids_say_nothing(tmp_path, capsys):
    folder, path = good_set(tmp_path)
    rc, report, text = check_json(capsys, folder, path)
    assert rc == 0 and report["problems"] == [] and "problems: none" in text


def test_duplicate_file_names_are_a_warning(tmp_path, capsys):
    folder, path = write_set(tmp_path, [img(1), img(2, "1.png")], [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [1, 1, 5, 5])])
    rc, report, _ = check_json(capsys, folder, path)
    p = problem(report, "duplicate-file-name")
    assert (rc, p["severity"]) == (0, "warning") and "images 1 and 2: 1.png" in p["examples"][0]


def test_images_without_boxes_are_a_warning(tmp_path, capsys):
    folder, path = write_set(tmp_path, [img(1), img(2), img(3)], [ann(1, 2, [1, 1, 5, 5])])
    rc, report, _ = check_json(capsys, folder, path)
    p = problem(report, "images-without-boxes")
    assert (rc, p["severity"], p["count"]) == (0, "warning", 2)
    assert p["examples"] == ["train image 1 1.png", "train image 3 3.png"]


def test_crowd_boxes_are_a_note_and_not_training_boxes(tmp_path, capsys):
    anns = [ann(1, 1, [1, 1, 5, 5]), ann(2, 1, [0, 0, 40, 30], iscrowd=1), ann(3, 1, [30, 20, 20, 20], iscrowd=1)]
    folder, path = write_set(tmp_path, [img(1)], anns)
    rc, report, _ = check_json(capsys, folder, path)
    p = problem(report, "crowd-boxes")
    assert (rc, p["severity"], p["count"]) == (0, "note", 2)
    assert report["summary"]["all"]["boxes"] == 1 and report["summary"]["all"]["crowd"] == 2
    assert "box-outside-image" not in codes(report)  # a crowd region is not clipped: nothing to warn about


# ------------------------------------------------------------------------------------------ across splits
def _two_splits(tmp_path: Path, val_categories, classes=("car", "person"), val_file="v.png") -> Path:
    root = tmp_path / "set"
    write_set(root, [img(1), img(2)], [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [1, 1, 5, 5], cid=2)])
    write_set(root, [img(1, val_file)], [ann(1, 1, [1, 1, 5, 5])], categories=val_categories, name="val")
    return write_data_file(root / "data.yaml", {s: (root / "images", root / f"{s}.json") for s in ("train", "val")},
                           list(classes))


def test_splits_with_other_category_ids_are_an_error(tmp_path, capsys):
    data_file = _two_splits(tmp_path, [{"id": 1, "name": "car"}, {"id": 3, "name": "person"}])
    out = tmp_path / "r.json"
    rc, _, _ = run_cli(capsys, data_file, "--json", out)
    p = problem(json.loads(out.read_text()), "split-categories-differ")
    assert (rc, p["severity"]) == (2, "error") and p["examples"] == ["train ids 1..2 but val ids [1, 3]"]


def test_splits_naming_the_same_ids_differently_are_a_warning(tmp_path, capsys):
    # the loaders compare ids only and take the validation split's names
    data_file = _two_splits(tmp_path, [{"id": 1, "name": "car"}, {"id": 2, "name": "pedestrian"}],
                            classes=("car", "pedestrian"))
    out = tmp_path / "r.json"
    rc, _, _ = run_cli(capsys, data_file, "--json", out)
    report = json.loads(out.read_text())
    assert rc == 0 and problem(report, "split-names-differ")["severity"] == "warning"
    assert report["summary"]["classes"] == ["car", "pedestrian"]


def test_data_classes_that_differ_from_the_categories_are_an_error(tmp_path, capsys):
    data_file = _two_splits(tmp_path, [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}],
                            classes=("person", "car"))
    out = tmp_path / "r.json"
    rc, _, _ = run_cli(capsys, data_file, "--json", out)
    p = problem(json.loads(out.read_text()), "classes-differ")
    assert (rc, p["severity"]) == (2, "error") and "['person', 'car']" in p["examples"][0]


def test_an_image_in_two_splits_is_a_warning(tmp_path, capsys):
    data_file = _two_splits(tmp_path, [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}], val_file="2.png")
    out = tmp_path / "r.json"
    rc, _, _ = run_cli(capsys, data_file, "--json", out)
    p = problem(json.loads(out.read_text()), "file-in-two-splits")
    assert (rc, p["severity"], p["examples"]) == (0, "warning", ["2.png in train and val"])


def test_a_data_file_without_a_val_split_is_an_error(tmp_path, capsys):
    data_file = _two_splits(tmp_path, [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}])
    data_file.write_text(data_file.read_text().replace("val:", "other:"))
    rc, text, err = run_cli(capsys, data_file)
    assert rc == 2, text + err


# ------------------------------------------------------------------------------------------ files and arguments
def test_unreadable_annotation_files_are_errors_not_tracebacks(tmp_path, capsys):
    folder, path = good_set(tmp_path)
    path.write_text('{"images": [')
    rc, report, text = check_json(capsys, folder, path)
    assert rc == 2 and problem(report, "not-json")["severity"] == "error"
    assert report["summary"]["splits"]["train"] is None and "train  not readable (see the problems)" in text
    path.write_text(json.dumps({"images": [img(1)], "categories": []}))
    rc, report, _ = check_json(capsys, folder, path)
    assert rc == 2 and "no 'annotations'" in problem(report, "missing-key")["examples"][0]


def test_arguments_that_cannot_work_are_named(tmp_path, capsys):
    folder, path = good_set(tmp_path)
    rc, _, err = run_cli(capsys, path)
    assert rc == 2 and "--images DIR" in err and str(path) in err
    rc, _, err = run_cli(capsys, tmp_path / "nothing.yaml")
    assert rc == 2 and "nothing.yaml: not found" in err
    rc, _, err = run_cli(capsys, tmp_path)
    assert rc == 2 and "no data.yaml in this folder" in err
    with pytest.raises(SystemExit) as exc:
        main(["check", str(path), "--images", str(folder), "--batch-size", "0"])
    assert exc.value.code == 2 and "must be a whole number >= 1, got '0'" in capsys.readouterr().err


def test_report_is_a_few_lines_however_many_problems(tmp_path, capsys):
    images = [img(i) for i in range(1, 41)]
    anns = [ann(i, i, [30, 20, 20, 20]) for i in range(1, 21)] + [ann(100, 1, [1, 1, 0, 3])]
    folder, path = write_set(tmp_path, images, anns)
    rc, report, text = check_json(capsys, folder, path)
    assert rc == 0
    assert problem(report, "box-outside-image")["count"] == 20
    assert len(problem(report, "images-without-boxes")["examples"]) == 5   # the first few are kept
    line = next(t for t in text.splitlines() if "outside the image" in t)
    assert "(20):" in line and line.count("bbox") == 3 and line.endswith("; ...")
    assert len(text.splitlines()) <= 16


def test_json_report_content(tmp_path, capsys):
    folder, path = write_set(tmp_path, [img(1), img(2)], [ann(1, 1, [1, 1, 5, 5]), ann(2, 1, [1, 1, 0, 5])])
    rc, report, _ = check_json(capsys, folder, path, "--batch-size", "2")
    assert rc == 0 and set(report) == {"usable", "summary", "problems", "suggestion"}
    assert report["summary"]["splits"]["train"]["dropped"] == 1
    dropped = problem(report, "degenerate-box")
    assert set(dropped) == {"severity", "code", "description", "count", "examples"}
    s = report["suggestion"]
    assert set(s["values"]) == {"data.image_size", "model.eval_spatial_size", "model.decoder.num_queries",
                                "train.epochs"}
    assert s["numbers"]["batch_size"] == 2 and s["numbers"]["steps_per_epoch"] == 1
    assert s["values"]["train.epochs"] == 300 and "300 optimiser steps" in s["rule"]


# ------------------------------------------------------------------------------------------ the suggestion
def _boxes_set(root: Path, n_images: int, w: int, h: int, box_sides: list[float], per_image: int = 1):
    """``n_images`` WxH images; box k (k = 0, 1, ...) is square with side box_sides[k % len], ``per_image`` each."""
    images = [img(i, "same.png", w, h) for i in range(1, n_images + 1)]
    anns, k = [], 0
    for i in range(1, n_images + 1):
        for _ in range(per_image):
            side = box_sides[k % len(box_sides)]
            anns.append(ann(k + 1, i, [0, 0, side, side]))
            k += 1
    return write_set(root, images, anns)


def _suggest(folder, path, batch_size=8) -> dict:
    return check_splits({"train": (folder, path)}, batch_size=batch_size).suggestion.values


def test_image_size_rule_median_box(tmp_path):
    # 12 px boxes in 400x400 images: at S a box is S * 12 / 400 px; >= 16 needs S >= 533.3 -> 544 of 128, 160, ...
    folder, path = _boxes_set(tmp_path, 10, 400, 400, [12])
    values = _suggest(folder, path)
    assert values["data.image_size"] == 544 and values["model.eval_spatial_size"] == [544, 544]
    assert math.ceil(16 * 400 / 12 / 32) * 32 == 544


def test_image_size_rule_tenth_percentile(tmp_path):
    # 10 boxes in 400x400: 3 of 8 px, 7 of 40 px; p10 8 px needs S * 8/400 >= 8 -> S >= 400 -> 416 (the median,
    # 40 px, would allow 160)
    folder, path = _boxes_set(tmp_path, 10, 400, 400, [8, 8, 8, 40, 40, 40, 40, 40, 40, 40])
    assert _suggest(folder, path)["data.image_size"] == 416


def test_image_size_rule_follows_trainings_square_resize(tmp_path):
    # 21x21 boxes in 800x200 images: resized to S x S a box is (21 S/800) x (21 S/200), sqrt = 21 S/400: 16.8 px at
    # 320, 15.12 at 288 (off the 16 px boundary by far more than rounding). (Scaling by the longer side instead
    # would call it 21 S/800 and ask for 640.)
    folder, path = _boxes_set(tmp_path, 4, 800, 200, [21])
    size = _suggest(folder, path)["data.image_size"]
    assert size == 320
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, target = CocoDetection(folder, path, eval_transforms(size))[0]
    w, h = (target["boxes"][0, 2:] * size).tolist()
    assert math.sqrt(w * h) == pytest.approx(16.8)


def test_image_size_rule_tiny_objects_get_640_and_say_so(tmp_path):
    # 2 px boxes in 400x400: 640 * 2/400 = 3.2 px, under the 16 px wanted and under 8 px: a warning too
    folder, path = _boxes_set(tmp_path, 10, 400, 400, [2])
    check = check_splits({"train": (folder, path)})
    assert check.suggestion.values["data.image_size"] == 640
    assert "stay tiny at 640: median 3.2 px" in check.suggestion.remarks[0]
    assert check.usable and "tiny-boxes" in {p.code for p in check.problems}


@pytest.mark.parametrize(("per_image", "queries"), [(25, 50), (26, 100), (50, 100), (51, 200), (150, 300),
                                                    (151, 300)])
def test_queries_rule(tmp_path, per_image, queries):
    # every image holds the same count, so the 99th percentile is that count: queries >= 2 x it
    folder, path = _boxes_set(tmp_path, 2, 400, 400, [40], per_image=per_image)
    assert _suggest(folder, path)["model.decoder.num_queries"] == queries


def test_queries_rule_says_when_300_cannot_find_them_all(tmp_path):
    folder, path = _boxes_set(tmp_path, 1, 400, 400, [40], per_image=301)
    check = check_splits({"train": (folder, path)})
    assert check.suggestion.values["model.decoder.num_queries"] == 300
    assert "an image has 301 objects" in check.suggestion.remarks[0]


@pytest.mark.parametrize(("n_images", "batch", "epochs"), [(20, 8, 100), (20, 4, 60), (700, 8, 4), (200, 1, 2),
                                                           (400, 1, 2)])
def test_epochs_rule(tmp_path, n_images, batch, epochs):
    # ceil(300 / ceil(images / batch)), at least 2: 20/8 -> 3 steps -> 100; 20/4 -> 5 -> 60; 700/8 -> 88 -> 4;
    # 200/1 -> 200 -> 2; 400/1 -> 400 -> 1, raised to 2
    folder, path = _boxes_set(tmp_path, n_images, 400, 400, [40])
    assert _suggest(folder, path, batch)["train.epochs"] == epochs
    assert max(2, math.ceil(300 / math.ceil(n_images / batch))) == epochs


def test_suggestion_is_printed_as_overrides(tmp_path, capsys):
    folder, path = _boxes_set(tmp_path, 10, 400, 400, [12])
    rc, text, _ = run_cli(capsys, path, "--images", folder)
    assert rc == 0
    assert ("suggestion: data.image_size=544 model.eval_spatial_size=[544,544] model.decoder.num_queries=50 "
            "train.epochs=150") in text
    assert "median box 16.3 px and p10 16.3 px at 544" in text
    assert "  rule: the smallest size at which the median box is >= 16 px and the 10th percentile >= 8 px" in text
