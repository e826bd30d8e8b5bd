"""Helpers that write tiny COCO data sets for the data and evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, width: int, height: int, color=(128, 128, 128), rects=()) -> None:
    """Write an RGB PNG/JPEG: a flat colour with filled rectangles ``(x0, y0, x1, y1, (r, g, b))``."""
    arr = np.empty((height, width, 3), np.uint8)
    arr[:] = color
    for x0, y0, x1, y1, c in rects:
        arr[y0:y1, x0:x1] = c
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_coco(root: Path, data: dict, name: str = "instances.json") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(json.dumps(data))
    return path


def tiny_coco(root: Path) -> tuple[Path, Path, dict]:
    """Two images (64x48 and 80x60), categories with non-contiguous ids 7 ('dog') and 3 ('cat').

    Image 1: a dog box, a cat box that sticks out of the image (clipped), a zero-width box (dropped),
    a crowd region (not a target). Image 2: no objects.
    """
    images_dir = root / "images"
    write_image(images_dir / "a.png", 64, 48)
    write_image(images_dir / "b.png", 80, 60, color=(10, 200, 30))
    data = {
        "images": [
            {"id": 11, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 12, "file_name": "b.png", "width": 80, "height": 60},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [8, 4, 16, 12], "area": 192, "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [40, 30, 40, 30], "area": 1200, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},
            {"id": 4, "image_id": 11, "category_id": 7, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1},
        ],
    }
    return images_dir, write_coco(root, data), data
