"""Differentiable point renderer: pytorch3d-compatible rasterizer and alpha compositor, camera helper.

    from pointavatar.render import project_points, rasterize_points, alpha_composite

    ndc = project_points(points_world, intrinsics, cam_pose)           # [B, N, 3]
    frags = rasterize_points(ndc, 512, radius, points_per_pixel=10)    # idx / zbuf / dists [B, S, S, K]
    images, weights = alpha_composite(frags, features, radius)         # [B, S, S, C], [B, S, S, K]

`backend="torch"` is the pure-PyTorch reference; `backend="cuda"` the Triton fast path; "auto" picks.
"""

from .api import (
    BACKENDS,
    BinningBudget,
    PointFragments,
    alpha_composite,
    fixed_binning,
    mark_visible,
    rasterize_points,
)
from .camera import project_points

__all__ = [
    "BACKENDS",
    "BinningBudget",
    "PointFragments",
    "alpha_composite",
    "fixed_binning",
    "mark_visible",
    "project_points",
    "rasterize_points",
]
