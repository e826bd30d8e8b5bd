"""``python -m dset.bench loader``: the training data pipeline's speed per loader worker, beside the reference
RT-DETR's pipeline on the same files, in one process.

    python -m dset.bench loader [--json] [--num-images 32] [--width 640 --height 480] [--size 640] [--rounds 5]
                                [--warmup 1] [--batch-size 4] [--formats jpeg png] [--seed 0] [--out DIR]
                                [--data DATA.yaml | --data instances.json --data-images DIR]

Files: ``--num-images`` scenes drawn by :mod:`dset.data.synthetic` (at ``--width`` x ``--height``, COCO's usual
640x480, so they have exact boxes), or the first images of a real set (``--data``: a data file's train split, or a
COCO JSON with its images folder); each written as JPEG (quality 90) and as PNG (Pillow's default compression),
with a COCO JSON per format, into a temporary folder (``--out DIR`` keeps them).

Ours is what training runs: :class:`dset.data.coco.CocoDetection` with
:func:`dset.data.loaders.train_transform_for` (``data.augment=rtdetr``, no ``data.stop_epoch``) at ``--size``, and
:func:`dset.data.coco.collate_fn`. The reference is "reference RT-DETR pipeline (re-stated)": lyuwenyu/RT-DETR's
``rtdetrv2_pytorch`` training pipeline written again here with torchvision.transforms.v2 (none of its code is
copied): its ``CocoDetection`` (torchvision's: pycocotools index, ``PIL.Image.open(...).convert("RGB")``; then
``ConvertCocoPolysToMask``: crowd annotations dropped, xywh -> xyxy clamped to the image, empty boxes dropped,
``area``/``iscrowd``/``orig_size``/``image_id``/``idx`` kept; the transforms get ``(image, target, dataset)``), the
ops of ``configs/rtdetrv2/include/dataloader.yml`` (RandomPhotometricDistort p 0.5, RandomZoomOut fill 0,
RandomIoUCrop p 0.8 without our empty-box guard, SanitizeBoundingBoxes min_size 1, RandomHorizontalFlip,
Resize [S, S], SanitizeBoundingBoxes min_size 1, ConvertPILImage float32 / 255, ConvertBoxes cxcywh normalised)
and ``BatchImageCollateFunction`` (``torch.cat``). Where it differs: category ids map to labels in the JSON's
category order (the reference's fixed COCO-80 table gives the same labels on COCO itself), and its collate's
multi-scale resize (a batch interpolated to a size drawn from 480..800 before epoch 71) is left out, because ours
does that step on the training device after the loader; both pipelines here end at the collated S x S batch.

Measurement: one thread (``torch.set_num_threads(1)``, as one loader worker), both pipelines on the same files,
batch by batch interleaved (pipeline order alternating per batch and round), a warm-up round first. Each
pipeline keeps its own torch random stream, seeded from (``--seed``, format) at the start of every round: every
round repeats the same augmentation draws, runs with one seed draw the same way, and since both pipelines consume
their streams alike they draw the same augmentations, so they do the same work: ``outputs_max_abs_diff`` (largest
difference between their batches, ~1e-7 from float rounding; inf if a batch differs in shape) and ``boxes_out``
(boxes left after the augmentations, per round) show it. Per pipeline and format: images/s per worker
(median over rounds, min, max) and ms per image split into decode (file to RGB PIL image) and the rest (targets,
transforms, collate). The ratio is ours / reference of the median images/s; its spread is the per-round ratios'.
``other_cpu_share`` is the share of the machine's CPU time that other processes used meanwhile (0 = quiet).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .config_checks import ConfigError
from .cpu_share import OtherCpuShare
from .data.errors import DatasetError

__all__ = ["REFERENCE_NAME", "FORMATS", "write_bench_files", "our_train_dataset", "reference_train_transforms",
           "ReferenceCocoDetection", "reference_collate", "bench_loader", "add_command"]

REFERENCE_NAME = "reference RT-DETR pipeline (re-stated)"
OURS_NAME = "ours (CocoDetection + train_transform_for + collate_fn)"
# format -> (file suffix, Pillow save options)
FORMATS: dict[str, tuple[str, dict]] = {"jpeg": (".jpg", {"quality": 90}), "png": (".png", {})}


# ---------------------------------------------------------------------------------------------- files


def _synthetic_scenes(count: int, width: int, height: int, seed: int):
    """``count`` (uint8 image [H, W, 3], annotations, categories): a synthetic scene drawn square at max(W, H) and
    cropped to W x H, boxes made tight to the objects' pixels left inside the crop."""
    from .data.synthetic import CLASS_NAMES, render_scene

    num_classes = 4
    categories = [{"id": k + 1, "name": CLASS_NAMES[k]} for k in range(num_classes)]
    side = max(width, height)
    attempt = 0
    for index in range(count):
        while True:  # a scene left without boxes by the crop is drawn again: RandomIoUCrop needs boxes
            rng = np.random.default_rng(np.random.SeedSequence([seed, index, attempt]))
            attempt += 1
            img, objects, _ = render_scene(rng, side, num_classes=num_classes, min_object_size=min(8, side // 8))
            anns = []
            for obj in objects:
                x0, y0, _, _ = obj.bbox
                sub = obj.mask[: max(0, height - y0), : max(0, width - x0)]
                if not sub.any():
                    continue
                rows, cols = np.flatnonzero(sub.any(1)), np.flatnonzero(sub.any(0))
                anns.append({"category_id": obj.label + 1, "iscrowd": 0, "area": float(sub.sum()),
                             "bbox": [float(x0 + cols[0]), float(y0 + rows[0]), float(cols[-1] - cols[0] + 1),
                                      float(rows[-1] - rows[0] + 1)]})
            if anns:
                break
        yield img[:height, :width], anns, categories


def _source_paths(data: str, data_images: str | None) -> tuple[str, str]:
    """(images folder, annotations JSON) of ``--data``: a COCO JSON (with ``--data-images``) or a data file's /
    data preset's train split."""
    if data.lower().endswith(".json"):
        if data_images is None:
            raise ConfigError(f"loader --data {data}: a COCO JSON needs its images folder (--data-images DIR)")
        return data_images, data
    if data_images is not None:
        raise ConfigError(f"loader --data-images {data_images}: only with a COCO JSON as --data (a data file names "
                          "its own folders)")
    from .config import read_data_layer

    layer = read_data_layer(data)["data"]
    train = layer.get("train") or {}
    if layer.get("name", "coco") != "coco" or not train.get("images") or not train.get("annotations"):
        raise ConfigError(f"loader --data {data}: needs a COCO data set with data.train.images and "
                          f"data.train.annotations (got name {layer.get('name')!r}, train {train!r})")
    return str(train["images"]), str(train["annotations"])


def _source_scenes(data: str, data_images: str | None, count: int):
    """The first ``count`` images of a real set (read and checked by our CocoDetection), with their annotations."""
    from .data.coco import CocoDetection

    images_dir, annotations = _source_paths(data, data_images)
    ds = CocoDetection(images_dir, annotations)
    categories = [{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in ds.coco.dataset["categories"]]
    keys = ("category_id", "iscrowd", "area", "bbox")
    for index, image_id in enumerate(ds.image_ids[:count]):
        anns = [{k: a[k] for k in keys} for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=image_id))]
        yield np.asarray(ds.load_image(index)), anns, categories


def write_bench_files(out: str | os.PathLike, count: int = 32, width: int = 640, height: int = 480, seed: int = 0,
                      data: str | None = None, data_images: str | None = None,
                      formats: tuple[str, ...] = ("jpeg", "png")) -> dict[str, Any]:
    """Write the benchmark's images once per format under ``out/<format>/`` with ``out/<format>/instances.json``.
    Returns ``{"formats": {format: {"images", "annotations", "bytes"}}, "count", "sizes", "source"}``."""
    out = Path(out)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"loader --formats: unknown format(s) {unknown}; known: {sorted(FORMATS)}")
    scenes = (_source_scenes(data, data_images, count) if data is not None
              else _synthetic_scenes(count, width, height, seed))
    cocos = {f: {"images": [], "annotations": [], "categories": []} for f in formats}
    folders = {}
    for f in formats:
        folders[f] = out / f / "images"
        folders[f].mkdir(parents=True, exist_ok=True)
    sizes, n_bytes, ann_id = set(), dict.fromkeys(formats, 0), 0
    for image_id, (img, anns, categories) in enumerate(scenes, start=1):
        h, w = img.shape[:2]
        sizes.add((w, h))
        pil = Image.fromarray(img)
        for f in formats:
            suffix, options = FORMATS[f]
            name = f"{image_id:06d}{suffix}"
            pil.save(folders[f] / name, **options)
            n_bytes[f] += (folders[f] / name).stat().st_size
            coco = cocos[f]
            coco["categories"] = categories
            coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        for a in anns:
            ann_id += 1
            for f in formats:
                cocos[f]["annotations"].append({"id": ann_id, "image_id": image_id, **a})
    n = len(cocos[formats[0]]["images"]) if formats else 0
    if n == 0:
        raise DatasetError(f"loader: no images to benchmark (--num-images {count}, source {data or 'synthetic'})")
    result = {"formats": {}, "count": n, "sizes": sorted(sizes),
              "source": "synthetic (dset.data.synthetic scenes)" if data is None else str(data)}
    for f in formats:
        ann_path = out / f / "instances.json"
        ann_path.write_text(json.dumps(cocos[f]))
        result["formats"][f] = {"images": str(folders[f]), "annotations": str(ann_path), "bytes": n_bytes[f]}
    return result


# ---------------------------------------------------------------------------------------------- ours


def our_train_dataset(images_dir: str | os.PathLike, annotations: str | os.PathLike, size: int) -> Dataset:
    """Our training data set exactly as a run builds it (``data.augment=rtdetr`` at ``size``)."""
    from .config import Config, with_values
    from .data.coco import CocoDetection
    from .data.loaders import train_transform_for

    cfg = with_values(Config(), {"data.image_size": size, "data.augment": "rtdetr", "data.stop_epoch": None})
    return CocoDetection(images_dir, annotations, train_transform_for(cfg))


# ---------------------------------------------------------------------------------------------- reference


class _RefRandomIoUCrop(v2.RandomIoUCrop):
    """RandomIoUCrop applied with probability ``p``, as the reference's (which has no guard for boxless samples)."""

    def __init__(self, p: float = 0.8) -> None:
        super().__init__()
        self.p = p

    def forward(self, *inputs: Any) -> Any:
        if torch.rand(1) >= self.p:
            return inputs if len(inputs) > 1 else inputs[0]
        return super().forward(*inputs)


class _RefConvertPILImage(v2.Transform):
    """PIL image -> float32 image tensor divided by 255 (the reference's ConvertPILImage, dtype float32, scale)."""

    _transformed_types = (Image.Image,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return tv_tensors.Image(F.pil_to_tensor(inpt).float() / 255.0)


class _RefConvertBoxes(v2.Transform):
    """Boxes -> cxcywh divided by the canvas (w, h, w, h), a plain tensor (the reference's ConvertBoxes)."""

    _transformed_types = (tv_tensors.BoundingBoxes,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        h, w = inpt.canvas_size
        boxes = box_convert(inpt.as_subclass(torch.Tensor), in_fmt=inpt.format.value.lower(), out_fmt="cxcywh")
        return boxes / torch.tensor([w, h, w, h])


def reference_train_transforms(size: int = 640) -> v2.Compose:
    """The reference's training ops (rtdetrv2_pytorch ``include/dataloader.yml``) at ``size``."""
    return v2.Compose([
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomZoomOut(fill=0),
        _RefRandomIoUCrop(p=0.8),
        v2.SanitizeBoundingBoxes(min_size=1),
        v2.RandomHorizontalFlip(),
        v2.Resize([size, size]),
        v2.SanitizeBoundingBoxes(min_size=1),
        _RefConvertPILImage(),
        _RefConvertBoxes(),
    ])


class ReferenceCocoDetection(Dataset):
    """The reference's COCO data set: torchvision's CocoDetection reading plus its ConvertCocoPolysToMask."""

    def __init__(self, images_dir: str | os.PathLike, annotations: str | os.PathLike,
                 transforms: Callable | None = None) -> None:
        from pycocotools.coco import COCO

        self.root = str(images_dir)
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
            self.coco = COCO(str(annotations))
        self.ids = sorted(self.coco.imgs)
        self.category2label = {c["id"]: i for i, c in enumerate(self.coco.dataset["categories"])}
        self.transforms = transforms
        self.epoch = 0  # read by the reference's stop_epoch policy; the strong ops run before it

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> Image.Image:
        file_name = self.coco.loadImgs(self.ids[index])[0]["file_name"]
        return Image.open(os.path.join(self.root, file_name)).convert("RGB")

    def _target(self, index: int, image: Image.Image) -> dict[str, Any]:
        w, h = image.size
        image_id = self.ids[index]
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)) if a.get("iscrowd", 0) == 0]
        boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        labels = torch.tensor([self.category2label[a["category_id"]] for a in anns], dtype=torch.int64)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(h, w)),
            "labels": labels[keep],
            "image_id": torch.tensor([image_id]),
            "area": torch.tensor([float(a["area"]) for a in anns])[keep],
            "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns])[keep],
            "orig_size": torch.as_tensor([int(w), int(h)]),
            "idx": torch.tensor([index]),
        }

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image = self.load_image(index)
        target = self._target(index, image)
        if self.transforms is not None:
            image, target, _ = self.transforms(image, target, self)
        return image, target


def reference_collate(items: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """The reference's BatchImageCollateFunction without its multi-scale step."""
    return torch.cat([x[0][None] for x in items], dim=0), [x[1] for x in items]


# ---------------------------------------------------------------------------------------------- measurement


class _TimedDecode:
    """Replaces a data set's ``load_image`` (the instance attribute shadows the method, so ``__getitem__`` calls it)
    and sums the seconds spent in it."""

    def __init__(self, dataset: Any) -> None:
        self.load = dataset.load_image
        self.seconds = 0.0
        dataset.load_image = self

    def __call__(self, index: int) -> Image.Image:
        t0 = time.perf_counter()
        try:
            return self.load(index)
        finally:
            self.seconds += time.perf_counter() - t0


def _machine() -> dict[str, Any]:
    import PIL
    import torchvision

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__, "python": platform.python_version()}


def _check_args(size: int, rounds: int, warmup: int, batch_size: int, count: int) -> None:
    for flag, value, low in (("--rounds", rounds, 1), ("--warmup", warmup, 0), ("--batch-size", batch_size, 1),
                             ("--num-images", count, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"loader {flag}: must be an integer >= {low}, got {value!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 32:
        raise ConfigError(f"loader --size: must be a positive multiple of 32 (as data.image_size), got {size!r}")


def _summary(per_round: list[dict]) -> dict[str, Any]:
    ips = [r["images_per_s"] for r in per_round]
    med = statistics.median(ips)
    return {"images_per_s": round(med, 3), "images_per_s_min": round(min(ips), 3),
            "images_per_s_max": round(max(ips), 3), "ms_per_image": round(1e3 / med, 3),
            "decode_ms": round(statistics.median(r["decode_ms"] for r in per_round), 3),
            "transform_ms": round(statistics.median(r["transform_ms"] for r in per_round), 3),
            "rounds": per_round}


def _difference(a: tuple[torch.Tensor, list[dict]], b: tuple[torch.Tensor, list[dict]]) -> float:
    """Largest absolute difference between two collated batches' images and boxes (inf: shapes differ)."""
    pairs = [(a[0], b[0])] + [(ta["boxes"], tb["boxes"]) for ta, tb in zip(a[1], b[1])]
    if len(a[1]) != len(b[1]) or any(x.shape != y.shape for x, y in pairs):
        return float("inf")
    return max((float((x.float() - y.float()).abs().max()) for x, y in pairs if x.numel()), default=0.0)


def _measure(pipelines: dict[str, tuple[Any, Callable]], n: int, batch_size: int, rounds: int, warmup: int,
             seeds: dict[str, int]) -> tuple[dict[str, list[dict]], float]:
    """Per pipeline, one record per measured round (batches interleaved, order alternating per batch and round),
    and the largest difference between two pipelines' outputs of a batch (two pipelines only)."""
    timers = {name: _TimedDecode(ds) for name, (ds, _) in pipelines.items()}
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    names = list(pipelines)
    records: dict[str, list[dict]] = {name: [] for name in names}
    diff = 0.0
    for r in range(warmup + rounds):
        states = {}
        for name in names:
            torch.manual_seed(seeds[name])
            states[name] = torch.get_rng_state()
        total, decode, boxes_out = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        for b, idx in enumerate(batches):
            outputs = {}
            for name in names if (r + b) % 2 == 0 else names[::-1]:
                ds, collate = pipelines[name]
                torch.set_rng_state(states[name])
                d0 = timers[name].seconds
                t0 = time.perf_counter()
                outputs[name] = collate([ds[i] for i in idx])
                total[name] += time.perf_counter() - t0
                decode[name] += timers[name].seconds - d0
                states[name] = torch.get_rng_state()
                boxes_out[name] += sum(int(t["boxes"].shape[0]) for t in outputs[name][1])
            diff = max(diff, _difference(*outputs.values()))
        if r >= warmup:
            for name in names:
                records[name].append({"images_per_s": round(n / total[name], 3),
                                      "decode_ms": round(decode[name] / n * 1e3, 3),
                                      "transform_ms": round((total[name] - decode[name]) / n * 1e3, 3),
                                      "boxes_out": boxes_out[name]})
    return records, diff


def _stream_seed(seed: int, fmt: str) -> int:
    return seed * 1000 + list(FORMATS).index(fmt)


def bench_loader(files: dict[str, Any] | None = None, *, size: int = 640, rounds: int = 5, warmup: int = 1,
                 batch_size: int = 4, seed: int = 0, num_images: int = 32, width: int = 640, height: int = 480,
                 formats: tuple[str, ...] = ("jpeg", "png"), data: str | None = None, data_images: str | None = None,
                 out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Measure both pipelines (see the module docstring). ``files``: what :func:`write_bench_files` returned (the
    files are then not written again); else they are written into ``out`` or a temporary folder."""
    _check_args(size, rounds, warmup, batch_size, num_images)
    with contextlib.ExitStack() as stack:
        if files is None:
            folder = out if out is not None else stack.enter_context(tempfile.TemporaryDirectory(prefix="dset-bench-"))
            files = write_bench_files(folder, num_images, width, height, seed, data, data_images, tuple(formats))
        threads = torch.get_num_threads()
        stack.callback(torch.set_num_threads, threads)
        stack.enter_context(torch.random.fork_rng(devices=[]))  # the caller's random state is left as it was
        torch.set_num_threads(1)
        results: dict[str, Any] = {}
        load = OtherCpuShare().start()
        for fmt, paths in files["formats"].items():
            pipelines = {
                "ours": (our_train_dataset(paths["images"], paths["annotations"], size), _our_collate()),
                "reference": (ReferenceCocoDetection(paths["images"], paths["annotations"],
                                                     reference_train_transforms(size)), reference_collate),
            }
            n = len(pipelines["ours"][0])
            recs, diff = _measure(pipelines, n, batch_size, rounds, warmup,
                            dict.fromkeys(pipelines, _stream_seed(seed, fmt)))
            ours, ref = _summary(recs["ours"]), _summary(recs["reference"])
            per_round = [o["images_per_s"] / f["images_per_s"] for o, f in zip(recs["ours"], recs["reference"])]
            results[fmt] = {"ours": ours, "reference": ref, "file_bytes": paths.get("bytes"),
                            "ratio": ours["images_per_s"] / ref["images_per_s"],
                            "ratio_min": round(min(per_round), 4), "ratio_max": round(max(per_round), 4),
                            # the same draws make the same batches: the ratio compares equal work
                            "outputs_max_abs_diff": diff}
        other = load.stop()
        machine = _machine()
    return {
        "bench": "loader",
        "size": size, "images": files["count"], "image_sizes": files["sizes"], "source": files["source"],
        "files": str(out) if out is not None else None,
        "batch_size": batch_size, "rounds": rounds, "warmup_rounds": warmup, "seed": seed,
        "pipelines": {"ours": OURS_NAME, "reference": REFERENCE_NAME},
        "results": results,
        "machine": machine,
        "other_cpu_share": other,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _our_collate() -> Callable:
    from .data.coco import collate_fn

    return collate_fn


# ---------------------------------------------------------------------------------------------- command line


def _print_table(res: dict[str, Any]) -> None:
    m = res["machine"]
    sizes = ", ".join(f"{w}x{h}" for w, h in res["image_sizes"][:3]) + (" ..." if len(res["image_sizes"]) > 3 else "")
    print(f"Training data pipeline per loader worker ({m['threads']} thread): {res['images']} images ({sizes}, "
          f"{res['source']}) -> {res['size']}x{res['size']}, batch {res['batch_size']}, median of {res['rounds']} "
          f"rounds after {res['warmup_rounds']} warm-up, seed {res['seed']}")
    print(f"machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, torchvision {m['torchvision']}, "
          f"Pillow {m['pillow']}; other_cpu {res['other_cpu_share']}, load {res['load_avg_1m']}")
    print(f"{'format':<6} {'pipeline':<57} {'img/s':>8} {'min':>8} {'max':>8} {'ms/img':>8} {'decode':>8} "
          f"{'rest':>8}")
    for fmt, r in res["results"].items():
        for key in ("ours", "reference"):
            p = r[key]
            print(f"{fmt:<6} {res['pipelines'][key]:<57} {p['images_per_s']:>8.2f} {p['images_per_s_min']:>8.2f} "
                  f"{p['images_per_s_max']:>8.2f} {p['ms_per_image']:>8.2f} {p['decode_ms']:>8.2f} "
                  f"{p['transform_ms']:>8.2f}")
    print("(decode: file to RGB PIL image; rest: targets, augmentations, resize, to tensor, collate; ms per image)")
    for fmt, r in res["results"].items():
        print(f"ratio {fmt}: ours / reference images/s = {r['ratio']:.3f} "
              f"(per round {r['ratio_min']:.3f} .. {r['ratio_max']:.3f}; same draws, outputs differ by at most "
              f"{r['outputs_max_abs_diff']:.1e})")


def _cmd_loader(args: argparse.Namespace) -> int:
    try:
        res = bench_loader(size=args.size, rounds=args.rounds, warmup=args.warmup, batch_size=args.batch_size,
                           seed=args.seed, num_images=args.num_images, width=args.width, height=args.height,
                           formats=tuple(args.formats), data=args.data, data_images=args.data_images, out=args.out)
    except (ConfigError, DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res), flush=True)
    else:
        _print_table(res)
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``loader`` sub-command to ``python -m dset.bench``'s parser."""
    p = subparsers.add_parser("loader", help="training data pipeline (decode, augmentations, resize, collate) "
                              "per loader worker vs the reference RT-DETR's, on the same JPEG and PNG files")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--num-images", type=int, default=32, help="images per format")
    p.add_argument("--width", type=int, default=640, help="synthetic images' width")
    p.add_argument("--height", type=int, default=480, help="synthetic images' height")
    p.add_argument("--size", type=int, default=640, help="training size (square), as data.image_size")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds (each: every image through both)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds, not counted")
    p.add_argument("--batch-size", type=int, default=4, help="images per collated batch")
    p.add_argument("--formats", nargs="+", choices=tuple(FORMATS), default=list(FORMATS))
    p.add_argument("--seed", type=int, default=0, help="seeds the synthetic scenes and the augmentations")
    p.add_argument("--data", default=None, metavar="DATA.yaml|instances.json",
                   help="use the first --num-images of a real set: a data file (its train split) or a COCO JSON")
    p.add_argument("--data-images", default=None, metavar="DIR", help="the images folder of a COCO JSON --data")
    p.add_argument("--out", default=None, metavar="DIR", help="write (and keep) the files here")
    p.set_defaults(func=_cmd_loader)
    return p
