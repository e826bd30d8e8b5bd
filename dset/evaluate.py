"""Evaluate a saved run: ``python -m dset.evaluate CHECKPOINT [--split val|test] [--data IMAGES ANNOTATIONS]
[key=value ...]``.

CHECKPOINT is ``checkpoints/best.pt`` or ``checkpoints/last.pt`` of a training run, or the run folder itself
(then ``checkpoints/best.pt``). The configuration is read from the checkpoint; ``key=value`` overrides
change evaluation settings (``data.batch_size``, ``data.max_val_images``, ``data.num_workers``,
``run.device``); ``data=FILE.yaml`` evaluates on the splits of that data file. Without ``--data`` the run's own
validation split is evaluated, or with ``--split test`` its test split (the scoring split, when its data has one;
the synthetic ones are regenerated from their parameters if their cache is gone). The EMA weights are evaluated unless
``--weights model`` (the raw training weights, only in ``last.pt``: ``best.pt`` keeps the EMA weights only).
Prints the COCO metrics (AP in [0, 1], pycocotools, original image sizes) and writes them as JSON with
``--json FILE``. ``--precisions bf16,fp16 --modes eager,compile`` also evaluates the model as it would be deployed
(bf16/fp16 autocast; eager, torch.compile, CUDA graphs) and prints each mAP against fp32 eager, marked where it
loses more than 0.1 point (:mod:`dset.deployed_accuracy`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import run_folder
from .config import ConfigError, config_from_dict, load_config, split_data_override, with_data_file

__all__ = ["evaluate_checkpoint", "prepare_evaluation", "main"]

log = logging.getLogger(__name__)


def _checkpoint_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        # a run folder, or its checkpoints folder
        names = (run_folder.BEST_CHECKPOINT, run_folder.RESUME_STATE)
        for name in (*names, *(Path(n).name for n in names)):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no checkpoint in {path} (looked for checkpoints/best.pt and checkpoints/last.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def evaluate_checkpoint(checkpoint: str | Path, images: str | None = None, annotations: str | None = None,
                        overrides: list[str] | None = None, weights: str = "ema", split: str = "val") -> dict:
    """COCO metrics of a saved run's model on its ``split`` ("val" or "test") or on ``images`` + ``annotations``.

    Returns the :func:`dset.engine.coco_eval.coco_metrics` dict plus ``split``, ``<split>_images``, ``epoch`` (of
    the checkpoint), ``weights`` and ``checkpoint``."""
    from .engine.coco_eval import evaluate_detections

    ev = prepare_evaluation(checkpoint, images, annotations, overrides, weights, split)
    metrics = evaluate_detections(ev.model, ev.loader, ev.data, ev.device, split=split)
    metrics.update(ev.describe())
    return metrics


@dataclass
class Evaluation:
    """A saved run's model (eval mode, on its device) and the data it is evaluated on."""

    model: torch.nn.Module
    loader: object
    data: object            # dset.data.loaders.DataBundle
    device: torch.device
    split: str
    epoch: int | None
    weights: str
    checkpoint: Path

    def describe(self) -> dict:
        return {"split": self.split, "epoch": self.epoch, "weights": self.weights, "checkpoint": str(self.checkpoint)}


def prepare_evaluation(checkpoint: str | Path, images: str | None = None, annotations: str | None = None,
                       overrides: list[str] | None = None, weights: str = "ema", split: str = "val") -> Evaluation:
    """What :func:`evaluate_checkpoint` evaluates: the checkpoint's model and the loader of the split."""
    from .data.errors import DatasetError
    from .data.loaders import build_eval_data, build_val_loader
    from .engine.distributed import DistInfo, resolve_device
    from .models.detector import build_model

    path = _checkpoint_path(checkpoint)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is reported with the file name
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or not ("ema" in ckpt or "model" in ckpt):
        raise ValueError(f"{path}: not a dset training checkpoint (no 'config' and 'ema'/'model' entries)")
    cfg = config_from_dict(ckpt["config"])
    overrides, data_file = split_data_override(overrides)
    if data_file is not None:   # data=FILE: another data set, as a data file describes it
        cfg = with_data_file(cfg, data_file)
    if overrides:
        cfg = load_config(cfg, overrides)
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if split == "test" and images is not None:
        raise ValueError("--split test evaluates the run's own test split; --data gives other images instead")
    if weights not in ckpt:   # best.pt keeps the EMA weights only; last.pt has both
        raise ValueError(f"{path} has no {weights!r} weights (best.pt keeps the EMA weights only; "
                         "the raw ones are in checkpoints/last.pt)")
    state = ckpt["ema"]["module"] if weights == "ema" else ckpt["model"]

    data = build_eval_data(cfg, images, annotations)
    if data.num_classes != cfg.model.num_classes:
        raise DatasetError(f"the checkpoint's model predicts {cfg.model.num_classes} classes but "
                           f"{data.paths.get('val_annotations')} has {data.num_classes} categories")
    saved_names = ckpt.get("category_names")
    if saved_names and list(saved_names) != list(data.category_names):
        log.warning("category names differ from the training data's (%s vs %s): labels are matched by order",
                    saved_names, data.category_names)
    device = resolve_device(cfg.run.device, DistInfo())
    model = build_model(cfg, load_weights=False)
    model.load_state_dict(state)
    model.to(device).eval()
    loader = build_val_loader(data.evaluated_split(split)[0], cfg)
    return Evaluation(model, loader, data, device, split, ckpt.get("epoch"), weights, path)


def _format(metrics: dict) -> str:
    keys = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR100")
    lines = [f"{k:>11s}  {metrics[k]:.4f}" for k in keys if k in metrics]
    for name, ap in (metrics.get("per_class_AP") or {}).items():
        lines.append(f"{'AP ' + name:>11s}  {ap:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dset.evaluate", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("checkpoint", help="checkpoints/best.pt or last.pt of a run, or the run folder")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="evaluation settings (data.batch_size=8, ...)")
    ap.add_argument("--data", nargs=2, metavar=("IMAGES", "ANNOTATIONS"),
                    help="evaluate on this images folder + COCO instances JSON instead of the run's validation split")
    ap.add_argument("--split", choices=("val", "test"), default="val",
                    help="the run's validation split (default; it selected the model) or its test split (scoring)")
    ap.add_argument("--weights", choices=("ema", "model"), default="ema",
                    help="EMA weights (default) or the raw model (last.pt only)")
    ap.add_argument("--precisions", metavar="P,P",
                    help="also evaluate in these precisions, from fp32,bf16,fp16 (bf16/fp16: torch.autocast)")
    ap.add_argument("--modes", metavar="M,M", help="also evaluate in these modes, from eager,compile,cudagraphs")
    ap.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    ns = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bad = [o for o in ns.overrides if "=" not in o]
    if bad:
        ap.error(f"overrides must be key=value, got {bad}")
    deployed = ns.precisions is not None or ns.modes is not None
    if deployed:
        from .inference_modes import MODES, PRECISIONS, parse_choices

        try:
            precisions = parse_choices(ns.precisions or "fp32", PRECISIONS, "--precisions")
            modes = parse_choices(ns.modes or "eager", MODES, "--modes")
        except ValueError as exc:
            ap.error(str(exc))

    from .data.errors import DatasetError

    images, annotations = ns.data if ns.data else (None, None)
    try:
        if deployed:
            from .deployed_accuracy import accuracy_table, deployed_accuracy

            ev = prepare_evaluation(ns.checkpoint, images, annotations, ns.overrides, ns.weights, ns.split)
            result = deployed_accuracy(ev, precisions, modes)
            metrics = {**result.pop("reference"), **result}
        else:
            metrics = evaluate_checkpoint(ns.checkpoint, images, annotations, ns.overrides, ns.weights, ns.split)
    except (ConfigError, DatasetError, FileNotFoundError, ValueError) as exc:
        from .engine.errors import error_message

        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2
    print(f"{metrics['checkpoint']} (epoch {metrics['epoch']}, {metrics['weights']} weights, "
          f"{metrics[ns.split + '_images']} {'given' if ns.data else ns.split} images; COCO AP in [0, 1], "
          "pycocotools)")
    print(_format(metrics))
    if deployed:
        print(accuracy_table(metrics))
    if ns.json:
        from .engine.records import json_safe

        Path(ns.json).write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
