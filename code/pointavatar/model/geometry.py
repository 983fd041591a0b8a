"""Canonical geometry MLP: SDF plus albedo logits (spec §5.3, IDR-style)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from pointavatar.config import GeometryNetworkConf
from pointavatar.model.embedder import PositionalEncoding


def softplus_slope(z: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """d softplus(z) / dz exactly as torch's Softplus backward: sigmoid(beta z), and 1 where
    beta z > threshold (torch returns z itself there)."""
    bz = z * beta
    return torch.where(bz > threshold, torch.ones_like(bz), torch.sigmoid(bz))


def softplus_curvature(z: torch.Tensor, s: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """d softplus'(z) / dz given the slope s = ``softplus_slope(z, ...)``: beta s (1 - s), zeroed where
    beta z >= threshold as torch's Softplus double backward does (note >=: at equality the slope is
    still sigmoid but the curvature 0)."""
    return torch.where(z * beta < threshold, beta * s * (1 - s), torch.zeros_like(s))


def softplus_vjp(
    g: torch.Tensor, z: torch.Tensor, w: torch.Tensor, beta: float, threshold: float
) -> torch.Tensor:
    """One reverse step through Linear + Softplus: (g * softplus'(z)) @ w, g and z [N, out], w
    [out, in] -> [N, in].

    g * softplus'(z) is torch's own Softplus backward op, the very op the reference's autograd
    graph holds: one kernel, bit-identical slope and threshold, and its derivatives are registered
    (a first-order backward through it is the reference's double backward). Equal to
    ``g * softplus_slope(z, beta, threshold)``; autograd keeps g and z (z is kept by the forward's
    Softplus anyway) and the product.
    """
    return torch.ops.aten.softplus_backward(g, z, beta, threshold) @ w


class _SoftplusVJPLean(torch.autograd.Function):
    """``softplus_vjp`` with a hand-written backward that keeps only g, z and w (z is kept by the
    forward's Softplus anyway): the slope and the curvature are recomputed from z, so the product
    g * slope is not kept. The backward uses differentiable ops, so a second derivative
    (gradgradcheck) still works."""

    @staticmethod
    def forward(ctx, g, z, w, beta, threshold):
        ctx.save_for_backward(g, z, w)
        ctx.beta, ctx.threshold = beta, threshold
        return (g * softplus_slope(z, beta, threshold)) @ w

    @staticmethod
    def backward(ctx, grad_out):
        g, z, w = ctx.saved_tensors
        beta, threshold = ctx.beta, ctx.threshold
        s = softplus_slope(z, beta, threshold)
        u = grad_out @ w.T  # [N, out]
        grad_g = u * s if ctx.needs_input_grad[0] else None
        grad_z = None
        if ctx.needs_input_grad[1]:
            grad_z = u * g * softplus_curvature(z, s, beta, threshold)
        grad_w = (g * s).T @ grad_out if ctx.needs_input_grad[2] else None
        return grad_g, grad_z, grad_w, None, None


def softplus_vjp_lean(
    g: torch.Tensor, z: torch.Tensor, w: torch.Tensor, beta: float, threshold: float
) -> torch.Tensor:
    """Same values and gradients as ``softplus_vjp`` with less memory kept for the backward."""
    return _SoftplusVJPLean.apply(g, z, w, beta, threshold)


class GeometryNetwork(nn.Module):
    """f(x) -> [sdf, feature_vector_size albedo logits] at canonical points.

    Layers ``lin0 .. lin{L-1}`` (names kept for checkpoint compatibility, spec Appendix A); Softplus
    (beta = 100) after every layer but the last; at each layer index in ``skip_in`` the encoded input
    is concatenated again and the sum divided by sqrt(2).

    With ``geometric_init`` the initial function is approximately ||x|| - ``bias`` on every output
    (SAL/IDR sphere init), applied before weight normalisation.

    Args:
        conf: the ``model.geometry_network`` block (sizes, init, encoding).
    """

    def __init__(self, conf: GeometryNetworkConf):
        super().__init__()
        d_in, multires, bias = conf.d_in, conf.multires, conf.bias
        self.embed = PositionalEncoding(multires, d_in)
        dims = [self.embed.out_dim] + list(conf.dims) + [conf.d_out + conf.feature_vector_size]
        self.num_layers = len(dims)
        self.skip_in = tuple(int(s) for s in conf.skip_in)
        self.softplus = nn.Softplus(beta=100)
        d0 = dims[0]
        for l in range(self.num_layers - 1):
            # The layer before a skip leaves room for the re-injected encoded input.
            out_dim = dims[l + 1] - d0 if (l + 1) in self.skip_in else dims[l + 1]
            lin = nn.Linear(dims[l], out_dim)
            if conf.geometric_init:
                with torch.no_grad():
                    if l == self.num_layers - 2:
                        nn.init.normal_(lin.weight, mean=math.sqrt(math.pi) / math.sqrt(dims[l]), std=1e-4)
                        nn.init.constant_(lin.bias, -bias)
                    elif multires > 0 and l == 0:
                        # Only the raw xyz inputs start non-zero: the encoding is switched on by training.
                        nn.init.constant_(lin.bias, 0.0)
                        nn.init.constant_(lin.weight[:, d_in:], 0.0)
                        nn.init.normal_(lin.weight[:, :d_in], 0.0, math.sqrt(2) / math.sqrt(out_dim))
                    elif multires > 0 and l in self.skip_in:
                        nn.init.constant_(lin.bias, 0.0)
                        nn.init.normal_(lin.weight, 0.0, math.sqrt(2) / math.sqrt(out_dim))
                        nn.init.constant_(lin.weight[:, -(d0 - d_in) :], 0.0)
                    else:
                        nn.init.constant_(lin.bias, 0.0)
                        nn.init.normal_(lin.weight, 0.0, math.sqrt(2) / math.sqrt(out_dim))
            if conf.weight_norm:
                lin = _weight_norm(lin, name="weight", dim=0)
            setattr(self, f"lin{l}", lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d_in] canonical points -> [N, d_out + feature_vector_size] (channel 0 = sdf)."""
        inp = self.embed(x)
        h = inp
        for l in range(self.num_layers - 1):
            if l in self.skip_in:
                h = torch.cat([h, inp], dim=-1) / math.sqrt(2)
            h = getattr(self, f"lin{l}")(h)
            if l < self.num_layers - 2:
                h = self.softplus(h)
        return h

    def forward_with_gradient(
        self, x: torch.Tensor, create_graph: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x) [N, C], d sdf / dx [N, d_in]) from one pass.

        Gradients are taken even under ``torch.no_grad`` (inference needs the normals, spec §2.9).
        With ``create_graph`` the gradient stays differentiable w.r.t. the network weights (normals
        and the eikonal loss train the geometry, spec §5.3). If ``x`` does not require grad it is
        treated as a fresh leaf, so no gradient reaches its producer.
        """
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            out = self.forward(x)
            sdf = out[:, :1]
            (grad,) = torch.autograd.grad(
                sdf, x, grad_outputs=torch.ones_like(sdf), create_graph=create_graph, retain_graph=True
            )
        if not create_graph:
            out, grad = out.detach(), grad.detach()
        return out, grad

    def forward_with_gradient_explicit(
        self, x: torch.Tensor, lean: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x) [N, C], d sdf / dx [N, d_in]) with the gradient built by an explicit reverse sweep.

        Same values as ``forward_with_gradient(x, create_graph=True)``, but the gradient is made of
        ordinary differentiable ops (no ``autograd.grad`` inside), so a loss on (out, grad) trains the
        weights, and reaches ``x``, with first-order autograd only: no double backward. Works as is
        under ``torch.no_grad`` (inference normals) and then keeps no graph at all.

        Forward: z_l = W_l h_l + b_l, h_{l+1} = softplus(z_l). Reverse, for the scalar sdf (channel
        0): g = W_last[0]; below each hidden layer g = (g * softplus'(z_l)) @ W_l; at a skip layer the
        input was cat([h, enc(x)]) / sqrt(2), so g splits into a part for h and a part for enc(x),
        both divided by sqrt(2); finally g goes through the encoding's Jacobian. softplus' is torch's
        own (slope exactly 1 where beta z > threshold, where torch's Softplus returns z).

        With ``lean`` each reverse step is one autograd node that keeps only (g, z, W) and
        recomputes the Softplus slope in its backward (less memory in eager mode).
        """
        beta, threshold = float(self.softplus.beta), float(self.softplus.threshold)
        last = self.num_layers - 2
        inp = self.embed(x)
        h = inp
        weights: list[torch.Tensor] = []
        zs: list[torch.Tensor] = []  # hidden pre-activations
        widths: list[int] = []  # width of h before a skip concatenation, per layer
        for l in range(self.num_layers - 1):
            widths.append(h.shape[-1])
            if l in self.skip_in:
                h = torch.cat([h, inp], dim=-1) / math.sqrt(2)
            lin = getattr(self, f"lin{l}")
            # Read the (weight-normalised) weight once: it serves the forward and the reverse sweep.
            w = lin.weight
            weights.append(w)
            z = F.linear(h, w, lin.bias)
            if l < last:
                h = self.softplus(z)
                zs.append(z)
            else:
                h = z
        out = h

        step = softplus_vjp_lean if lean else softplus_vjp
        g_enc = None
        g = None
        for l in range(last, -1, -1):
            if l == last:
                g = weights[l][:1].expand(x.shape[0], -1)  # [N, in_l]
            else:
                g = step(g, zs[l], weights[l], beta, threshold)  # [N, in_l]
            if l in self.skip_in:
                d_h = widths[l]
                g_part = g[:, d_h:] / math.sqrt(2)
                g_enc = g_part if g_enc is None else g_enc + g_part
                g = g[:, :d_h] / math.sqrt(2)
        g_enc = g if g_enc is None else g_enc + g
        grad = self.embed.vjp(x, g_enc)
        return out, grad

    def gradient(self, x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
        """d sdf / dx [N, d_in] (the original's method)."""
        return self.forward_with_gradient(x, create_graph=create_graph)[1]
