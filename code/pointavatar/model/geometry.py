"""Canonical geometry MLP: SDF plus albedo logits (spec §5.3, IDR-style)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from pointavatar.config import GeometryNetworkConf
from pointavatar.model.embedder import PositionalEncoding


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

    def gradient(self, x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
        """d sdf / dx [N, d_in] (the original's method)."""
        return self.forward_with_gradient(x, create_graph=create_graph)[1]
