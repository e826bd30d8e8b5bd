"""Write a small Pascal VOC folder for the end-to-end demo: ``python tests/make_voc_dataset.py OUT [--images N]
[--seed S]``, then ``python -m dset.data convert --from voc OUT DST --group-by prefix``.

Scenes come from the built-in synthetic set's drawing (:func:`dset.data.synthetic.render_scene`), so a detector
learns them in a few epochs on CPU: car = red ellipses, person = green rectangles, bicycle = blue triangles,
dog = yellow crosses. Each scene (320 x 320) is filmed as a sequence of ``FRAMES`` frames of 320 x 240, the
window sliding down 80 px: near-duplicate frames named ``seqSS_FFFF.jpg`` that ``--group-by prefix`` keeps on
one side of the split. Objects cut by the frame get their box clipped and ``<truncated>1``.

The problems the converter and the check report, once each: the smallest object of the first frame is
``<difficult>1``; in the first frame where an object crosses the window, its box is written as it lies,
outside the image; ``empty_0000.jpg`` has no objects; ``missing_0000.xml`` names an image that is not there.
Deterministic: the same N and seed give the same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from dset.data.synthetic import render_scene  # noqa: E402

CLASSES = ("car", "person", "bicycle", "dog")   # the synthetic set's circle, square, triangle, cross
SCENE, WIDTH, HEIGHT = 320, 320, 240
FRAMES = 4
MIN_VISIBLE_PX = 4   # an object cut to fewer rows than this is not labelled (hardly anything of it shows)


def _xml(name: str, objects: list[dict], width: int, height: int) -> str:
    parts = [f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{escape(name)}</filename>\n"
             f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n"
             "  <segmented>0</segmented>\n"]
    for o in objects:
        x0, y0, x1, y1 = o["box"]   # 1-based inclusive pixel indices, VOC's convention
        parts.append(f"  <object>\n    <name>{o['name']}</name>\n    <pose>Unspecified</pose>\n"
                     f"    <truncated>{o['truncated']}</truncated>\n    <difficult>{o['difficult']}</difficult>\n"
                     f"    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>\n"
                     "  </object>\n")
    return "".join(parts) + "</annotation>\n"


def _frame(scene: np.ndarray, objects, top: int, exceed: bool) -> tuple[np.ndarray, list[dict]]:
    """The window of rows ``top..top+HEIGHT`` and its objects; ``exceed``: boxes as they lie, not clipped."""
    out = []
    for obj in objects:
        x, y, w, h = obj.bbox          # 0-based, w x h pixels
        y0, y1 = y - top, y + h - top  # in the frame, y1 exclusive
        visible = min(y1, HEIGHT) - max(y0, 0)
        if visible < MIN_VISIBLE_PX:
            continue
        cut = y0 < 0 or y1 > HEIGHT
        if not exceed:
            y0, y1 = max(y0, 0), min(y1, HEIGHT)
        out.append({"name": CLASSES[obj.label], "box": (x + 1, y0 + 1, x + w, y1), "truncated": int(cut),
                    "difficult": 0, "area": w * visible})
    return scene[top:top + HEIGHT], out


def make_voc(out: str | Path, images: int = 120, seed: int = 0) -> Path:
    """Write the VOC folder ``out`` (Annotations/, JPEGImages/) with ``images`` images; returns ``out``."""
    out = Path(out)
    if images < 2:
        raise ValueError(f"--images must be at least 2 (one is the empty image), got {images}")
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    tops = np.linspace(0, SCENE - HEIGHT, FRAMES).round().astype(int)
    exceeded = False
    for i in range(images - 1):
        seq, f = divmod(i, FRAMES)
        if f == 0:  # one scene per sequence
            rng = np.random.default_rng(np.random.SeedSequence([seed, seq]))
            scene, objects, _ = render_scene(rng, SCENE, num_classes=len(CLASSES), min_objects=1, max_objects=6,
                                             min_object_size=16, max_object_frac=0.45)
        pixels, labelled = _frame(scene, objects, int(tops[f]), exceed=False)
        if not exceeded and any(o["truncated"] for o in labelled):
            pixels, labelled = _frame(scene, objects, int(tops[f]), exceed=True)
            exceeded = True
        if i == 0 and labelled:
            min(labelled, key=lambda o: o["area"])["difficult"] = 1
        name = f"seq{seq:02d}_{f:04d}"
        Image.fromarray(pixels).save(out / "JPEGImages" / f"{name}.jpg", quality=92)
        (out / "Annotations" / f"{name}.xml").write_text(_xml(f"{name}.jpg", labelled, WIDTH, HEIGHT))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 10**6]))
    empty, _, _ = render_scene(rng, SCENE, min_objects=0, max_objects=0)
    Image.fromarray(empty[:HEIGHT]).save(out / "JPEGImages" / "empty_0000.jpg", quality=92)
    (out / "Annotations" / "empty_0000.xml").write_text(_xml("empty_0000.jpg", [], WIDTH, HEIGHT))
    lost = [{"name": "car", "box": (10, 10, 60, 50), "truncated": 0, "difficult": 0}]
    (out / "Annotations" / "missing_0000.xml").write_text(_xml("missing_0000.jpg", lost, WIDTH, HEIGHT))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the VOC folder to write")
    ap.add_argument("--images", type=int, default=120, help="number of images (default 120)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the scenes (default 0)")
    ns = ap.parse_args(argv)
    try:
        out = make_voc(ns.out, ns.images, ns.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {ns.images} images ({len(CLASSES)} classes: {', '.join(CLASSES)}) to {out}\n"
          f"next: python -m dset.data convert --from voc {out} DST --group-by prefix --val 0.2 --test 0.2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
