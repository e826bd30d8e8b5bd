"""Deterministic synthetic detection scenes written as a COCO data set: the offline default data set.

Each image holds 1-8 (``min_objects``..``max_objects``) coloured shapes on a varied background. A class is a
shape plus a colour family (with hue/saturation/brightness jitter and a lighting gradient), so it is learnable
but not a single fixed template:

    1 circle (red ellipses)   2 square (green rectangles)   3 triangle (blue, rotated)   4 cross (yellow, rotated)
    5 ring (magenta)          6 diamond (cyan)               -- 5 and 6 only with num_classes > 4

Object sizes are log-uniform between ``min_object_size`` px and ``max_object_frac`` x image size, which at
320 px puts about 49 % / 37 % / 14 % of the objects in COCO's small (< 32^2 px) / medium / large ranges.
Objects may overlap: a new object is placed only where every earlier object keeps at least half of its
pixels visible. Backgrounds are noise, linear gradients or low-frequency textures with line clutter.

Boxes are exact: ``bbox`` is the tight box of the object's own drawn pixels (amodal: including any part a later
object covers), ``area`` is the object's pixel count (COCO's area is the object's, not the box's, area),
``iscrowd`` is 0. Sensor noise is added to the whole image after the objects are drawn.

Splits: ``train`` and ``val`` (the selection split: best epoch, early stopping, tuning) and, with ``num_test`` > 0,
``test`` (the scoring split). Every image is drawn from a generator seeded by (seed, split, index), so the three
splits hold different scenes, and an image does not depend on how many images the other splits have.

The data set is a pure function of its parameters (and ``GENERATOR_VERSION``). It is written once, as PNG images
plus ``annotations/instances_{train,val[,test]}.json``, into ``<root>/<readable name>_<hash of all parameters>``;
a later call with the same parameters reuses it. It is built in a temporary folder beside it and renamed into
place when complete, so an interrupted generation never leaves a half-written data set. Default root:
``$DSET_CACHE_DIR/synthetic`` if ``DSET_CACHE_DIR`` is set, else ``~/.cache/dset/synthetic``.

Command line: ``python -m dset.data.synthetic --out DIR [--num-train N] [--num-val N] [--num-test N] [--image-size S]
[--seed S]``
prints the paths (``--out`` is the root the data set folder is created in).
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "GENERATOR_VERSION",
    "CLASS_NAMES",
    "SyntheticObject",
    "make_synthetic_coco",
    "dataset_key",
    "render_scene",
    "default_cache_root",
]

# Bump when the drawing code changes: it is part of the cache key, so old caches are not reused.
GENERATOR_VERSION = 1

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
# hue centre (degrees) of each class's colour family
_CLASS_HUE = {"circle": 0.0, "square": 120.0, "triangle": 220.0, "cross": 55.0, "ring": 300.0, "diamond": 180.0}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


@dataclass
class SyntheticObject:
    """One drawn object: contiguous ``label`` (index into CLASS_NAMES), tight ``bbox`` (x, y, w, h) in pixels,
    ``area`` (pixel count) and its full (amodal) ``mask`` cropped to the bbox."""

    label: int
    bbox: tuple[int, int, int, int]
    area: int
    mask: np.ndarray
    color: tuple[float, float, float]


def default_cache_root() -> Path:
    env = os.environ.get("DSET_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "synthetic"
    return Path.home() / ".cache" / "dset" / "synthetic"


# ---------------------------------------------------------------------------------------------- drawing


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _shape_mask(name: str, w: float, h: float, angle: float) -> np.ndarray:
    """Binary mask of one shape of nominal size w x h (before rotation), cropped to its tight extent."""
    pad = 2
    side = int(math.ceil(math.hypot(w, h))) + 2 * pad
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    cx = cy = side / 2.0
    if name in ("circle", "ring"):
        draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=255)
        if name == "ring":
            t = 0.55  # inner radius fraction
            draw.ellipse([cx - t * w / 2, cy - t * h / 2, cx + t * w / 2, cy + t * h / 2], fill=0)
    else:
        if name == "square":
            pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
        elif name == "diamond":
            pts = np.array([[0, -h], [w, 0], [0, h], [-w, 0]]) / 2
        elif name == "triangle":
            pts = np.array([[0, -h], [w, h], [-w, h]]) / 2
        elif name == "cross":
            a, b = w / 2, h / 2
            tx, ty = 0.17 * w, 0.17 * h  # half arm thickness
            pts = np.array(
                [[-tx, -b], [tx, -b], [tx, -ty], [a, -ty], [a, ty], [tx, ty],
                 [tx, b], [-tx, b], [-tx, ty], [-a, ty], [-a, -ty], [-tx, -ty]]
            )
        else:
            raise ValueError(f"unknown shape {name!r}")
        pts = _rotate(pts, angle) + [cx, cy]
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    mask = np.asarray(canvas) > 127
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return np.zeros((0, 0), bool)
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _noise(rng: np.random.Generator, sigma: float, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] in 0..255: noise, gradient or texture, mostly low-saturation."""
    kind = rng.integers(3)
    grey = rng.uniform(40, 215)
    c0 = np.clip(grey + rng.normal(0, 30, 3), 0, 255).astype(np.float32)
    if kind == 0:  # noisy flat colour
        img = c0 + _noise(rng, rng.uniform(5, 25), (size, size, 3))
    elif kind == 1:  # linear gradient between two colours
        c1 = np.clip(rng.uniform(20, 235) + rng.normal(0, 30, 3), 0, 255).astype(np.float32)
        theta = rng.uniform(0, 2 * math.pi)
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        t = ramp[None, :] * np.float32(math.cos(theta)) + ramp[:, None] * np.float32(math.sin(theta))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c0 + t[..., None] * (c1 - c0) + _noise(rng, 4, (size, size, 3))
    else:  # low-frequency texture + line clutter
        cells = int(rng.integers(3, 12))
        low = rng.normal(0, rng.uniform(15, 45), (cells, cells, 3)).astype(np.float32)
        up = np.stack(
            [np.asarray(Image.fromarray(low[..., k]).resize((size, size), Image.BICUBIC)) for k in range(3)], -1
        )
        img = np.clip(c0 + up + _noise(rng, 6, (size, size, 3)), 0, 255)
        clutter = Image.fromarray(img.astype(np.uint8))
        draw = ImageDraw.Draw(clutter)
        for _ in range(int(rng.integers(0, 8))):
            p = rng.uniform(0, size, 4)
            col = tuple(int(v) for v in np.clip(grey + rng.normal(0, 50, 3), 0, 255))
            draw.line([(p[0], p[1]), (p[2], p[3])], fill=col, width=int(rng.integers(1, 3)))
        img = np.asarray(clutter, dtype=np.float32)
    return img


def _class_color(rng: np.random.Generator, name: str) -> np.ndarray:
    hue = (_CLASS_HUE[name] + rng.normal(0, 8)) % 360
    sat = rng.uniform(0.6, 1.0)
    val = rng.uniform(0.6, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue / 360, sat, val), np.float32) * 255


def render_scene(
    rng: np.random.Generator,
    image_size: int,
    num_classes: int = 4,
    min_objects: int = 1,
    max_objects: int = 8,
    min_object_size: int = 8,
    max_object_frac: float = 0.6,
    noise: bool = True,
) -> tuple[np.ndarray, list[SyntheticObject], np.ndarray]:
    """Draw one scene. Returns (uint8 image [S, S, 3], objects in drawing order, owner map [S, S]).

    ``owner[y, x]`` is the index of the object whose pixel is visible there (-1: background).
    With ``noise=False`` no sensor noise is added, so visible object pixels keep exactly their object's colour.
    """
    size = image_size
    img = _background(rng, size)
    owner = np.full((size, size), -1, np.int32)
    objects: list[SyntheticObject] = []
    visible: list[int] = []
    n_target = int(rng.integers(min_objects, max_objects + 1))
    s_min = float(min_object_size)
    s_max = max(s_min, max_object_frac * size)
    for _ in range(n_target):
        label = int(rng.integers(num_classes))
        name = CLASS_NAMES[label]
        s = math.exp(rng.uniform(math.log(s_min), math.log(s_max)))
        aspect = math.exp(rng.uniform(-0.35, 0.35))
        w, h = s * math.sqrt(aspect), s / math.sqrt(aspect)
        angle = math.radians(rng.uniform(-30, 30)) if name in ("triangle", "cross") else 0.0
        mask = _shape_mask(name, w, h, angle)
        mh, mw = mask.shape
        if mh < 2 or mw < 2 or mh > size or mw > size:
            continue
        area = int(mask.sum())
        for _trial in range(15):
            x0 = int(rng.integers(0, size - mw + 1))
            y0 = int(rng.integers(0, size - mh + 1))
            under = owner[y0 : y0 + mh, x0 : x0 + mw][mask]
            covered = np.bincount(under + 1, minlength=len(objects) + 1)[1:]
            if all(visible[j] - covered[j] >= 0.5 * objects[j].area for j in range(len(objects))):
                break
        else:
            continue
        for j in range(len(objects)):
            visible[j] -= int(covered[j])
        color = _class_color(rng, name)
        # lighting: a linear brightness ramp across the object
        gx = np.linspace(-0.5, 0.5, mw, dtype=np.float32)[None, :]
        gy = np.linspace(-0.5, 0.5, mh, dtype=np.float32)[:, None]
        ramp = 1.0 + np.float32(rng.uniform(-0.15, 0.15)) * gx + np.float32(rng.uniform(-0.15, 0.15)) * gy
        patch = img[y0 : y0 + mh, x0 : x0 + mw]
        patch[mask] = np.clip(color[None, :] * ramp[mask][:, None], 0, 255)
        owner[y0 : y0 + mh, x0 : x0 + mw][mask] = len(objects)
        objects.append(SyntheticObject(label, (x0, y0, mw, mh), area, mask, tuple(float(c) for c in color)))
        visible.append(area)
    if noise:
        img += _noise(rng, rng.uniform(1.5, 5.0), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects, owner


# ---------------------------------------------------------------------------------------------- data set


def _params(num_train, num_val, image_size, seed, num_classes, min_objects, max_objects, min_object_size,
            max_object_frac, num_test=0) -> dict:
    p = {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "seed": int(seed),
        "num_classes": int(num_classes),
        "min_objects": int(min_objects),
        "max_objects": int(max_objects),
        "min_object_size": int(min_object_size),
        "max_object_frac": float(max_object_frac),
    }
    # only when there is a test split: a data set without one keeps its key (its cache and the fingerprints of the
    # runs made on it)
    if int(num_test):
        p["num_test"] = int(num_test)
    return p


def _splits(p: dict) -> dict[str, int]:
    """Each split's number of images, in the order their ids are given."""
    sizes = {"train": p["num_train"], "val": p["num_val"]}
    if p.get("num_test", 0):
        sizes["test"] = p["num_test"]
    return sizes


def _validate(p: dict) -> None:
    if p["num_train"] < 1 or p["num_val"] < 1:
        raise ValueError(f"synthetic: num_train and num_val must be >= 1, got {p['num_train']}, {p['num_val']}")
    if p.get("num_test", 0) < 0:
        raise ValueError(f"synthetic: num_test must be >= 0, got {p['num_test']}")
    if p["image_size"] < 32:
        raise ValueError(f"synthetic: image_size must be >= 32, got {p['image_size']}")
    if not 1 <= p["num_classes"] <= len(CLASS_NAMES):
        raise ValueError(f"synthetic: num_classes must be in 1..{len(CLASS_NAMES)}, got {p['num_classes']}")
    if not 0 <= p["min_objects"] <= p["max_objects"]:
        raise ValueError(f"synthetic: need 0 <= min_objects <= max_objects, got {p['min_objects']}, {p['max_objects']}")
    if not 4 <= p["min_object_size"] <= p["max_object_frac"] * p["image_size"]:
        raise ValueError(
            f"synthetic: need 4 <= min_object_size <= max_object_frac * image_size, got min_object_size "
            f"{p['min_object_size']}, max_object_frac {p['max_object_frac']}, image_size {p['image_size']}"
        )
    if not 0 < p["max_object_frac"] <= 0.7:
        raise ValueError(f"synthetic: max_object_frac must be in (0, 0.7], got {p['max_object_frac']}")


def _make_image(p: dict, split: str, index: int, image_id: int, img_dir: str) -> tuple[dict, list[dict]]:
    """Render image ``index`` of ``split``, write its PNG, return its COCO image entry and annotations (no ids).

    Seeded by (seed, split, index) alone, so the output does not depend on the order or process it runs in."""
    rng = np.random.default_rng(np.random.SeedSequence([p["seed"], _SPLIT_CODE[split], index]))
    img, objects, _ = render_scene(
        rng,
        p["image_size"],
        num_classes=p["num_classes"],
        min_objects=p["min_objects"],
        max_objects=p["max_objects"],
        min_object_size=p["min_object_size"],
        max_object_frac=p["max_object_frac"],
    )
    file_name = f"{image_id:06d}.png"
    Image.fromarray(img).save(os.path.join(img_dir, file_name), compress_level=1)
    entry = {"id": image_id, "file_name": file_name, "width": p["image_size"], "height": p["image_size"]}
    anns = [
        {
            "image_id": image_id,
            "category_id": obj.label + 1,
            "bbox": [float(v) for v in obj.bbox],
            "area": float(obj.area),
            "iscrowd": 0,
        }
        for obj in objects
    ]
    return entry, anns


def _make_image_star(args: tuple) -> tuple[dict, list[dict]]:
    return _make_image(*args)


def _write_dataset(folder: Path, p: dict, workers: int) -> None:
    jobs: dict[str, list[tuple]] = {}
    next_id = 1
    for split, n in _splits(p).items():
        img_dir = folder / "images" / split
        img_dir.mkdir(parents=True)
        jobs[split] = [(p, split, i, next_id + i, str(img_dir)) for i in range(n)]
        next_id += n
    all_jobs = [job for split_jobs in jobs.values() for job in split_jobs]
    if workers > 1:
        # spawn, not fork: the caller may hold threads/locks (torch, DataLoader) that a fork would copy
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            results = list(ex.map(_make_image_star, all_jobs, chunksize=max(1, len(all_jobs) // (4 * workers))))
    else:
        results = [_make_image(*job) for job in all_jobs]

    (folder / "annotations").mkdir()
    categories = [{"id": k + 1, "name": CLASS_NAMES[k], "supercategory": "shape"} for k in range(p["num_classes"])]
    offset = 0
    for split in jobs:
        split_results = results[offset : offset + len(jobs[split])]
        offset += len(jobs[split])
        images = [entry for entry, _ in split_results]
        annotations = [{"id": k + 1, **ann} for k, ann in enumerate(a for _, anns in split_results for a in anns)]
        coco = {
            "info": {"description": f"dset synthetic shapes ({split})", "version": str(GENERATOR_VERSION), "params": p},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        with open(folder / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco, f)


def _paths(folder: Path, p: dict) -> dict[str, str]:
    paths = {}
    for split in _splits(p):
        paths[f"{split}_images"] = str(folder / "images" / split)
        paths[f"{split}_annotations"] = str(folder / "annotations" / f"instances_{split}.json")
    paths["root"] = str(folder)
    return paths


def _is_complete(folder: Path, key: str, p: dict) -> bool:
    marker = folder / "COMPLETE"
    try:
        if marker.read_text().strip() != key:
            return False
        paths = _paths(folder, p)
        return all(Path(paths[f"{split}_annotations"]).is_file() and len(os.listdir(paths[f"{split}_images"])) == n
                   for split, n in _splits(p).items())
    except OSError:
        return False


def dataset_key(num_train: int = 256, num_val: int = 64, image_size: int = 320, seed: int = 0, num_classes: int = 4,
                min_objects: int = 1, max_objects: int = 8, min_object_size: int = 8,
                max_object_frac: float = 0.6, num_test: int = 0) -> str:
    """The data set's identity: a hash of all its parameters and GENERATOR_VERSION (its cache folder's key)."""
    p = _params(num_train, num_val, image_size, seed, num_classes, min_objects, max_objects, min_object_size,
                max_object_frac, num_test)
    return hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:16]


def make_synthetic_coco(
    root: str | os.PathLike | None = None,
    num_train: int = 256,
    num_val: int = 64,
    image_size: int = 320,
    seed: int = 0,
    num_classes: int = 4,
    min_objects: int = 1,
    max_objects: int = 8,
    min_object_size: int = 8,
    max_object_frac: float = 0.6,
    force: bool = False,
    workers: int = 1,
    num_test: int = 0,
) -> dict[str, str]:
    """Generate (or reuse) the synthetic COCO data set and return its paths.

    Returns ``{"train_images", "train_annotations", "val_images", "val_annotations", "root"}`` (strings), with
    ``num_test`` > 0 also ``"test_images", "test_annotations"``; ``root`` is the data set's own folder inside the
    cache ``root`` argument. ``force=True`` regenerates.
    ``workers``: processes that render images (1: in this process). The output is identical for any number of
    workers. More than 1 uses spawned processes, so a calling script needs the usual
    ``if __name__ == "__main__":`` guard; the command line uses up to 8 by default.
    Train image ids are 1..num_train, val ids continue after them, test ids after val's.
    """
    p = _params(num_train, num_val, image_size, seed, num_classes, min_objects, max_objects, min_object_size,
                max_object_frac, num_test)
    _validate(p)
    key = dataset_key(num_train, num_val, image_size, seed, num_classes, min_objects, max_objects, min_object_size,
                      max_object_frac, num_test)
    cache_root = Path(root).expanduser() if root is not None else default_cache_root()
    counts = "-".join(str(n) for n in _splits(p).values())
    name = f"shapes{p['num_classes']}_{counts}_{p['image_size']}px_seed{p['seed']}_{key}"
    folder = cache_root / name
    if not force and _is_complete(folder, key, p):
        return _paths(folder, p)

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # (not mkdtemp: that makes it 0700)
    try:
        _write_dataset(tmp, p, max(1, int(workers)))
        (tmp / "params.json").write_text(json.dumps(p, indent=2, sort_keys=True))
        (tmp / "COMPLETE").write_text(key)
        if folder.exists():  # stale, incomplete, or forced: replace it
            if not force and _is_complete(folder, key, p):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return _paths(folder, p)
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=cache_root))
            os.rename(folder, old / "d")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            # lost a race with another process that renamed a complete copy into place
            if _is_complete(folder, key, p):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(folder, p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dset.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="cache root the data set folder is created in "
                    "(default $DSET_CACHE_DIR/synthetic or ~/.cache/dset/synthetic)")
    ap.add_argument("--num-train", type=int, default=256)
    ap.add_argument("--num-val", type=int, default=64)
    ap.add_argument("--num-test", type=int, default=0, help="images of the test (scoring) split; 0: none")
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-classes", type=int, default=4)
    ap.add_argument("--min-objects", type=int, default=1)
    ap.add_argument("--max-objects", type=int, default=8)
    ap.add_argument("--force", action="store_true", help="regenerate even if a complete copy exists")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="rendering processes (default: CPU count, at most 8)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        paths = make_synthetic_coco(
            root=args.out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
            seed=args.seed, num_classes=args.num_classes, min_objects=args.min_objects,
            max_objects=args.max_objects, force=args.force, workers=args.workers, num_test=args.num_test,
        )
    except ValueError as e:
        ap.error(str(e))
    for k, v in paths.items():
        print(f"{k}: {v}")
    print(f"seconds: {time.perf_counter() - t0:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
