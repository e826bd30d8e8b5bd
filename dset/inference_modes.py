"""How a model is run as deployed: a precision (fp32, or bf16 / fp16 under ``torch.autocast``) and a mode (eager,
``torch.compile``, or a CUDA graph replayed on a static input buffer).

:func:`inference_runner` turns an eval model into a callable ``images -> outputs`` for one combination, or raises
:class:`InferenceModeError` saying why that combination cannot run on the model's device (the caller records it as
not run and goes on). The latency protocol (:mod:`dset.measure`, :mod:`dset.latency_benchmark`) times these
callables and :mod:`dset.deployed_accuracy` evaluates them; ``docs/deployment.md`` describes both.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn

from .models.moe import moe_dispatch

PRECISIONS = ("fp32", "bf16", "fp16")
MODES = ("eager", "compile", "cudagraphs")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# warm-up iterations on a side stream before a CUDA graph is captured (PyTorch's CUDA graphs notes: lazy
# initialisations, cuDNN/cuBLAS autotuning and allocator pools settle before capture)
CAPTURE_WARMUP = 3


class InferenceModeError(ValueError):
    """A precision and mode that cannot run here (e.g. CUDA graphs on a CPU device), with why."""


def precision_label(precision: str) -> str:
    """``"fp32"``, or ``"bf16 (autocast)"``: the reduced precisions are autocast, not a converted model."""
    return precision if precision == "fp32" else f"{precision} (autocast)"


def describe(precision: str, mode: str) -> str:
    """How a combination is named in output: ``"fp32 eager"``, ``"bf16 (autocast) cudagraphs"``."""
    return f"{precision_label(precision)} {mode}"


def parse_choices(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``, every item one of ``allowed``; a ValueError naming ``flag`` and the value."""
    items = tuple(s.strip() for s in text.split(","))
    bad = [s for s in items if s not in allowed]
    if not text.strip() or bad or len(set(items)) != len(items):
        raise ValueError(f"{flag} takes a comma-separated list of distinct values from {', '.join(allowed)}; got "
                         f"{text!r}" + (f" ({', '.join(repr(b) for b in bad)} unknown)" if bad else ""))
    return items


def check_combination(precision: str, mode: str, device: torch.device | str) -> None:
    """Raise :class:`InferenceModeError` with the reason when ``precision`` + ``mode`` cannot run on ``device``."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "cudagraphs" and device.type != "cuda":
        raise InferenceModeError(f"CUDA graphs need a CUDA device; the model is on {device.type}")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise InferenceModeError(f"{torch.cuda.get_device_name(device)} does not support bfloat16")


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to the precision's dtype on ``device_type``; fp32: no autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class InferenceRunner:
    """``runner(images) -> outputs`` of one model in one precision and mode (see :func:`inference_runner`).
    ``close()`` releases what the mode holds (a compiled copy, CUDA graphs)."""

    def __init__(self, model: nn.Module, precision: str, mode: str):
        self.model, self.precision, self.mode = model, precision, mode
        self.device = _model_device(model)
        self._stack = contextlib.ExitStack()
        self._forward: Callable = model
        self._graphs: dict[tuple, tuple] = {}   # input shape -> (graph, static input, static outputs)
        self._pool = None
        if mode == "compile":
            # a private copy kept on the static MoE dispatch for the runner's life: entering moe_dispatch on every
            # call would add ~0.3 ms of module walking, and torch.compile guards on the flag it sets
            compiled_model = copy.deepcopy(model)
            self._stack.enter_context(moe_dispatch(compiled_model, "static"))
            self._forward = torch.compile(compiled_model)

    def __call__(self, images: torch.Tensor):
        if self.mode == "cudagraphs":
            graph, static_in, static_out = self._graphs.get(tuple(images.shape)) or self._capture(images)
            static_in.copy_(images)
            graph.replay()
            return static_out   # overwritten by the next replay of this shape
        with torch.inference_mode(), autocast(self.precision, self.device.type):
            return self._forward(images)

    def _capture(self, example: torch.Tensor) -> tuple:
        """A CUDA graph of the whole forward at ``example``'s shape, captured after warm-up on a side stream."""
        static_in = example.detach().clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with moe_dispatch(self.model, "static"), torch.inference_mode(), autocast(self.precision, "cuda"):
            with torch.cuda.stream(side):
                for _ in range(CAPTURE_WARMUP):
                    self.model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()   # one memory pool for every shape's graph
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    static_out = self.model(static_in)
            except RuntimeError as exc:  # e.g. an operation that reads a value back to the host
                raise InferenceModeError(f"CUDA graph capture failed: {str(exc).splitlines()[0]}") from None
        self._graphs[tuple(example.shape)] = (graph, static_in, static_out)
        return self._graphs[tuple(example.shape)]

    def close(self) -> None:
        self._stack.close()
        self._graphs.clear()
        self._forward = self.model


def inference_runner(model: nn.Module, precision: str, mode: str, example: torch.Tensor) -> InferenceRunner:
    """A callable running eval ``model`` (on its device) in ``precision`` and ``mode``: eager on the default
    (sparse) MoE dispatch; ``compile``: ``torch.compile`` of a copy on the static MoE dispatch; ``cudagraphs``: the
    whole forward captured on the static dispatch and replayed on a static input buffer (one graph per input
    shape; the outputs returned are the graph's, overwritten by its next replay). Everything under
    ``torch.inference_mode()``, bf16/fp16 under ``torch.autocast``. Called once on ``example`` here, so that a
    combination that cannot run (compilation or capture failing) raises :class:`InferenceModeError` now."""
    device = _model_device(model)
    check_combination(precision, mode, device)
    if model.training:
        raise ValueError("inference_runner needs a model in eval mode (call model.eval())")
    runner = InferenceRunner(model, precision, mode)
    try:
        # twice: the first call fills the model's caches (the decoder's anchors), on which torch.compile's guards
        # then recompile once
        for _ in range(2 if mode == "compile" else 1):
            runner(example)
    except InferenceModeError:
        runner.close()
        raise
    except Exception as exc:  # noqa: BLE001 - compilation problems come as many types: say which and go on
        runner.close()
        if mode == "eager":   # the model's own error (e.g. an input size it cannot take), not the mode's
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise InferenceModeError(f"{describe(precision, mode)} failed on {device.type}: {type(exc).__name__}: "
                                 f"{first_line}") from None
    return runner
