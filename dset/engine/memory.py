"""Peak memory of a run: host (resident set of this process) and GPU (``torch.cuda.max_memory_allocated``),
both counted from the run's start (:func:`reset_peak_memory`)."""

from __future__ import annotations

import sys

import torch

__all__ = ["reset_peak_memory", "peak_host_memory_mb", "peak_gpu_memory_mb"]


def reset_peak_memory(device: torch.device) -> None:
    """Restart both peaks from the current use, so that a run's peaks are its own and not those of an earlier
    run in the same process (a study trains many)."""
    reset_peak_host_memory()
    if device.type == "cuda":
        torch.cuda.init()   # resetting the peak of a device CUDA has not initialised yet is an error
        torch.cuda.reset_peak_memory_stats(device)


def reset_peak_host_memory() -> None:
    """Linux: restart the peak resident set size (VmHWM) from the current one. Elsewhere: nothing to do."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_host_memory_mb() -> float | None:
    """Peak resident memory of this process in MiB: VmHWM on Linux (since :func:`reset_peak_host_memory`),
    else ``ru_maxrss`` (since the process started)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024   # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, kB on Linux


def peak_gpu_memory_mb(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` of ``device`` in MiB (since :func:`reset_peak_memory`); None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
