"""Accuracy of what is deployed: a saved run's COCO mAP under each precision and mode it would be deployed in
(:mod:`dset.inference_modes`), against fp32 eager on the same split, as RF-DETR checks its FP16 artifact.

A combination that loses more than :data:`MARK_POINTS` mAP points is marked; one that cannot run on the device is
listed as not run, with why. ``python -m dset.evaluate RUN --precisions bf16,fp16 --modes eager,compile`` prints
the table; ``docs/deployment.md`` describes the check.
"""

from __future__ import annotations

import torch
from torch import nn

from .inference_modes import InferenceModeError, describe, inference_runner

MARK_POINTS = 0.1   # mAP points (mAP x 100) a deployed combination may lose against fp32 eager before it is marked
REFERENCE = ("fp32", "eager")


class _RunnerModule(nn.Module):
    """A runner as the module :func:`dset.engine.coco_eval.evaluate_detections` calls (it switches eval/train)."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner

    def forward(self, images: torch.Tensor) -> dict:
        return self.runner(images)


def compare_to_reference(rows: list[dict], limit_points: float = MARK_POINTS) -> list[dict]:
    """``rows`` (each with ``precision``, ``mode`` and ``mAP`` in [0, 1], or ``not_run``) with ``delta_points``
    (100 x (mAP - the fp32 eager row's mAP)) and ``marked`` (it loses more than ``limit_points``)."""
    reference = next((r for r in rows if (r["precision"], r["mode"]) == REFERENCE and "mAP" in r), None)
    if reference is None:
        raise ValueError("the comparison needs an fp32 eager row with its mAP (the reference)")
    out = []
    for r in rows:
        if "mAP" in r:
            delta = 100 * (r["mAP"] - reference["mAP"])
            r = {**r, "delta_points": delta, "marked": delta < -limit_points}
        out.append(r)
    return out


def deployed_accuracy(ev, precisions: tuple[str, ...], modes: tuple[str, ...]) -> dict:
    """COCO metrics of a saved run's model and split (``ev``, :func:`dset.evaluate.prepare_evaluation`) under fp32
    eager (the reference, always evaluated) and each of ``precisions`` x ``modes``. Returns ``{"reference": metrics
    of fp32 eager, "rows": [{precision, mode, label, mAP, mAP50, delta_points, marked} or {precision, mode, label,
    not_run}], "mark_points": ..., "device": ...}`` and the checkpoint's description."""
    from .engine.coco_eval import evaluate_detections
    from .measure import device_name
    combinations = list(dict.fromkeys([REFERENCE] + [(p, m) for p in precisions for m in modes]))
    example = next(iter(ev.loader))[0].to(ev.device)
    rows, reference = [], None
    for precision, mode in combinations:
        row = {"precision": precision, "mode": mode, "label": describe(precision, mode)}
        try:
            runner = inference_runner(ev.model, precision, mode, example)
        except InferenceModeError as exc:
            rows.append({**row, "not_run": str(exc)})
            continue
        try:
            metrics = evaluate_detections(_RunnerModule(runner), ev.loader, ev.data, ev.device, split=ev.split)
        finally:
            runner.close()
        if (precision, mode) == REFERENCE:
            reference = metrics
        rows.append({**row, "mAP": metrics["mAP"], "mAP50": metrics["mAP50"]})
    return {**ev.describe(), "device": device_name(ev.device), "reference": reference, "mark_points": MARK_POINTS,
            "rows": compare_to_reference(rows)}


def accuracy_table(result: dict) -> str:
    """:func:`deployed_accuracy`'s rows as a small text table."""
    lines = [f"Accuracy of what is deployed ({result['split']} split, {result['device']}; mAP in [0, 1], difference "
             f"in points against fp32 eager; marked (!) when it loses more than {result['mark_points']} point):",
             f"  {'precision / mode':<28s} {'mAP':>7s} {'mAP50':>7s} {'vs fp32 eager':>14s}"]
    for r in result["rows"]:
        if "not_run" in r:
            lines.append(f"  {r['label']:<28s} not run: {r['not_run']}")
        else:
            lines.append(f"  {r['label']:<28s} {r['mAP']:7.4f} {r['mAP50']:7.4f} {r['delta_points']:+13.2f}"
                         + (" !" if r["marked"] else ""))
    return "\n".join(lines)
