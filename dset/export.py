"""``python -m dset.export PRESET [key=value ...] --onnx OUT.onnx``: export any variant to ONNX, every switch
included, and check the file against eager PyTorch.

What is exported: the eval forward ``images [B, 3, H, W] -> (pred_logits [B, Q, C], pred_boxes [B, Q, 4])``
(boxes cx, cy, w, h in [0, 1]; no post-processing), at one input size (``--size``, default
``data.image_size``; the anchors and token pruning's kept count K depend on it) with a dynamic batch.
Exported with PyTorch's TorchScript-based ONNX exporter (``torch.onnx.export(dynamo=False)``), which
traces the model.

Faithfulness. A trace records the operations one input ran and freezes every Python number it read from a
tensor. The paths of this model that read tensors on the host are handled explicitly, so nothing is frozen
silently:
- MoE layers (encoder and decoder) size their dispatch buffers from each expert's group size
  (``counts.tolist()``). During export they take their export dispatch (:meth:`MoEFFN._forward_export`:
  per-expert ``NonZero``/gather/matmul/``ScatterElements``-add; same routing, same routed work, sizes decided at
  run time). Exported any other way they refuse with a message (``torch.onnx.export`` on the model directly).
- Token pruning keeps K = f(tokens, keep ratio in force) tokens: K depends only on the input size and the
  schedule's epoch, so it is a constant of the exported graph (as the model's anchors are); the choice of
  WHICH K tokens is a ``TopK`` on the importance scores, computed at run time.
- Query selection (``TopK`` of the encoder scores, as in RT-DETR) is computed at run time.
The MoE dispatch is the only place where the eval forward reads a tensor's value into Python (the training-only
code, the criterion and box checks, does too); anything else a trace freezes is a shape, fixed at export. The
check below is what guards against an unnoticed one: it runs inputs other than the traced one, at two batch
sizes.

Check: after writing the file, ONNX Runtime runs it on random inputs (batch 1 and 2) and the largest
absolute difference from eager PyTorch is printed (:func:`compare_with_eager`: queries whose scores tie
to float rounding may come out of the two runtimes' ``TopK`` in another order; rows are paired before they
are compared, and how many moved is printed); above ``--tolerance`` (1e-4) the export fails and the file is
removed.

The token pruner runs at the keep ratio of the end of its schedule unless ``--epoch`` says otherwise (the
deployed, trained state), as in ``dset.profile``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .config import ConfigError, load_config
from .models.detector import TensorOutputs
from .models.moe import moe_dispatch

__all__ = ["ExportError", "export_onnx", "compare_with_eager", "onnxruntime_session", "OPSET", "TOLERANCE"]

OPSET = 17
TOLERANCE = 1e-4
INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_logits", "pred_boxes")


class ExportError(RuntimeError):
    """The model could not be exported faithfully; the message says which path and why."""


def export_onnx(model: nn.Module, path: str | os.PathLike, size: int | tuple[int, int] = 640,
                opset: int = OPSET) -> Path:
    """Write ``model``'s eval forward to ``path`` as ONNX (input ``images`` [batch, 3, H, W], dynamic batch;
    outputs ``pred_logits``, ``pred_boxes``). Raises :class:`ExportError` when a path would not be exported
    faithfully."""
    h, w = (size, size) if isinstance(size, int) else size
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise ExportError(f"export size must be positive multiples of 32 (the backbone's stride), got {h}x{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    example = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with moe_dispatch(model, "export"), warnings.catch_warnings():
            # the tracer warns about every shape it turns into a Python int; the shapes are fixed at export
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(TensorOutputs(model).eval(), (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"},
                                            OUTPUT_NAMES[1]: {0: "batch"}})
    except RuntimeError as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"ONNX export failed: {exc}") from exc
    finally:
        model.train(was_training)
    return path


def onnxruntime_session(path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None):
    """An ONNX Runtime session on ``path`` (CPU provider unless ``providers``), with ``threads`` intra-op threads
    (default: torch's thread count, so that eager and ONNX Runtime timings use the same cores)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # a dependency of the project: only a broken environment gets here
        raise ExportError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its per-node warnings are noise here
    return ort.InferenceSession(str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"])


def comparison_images(size: int | tuple[int, int], batch_sizes: tuple[int, ...] = (1, 2),
                      seed: int = 1) -> list[torch.Tensor]:
    """The random inputs :func:`compare_with_eager` runs both runtimes on: one ``[B, 3, H, W]`` batch in [0, 1)
    per batch size, drawn in order from one generator seeded with ``seed``."""
    h, w = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, h, w, generator=generator) for batch in batch_sizes]


def compare_with_eager(model: nn.Module, session, size: int | tuple[int, int], batch_sizes: tuple[int, ...] = (1, 2),
                       seed: int = 1) -> dict:
    """ONNX Runtime ``session`` against eager ``model`` on random inputs of each batch size (seed ``seed``, not
    the traced input). Per image, the Q output rows (queries) of both are paired one to one by the assignment
    that minimises their differences: queries whose selection scores tie to float rounding (1e-6 apart; common
    at random initialisation, and a matter of chance in any model) may come out in another order from the two
    runtimes' ``TopK``, which permutes rows without changing the detections. Returns ``{"pred_logits": max
    |diff|, "pred_boxes": max |diff|, "reordered_queries": rows that moved (all images), "images": n}``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    worst = {"pred_logits": 0.0, "pred_boxes": 0.0, "reordered_queries": 0, "images": 0}
    try:
        for images in comparison_images(size, batch_sizes, seed):
            with torch.inference_mode():
                ref = model(images.to(device))
            got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})))
            diff = paired_query_differences(ref, got)
            worst["reordered_queries"] += diff["reordered_queries"]
            worst["images"] += diff["images"]
            for k in OUTPUT_NAMES:
                worst[k] = max(worst[k], diff[k])
    finally:
        model.train(was_training)
    return worst


def paired_query_differences(a: dict, b: dict) -> dict:
    """Two runs' ``pred_logits`` and ``pred_boxes`` ([B, Q, ...] tensors or arrays) compared per image, the Q rows
    of the two paired one to one by the assignment that minimises their differences (queries whose selection
    scores tie may come out in another order). ``{"pred_logits": max |diff|, "pred_boxes": max |diff|,
    "reordered_queries": rows that moved, "images": B}``."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    def as_numpy(v):
        return v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float32)

    a, b = ({k: as_numpy(d[k]) for k in OUTPUT_NAMES} for d in (a, b))
    out = {"pred_logits": 0.0, "pred_boxes": 0.0, "reordered_queries": 0, "images": a[OUTPUT_NAMES[0]].shape[0]}
    for i in range(out["images"]):
        cost = np.maximum(*(np.abs(a[k][i][:, None, :] - b[k][i][None, :, :]).max(-1) for k in OUTPUT_NAMES))
        rows, cols = linear_sum_assignment(cost)
        out["reordered_queries"] += int((rows != cols).sum())
        for k in OUTPUT_NAMES:
            out[k] = max(out[k], float(np.abs(a[k][i][rows] - b[k][i][cols]).max()))
    return out


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dset.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="preset name or YAML file (e.g. dset_r18)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="configuration overrides, e.g. model.checkpoint=runs/d18/checkpoints/best.pt")
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    parser.add_argument("--size", type=int, default=None, help="square input size (default: data.image_size)")
    parser.add_argument("--epoch", type=int, default=None,
                        help="epoch for the token-pruning schedule (default: the end of its ramp)")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest allowed |ONNX Runtime - PyTorch| (default {TOLERANCE:g})")
    parser.add_argument("--no-check", action="store_true", help="keep the file without comparing it to PyTorch")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _argument_parser().parse_intermixed_args(argv)

    from .models.detector import build_model

    try:
        cfg = load_config(args.preset, args.overrides)
        size = args.size or cfg.data.image_size
        model = build_model(cfg).eval()
        model.set_deployed_epoch(args.epoch)
        torch.manual_seed(0)
        path = export_onnx(model, args.onnx, size, args.opset)
    except (ConfigError, FileNotFoundError, ValueError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kept = ""
    if model.token_pruner is not None:
        tokens = (size // 32) ** 2
        kept = f", token pruning keeps {model.token_pruner.num_kept(tokens)} of {tokens} tokens"
    if model.memory_pruner is not None:
        memory_tokens, memory_kept = model.memory_token_counts(size)
        kept += f", memory pruning keeps {memory_kept} of {memory_tokens} memory tokens"
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {args.preset} at {size}x{size}, dynamic batch, "
          f"opset {args.opset}{kept}")
    if args.no_check:
        return 0
    diff = compare_with_eager(model, onnxruntime_session(path), size)
    worst = max(diff["pred_logits"], diff["pred_boxes"])
    line = (f"pred_logits {diff['pred_logits']:.2e}, pred_boxes {diff['pred_boxes']:.2e} over {diff['images']} images "
            f"(batches 1 and 2), {diff['reordered_queries']} queries in another order (tied scores)")
    if not worst <= args.tolerance:
        path.unlink(missing_ok=True)
        print(f"error: ONNX Runtime differs from PyTorch by more than {args.tolerance:g}: {line}; removed {path}. "
              "Pass --no-check to keep the file.", file=sys.stderr)
        return 1
    print(f"checked with ONNX Runtime: max |difference| from PyTorch {line}; tolerance {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
