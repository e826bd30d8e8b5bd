"""Pascal VOC annotations read into a :class:`~dset.data.conversion.SourceSet` (``convert --from voc``).

Layouts: ``SRC/Annotations/*.xml`` + ``SRC/JPEGImages/`` (VOC), where ``SRC/ImageSets/Main/{train,val,test}.txt``
(image ids, one a line), when there, is the source's split; or a folder of images with an XML beside each
(LabelImg), searched recursively, so ``--group-by folder`` can keep a folder's images together.

Rules:
- The image is ``<filename>`` in the image folder (LabelImg: beside the XML), else the XML's stem with any image
  suffix; an XML whose image is not there is dropped, with its reason counted.
- Image size: ``<size>``'s width and height, else (missing or 0) the image file's header.
- VOC corners are 1-based pixel indices, inclusive: pixels ``xmin..xmax`` are COCO's ``[xmin - 1, xmax)``. Boxes
  are clipped to the image (one touching or crossing the border keeps its inside part); one with no area left
  is dropped.
- ``difficult`` objects: ``ignore`` (default) makes them crowd regions (``iscrowd`` 1), which VOC's and COCO's
  evaluation ignore and training skips; ``keep`` makes them ordinary boxes; ``drop`` leaves them out.
- Classes: ``--classes`` in its order (objects of other classes are dropped, counted by class), else the sorted
  names of the objects kept. Category ids are 1..C in that order; ``area`` is the box's area.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from .conversion import IMAGE_SUFFIXES, SourceSet, categories_of, coco_box, image_size
from .errors import DatasetError

__all__ = ["DIFFICULT_MODES", "read_voc"]

DIFFICULT_MODES = ("ignore", "keep", "drop")
SPLIT_FILES = ("train", "val", "test")


def _text(node: ET.Element, tag: str) -> str | None:
    found = node.find(tag)
    return found.text.strip() if found is not None and found.text is not None else None


def _number(node: ET.Element, tag: str, xml: Path, where: str) -> float:
    text = _text(node, tag)
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DatasetError(f"{xml}: {where} <{tag}> must be a number, got {text!r}") from None


def _size(root: ET.Element) -> tuple[int, int] | None:
    size = root.find("size")
    if size is None:
        return None
    try:
        w, h = int(float(_text(size, "width") or 0)), int(float(_text(size, "height") or 0))
    except ValueError:
        return None  # unreadable <size>: the file header decides
    return (w, h) if w > 0 and h > 0 else None


def _find_image(folder: Path, xml: Path, filename: str | None) -> Path | None:
    if filename:
        path = folder / filename
        if path.is_file():
            return path
    for stem in dict.fromkeys(s for s in (Path(filename).stem if filename else None, xml.stem) if s):
        for suffix in sorted(IMAGE_SUFFIXES):
            for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _parse(xml: Path) -> ET.Element:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as e:
        raise DatasetError(f"{xml}: cannot read the VOC XML ({e})") from e
    if root.tag != "annotation":
        raise DatasetError(f"{xml}: a VOC file's root element is <annotation>, got <{root.tag}>")
    return root


def _objects(root: ET.Element, xml: Path) -> list[tuple[str, bool, tuple[float, float, float, float]]]:
    """``(name, difficult, (xmin, ymin, xmax, ymax))`` of each ``<object>``, as written (1-based, inclusive)."""
    out = []
    for i, obj in enumerate(root.findall("object")):
        where = f"<object> {i + 1}"
        name = _text(obj, "name")
        if not name:
            raise DatasetError(f"{xml}: {where} has no <name>")
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{xml}: {where} ({name!r}) has no <bndbox>")
        corners = tuple(_number(box, tag, xml, f"{where} ({name!r})") for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult = _text(obj, "difficult") or "0"
        if difficult not in ("0", "1"):
            raise DatasetError(f"{xml}: {where} ({name!r}) <difficult> must be 0 or 1, got {difficult!r}")
        out.append((name, difficult == "1", corners))  # type: ignore[arg-type]
    return out


def _source_split(src: Path, stem_to_id: dict[str, int], dropped: Counter) -> tuple[dict | None, str]:
    main = src / "ImageSets" / "Main"
    files = {s: main / f"{s}.txt" for s in SPLIT_FILES if (main / f"{s}.txt").is_file()}
    if not files:
        return None, ""
    split: dict[str, list[int]] = {}
    for name, path in files.items():
        stems = path.read_text(encoding="utf-8").split()
        split[name] = [stem_to_id[s] for s in stems if s in stem_to_id]
        missing = len(stems) - len(split[name])
        if missing:
            dropped[f"ids in ImageSets/Main/{name}.txt without a usable XML and image"] += missing
    return split, "ImageSets/Main/" + ", ".join(f"{s}.txt" for s in files)


def read_voc(src: str | Path, classes: list[str] | None = None, difficult: str = "ignore") -> SourceSet:
    """The VOC folder ``src`` (see the module doc) as a SourceSet."""
    src = Path(src)
    if difficult not in DIFFICULT_MODES:
        raise DatasetError(f"difficult must be one of {list(DIFFICULT_MODES)}, got {difficult!r}")
    if not src.is_dir():
        raise DatasetError(f"VOC folder not found: {src}")
    if (src / "Annotations").is_dir():
        layout, images_root = "Annotations + JPEGImages", src / "JPEGImages"
        xmls = sorted((src / "Annotations").glob("*.xml"))
        if not images_root.is_dir():
            raise DatasetError(f"{src}: has Annotations/ but no JPEGImages/ folder")
    else:
        layout, images_root = "images with an XML beside each", src
        xmls = sorted(p for p in src.rglob("*.xml") if p.is_file())
    if not xmls:
        raise DatasetError(f"{src}: no VOC XML files (Annotations/*.xml, or an XML beside each image)")

    dropped: Counter[str] = Counter()
    noted: Counter[str] = Counter()
    parsed = []   # (image entry without id, objects, xml stem)
    for xml in xmls:
        root = _parse(xml)
        folder = images_root if layout.startswith("Annotations") else xml.parent
        image = _find_image(folder, xml, _text(root, "filename"))
        if image is None:
            dropped["XML files whose image file is missing"] += 1
            continue
        size = _size(root)
        if size is None:
            size = image_size(image)
            noted["images sized from the file (no <size> in the XML)"] += 1
        entry = {"file_name": image.relative_to(images_root).as_posix(), "width": size[0], "height": size[1]}
        parsed.append((entry, _objects(root, xml), xml.stem))

    if classes is None:
        classes = sorted({name for _, objs, _ in parsed for name, hard, _ in objs
                          if not (hard and difficult == "drop")})
    if not classes:
        raise DatasetError(f"{src}: no objects in {len(xmls)} XML file(s) with an image; nothing to detect")
    index = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations, stem_to_id = [], [], {}
    for image_id, (entry, objs, stem) in enumerate(parsed, start=1):
        images.append({"id": image_id, **entry})
        stem_to_id.setdefault(stem, image_id)
        for name, hard, (x0, y0, x1, y1) in objs:
            if hard and difficult == "drop":
                dropped["difficult objects (--difficult drop)"] += 1
                continue
            if name not in index:
                dropped[f"objects of class {name!r} (not in --classes)"] += 1
                continue
            box = coco_box(x0 - 1, y0 - 1, x1, y1, entry["width"], entry["height"])
            if box is None:
                dropped["boxes with no area inside the image"] += 1
                continue
            if x0 - 1 < 0 or y0 - 1 < 0 or x1 > entry["width"] or y1 > entry["height"]:
                noted["boxes clipped to the image"] += 1
            crowd = int(hard and difficult == "ignore")
            if crowd:
                noted["difficult objects made ignore regions (iscrowd 1)"] += 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": index[name],
                                "bbox": box, "area": round(box[2] * box[3], 4), "iscrowd": crowd})
    split, split_from = (_source_split(src, stem_to_id, dropped) if layout.startswith("Annotations")
                         else (None, ""))
    return SourceSet(format="voc", path=src, layout=layout, images_root=images_root,
                     categories=categories_of(classes), images=images, annotations=annotations,
                     source_split=split, source_split_from=split_from, options={"difficult": difficult},
                     dropped=dropped, noted=noted)
