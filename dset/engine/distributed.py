"""Distributed training helpers: the process group under ``torchrun``, the device of this process, DDP
wrapping and the few collectives training uses.

Under ``torchrun`` (``WORLD_SIZE > 1``), or ``srun`` with several tasks, :func:`setup_distributed` creates the
process group (NCCL on CUDA, gloo on CPU) and :func:`teardown_distributed` destroys it again; without it
everything here works on one process (the collectives return their input).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config, ConfigError
from .slurm_env import torch_env_from_slurm

__all__ = ["DistInfo", "setup_distributed", "teardown_distributed", "resolve_device", "wrap_for_ddp",
           "all_gather_object", "broadcast_object", "broadcast_state", "any_rank", "params_in_sync"]


@dataclasses.dataclass
class DistInfo:
    """This process's place in the run: its rank, the number of processes, its local rank (its GPU), and
    whether :func:`setup_distributed` created the process group (and :func:`teardown_distributed` ends it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_setting: str) -> DistInfo:
    """The process group of a ``torchrun`` launch, or of ``srun`` tasks of one SLURM step (:mod:`.slurm_env`),
    created here unless it exists; or a single process."""
    os.environ.update(torch_env_from_slurm(os.environ))
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if env_world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_setting != "cpu"
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
        info.created_group = True
    if dist.is_available() and dist.is_initialized():
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    return info


def teardown_distributed(dinfo: DistInfo) -> None:
    """Destroy the process group :func:`setup_distributed` created (one it found is left to its creator)."""
    if dinfo.created_group and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(setting: str, dinfo: DistInfo) -> torch.device:
    """``run.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) as this process's device: ``cuda``
    is the process's local rank's GPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {setting!r} requested but CUDA is not available")
    if setting == "cuda":
        return torch.device("cuda", dinfo.local_rank)
    if setting.startswith("cuda") or setting == "cpu" or setting == "mps":
        return torch.device(setting)
    raise ConfigError(f"run.device: expected 'auto', 'cpu' or 'cuda[:N]', got {setting!r}")


def wrap_for_ddp(model: nn.Module, cfg: Config, device: torch.device, dinfo: DistInfo) -> tuple[nn.Module, nn.Module]:
    """``(core, trained)``: the model whose weights are the run's (SyncBatchNorm on CUDA under DDP) and the
    module the training step calls (``core`` itself on one process, its DDP wrapper otherwise)."""
    if dinfo.world_size == 1:
        return model, model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    # experts that receive no token in a step (and the denoising embedding without denoising) get no gradient:
    # DDP must then look for unused parameters
    m = cfg.model
    find_unused = (m.encoder_moe.enabled or m.decoder_moe.enabled or m.token_pruning.enabled
                   or m.memory_pruning.enabled or m.decoder.num_denoising == 0)
    return model, nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused, **ddp_kwargs)


def all_gather_object(obj: Any, dinfo: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if dinfo.world_size == 1:
        return [obj]
    out = [None] * dinfo.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, dinfo: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if dinfo.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_state(module: nn.Module, dinfo: DistInfo) -> None:
    """Give every rank rank 0's parameters and buffers of ``module`` (in place). The EMA model needs it before a
    distributed evaluation: each rank's EMA averages its own BatchNorm running statistics (plain BatchNorm on CPU
    updates them from the rank's own batches), so without it the ranks would evaluate different models, and not
    the one the checkpoints keep (rank 0's)."""
    if dinfo.world_size == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def any_rank(flag: bool, device: torch.device, dinfo: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on some rank (``flag`` itself on one process)."""
    if dinfo.world_size == 1:
        return flag
    total = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(total)
    return total.item() > 0


def params_in_sync(model: nn.Module, dinfo: DistInfo) -> bool:
    """All ranks hold the same weights (a cheap DDP sanity check: one checksum per rank)."""
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().cpu()
    values = all_gather_object(float(checksum), dinfo)
    return all(v == values[0] for v in values)
