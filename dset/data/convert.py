"""``python -m dset.data convert --from voc|yolo|coco SRC DST``: a data set in another format written as COCO
(``DST/images``, ``DST/{train,val[,test]}.json``, ``DST/data.yaml``), split by the source's own split or by
``--val / --test / --group-by / --seed``. The rules of each format are in :mod:`.voc`, :mod:`.yolo` and
:mod:`.coco_reindex`; the split and the layout in :mod:`.split`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config_checks import ConfigError
from .conversion import ConversionResult, SourceSet, parse_classes, save
from .split import SplitRule, add_split_arguments, rule_from_args

__all__ = ["FORMATS", "read_source", "convert", "add_command"]

FORMATS = ("voc", "yolo", "coco")


def read_source(fmt: str, src: str | Path, classes: list[str] | None = None, difficult: str | None = None,
                images: str | Path | None = None) -> SourceSet:
    """The data set ``src`` in format ``fmt`` as a SourceSet; ``difficult`` is VOC's, ``images`` COCO's."""
    if fmt not in FORMATS:
        raise ConfigError(f"--from must be one of {list(FORMATS)}, got {fmt!r}")
    if difficult is not None and fmt != "voc":
        raise ConfigError(f"--difficult applies to --from voc only, not {fmt}")
    if images is not None and fmt != "coco":
        raise ConfigError(f"--images applies to --from coco only (the folder of the JSON's file names), not {fmt}")
    if fmt == "voc":
        from .voc import read_voc
        return read_voc(src, classes, difficult or "ignore")
    if fmt == "yolo":
        from .yolo import read_yolo
        return read_yolo(src, classes)
    from .coco_reindex import read_coco
    return read_coco(src, images, classes)


def convert(fmt: str, src: str | Path, dst: str | Path, classes: list[str] | None = None,
            rule: SplitRule | None = None, resplit: bool = False, copy: bool = False, difficult: str | None = None,
            images: str | Path | None = None) -> ConversionResult:
    """Read ``src`` (:func:`read_source`) and write it to ``dst`` (:func:`dset.data.conversion.save`)."""
    return save(read_source(fmt, src, classes, difficult, images), dst, rule, resplit=resplit, copy=copy)


def _run(ns: argparse.Namespace) -> int:
    result = convert(ns.source_format, ns.src, ns.dst, parse_classes(ns.classes), rule_from_args(ns),
                     resplit=ns.resplit, copy=ns.copy, difficult=ns.difficult, images=ns.images)
    print(result.summary())
    print(f"data file: {result.written.data_file}")
    print(f"next: python -m dset.data check {result.written.data_file}")
    return 0


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="write a VOC, YOLO or COCO data set as a split COCO data set with a data file",
        description="Convert a Pascal VOC, YOLO or COCO data set into DST/images, DST/train.json, DST/val.json "
                    "(and DST/test.json) and DST/data.yaml, with category ids 1..C. A source with its own split "
                    "(VOC ImageSets/Main, YOLO train/val folders) keeps it unless --resplit; otherwise it is split "
                    "by --val, --test, --group-by and --seed.")
    p.add_argument("--from", dest="source_format", required=True, choices=FORMATS,
                   help="source format: voc (Annotations/ + JPEGImages/, or an XML beside each image), yolo "
                        "(images/ + labels/), coco (an instances JSON, to re-index its categories)")
    p.add_argument("src", help="the source: a VOC or YOLO folder, or a COCO instances JSON")
    p.add_argument("dst", help="output folder")
    p.add_argument("--classes", default=None, metavar="A,B,C",
                   help="class names in category order. voc: keep only these; yolo: the names of class 0, 1, ... "
                        "(instead of data.yaml / classes.txt); coco: keep and order these")
    p.add_argument("--difficult", default=None, choices=("ignore", "keep", "drop"),
                   help="voc: difficult objects become ignore regions (iscrowd 1, the default), ordinary boxes, "
                        "or are left out")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="coco: the folder the JSON's file names are relative to (default: images/ beside the "
                        "JSON, else its folder)")
    add_split_arguments(p)
    p.add_argument("--resplit", action="store_true",
                   help="split anew by --val / --test / --group-by / --seed even when the source has a split")
    p.add_argument("--copy", action="store_true", help="copy the images into DST/images instead of linking")
    p.set_defaults(run=_run)
