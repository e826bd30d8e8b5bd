"""Data: COCO-format data set, transforms, the synthetic data set and the DAIR-V2X converter.

Names are imported lazily, so ``python -m dset.data.synthetic`` (and its worker processes) and
``python -m dset.data.dair_v2x`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any


class DatasetError(ValueError):
    """A data set file is missing or malformed; the message names the file and the offending key/value.

    Defined here (torch-free) so the converters' command lines start fast; ``dset.data.coco.DatasetError``
    is this class."""


_EXPORTS = {
    "CocoDetection": "coco",
    "collate_fn": "coco",
    "train_transforms": "transforms",
    "eval_transforms": "transforms",
    "NormalizeBoxes": "transforms",
    "make_synthetic_coco": "synthetic",
    "convert_dair_v2x": "dair_v2x",
    "DAIR_V2X_CLASSES": "dair_v2x",
}

__all__ = sorted([*_EXPORTS, "DatasetError"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
