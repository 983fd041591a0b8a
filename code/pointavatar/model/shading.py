"""Shading MLP: deformed normal -> RGB shading in (0, 1) (spec §5.5)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from pointavatar.config import RenderingNetworkConf
from pointavatar.model.embedder import PositionalEncoding


class RenderingNetwork(nn.Module):
    """s = sigmoid(MLP([enc(n), enc(x)?, features?])), ReLU hidden layers, layers ``lin0..``.

    PointAvatar's conf feeds only the deformed unit normal (d_in = 3, no encodings, no features).
    ``multires_view`` encodes the normal input, ``multires_pnts`` > 0 adds encoded point positions
    (then ``points`` must be passed), ``feature_vector_size`` > 0 adds per-point features.
    Linear layers keep PyTorch's default init, with weight norm when asked.

    Args:
        conf: the ``model.rendering_network`` block.
    """

    def __init__(self, conf: RenderingNetworkConf):
        super().__init__()
        self.feature_vector_size = int(conf.feature_vector_size)
        self.embedview = PositionalEncoding(conf.multires_view, conf.d_in)
        self.embedpnts = PositionalEncoding(conf.multires_pnts, 3) if conf.multires_pnts > 0 else None
        d0 = self.embedview.out_dim + self.feature_vector_size
        if self.embedpnts is not None:
            d0 += self.embedpnts.out_dim
        dims = [d0] + list(conf.dims) + [conf.d_out]
        self.num_layers = len(dims)
        for l in range(self.num_layers - 1):
            lin = nn.Linear(dims[l], dims[l + 1])
            if conf.weight_norm:
                lin = _weight_norm(lin, name="weight", dim=0)
            setattr(self, f"lin{l}", lin)
        self.relu = nn.ReLU()

    def forward(
        self,
        normals: torch.Tensor,
        points: torch.Tensor | None = None,
        feature_vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """normals [M, d_in] (unit, world frame) -> shading [M, d_out] in (0, 1)."""
        parts = [self.embedview(normals)]
        if self.embedpnts is not None:
            if points is None:
                raise ValueError("RenderingNetwork with multires_pnts > 0 needs the points [M, 3]")
            parts.append(self.embedpnts(points))
        if self.feature_vector_size > 0:
            if feature_vectors is None:
                raise ValueError("RenderingNetwork with feature_vector_size > 0 needs feature_vectors")
            parts.append(feature_vectors)
        h = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        for l in range(self.num_layers - 1):
            h = getattr(self, f"lin{l}")(h)
            if l < self.num_layers - 2:
                h = self.relu(h)
        return torch.sigmoid(h)
