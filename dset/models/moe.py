"""Token-level mixture-of-experts FFN: router, experts, balance loss, usage statistics.

:class:`MoEFFN` replaces the transformer FFN ``linear2(dropout(act(linear1(x))))`` of RT-DETR's AIFI encoder layer
(GELU) and decoder layers (ReLU). Each token (or, with ``patch_size > 1``, each patch of the encoder's map) is
routed to its ``top_k`` experts; dispatch is dropless, every token-slot computed only by its own expert, on a
padded batched path (balanced routing) or a per-expert loop (imbalanced), with one host sync per forward. After
each forward the module holds ``balance_loss``, ``z_loss``, ``usage`` and ``router_entropy``. The experts of a
layer that replaced a dense FFN start as :class:`ExpertInit` says (upcycled, drop-upcycled or random).
The routing, the dispatch paths, the auxiliary losses and the compute accounting in detail: docs/moe.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..analytic import moe_ffn_macs_per_token
from ..config_checks import EXPERT_INITS

__all__ = [
    "MoEFFN",
    "EXPERT_INITS",
    "ExpertInit",
    "RoutingGroups",
    "patch_groups",
    "dense_moe_forward",
    "moe_dispatch",
    "MOE_DISPATCHES",
]

_ACTIVATIONS = ("relu", "gelu")


def _activation(h: torch.Tensor, name: str, inplace: bool) -> torch.Tensor:
    if name == "relu":
        return torch.relu_(h) if inplace else torch.relu(h)
    return F.gelu(h)  # exact (erf) GELU, like nn.GELU() in the AIFI layer


_gelu_ = getattr(torch._C._nn, "gelu_", None)  # in-place exact GELU, used only without autograd


def _grouped_mm_fn():
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        fn = getattr(getattr(torch.nn, "functional", None), "grouped_mm", None)
    return fn


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether the grouped-matmul path is used for ``x``.

    Opt-in only: ``DSET_MOE_GROUPED_MM=1`` turns it on where the op exists. It is off by default
    because on CPU the padded ``baddbmm`` / per-expert ``addmm`` paths were as fast or faster, and on
    CUDA its kernels have device/dtype/alignment requirements (bf16, recent GPUs) that this project's
    CPU-only tests cannot check. ``x`` is accepted so that a device/dtype rule can be added here."""
    if _grouped_mm_fn() is None:
        return False
    return os.environ.get("DSET_MOE_GROUPED_MM", "0") == "1"


# the expert tensors upcycle_from_dense fills from a dense FFN (linear1.weight/bias, linear2.weight/bias)
UPCYCLED_EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


class ExpertInit(NamedTuple):
    """How :meth:`MoEFFN.init_experts_from_dense` makes the experts of a layer that replaced a dense FFN:
    ``mode`` one of :data:`EXPERT_INITS` (``upcycle``: copies, plus ``noise`` relative Gaussian noise;
    ``drop_upcycle``: copies with ``drop_ratio`` of each expert's hidden units re-initialised; ``random``: the
    experts keep their own initialisation, :meth:`MoEFFN.reset_parameters`)."""

    mode: str = "upcycle"
    noise: float = 0.0
    drop_ratio: float = 0.5

    @classmethod
    def of(cls, moe_cfg) -> ExpertInit:
        """From a ``MoEConfig`` (``expert_init``, ``upcycle_noise``, ``drop_upcycle_ratio``)."""
        return cls(moe_cfg.expert_init, moe_cfg.upcycle_noise, moe_cfg.drop_upcycle_ratio)

    def describe(self) -> str:
        if self.mode == "upcycle":
            return "upcycled (copies of the dense FFN" + (f", relative noise {self.noise:g})" if self.noise else ")")
        if self.mode == "drop_upcycle":
            return f"drop-upcycled (copies of the dense FFN, {self.drop_ratio:g} of each expert's hidden units " \
                   "re-initialised)"
        return "random (xavier-uniform, the dense FFN unused)"


class RoutingGroups(NamedTuple):
    """Tokens that share one routing decision: ``ids [T]`` (the group of each of the layer's ``T`` tokens, in
    ``[0, count)``) and ``count``, the number of groups (a Python int, so that no size is read from a tensor)."""

    ids: torch.Tensor
    count: int


def patch_groups(h: int, w: int, patch_size: int, batch: int, index: torch.Tensor | None = None,
                 device=None) -> RoutingGroups:
    """The ``patch_size x patch_size`` patch of each token of ``batch`` row-major ``h x w`` maps (or only of the
    tokens at ``index [B, K]``, positions in the map, e.g. those token pruning kept), numbered apart per image.
    Patches at the right and bottom edges may be smaller."""
    position = torch.arange(h * w, device=device).expand(batch, -1) if index is None else index
    per_row = -(-w // patch_size)
    per_image = -(-h // patch_size) * per_row
    patch = (position // w // patch_size) * per_row + position % w // patch_size
    patch = patch + torch.arange(batch, device=position.device).unsqueeze(1) * per_image
    return RoutingGroups(patch.reshape(-1), batch * per_image)


def _expert_counts(flat_e: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token-slots per expert, ``[E]`` int64, with ``scatter_add``: CUDA's ``bincount`` reads its input's maximum
    back to the host."""
    return torch.zeros(num_experts, dtype=torch.long, device=flat_e.device).scatter_add_(
        0, flat_e, torch.ones_like(flat_e))


def _group_mean(values: torch.Tensor, groups: RoutingGroups) -> torch.Tensor:
    """``[T, E]`` -> ``[count, E]``: the mean over each group's tokens (0 for an empty group). Written with
    ``scatter_add`` (ONNX ``ScatterElements``), not ``bincount``, so that an exported graph keeps it."""
    ids = groups.ids
    sums = values.new_zeros(groups.count, values.shape[1]).scatter_add(
        0, ids.unsqueeze(1).expand(-1, values.shape[1]), values)
    sizes = values.new_zeros(groups.count).scatter_add(0, ids, torch.ones_like(values[:, 0]))
    return sums / sizes.clamp(min=1).unsqueeze(1)


class MoEFFN(nn.Module):
    """Top-k mixture of two-layer FFN experts with sparse, dropless dispatch.

    Args:
        d_model: token width.
        hidden_dim: hidden width of each expert.
        num_experts: number of experts E (>= 1).
        top_k: experts per token (1 <= top_k <= num_experts).
        activation: ``"relu"`` (decoder FFN) or ``"gelu"`` (AIFI FFN, exact GELU).
        dropout: dropout on the hidden activation, as in the dense FFN.
        router_noise: std of Gaussian noise added to router logits in training (0 = none).
        patch_size: patch-level routing's patch side (1 = per token); the caller passes the groups to
            ``forward`` (:func:`patch_groups`), since only it knows where the tokens lie.

    Parameters: ``router`` (nn.Linear), ``w1`` [E, hidden, d], ``b1`` [E, hidden], ``w2`` [E, d, hidden],
    ``b2`` [E, d]; each expert slice is initialised like ``nn.Linear``.
    Input ``[..., d]`` (e.g. ``[N, d]`` or ``[B, N, d]``), output the same shape.

    ``pad_waste_limit`` (class attribute, overridable per instance): the padded all-experts-at-once
    path is taken when ``E * max_count <= pad_waste_limit * T * top_k``, i.e. when padding every
    expert's group to the largest one wastes at most that factor of compute; otherwise the
    per-expert loop runs. ``0`` forces the loop, ``float("inf")`` the padded path.
    """

    pad_waste_limit: float = 1.5
    # set by dset.export while it exports a graph: forward takes _forward_export, which a trace cannot freeze
    export_dispatch: bool = False
    # set by moe_dispatch(model, "static") (CUDA graphs, torch.compile): forward takes _forward_static, whose
    # shapes do not depend on the routing, so it never reads a count back to the host
    static_dispatch: bool = False

    def __init__(
        self,
        d_model: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        activation: str = "relu",
        dropout: float = 0.0,
        router_noise: float = 0.0,
        patch_size: int = 1,
    ) -> None:
        super().__init__()
        if int(num_experts) < 1:
            raise ValueError(f"num_experts must be >= 1, got num_experts={num_experts}")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got top_k={top_k}")
        if int(top_k) > int(num_experts):
            raise ValueError(
                f"top_k must be <= num_experts, got top_k={top_k} > num_experts={num_experts}"
            )
        if int(d_model) < 1:
            raise ValueError(f"d_model must be >= 1, got d_model={d_model}")
        if int(hidden_dim) < 1:
            raise ValueError(f"hidden_dim must be >= 1, got hidden_dim={hidden_dim}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got activation={activation!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={dropout}")
        if float(router_noise) < 0.0:
            raise ValueError(f"router_noise must be >= 0, got router_noise={router_noise}")
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got patch_size={patch_size}")

        self.d_model = int(d_model)
        self.hidden_dim = int(hidden_dim)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.activation = activation
        self.router_noise = float(router_noise)
        self.patch_size = int(patch_size)  # the caller groups the tokens (patch_groups) and passes them to forward

        self.router = nn.Linear(self.d_model, self.num_experts)
        E, H, D = self.num_experts, self.hidden_dim, self.d_model
        self.w1 = nn.Parameter(torch.empty(E, H, D))
        self.b1 = nn.Parameter(torch.empty(E, H))
        self.w2 = nn.Parameter(torch.empty(E, D, H))
        self.b2 = nn.Parameter(torch.empty(E, D))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

        # Per-forward statistics (tensors; never synchronised by the module).
        self.balance_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.usage: torch.Tensor | None = None
        self.router_entropy: torch.Tensor | None = None
        self.last_dispatch: str = ""  # "padded" | "loop" | "grouped_mm" | "static": the path of the last forward

    # ------------------------------------------------------------------ init / upcycling
    def reset_parameters(self) -> None:
        """The original DSET code's initialisation (``SpecialistNetwork``, ``AdaptiveRouter``): every expert
        slice's weights xavier-uniform, their biases zero; the router N(0, 0.01), its bias zero."""
        for e in range(self.num_experts):
            for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
                nn.init.xavier_uniform_(w.data[e])
                nn.init.zeros_(b.data[e])
        self.init_router(0.01)

    @torch.no_grad()
    def init_router(self, std: float, generator: torch.Generator | None = None) -> None:
        """Router weights ~ N(0, std) (0: all zeros), bias zero: small logits, so that the first steps route almost
        uniformly while ties are broken."""
        if std < 0:
            raise ValueError(f"router_init_std must be >= 0, got router_init_std={std}")
        if std > 0:
            rw = torch.randn(self.router.weight.shape, generator=generator, dtype=torch.float32)
            self.router.weight.copy_(rw.to(self.router.weight) * std)
        else:
            self.router.weight.zero_()
        self.router.bias.zero_()

    @torch.no_grad()
    def upcycle_from_dense(
        self,
        linear1: nn.Module,
        linear2: nn.Module,
        noise_std: float = 0.0,
        router_init_std: float = 0.01,
        generator: torch.Generator | None = None,
        drop_ratio: float = 0.0,
    ) -> MoEFFN:
        """Sparse upcycling: make every expert a copy of the dense FFN ``linear2(act(linear1(x)))``.

        ``linear1``/``linear2`` are ``nn.Linear`` (or anything with ``.weight``/``.bias`` of shapes
        [hidden, d]/[hidden] and [d, hidden]/[d]). ``noise_std`` adds Gaussian noise of RELATIVE std:
        each copied tensor gets ``noise_std * tensor.std()`` noise, drawn independently per expert.
        ``drop_ratio`` > 0 is Drop-Upcycling (Nakamura et al., ICLR 2025): then each expert re-initialises its own
        random ``round(drop_ratio * hidden)`` hidden units (:meth:`drop_hidden_units`).
        The router is :meth:`init_router` with ``router_init_std``.
        With ``noise_std == 0`` and ``drop_ratio == 0`` the layer computes exactly the dense FFN whatever the
        routing (the renormalised top-k weights sum to 1): the router then gets no gradient from the task loss.
        ``generator``: the random draws (noise, units, new values, router); None: torch's global generator.
        Returns ``self``."""
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got noise_std={noise_std}")
        if not 0.0 <= drop_ratio <= 1.0:
            raise ValueError(f"drop_ratio must be in [0, 1], got drop_ratio={drop_ratio}")
        if router_init_std < 0:
            raise ValueError(f"router_init_std must be >= 0, got router_init_std={router_init_std}")
        w1, b1 = linear1.weight, linear1.bias
        w2, b2 = linear2.weight, linear2.bias
        H, D = self.hidden_dim, self.d_model
        if tuple(w1.shape) != (H, D) or tuple(w2.shape) != (D, H):
            raise ValueError(
                f"dense FFN shapes linear1.weight={tuple(w1.shape)}, linear2.weight={tuple(w2.shape)} "
                f"do not match MoEFFN(d_model={D}, hidden_dim={H})"
            )
        if b1 is None:
            b1 = torch.zeros(H, dtype=w1.dtype, device=w1.device)
        if b2 is None:
            b2 = torch.zeros(D, dtype=w2.dtype, device=w2.device)
        for dst, src in ((self.w1, w1), (self.b1, b1), (self.w2, w2), (self.b2, b2)):
            src = src.detach().to(dst.device, dst.dtype)
            dst.copy_(src.unsqueeze(0).expand_as(dst))
            if noise_std > 0:
                scale = float(src.float().std()) * noise_std if src.numel() > 1 else noise_std
                noise = torch.randn(dst.shape, generator=generator, dtype=torch.float32)
                dst.add_(noise.to(dst.device, dst.dtype) * scale)
        if drop_ratio > 0:
            self.drop_hidden_units(drop_ratio, w1, b1, w2, generator)
        self.init_router(router_init_std, generator)
        return self

    @torch.no_grad()
    def drop_hidden_units(self, ratio: float, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                          generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Drop-Upcycling's re-initialisation: for each expert independently, ``round(ratio * hidden)`` (at least 1)
        hidden units drawn at random get new values: their rows of ``w1``/``b1`` and their columns of ``w2``, drawn
        from normals with the mean and std of the dense tensors ``w1``/``b1``/``w2`` they were copied from (as the
        paper does). ``b2`` stays the dense copy. Returns each expert's re-initialised units (sorted indices)."""
        count = max(1, round(ratio * self.hidden_dim))
        stats = [(float(t.float().mean()), float(t.float().std()) if t.numel() > 1 else 0.0) for t in (w1, b1, w2)]
        (m1, s1), (mb, sb), (m2, s2) = stats
        chosen = []
        for e in range(self.num_experts):
            units = torch.randperm(self.hidden_dim, generator=generator)[:count].sort().values
            rows = torch.randn(count, self.d_model, generator=generator) * s1 + m1
            biases = torch.randn(count, generator=generator) * sb + mb
            cols = torch.randn(self.d_model, count, generator=generator) * s2 + m2
            at = units.to(self.w1.device)
            self.w1[e, at] = rows.to(self.w1)
            self.b1[e, at] = biases.to(self.b1)
            self.w2[e, :, at] = cols.to(self.w2)
            chosen.append(units)
        return chosen

    def init_experts_from_dense(self, linear1: nn.Module, linear2: nn.Module, init: ExpertInit,
                                generator: torch.Generator | None = None) -> MoEFFN:
        """The experts (and router) of a layer that replaced the dense FFN ``linear1``/``linear2``, as ``init``
        says: :meth:`upcycle_from_dense` (plain, or with Drop-Upcycling's ratio), or for ``random`` nothing: the
        experts and router keep their own initialisation. Returns ``self``."""
        if init.mode == "upcycle":
            return self.upcycle_from_dense(linear1, linear2, noise_std=init.noise, generator=generator)
        if init.mode == "drop_upcycle":
            return self.upcycle_from_dense(linear1, linear2, generator=generator, drop_ratio=init.drop_ratio)
        if init.mode == "random":
            return self
        raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {init.mode!r}")

    @classmethod
    def from_dense(
        cls,
        linear1: nn.Module,
        linear2: nn.Module,
        num_experts: int,
        top_k: int,
        activation: str = "relu",
        noise_std: float = 0.0,
        dropout: float = 0.0,
        router_noise: float = 0.0,
        router_init_std: float = 0.01,
        generator: torch.Generator | None = None,
        drop_ratio: float = 0.0,
    ) -> MoEFFN:
        """Build an upcycled ``MoEFFN`` from a dense FFN's two linears (see ``upcycle_from_dense``)."""
        d_model, hidden = linear1.in_features, linear1.out_features
        m = cls(d_model, hidden, num_experts, top_k, activation, dropout, router_noise)
        m = m.to(device=linear1.weight.device, dtype=linear1.weight.dtype)
        return m.upcycle_from_dense(linear1, linear2, noise_std, router_init_std, generator, drop_ratio)

    # ------------------------------------------------------------------ diagnostics
    @torch.no_grad()
    def expert_cosine(self) -> torch.Tensor:
        """The mean pairwise cosine similarity of the experts' flattened weights (``w1`` and ``w2`` of an expert
        concatenated): 1 when the experts are identical (e.g. plain upcycling without noise), near 0 for
        independent random ones. A 0-d float32 tensor (not synchronised); NaN with a single expert."""
        E = self.num_experts
        flat = torch.cat([self.w1.reshape(E, -1), self.w2.reshape(E, -1)], dim=1).float()
        unit = F.normalize(flat, dim=1)
        gram = unit @ unit.t()
        off_diagonal = ~torch.eye(E, dtype=torch.bool, device=gram.device)
        return gram[off_diagonal].mean() if E > 1 else gram.new_tensor(float("nan"))

    # ------------------------------------------------------------------ accounting
    def flops_per_token(self) -> int:
        """Multiply-adds actually done per token: ``d*E + top_k * 2 * d * hidden`` (biases ignored)."""
        return moe_ffn_macs_per_token(self.d_model, self.hidden_dim, self.num_experts, self.top_k)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, activation={self.activation}, router_noise={self.router_noise}"
            + (f", patch_size={self.patch_size}" if self.patch_size > 1 else "")
        )

    # ------------------------------------------------------------------ routing
    def route(self, x2d: torch.Tensor, groups: RoutingGroups | None = None):
        """Router on ``[T, d]``. Returns ``(top_w [T,k] renormalised, top_i [T,k], probs [T,E],
        lse [T])`` where ``probs`` are the (noisy, in training) routing probabilities and ``lse`` the
        logsumexp of the noise-free logits (for the z-loss). With ``groups`` every token takes its group's
        decision: the group's mean logits, and noise drawn once per group."""
        logits = self.router(x2d).float()
        noisy = self.training and self.router_noise > 0
        if groups is not None:
            group_logits = _group_mean(logits, groups)
            logits = group_logits.index_select(0, groups.ids)
        if noisy:
            noise = (torch.randn_like(logits) if groups is None
                     else torch.randn_like(group_logits).index_select(0, groups.ids))
            log_probs = (logits + noise * self.router_noise).log_softmax(dim=-1)
        else:
            log_probs = logits.log_softmax(dim=-1)
        probs = log_probs.exp()
        if self.top_k == self.num_experts:
            # every expert is chosen: natural order, weights = probs (they already sum to 1)
            top_w = probs
            top_i = torch.arange(self.num_experts, device=x2d.device).expand(probs.shape[0], -1)
        else:
            top_w, top_i = probs.topk(self.top_k, dim=-1)
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if noisy or self.top_k == self.num_experts:
            lse = torch.logsumexp(logits, dim=-1)
        else:
            # logit_i - log_softmax_i = logsumexp for every i; the top-1 column is the exact one
            top1 = top_i[:, :1]
            lse = (logits.gather(1, top1) - log_probs.gather(1, top1)).squeeze(1)
        return top_w, top_i, probs, lse

    def _set_stats(self, probs: torch.Tensor, lse: torch.Tensor, counts: torch.Tensor) -> None:
        if probs.shape[0] == 0:  # no tokens: zero losses, zero usage and entropy (shapes only, no sync)
            self.balance_loss = probs.sum() * 0.0
            self.z_loss = lse.sum() * 0.0
            self.usage = counts.to(probs.dtype).detach()
            self.router_entropy = probs.detach().sum() * 0.0
            return
        total = probs.shape[0] * self.top_k
        f = counts.to(probs.dtype) / total
        P = probs.mean(dim=0)
        self.balance_loss = self.num_experts * (f * P).sum()
        self.z_loss = lse.pow(2).mean()
        self.usage = f.detach()
        # mean over tokens of the routing distribution's entropy (nats): ln(E) uniform, 0 one-hot
        self.router_entropy = torch.special.entr(probs.detach()).sum(dim=-1).mean()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, groups: RoutingGroups | None = None) -> torch.Tensor:
        """``x [..., d]``; ``groups``: tokens (of ``x`` flattened to ``[T, d]``) that share a routing decision
        (patch-level routing), or None: each token routes alone."""
        shape = x.shape
        if shape[-1] != self.d_model:
            raise ValueError(f"expected last dim d_model={self.d_model}, got input shape {tuple(shape)}")
        if self.export_dispatch:
            return self._forward_export(x, groups)
        if self.static_dispatch:
            return self._forward_static(x, groups)
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            raise RuntimeError(
                "MoEFFN's sparse dispatch cannot be exported as it is: it reads each expert's group size to the "
                "host (counts.tolist()) to size its buffers, which an ONNX trace or torch.export would freeze at "
                "the traced input's routing and so give another model for any other input. Export with "
                "`python -m dset.export` (dset.export.export_onnx), which switches every MoE layer to its export "
                "dispatch (per-expert nonzero, gather, matmul, scatter_add: the same routed computation, with "
                "group sizes decided at run time)")
        x2d = x.reshape(-1, self.d_model)
        T, E, k = x2d.shape[0], self.num_experts, self.top_k

        top_w, top_i, probs, lse = self.route(x2d, groups)
        flat_e = top_i.reshape(-1)  # [T*k] expert of each token-slot (slot s = token s // k)
        counts = _expert_counts(flat_e, E)
        self._set_stats(probs, lse, counts)
        if T == 0:
            return x.new_zeros(shape)

        # Group the token-slots by expert (stable: tokens stay in order inside a group).
        sorted_e, order = torch.sort(flat_e, stable=True)  # order: sorted position -> slot
        token_sorted = order // k
        slot_ids = torch.arange(T * k, device=x.device)

        if _grouped_mm_supported(x2d):
            ys = self._experts_grouped(x2d.index_select(0, token_sorted), counts)
            row_of_sorted = slot_ids
            self.last_dispatch = "grouped_mm"
        else:
            counts_host = counts.tolist()  # the single host sync (free on CPU)
            cap = max(counts_host)
            if E * cap <= self.pad_waste_limit * T * k:
                # Padded layout [E, cap]: row e*cap + j holds the j-th token-slot of expert e.
                starts = torch.cumsum(counts, 0) - counts
                row_of_sorted = sorted_e * cap + (slot_ids - starts[sorted_e])
                token_of_row = torch.zeros(E * cap, dtype=torch.long, device=x.device)
                token_of_row.scatter_(0, row_of_sorted, token_sorted)  # padding rows read token 0
                ys = self._experts_padded(x2d.index_select(0, token_of_row).view(E, cap, self.d_model))
                self.last_dispatch = "padded"
            else:
                ys = self._experts_loop(x2d.index_select(0, token_sorted), counts_host)
                row_of_sorted = slot_ids
                self.last_dispatch = "loop"

        # Back to slot order ([T, k, d]) and weighted sum over the k slots in one bmm.
        # (Deterministic, unlike index_add, whose CUDA kernel uses atomics.)
        row_of_slot = torch.empty_like(order).scatter_(0, order, row_of_sorted)
        y_slots = ys.index_select(0, row_of_slot).view(T, k, self.d_model)
        out = torch.bmm(top_w.to(ys.dtype).unsqueeze(1), y_slots)  # [T, 1, d]
        return out.reshape(shape)

    def _forward_export(self, x: torch.Tensor, groups: RoutingGroups | None = None) -> torch.Tensor:
        """Inference dispatch for graph export (``export_dispatch``): the same routing and the same routed
        work as :meth:`forward`, written without host reads so that a traced graph stays correct for every
        input: per expert, ``nonzero`` finds its token-slots (a size decided at run time, ONNX ``NonZero``),
        their tokens are gathered, run through the expert and added back weighted (``scatter_add``, ONNX
        ``ScatterElements`` with add). Eval only: no noise, no statistics, no dropout."""
        if self.training:
            raise RuntimeError("MoEFFN.export_dispatch is for inference graphs: put the model in eval mode")
        x2d = x.reshape(-1, self.d_model)
        top_w, top_i, _, _ = self.route(x2d, groups)
        flat_w = top_w.reshape(-1)
        out = torch.zeros_like(x2d)
        for e in range(self.num_experts):
            slots = (top_i.reshape(-1) == e).nonzero().squeeze(1)  # token-slots of expert e: token = slot // k
            token = torch.div(slots, self.top_k, rounding_mode="floor")
            h = _activation(torch.addmm(self.b1[e], x2d.index_select(0, token), self.w1[e].t()), self.activation, False)
            y = torch.addmm(self.b2[e], h, self.w2[e].t()) * flat_w.index_select(0, slots).to(x2d.dtype).unsqueeze(-1)
            # a token picks an expert once, so the indices are distinct; scatter_add (ONNX ScatterElements, add)
            out = out.scatter_add(0, token.unsqueeze(-1).expand(-1, self.d_model), y)
        return out.reshape(x.shape)

    def _forward_static(self, x: torch.Tensor, groups: RoutingGroups | None = None) -> torch.Tensor:
        """Static-shape dispatch (``static_dispatch``): the same routing, statistics and output as
        :meth:`forward`, with every expert run on every token and its output weighted by the token's gate (0 for
        an expert it did not choose). No shape depends on the routing and no count is read to the host, so a
        CUDA graph captures it; it costs ``num_experts / top_k`` times the experts' routed multiply-adds, which
        for few experts on few tokens (batch 1) is cheaper than a host sync."""
        x2d = x.reshape(-1, self.d_model)
        top_w, top_i, probs, lse = self.route(x2d, groups)
        counts = _expert_counts(top_i.reshape(-1), self.num_experts)
        self._set_stats(probs, lse, counts)
        self.last_dispatch = "static"
        gates = x2d.new_zeros(x2d.shape[0], self.num_experts).scatter(1, top_i, top_w.to(x2d.dtype))
        return _gated_dense_experts(self, x2d, gates).reshape(x.shape)

    def _act_(self, h: torch.Tensor, need_grad: bool) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu_(h)  # the matmul's backward needs only its inputs; relu's its output
        if need_grad or _gelu_ is None:
            return F.gelu(h)
        return _gelu_(h)

    def _experts_padded(self, xpad: torch.Tensor) -> torch.Tensor:
        """All experts at once on the padded ``[E, cap, d]`` layout: two ``baddbmm`` (bias fused).
        Returns ``[E*cap, d]``; the padding rows hold garbage that is never read."""
        need_grad = torch.is_grad_enabled() and (xpad.requires_grad or self.w1.requires_grad)
        h = torch.baddbmm(self.b1.unsqueeze(1), xpad, self.w1.transpose(1, 2))  # [E, cap, hidden]
        h = self.dropout(self._act_(h, need_grad))
        y = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2.transpose(1, 2))  # [E, cap, d]
        return y.view(-1, self.d_model)

    def _experts_loop(self, xs: torch.Tensor, counts: list) -> torch.Tensor:
        """One ``addmm`` (bias fused) per layer per non-empty expert on its contiguous group.

        Without autograd the second layer writes straight into one preallocated output (no ``cat``)."""
        need_grad = torch.is_grad_enabled() and (xs.requires_grad or self.w1.requires_grad)
        # out= variants are not autocast-eligible (dtype mismatch), so autocast takes the cat route
        use_out = not need_grad and not torch.is_autocast_enabled(xs.device.type)
        ys = xs.new_empty(xs.shape[0], self.d_model) if use_out else None
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xe = xs[start:start + n]
            h = torch.addmm(self.b1[e], xe, self.w1[e].t())
            h = self.dropout(self._act_(h, need_grad))
            if use_out:
                torch.addmm(self.b2[e], h, self.w2[e].t(), out=ys[start:start + n])
            else:
                outs.append(torch.addmm(self.b2[e], h, self.w2[e].t()))
            start += n
        if use_out:
            return ys
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _experts_grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Sync-free path with ``torch._grouped_mm`` (group offsets stay on the device)."""
        gmm = _grouped_mm_fn()
        offs = torch.cumsum(counts, dim=0).to(torch.int32)
        expert_of_slot = torch.repeat_interleave(
            torch.arange(self.num_experts, device=xs.device), counts, output_size=xs.shape[0]
        )
        h = gmm(xs, self.w1.transpose(1, 2), offs=offs)
        h = h + self.b1.index_select(0, expert_of_slot)
        h = self.dropout(_activation(h, self.activation, False))
        y = gmm(h, self.w2.transpose(1, 2), offs=offs)
        return y + self.b2.index_select(0, expert_of_slot)


def _gated_dense_experts(moe: MoEFFN, x2d: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``sum_e gates[:, e] * expert_e(x2d)`` for ``x2d [T, d]`` and ``gates [T, E]``, in two matmuls: the E experts'
    first layers are one ``[T, d] x [d, E*hidden]`` matmul and their second layers, with the gates folded into
    the hidden activations, one ``[T, E*hidden] x [E*hidden, d]`` matmul."""
    T, E, H, D = x2d.shape[0], moe.num_experts, moe.hidden_dim, moe.d_model
    h = torch.addmm(moe.b1.reshape(E * H), x2d, moe.w1.reshape(E * H, D).t())  # [T, E*H]
    h = moe.dropout(_activation(h, moe.activation, False))
    h = (h.view(T, E, H) * gates.unsqueeze(-1)).view(T, E * H)
    w2cat = moe.w2.permute(0, 2, 1).reshape(E * H, D)  # rows (e, j) -> W2_e[:, j]
    return torch.addmm(gates @ moe.b2, h, w2cat)


def dense_moe_forward(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Reference "run every expert and mask" MoE: all E experts on all tokens, combined with the
    top-k routing weights (zero for unchosen experts). Same router as ``moe`` (noise included in
    training, so compare in eval mode). Used as a correctness oracle and as a benchmark baseline.
    Does not set ``moe``'s statistics (``moe_dispatch(model, "static")`` is the module's own dense path)."""
    x2d = x.reshape(-1, moe.d_model)
    top_w, top_i, _, _ = moe.route(x2d)
    gates = x2d.new_zeros(x2d.shape[0], moe.num_experts).scatter(1, top_i, top_w.to(x2d.dtype))  # [T, E]
    return _gated_dense_experts(moe, x2d, gates).reshape(x.shape)


MOE_DISPATCHES = ("sparse", "static", "export")


@contextlib.contextmanager
def moe_dispatch(model: nn.Module, mode: str) -> Iterator[None]:
    """Every :class:`MoEFFN` of ``model`` on one dispatch for the block: ``sparse`` (the default: dropless,
    one host read per forward), ``static`` (:meth:`MoEFFN._forward_static`: no host read, for CUDA graphs and
    ``torch.compile``) or ``export`` (:meth:`MoEFFN._forward_export`: for ONNX, eval only). Restored after."""
    if mode not in MOE_DISPATCHES:
        raise ValueError(f"MoE dispatch must be one of {MOE_DISPATCHES}, got {mode!r}")
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    saved = [(m.static_dispatch, m.export_dispatch) for m in layers]
    for m in layers:
        m.static_dispatch, m.export_dispatch = mode == "static", mode == "export"
    try:
        yield
    finally:
        for m, (static, export) in zip(layers, saved):
            m.static_dispatch, m.export_dispatch = static, export
