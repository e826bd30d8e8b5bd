"""Data sets, samplers and data loaders for a :class:`dset.config.Config`.

- ``data.name: synthetic`` generates (or reuses from its cache) the built-in synthetic data set with the
  ``data.synthetic.*`` settings; ``data.name: coco`` reads ``data.{train,val}.{images,annotations}``.
- Splits: ``train``; ``val``, the selection split (best epoch, early stopping, tuning); and optionally ``test``,
  the scoring split (``data.test.*``, or ``data.synthetic.num_test`` > 0): the finished run's reported checkpoint
  is evaluated on it once. All of a split's images are evaluated (``data.max_val_images`` limits val only).
- Training images go through ``data.augment``: ``rtdetr`` (RT-DETR's recipe, :func:`train_transforms`),
  ``flip`` (horizontal flip + resize) or ``none`` (resize only); validation images are only resized.
  Both to ``data.image_size`` square.
- ``data.max_train_images`` / ``data.max_val_images`` keep the first N images of a split (budgets); the
  evaluation is then restricted to those image ids.
- Shuffling is seeded per epoch: the training order of epoch ``e`` is a permutation drawn from a generator
  seeded with ``run.seed + e`` (``DistributedSampler``'s rule, with one replica when not distributed), and
  the data-loader workers' seeds come from a generator seeded the same way. Call :func:`set_loader_epoch`
  at the start of every epoch; a resumed run then sees exactly the batches the uninterrupted run saw.
- Under DDP each rank reads its share: training through ``DistributedSampler`` (padded to equal length),
  validation through :class:`ShardSampler` (``rank::world_size``, no padding, so no image is counted twice).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ..config import Config
from .coco import CocoDetection, collate_fn
from .errors import DatasetError

__all__ = ["DataBundle", "data_paths", "build_datasets", "build_eval_data", "build_train_loader", "build_val_loader",
           "set_loader_epoch", "ShardSampler", "train_transform_for"]

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """The splits and what training and evaluation need to know about them."""

    train: Dataset | None                     # CocoDetection (or a Subset of it); None when not built
    val: Dataset                              # CocoDetection (or a Subset of it)
    val_dataset: CocoDetection                # the underlying validation data set (``coco`` for COCOeval)
    val_image_ids: list[int]                  # the image ids that are evaluated
    num_classes: int
    category_names: list[str]
    label_to_category_id: dict[int, int]
    paths: dict[str, str] = field(default_factory=dict)
    test: CocoDetection | None = None         # the test (scoring) split, every image of it; None: there is none

    def evaluated_split(self, split: str) -> tuple[Dataset, CocoDetection, list[int]]:
        """``split`` ("val" or "test") as evaluation reads it: the data set a loader iterates, the underlying
        COCO data set (ground truth) and the image ids that are scored."""
        if split == "val":
            return self.val, self.val_dataset, self.val_image_ids
        if split == "test":
            if self.test is None:
                raise DatasetError("this data has no test split (set data.test.images and data.test.annotations, "
                                   "or data.synthetic.num_test for the synthetic set)")
            return self.test, self.test, self.test.image_ids
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")


def data_paths(cfg: Config) -> dict[str, str]:
    """``{train_images, train_annotations, val_images, val_annotations}`` of the configured data set, and
    ``test_images``, ``test_annotations`` when it has a test split; for ``synthetic`` the data set is generated
    into its cache first (seconds, once)."""
    d = cfg.data
    if d.name == "synthetic":
        from .synthetic import make_synthetic_coco

        s = d.synthetic
        try:
            paths = make_synthetic_coco(root=s.root, num_train=s.num_train, num_val=s.num_val,
                                        image_size=s.image_size, seed=s.seed, num_classes=s.num_classes,
                                        max_objects=s.max_objects, min_object_size=s.min_object_size,
                                        num_test=s.num_test)
        except ValueError as exc:  # invalid combination of synthetic parameters
            raise DatasetError(f"data.synthetic: {exc}") from None
        return {k: str(v) for k, v in paths.items()}
    splits = ("train", "val", "test") if d.test.annotations is not None else ("train", "val")
    return {f"{split}_{part}": str(getattr(getattr(d, split), part)) for split in splits
            for part in ("images", "annotations")}


def train_transform_for(cfg: Config):
    """The training pipeline ``data.augment`` names; with ``data.stop_epoch`` the RT-DETR recipe gives way to
    the flip pipeline at that epoch (RT-DETRv2's policy)."""
    from .transforms import StopEpochPolicy, eval_transforms, flip_transforms, train_transforms

    size = cfg.data.image_size
    if cfg.data.augment == "rtdetr":
        if cfg.data.stop_epoch is not None:
            return StopEpochPolicy(train_transforms(size), flip_transforms(size), cfg.data.stop_epoch)
        return train_transforms(size)
    if cfg.data.augment == "flip":
        return flip_transforms(size)
    return eval_transforms(size)


def _first(ds: CocoDetection, n: int | None) -> Dataset:
    return ds if n is None or n >= len(ds) else Subset(ds, range(n))


def build_datasets(cfg: Config, train: bool = True) -> DataBundle:
    """The splits of the configured data set (without training with ``train=False``).

    Raises :class:`DatasetError` naming the file when a split is missing or malformed, or when a split's
    categories differ from the validation split's."""
    from .transforms import eval_transforms

    paths = data_paths(cfg)
    val_full = CocoDetection(paths["val_images"], paths["val_annotations"], eval_transforms(cfg.data.image_size))

    classes = cfg.data.classes
    if classes is not None and list(classes) != val_full.category_names:
        raise DatasetError(f"data.classes {list(classes)} differ from the categories of {paths['val_annotations']} "
                           f"(in id order): {val_full.category_names}")

    def same_categories(split: CocoDetection, name: str, label: str) -> CocoDetection:
        if split.category_ids != val_full.category_ids:
            raise DatasetError(
                f"the {label} and validation sets have different categories: {paths[name + '_annotations']} has "
                f"ids {split.category_ids}, {paths['val_annotations']} has ids {val_full.category_ids}")
        return split

    train_ds = test_ds = None
    if train:
        train_full = CocoDetection(paths["train_images"], paths["train_annotations"], train_transform_for(cfg))
        train_ds = _first(same_categories(train_full, "train", "training"), cfg.data.max_train_images)
    if "test_annotations" in paths:
        test_ds = same_categories(CocoDetection(paths["test_images"], paths["test_annotations"],
                                                eval_transforms(cfg.data.image_size)), "test", "test")
    val_ds = _first(val_full, cfg.data.max_val_images)
    val_ids = val_full.image_ids[: len(val_ds)]
    return DataBundle(train=train_ds, val=val_ds, val_dataset=val_full, val_image_ids=val_ids,
                      num_classes=val_full.num_classes, category_names=list(val_full.category_names),
                      label_to_category_id=dict(val_full.label_to_category_id), paths=paths, test=test_ds)


def build_eval_data(cfg: Config, images: str | None = None, annotations: str | None = None) -> DataBundle:
    """Only a validation split: the configured one, or the given images folder and COCO JSON (resized to
    ``data.image_size``; ``data.max_val_images`` applies)."""
    from .transforms import eval_transforms

    if images is None and annotations is None:
        return build_datasets(cfg, train=False)
    if images is None or annotations is None:
        raise DatasetError("evaluation data needs both an images folder and an annotations file")
    full = CocoDetection(images, annotations, eval_transforms(cfg.data.image_size))
    ds = _first(full, cfg.data.max_val_images)
    return DataBundle(train=None, val=ds, val_dataset=full, val_image_ids=full.image_ids[: len(ds)],
                      num_classes=full.num_classes, category_names=list(full.category_names),
                      label_to_category_id=dict(full.label_to_category_id),
                      paths={"val_images": str(images), "val_annotations": str(annotations)})


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: every item exactly once over all ranks."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def build_train_loader(dataset: Dataset, cfg: Config, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False) -> DataLoader:
    """Shuffled training loader (seeded per epoch; see :func:`set_loader_epoch`). ``data.batch_size`` is
    per process; the last, smaller batch is kept. ``pin_memory`` (a CUDA run) lets the copies to the GPU overlap
    the step; workers are not persistent, since each epoch reseeds them and tells them the epoch."""
    if len(dataset) < world_size:
        raise DatasetError(f"the training set has {len(dataset)} images, fewer than the {world_size} processes")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.run.seed,
                                 drop_last=False)
    generator = torch.Generator()
    generator.manual_seed(cfg.run.seed)
    return DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=cfg.data.num_workers, generator=generator, drop_last=False,
                      persistent_workers=False, pin_memory=pin_memory)


def build_val_loader(dataset: Dataset, cfg: Config, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Validation loader in data-set order; each rank reads ``rank::world_size``."""
    return DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      collate_fn=collate_fn, num_workers=cfg.data.num_workers, drop_last=False)


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int, rank: int = 0) -> None:
    """Seed the epoch's shuffling (``seed + epoch``, the same on every rank: ranks take disjoint slices of
    one permutation) and its workers' random augmentations (``seed + epoch``, offset per rank), and tell an
    epoch-dependent training pipeline (``data.stop_epoch``) the epoch."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    dataset = loader.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if hasattr(getattr(dataset, "transforms", None), "set_epoch"):  # StopEpochPolicy
        dataset.transforms.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed + epoch + 1_000_003 * rank)
