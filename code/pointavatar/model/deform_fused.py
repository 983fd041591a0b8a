"""The deformer's Softplus layers with their three forward-mode tangents as one autograd node (spec §5.7).

``softplus_chain_with_tangents`` computes what ``deform_explicit``'s ``_softplus`` / ``_linear`` steps
compute, but autograd records a single ``torch.autograd.Function`` whose hand-written backward recomputes
the activations, their tangents, the slopes and the curvatures from the kept pre-activations: training
keeps z [N, D] and tz [3, N, D] per Softplus and nothing else. ``trunk_with_tangents_fused`` and
``skinning_with_tangents_fused`` are ``deform_explicit.trunk_with_tangents`` and
``skinning_with_tangents`` on top of it.

The primal and its three tangents travel stacked as one [4, N, D] tensor (row 0 the primal, rows 1-3 the
tangents), so each layer's forward product, weight gradient and input gradient is a single [4N, D] GEMM.

Dimension letters: N points, D a layer's width, J joints (bones).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from pointavatar.model.deform_explicit import _first_layer, _linear
from pointavatar.model.deformer import SKINNING_TEMPERATURE, ForwardDeformer
from pointavatar.model.geometry import softplus_curvature, softplus_slope
from pointavatar.model.geometry_fused import _fused_dtypes, _mm, _run


def _stack(z: torch.Tensor, tz: torch.Tensor) -> torch.Tensor:
    """z [N, D] and tz [3, N, D] -> [4, N, D]."""
    return torch.cat([z[None], tz])


def _activate(z: torch.Tensor, tz: torch.Tensor, beta: float, threshold: float):
    """(softplus(z) [N, D], tz * softplus'(z) [3, N, D]) with torch's own Softplus ops (as
    ``deform_explicit._softplus``: the slope is 1 where beta z > threshold)."""
    return F.softplus(z, beta, threshold), torch.ops.aten.softplus_backward(tz, z, beta, threshold)


def _forward_pass(z0, tz0, weights, biases, beta, threshold, final_activation, save_dtype, mm_dtype):
    """The chain without autograd: (a [N, D], ta [3, N, D], the kept z_i list, the kept tz_i list)."""
    n = z0.shape[0]
    m = len(weights)

    def keep(t):
        return t if save_dtype is None else t.to(save_dtype)

    zs, tzs = [keep(z0)], [keep(tz0)]
    z, tz = z0, tz0
    for i in range(m):
        a = _stack(*_activate(z, tz, beta, threshold)).reshape(4 * n, -1)  # [4N, D_in]
        w, b = weights[i], biases[i]
        if i == m - 1 and not final_activation:
            # Two products rather than views of one: the Function's outputs stay separate tensors.
            z = _mm(a[:n], w.T, mm_dtype)
            tz = _mm(a[n:], w.T, mm_dtype).view(3, n, -1)
            return (z if b is None else z + b), tz, zs, tzs
        y = _mm(a, w.T, mm_dtype).view(4, n, -1)  # [4, N, D_out]; the bias on the primal row only
        if b is not None:
            y[0] += b
        z, tz = y[0], y[1:]
        y_kept = keep(y)  # one storage for z and tz
        zs.append(y_kept[0])
        tzs.append(y_kept[1:])
    a, ta = _activate(z, tz, beta, threshold)
    return a, ta, zs, tzs


def _activation_vjp(d_a: torch.Tensor, z: torch.Tensor, tz: torch.Tensor, beta: float, threshold: float):
    """Back through a = softplus(z), ta_k = tz_k s: d_a [4, N, D] (d a; d ta) -> ((d z; d tz) [4, N, D],
    the slope s [N, D]). d z = d a s + sum_k d ta_k tz_k c and d tz = d ta s, with c torch's curvature
    (``geometry.softplus_curvature``)."""
    s = softplus_slope(z, beta, threshold)
    d_y = d_a * s
    d_y[0] += (d_a[1:] * tz).sum(0) * softplus_curvature(z, s, beta, threshold)
    return d_y, s


def _backward_pass(
    d_out, d_tout, zs, tzs, weights, beta, threshold, final_activation, mm, need_z0, need_tz0, need_w, need_b
):
    """The hand-written backward (see softplus_chain_with_tangents): (d z0, d tz0, d weights, d biases),
    None where not needed."""
    m = len(weights)
    n = d_out.shape[0]
    dtype = d_out.dtype
    zs = [z.to(dtype) for z in zs]
    tzs = [t.to(dtype) for t in tzs]
    d_y = _stack(d_out, d_tout)  # [4, N, D_top]
    if len(zs) == m + 1:  # the top output went through a Softplus
        d_y, _ = _activation_vjp(d_y, zs[m], tzs[m], beta, threshold)
    d_w, d_b = [None] * m, [None] * m
    for i in range(m - 1, -1, -1):  # linear i maps the activation of z_i to z_{i+1}
        z, tz = zs[i], tzs[i]
        d_y2 = d_y.reshape(4 * n, -1)  # [4N, D_out]
        if need_w[i]:
            a = _stack(*_activate(z, tz, beta, threshold)).reshape(4 * n, -1)  # [4N, D_in]
            d_w[i] = _mm(d_y2.T, a, mm)  # d z^T a + sum_k d tz_k^T ta_k
        if need_b[i]:
            d_b[i] = d_y[0].sum(0)
        if i == 0 and not (need_z0 or need_tz0):
            return None, None, d_w, d_b
        d_a = _mm(d_y2, weights[i], mm).view(4, n, -1)  # (d a_i; d ta_i)
        d_y, _ = _activation_vjp(d_a, z, tz, beta, threshold)
    return (d_y[0] if need_z0 else None), (d_y[1:] if need_tz0 else None), d_w, d_b


class _FusedSoftplusChain(torch.autograd.Function):
    """(a, ta) of a Softplus / Linear chain in one node; see ``softplus_chain_with_tangents``.

    Inputs: z0 [N, D0], tz0 [3, N, D0], Softplus beta and threshold, final_activation, the dtype the
    pre-activations are saved in (None = the compute dtype), the matmul operand dtype, compiled, then the
    m weights [D_i+1, D_i] and the m biases [D_i+1] (or None). Saved: every pre-activation that goes
    through a Softplus, z_i [N, D_i] then tz_i [3, N, D_i] (z_0, tz_0 the inputs themselves unless cast),
    then the weights.
    """

    @staticmethod
    def forward(ctx, z0, tz0, beta, threshold, final_activation, save_dtype, mm_dtype, compiled, *params):
        m = len(params) // 2
        weights, biases = tuple(params[:m]), tuple(params[m:])
        a, ta, zs, tzs = _run(
            "deform_forward",
            _forward_pass,
            compiled,
            z0,
            tz0,
            weights,
            biases,
            beta,
            threshold,
            final_activation,
            save_dtype,
            mm_dtype,
        )
        ctx.save_for_backward(*zs, *tzs, *weights)
        ctx.m, ctx.n_act = m, len(zs)
        ctx.beta, ctx.threshold, ctx.final_activation = beta, threshold, final_activation
        ctx.mm_dtype, ctx.compiled = mm_dtype, compiled
        return a, ta

    @staticmethod
    @once_differentiable
    def backward(ctx, d_a, d_ta):
        m, k = ctx.m, ctx.n_act
        saved = ctx.saved_tensors
        zs, tzs, weights = list(saved[:k]), list(saved[k : 2 * k]), tuple(saved[2 * k :])
        first = 8  # z0, tz0 and the six settings come before the parameters
        need_w = tuple(ctx.needs_input_grad[first : first + m])
        need_b = tuple(ctx.needs_input_grad[first + m :])
        d_z0, d_tz0, d_w, d_b = _run(
            "deform_backward",
            _backward_pass,
            ctx.compiled,
            d_a,
            d_ta,
            zs,
            tzs,
            weights,
            ctx.beta,
            ctx.threshold,
            ctx.final_activation,
            ctx.mm_dtype,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            need_w,
            need_b,
        )
        return d_z0, d_tz0, *[None] * (first - 2), *d_w, *d_b


def softplus_chain_with_tangents(
    z0: torch.Tensor,
    tz0: torch.Tensor,
    linears: Sequence[nn.Linear],
    beta: float,
    threshold: float,
    final_activation: bool = True,
    save_dtype: torch.dtype | None = None,
    mm_dtype: torch.dtype | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softplus, then (Linear, Softplus) per linear, on a primal and its 3 tangents, in one autograd node.

    a_0 = softplus(z0), ta_0 = tz0 softplus'(z0); for each linear i = 1..m: z_i = a_{i-1} W_i^T + b_i,
    tz_i = ta_{i-1} W_i^T (no bias on tangents), a_i = softplus(z_i), ta_i = tz_i softplus'(z_i), except
    after the last linear with ``final_activation=False``, which returns (z_m, tz_m). With no linears it
    is the activation of (z0, tz0) whatever ``final_activation`` says. softplus' is torch's Softplus slope
    (1 where beta z > threshold). Same values as the ``deform_explicit._linear`` / ``_softplus`` steps.

    Kept for the backward: z_i and tz_i of every Softplus (in ``save_dtype`` if given) and the weights;
    under ``torch.no_grad`` nothing. Not under ``torch.autocast`` while gradients are recorded (a
    RuntimeError): the hand-written backward does not replay the forward's autocast.

    Backward, per Softplus i given (d a_i, d ta_i), with s_i its slope and c_i its curvature (beta s (1 -
    s), 0 where beta z >= threshold): d tz_i = d ta_i s_i, d z_i = d a_i s_i + sum_k d ta_i[k] tz_i[k] c_i.
    Per linear i, with a_{i-1} and ta_{i-1} recomputed from the kept z, tz: d W_i = d z_i^T a_{i-1} +
    sum_k d tz_i[k]^T ta_{i-1}[k], d b_i = sum_N d z_i, d a_{i-1} = d z_i W_i, d ta_{i-1} = d tz_i W_i.

    Args:
        z0: [N, D0] a pre-activation (from the caller's graph; may require grad).
        tz0: [3, N, D0] its tangents d z0 / d x_k.
        linears: the m Linear layers (weight-normed or not: their weight is read here, so autograd carries
            its gradient to the parametrisation); m may be 0.
        beta, threshold: the Softplus settings.
        final_activation: whether the last linear's output goes through the Softplus.
        save_dtype: dtype of the kept z_i, tz_i (None = the compute dtype, exact gradients; e.g.
            torch.bfloat16: half the memory, gradients rounded through the stored values; the returned
            values are not affected).
        mm_dtype: dtype the matrix products' operands are rounded to, forward and backward (e.g.
            torch.bfloat16, as ``geometry_fused._mm``); None = z0's dtype.
        compiled: run the forward and backward passes through torch.compile (dynamic point count).

    Returns:
        (a [N, D_m], ta [3, N, D_m]), or (z_m, tz_m) with ``final_activation=False``.
    """
    if z0.dim() != 2 or tz0.shape != (3, *z0.shape):
        raise ValueError(f"z0 must be [N, D] and tz0 [3, N, D], got {tuple(z0.shape)} and {tuple(tz0.shape)}")
    save_dtype, mm_dtype = _fused_dtypes(
        z0, save_dtype, mm_dtype, "softplus_chain_with_tangents", "deform_explicit's trunk"
    )
    linears = list(linears)
    return _FusedSoftplusChain.apply(
        z0,
        tz0,
        float(beta),
        float(threshold),
        bool(final_activation),
        save_dtype,
        mm_dtype,
        bool(compiled),
        *[lin.weight for lin in linears],
        *[lin.bias for lin in linears],
    )


def trunk_with_tangents_fused(
    deformer: ForwardDeformer,
    x: torch.Tensor,
    save_dtype: torch.dtype | None = None,
    mm_dtype: torch.dtype | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``deform_explicit.trunk_with_tangents``: (h [N, D], d h / d x_k [3, N, D]) at x [N, 3], the Softplus
    layers as one ``softplus_chain_with_tangents`` node (lin0's product stays ordinary autograd ops)."""
    z, t = _first_layer(deformer, x)
    act = deformer.softplus
    lins = [getattr(deformer, f"lin{l}") for l in range(1, deformer.num_layers - 1)]
    return softplus_chain_with_tangents(
        z, t, lins, act.beta, act.threshold, True, save_dtype, mm_dtype, compiled
    )


def skinning_with_tangents_fused(
    deformer: ForwardDeformer,
    h: torch.Tensor,
    t: torch.Tensor,
    save_dtype: torch.dtype | None = None,
    mm_dtype: torch.dtype | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``deform_explicit.skinning_with_tangents``: (weights [N, J], d weights / d x_k [3, N, J]) from the
    trunk's (h, t); skinning_linear's product stays ordinary autograd ops, its Softplus and the
    ``skinning`` head are one ``softplus_chain_with_tangents`` node."""
    z, ts = _linear(deformer.skinning_linear, h, t)
    act = deformer.softplus
    logits, t_logits = softplus_chain_with_tangents(
        z, ts, [deformer.skinning], act.beta, act.threshold, False, save_dtype, mm_dtype, compiled
    )
    weights = torch.softmax(SKINNING_TEMPERATURE * logits, dim=-1)
    t_l = SKINNING_TEMPERATURE * t_logits
    return weights, weights * (t_l - (weights * t_l).sum(-1, keepdim=True))  # softmax JVP
