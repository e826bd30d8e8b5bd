"""Which GPU each worker of a study uses.

``--workers N`` on a machine with G visible GPUs gives worker i the GPU ``devices[i % len(devices)]`` through
``CUDA_VISIBLE_DEVICES`` (inside the worker it is ``cuda:0``); ``--devices 0,2`` chooses the GPUs (indices
among those visible, as ``nvidia-smi`` lists them or as ``$CUDA_VISIBLE_DEVICES`` already narrows them).
More workers than GPUs share them round-robin, with a warning: each run's latency tag then says its GPU was
shared while it was measured. Without a GPU every worker runs on the CPU, which N > 1 workers share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """One worker's device: ``visible`` is its CUDA_VISIBLE_DEVICES value (None: the CPU, or no change)."""

    visible: str | None
    label: str                  # "GPU 1", "CPU"
    sharers: int                # how many workers use this device (1: it has it to itself)

    @property
    def shared(self) -> bool:
        return self.sharers > 1

    @property
    def env(self) -> dict[str, str]:
        return {} if self.visible is None else {"CUDA_VISIBLE_DEVICES": self.visible}

    def note(self) -> str:
        """What the latency tag adds: whether the device was shared while the run was measured."""
        if self.sharers > 1:
            return f"; {self.label} shared by {self.sharers} workers while measured"
        return f"; {self.label} to itself" if self.visible is not None else ""


class DeviceError(ValueError):
    pass


def gpu_count() -> int:
    """GPUs this process can see. ``torch.cuda.device_count`` asks NVML and does not initialise CUDA, so that
    CUDA_VISIBLE_DEVICES set afterwards (``--workers 1 --devices 2``) still takes effect here."""
    import torch

    return torch.cuda.device_count()


def parse_devices(text: str | None) -> list[int] | None:
    if text is None or text == "":
        return None
    try:
        out = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise DeviceError(f"--devices: expected GPU indices like 0,2, got {text!r}") from None
    if not out or any(i < 0 for i in out) or len(set(out)) != len(out):
        raise DeviceError(f"--devices: expected distinct GPU indices >= 0 like 0,2, got {text!r}")
    return out


def plan_devices(workers: int, gpus: int, devices: list[int] | None = None,
                 visible_env: str | None = None) -> tuple[list[Slot], str | None]:
    """The device of each of ``workers`` workers on a machine with ``gpus`` visible GPUs, and a warning when
    workers must share a GPU (None otherwise). ``visible_env``: the invoking process's CUDA_VISIBLE_DEVICES,
    whose entries ``devices`` index."""
    physical = [x.strip() for x in visible_env.split(",")] if visible_env else [str(i) for i in range(gpus)]
    physical = physical[:gpus] if gpus else []
    if devices is not None:
        if not physical:
            raise DeviceError(f"--devices {','.join(map(str, devices))}: this machine has no CUDA GPU")
        bad = [d for d in devices if d >= len(physical)]
        if bad:
            raise DeviceError(f"--devices: GPU index {bad[0]} does not exist (this machine has {len(physical)} "
                              f"visible GPU(s): 0-{len(physical) - 1})")
        chosen = [physical[d] for d in devices]
    else:
        chosen = physical
    if not chosen:
        return [Slot(None, "CPU", workers)] * workers, None
    slots_for = [chosen[i % len(chosen)] for i in range(workers)]
    slots = [Slot(v, f"GPU {v}", slots_for.count(v)) for v in slots_for]
    warning = None
    if workers > len(chosen):
        warning = (f"{workers} workers on {len(chosen)} GPU(s) ({','.join(chosen)}): GPUs are shared round-robin "
                   f"(runs are slower, and their latency tags say the GPU was shared)")
    return slots, warning


def plan_for_invocation(workers: int, devices_text: str | None) -> tuple[list[Slot], str | None]:
    return plan_devices(workers, gpu_count(), parse_devices(devices_text), os.environ.get("CUDA_VISIBLE_DEVICES"))
