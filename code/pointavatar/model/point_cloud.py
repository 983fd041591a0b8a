"""The learnable canonical point cloud (spec §5.1)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pointavatar.config import PointCloudConf


class PointCloud(nn.Module):
    """Parameter ``points`` [N, 3] in the free canonical x_c space (state-dict key ``pc.points``) and
    the raster radius ``radius`` (NDC).

    Points start on the sphere of radius ``conf.init_radius``: U[-1, 1]^3 samples pushed radially onto
    it (so not uniform on the sphere, as in the original). ``max_points`` bounds upsampling (the
    point schedule checks N <= max_points / 2).

    ``radius`` is a plain float attribute, not a buffer, so the state dict holds only ``points`` (the
    original's layout); checkpoints store it beside the state dict. It starts at
    :meth:`initial_radius` of the initial N. The resizing methods (``init``, ``prune``,
    ``upsample_points``) change the points only: the point schedule of the trainer changes the radius
    together with them, and checkpoint loading sets it.

    Resizing replaces the Parameter, so an optimizer holding the old one must be re-created (the
    original does exactly that, spec §7).
    """

    def __init__(self, conf: PointCloudConf):
        super().__init__()
        self.max_points = int(conf.max_points)
        self.init_radius = float(conf.init_radius)
        self.radius_factor = float(conf.radius_factor)
        self.points = nn.Parameter(torch.empty(0, 3))
        self.init(conf.n_init_points)
        self.radius = self.initial_radius()

    @property
    def n_points(self) -> int:
        return self.points.shape[0]

    def init(self, n_points: int) -> None:
        """Re-create ``points`` with ``n_points`` fresh sphere samples (device and dtype kept).

        Used before loading a checkpoint whose N differs from the current one.
        """
        p = self.points
        x = torch.rand(int(n_points), 3, device=p.device, dtype=p.dtype) * 2.0 - 1.0
        x = nn.functional.normalize(x, dim=1) * self.init_radius
        self.points = nn.Parameter(x)

    def initial_radius(self, n_points: int | None = None) -> float:
        """radius_factor * 0.75 ** log2(N / 100) NDC: 0.16875 for 400 points (spec §5.1)."""
        n = self.n_points if n_points is None else n_points
        return self.radius_factor * (0.75 ** math.log2(n / 100))

    def prune(self, mask: torch.Tensor) -> None:
        """Keep the rows where ``mask`` [N] (bool) is True."""
        if mask.dtype != torch.bool or mask.shape != (self.n_points,):
            raise ValueError(
                f"prune mask must be bool [{self.n_points}], got {mask.dtype} {tuple(mask.shape)}"
            )
        self.points = nn.Parameter(self.points.detach()[mask.to(self.points.device)].clone())

    def upsample_points(self, new_points: torch.Tensor) -> None:
        """Append ``new_points`` [M, 3] (no gradient history is kept)."""
        new = new_points.detach().to(device=self.points.device, dtype=self.points.dtype)
        self.points = nn.Parameter(torch.cat([self.points.detach(), new], dim=0))
