"""What :mod:`dset.data.check` reports: the summary numbers of a split (counts, class histogram, box and image
sizes, objects per image) and the report as a few readable lines (those numbers, the problems grouped with their
first examples, the suggestion and the verdict)."""

from __future__ import annotations

from typing import Any

import numpy as np

SHOWN_EXAMPLES = 3
SHOWN_CLASSES = 10
SMALL_AREA, MEDIUM_AREA = 32**2, 96**2  # COCO's small / medium / large


def boxes_per_category(s: Any) -> dict[int, int]:
    """Training boxes per category id of a split (``dset.data.check``'s _Split: ``boxes`` of (image, id, w, h))."""
    counts: dict[int, int] = {}
    for _, cid, _, _ in s.boxes:
        counts[cid] = counts.get(cid, 0) + 1
    return counts


def _rounded(values, qs: dict[str, float]) -> dict[str, float | None]:
    if not len(values):
        return {k: None for k in qs}
    return {k: round(float(np.percentile(values, q)), 1) for k, q in qs.items()}


def split_stats(parts: list) -> dict[str, Any]:
    """Counts, box sizes, image sizes and objects per image of one split (or several together)."""
    widths = [r["width"] for s in parts for r in s.images]
    heights = [r["height"] for s in parts for r in s.images]
    per_image = [r["boxes"] for s in parts for r in s.images]
    w = np.array([b[2] for s in parts for b in s.boxes], dtype=float)
    h = np.array([b[3] for s in parts for b in s.boxes], dtype=float)
    area = w * h
    names = {cid: name for s in parts for cid, name in s.categories}
    per_class: dict[str, int] = {}
    for s in parts:
        for cid, n in boxes_per_category(s).items():
            per_class[names[cid]] = per_class.get(names[cid], 0) + n
    quantiles = {"p10": 10, "median": 50, "p90": 90}
    return {
        "images": len(per_image),
        "annotations": sum(s.num_annotations for s in parts),
        "boxes": len(area),
        "images_without_boxes": sum(1 for n in per_image if n == 0),
        "crowd": sum(s.num_crowd for s in parts),
        "dropped": sum(s.num_dropped for s in parts),
        "boxes_per_class": {names[cid]: per_class.get(names[cid], 0) for cid in sorted(names)},
        "box_sizes": {
            "small": int((area < SMALL_AREA).sum()),
            "medium": int(((area >= SMALL_AREA) & (area < MEDIUM_AREA)).sum()),
            "large": int((area >= MEDIUM_AREA).sum()),
            "sqrt_area_px": _rounded(np.sqrt(area), quantiles),
            "shorter_side_px": _rounded(np.minimum(w, h), quantiles),
        },
        "image_sizes": {
            "width": {"min": min(widths, default=None), "median": _rounded(widths, {"m": 50})["m"],
                      "max": max(widths, default=None)},
            "height": {"min": min(heights, default=None), "median": _rounded(heights, {"m": 50})["m"],
                       "max": max(heights, default=None)},
        },
        "objects_per_image": {**_rounded(per_image, {"median": 50, "p99": 99}), "max": max(per_image, default=None)},
    }




def _format_split_line(name: str, stats: dict | None, width: int) -> str:
    if stats is None:
        return f"{name:<{width}}  not readable (see the problems)"
    n_classes = len(stats["boxes_per_class"])
    classes = f"{n_classes} class{'es' if n_classes != 1 else ''}"
    return (f"{name:<{width}}  {stats['images']:>6} images  {stats['boxes']:>7} boxes   {classes}   "
            f"({stats['images_without_boxes']} without boxes)")


def _px(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def format_check(check: Any) -> str:
    """The report of a :class:`dset.data.check.DataCheck` as ``python -m dset.data check`` prints it (and a
    refused run quotes it)."""
    o = check.overview
    width = max((len(n) for n in o["splits"]), default=5)
    lines = [_format_split_line(n, st, width) for n, st in o["splits"].items()]
    a = o["all"]
    if a["images"]:
        per_class = sorted(a["boxes_per_class"].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{n} {c}" for n, c in per_class[:SHOWN_CLASSES])
        more = f", and {len(per_class) - SHOWN_CLASSES} more" if len(per_class) > SHOWN_CLASSES else ""
        lines.append(f"classes: {shown}{more}")
        b, im = a["box_sizes"], a["image_sizes"]
        sq, side = b["sqrt_area_px"], b["shorter_side_px"]
        if im["width"]["min"] == im["width"]["max"] and im["height"]["min"] == im["height"]["max"]:
            images = f"images {im['width']['min']}x{im['height']['min']}"
        else:
            images = (f"images {im['width']['min']}x{im['height']['min']} to {im['width']['max']}x"
                      f"{im['height']['max']}, median {_px(im['width']['median'])}x{_px(im['height']['median'])}")
        lines.append(f"boxes: small {b['small']} / medium {b['medium']} / large {b['large']}; sqrt(area) p10 "
                     f"{_px(sq['p10'])} px, median {_px(sq['median'])} px, p90 {_px(sq['p90'])} px; shorter side "
                     f"median {_px(side['median'])} px ({images})")
        op = a["objects_per_image"]
        lines.append(f"objects per image: median {_px(op['median'])}, p99 {_px(op['p99'])}, max {op['max']}")
    if not check.problems:
        lines.append("problems: none")
    for p in check.problems:
        examples = "; ".join(p.examples[:SHOWN_EXAMPLES]) + ("; ..." if p.count > SHOWN_EXAMPLES else "")
        lines.append(f"{p.severity:<8} {p.description} ({p.count}): {examples}")
    s = check.suggestion
    if s is not None:
        n = s.numbers
        lines.append(f"suggestion: {s.overrides()}")
        lines.append(f"  from: median box {n['median_box_px_at_size']} px and p10 {n['p10_box_px_at_size']} px at "
                     f"{s.values['data.image_size']}; objects per image p99 {n['objects_per_image_p99']}; "
                     f"{n['training_images']} images / batch {n['batch_size']} = {n['steps_per_epoch']} "
                     f"step{'s' if n['steps_per_epoch'] != 1 else ''} an epoch")
        lines.extend(f"  note: {r}" for r in s.remarks)
        lines.append(f"  rule: {s.rule_in_brief}")
    lines.append("usable: yes" if check.usable else "usable: NO (errors above; training would fail or learn nothing)")
    return "\n".join(lines)
