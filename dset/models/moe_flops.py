"""How fvcore counts a mixture-of-experts layer (:class:`dset.models.moe.MoEFFN`).

``MoEFFN.flops_per_token()`` / ``dset.analytic.moe_ffn_macs_per_token`` give the nominal multiply-adds (MACs) per
token: ``d*E`` for the router plus ``top_k * 2 * d * hidden`` for the experts (biases, softmax, top-k, padding and
the weighted combine ignored); GFLOPs in the paper convention are 2 x MACs. For fvcore tracing, pass
:func:`fvcore_op_handles`: fvcore does not know ``aten::baddbmm``, which the padded path uses, and would silently
count the experts as zero.
"""

from __future__ import annotations

__all__ = ["grouped_mm_flop_jit", "baddbmm_flop_jit", "fvcore_op_handles"]


def grouped_mm_flop_jit(inputs, outputs):
    """fvcore op handle for ``aten::_grouped_mm``: multiply-adds = rows(A) * K * N."""
    from fvcore.nn.jit_handles import get_shape

    a, b = get_shape(inputs[0]), get_shape(inputs[1])
    if a is None or b is None:
        return 0
    return int(a[0]) * int(a[-1]) * int(b[-1])


def baddbmm_flop_jit(inputs, outputs):
    """fvcore op handle for ``aten::baddbmm(bias, A [n,c,t], B [n,t,d])``: multiply-adds = n*c*t*d
    (the bias add is ignored, as fvcore's ``addmm`` handle ignores it)."""
    from fvcore.nn.jit_handles import get_shape

    a, b = get_shape(inputs[1]), get_shape(inputs[2])
    if a is None or b is None:
        return 0
    n, c, t = (int(v) for v in a)
    return n * c * t * int(b[-1])


def fvcore_op_handles() -> dict:
    """Op handles to pass to ``fvcore.nn.FlopCountAnalysis(...).set_op_handle(**handles)`` so that
    every MoE dispatch path is counted (fvcore has no default handle for ``aten::baddbmm``, used by
    the padded path, nor for ``aten::_grouped_mm``). With them fvcore counts what was executed: the
    router, the expert matmuls INCLUDING the padding rows of the padded path (at most
    ``pad_waste_limit`` x the routed work), and the ``[T,1,k] x [T,k,d]`` combine ``bmm``.
    ``MoEFFN.flops_per_token()`` is the padding-free nominal count."""
    return {"aten::baddbmm": baddbmm_flop_jit, "aten::_grouped_mm": grouped_mm_flop_jit}
