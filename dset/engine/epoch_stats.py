"""Statistics gathered while a run trains: the per-epoch means of its losses, expert usage (and its entropy), the
MoE diagnostics (router entropy, expert similarity) and token keep ratio (:class:`EpochStats`, averaged over ranks),
and the throughput of the attempt (:class:`Throughput`). Metric names: :mod:`dset.metric_names`."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any

import torch

from .. import metric_names as M
from .distributed import DistInfo, all_gather_object

__all__ = ["EpochStats", "Throughput", "entropy"]

MOE_SITES = ("encoder_moe", "decoder_moe")


def entropy(shares: list[float]) -> float:
    """Entropy (natural log, nats) of the usage shares; ln(num_experts) when perfectly balanced."""
    total = sum(shares)
    if total <= 0:
        return float("nan")
    return -sum((s / total) * math.log(s / total) for s in shares if s > 0)


# each pruner's keep ratio metrics: (measured mean over the epoch's steps, the schedule's ratio)
KEEP_RATIO_METRICS = {"token_pruning": (M.KEEP_RATIO, M.SCHEDULED_KEEP_RATIO),
                      "memory_pruning": (M.MEMORY_KEEP_RATIO, M.SCHEDULED_MEMORY_KEEP_RATIO)}


class EpochStats:
    """Sums over the epoch's steps, kept as tensors (no host sync per step: they are read at the epoch's end)."""

    def __init__(self) -> None:
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.loss_counts: dict[str, int] = {}
        self.total_sum: torch.Tensor | float = 0.0   # the total losses' sum, on the loss's device
        self.steps = 0
        self.images = 0
        self.usage_sums: dict[str, list[torch.Tensor]] = {}
        self.usage_count = 0
        # per MoE site: each layer's sum of the per-forward mean router entropy (counted by usage_count)
        self.router_entropy_sums: dict[str, list[torch.Tensor]] = {}
        # per MoE site: its layers (MoEFFN), whose experts' similarity is read from the weights at the epoch's end
        self.moe_layers: dict[str, list] = {}
        # per pruner ("token_pruning", "memory_pruning"): [sum of measured keep ratios, steps, scheduled ratio]
        self.keep: dict[str, list] = {}

    def mean_loss(self) -> float:
        """The mean total loss so far (a host read)."""
        return float(self.total_sum) / max(1, self.steps)

    def add(self, loss_dict: dict[str, torch.Tensor], total: torch.Tensor, batch: int, sparse: dict) -> None:
        for k, v in loss_dict.items():
            v = v.detach().float()
            self.loss_sums[k] = self.loss_sums[k] + v if k in self.loss_sums else v.clone()
            self.loss_counts[k] = self.loss_counts.get(k, 0) + 1
        self.total_sum = self.total_sum + total.detach().float()
        self.steps += 1
        self.images += batch
        any_usage = False
        for kind in MOE_SITES:
            usages = sparse.get(kind)
            if usages:
                any_usage = True
                sums = self.usage_sums.setdefault(kind, [torch.zeros_like(u, dtype=torch.float32) for u in usages])
                for s, u in zip(sums, usages):
                    s.add_(u.float())
                entropies = sparse[f"{kind}_router_entropy"]
                sums = self.router_entropy_sums.setdefault(
                    kind, [torch.zeros_like(h, dtype=torch.float32) for h in entropies])
                for s, h in zip(sums, entropies):
                    s.add_(h.float())
                self.moe_layers[kind] = sparse[f"{kind}_layers"]
        self.usage_count += int(any_usage)
        for kind in KEEP_RATIO_METRICS:
            stats = sparse.get(kind)
            if stats:
                acc = self.keep.setdefault(kind, [0.0, 0, None])
                acc[0] += float(stats["keep_ratio"])
                acc[1] += 1
                acc[2] = float(stats["scheduled_keep_ratio"])

    def reduce(self, dinfo: DistInfo) -> dict:
        """Means over the epoch's steps (and over ranks), named as in :mod:`dset.metric_names`, and under
        ``counts`` the epoch's ``train_images`` (all ranks) and ``train_steps``."""
        local = {
            "losses": {k: (float(v.item()), self.loss_counts[k]) for k, v in self.loss_sums.items()},
            "total": (float(self.total_sum), self.steps),
            "images": self.images,
            "usage": {k: ([u.tolist() for u in v], self.usage_count) for k, v in self.usage_sums.items()},
            "router_entropy": {k: [float(h) / max(1, self.usage_count) for h in v]
                               for k, v in self.router_entropy_sums.items()},
            "expert_cosine": {k: [float(m.expert_cosine()) for m in layers] for k, layers in self.moe_layers.items()},
            "keep": self.keep,
        }
        parts = all_gather_object(local, dinfo)
        out: dict[str, Any] = {}
        total_sum = sum(p["total"][0] for p in parts)
        total_n = sum(p["total"][1] for p in parts)
        out[M.train_loss_metric("loss")] = total_sum / max(1, total_n)
        names = sorted({k for p in parts for k in p["losses"]}, key=_loss_sort_key)
        for k in names:
            s = sum(p["losses"][k][0] for p in parts if k in p["losses"])
            n = sum(p["losses"][k][1] for p in parts if k in p["losses"])
            out[M.train_loss_metric(k)] = s / max(1, n)
        for kind, (measured, scheduled) in KEEP_RATIO_METRICS.items():
            have = [p["keep"][kind] for p in parts if kind in p["keep"]]
            keep_n = sum(n for _, n, _ in have)
            if keep_n:
                out[measured] = sum(s for s, _, _ in have) / keep_n
                out[scheduled] = have[0][2]
        out.update(_usage_metrics(parts))
        out.update(_moe_diagnostics(parts))
        out["counts"] = {"train_images": sum(p["images"] for p in parts), "train_steps": total_n}
        return out


def _usage_metrics(parts: list[dict]) -> dict[str, float]:
    """Each MoE site's usage share per layer and expert (mean over the epoch's forwards and the ranks), and each
    layer's entropy of them."""
    out = {}
    for kind in MOE_SITES:
        have = [p["usage"][kind] for p in parts if kind in p["usage"]]
        if not have:
            continue
        count = sum(c for _, c in have)
        for layer in range(len(have[0][0])):
            shares = [sum(u[layer][e] for u, _ in have) / max(1, count) for e in range(len(have[0][0][layer]))]
            for e, share in enumerate(shares):
                out[M.usage_metric(kind, layer, e)] = share
            out[M.entropy_metric(kind, layer)] = entropy(shares)
    return out


def _moe_diagnostics(parts: list[dict]) -> dict[str, float]:
    """Each MoE layer's router entropy (mean over the epoch's forwards, then over the ranks, which see as many)
    and expert cosine similarity (from the weights at the epoch's end; the ranks hold the same weights)."""
    out = {}
    for key, name in (("router_entropy", M.router_entropy_metric), ("expert_cosine", M.expert_cosine_metric)):
        for kind in MOE_SITES:
            have = [p[key][kind] for p in parts if kind in p[key]]
            for layer in range(len(have[0]) if have else 0):
                out[name(kind, layer)] = sum(h[layer] for h in have) / len(have)
    return out


def _loss_sort_key(name: str) -> tuple:
    # main losses first, then aux, dn, extra, each in a stable order
    rank = 0 if not any(s in name for s in ("_aux_", "_dn_")) else (1 if "_aux_" in name else 2)
    return (rank, name)


class Throughput:
    """Images over the seconds spent in the epochs' training steps (data loading included) and in evaluation,
    for this attempt (a resumed run counts its own epochs only)."""

    def __init__(self) -> None:
        self.train_images = 0
        self.train_seconds = 0.0
        self.eval_images = 0
        self.eval_seconds = 0.0

    @contextmanager
    def timing_training(self):
        start = time.perf_counter()
        yield
        self.train_seconds += time.perf_counter() - start

    @contextmanager
    def timing_evaluation(self):
        start = time.perf_counter()
        yield
        self.eval_seconds += time.perf_counter() - start

    def summary(self) -> dict:
        """The ``summary.json`` entries: what was counted and timed."""
        return {
            "train_images_processed": self.train_images,
            "train_seconds": self.train_seconds,
            "eval_images_processed": self.eval_images,
            "eval_seconds": self.eval_seconds,
        }

    def metrics(self) -> dict:
        """The final metrics: images per second of training and of evaluation (None when nothing was timed)."""
        return {
            M.TRAIN_IMAGES_PER_S: self.train_images / self.train_seconds if self.train_seconds > 0 else None,
            M.EVAL_IMAGES_PER_S: self.eval_images / self.eval_seconds if self.eval_seconds > 0 else None,
        }
