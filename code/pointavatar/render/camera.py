"""World points -> the rasterizer's NDC points, with the converted cameras of spec §3.5."""

from __future__ import annotations

import torch

from ..errors import PointAvatarError


def project_points(points: torch.Tensor, intrinsics: torch.Tensor, cam_pose: torch.Tensor) -> torch.Tensor:
    """Project world points to NDC x, y plus view-space depth, differentiably.

    Args:
        points: [B, N, 3] world coordinates (the FLAME frame scaled by 4, spec §3.5).
        intrinsics: [B, 4, 4] the dataset's converted NDC projection K (spec §3.5: K00 = 2 fx / W,
            K11 = 2 fy / H, K02 = 1 - 2 cx / W, K12 = 1 - 2 cy / H, K32 = K23 = 1).
        cam_pose: [B, 3, 4] the converted extrinsics [R | T] in pytorch3d's row-vector convention,
            X_view = X_world @ R + T.

    Returns:
        [B, N, 3]: NDC x (+x left), NDC y (+y up) and view-space z (> 0 in front of the camera), the
        input of `rasterize_points`. As pytorch3d's PerspectiveCameras: [x_ndc, y_ndc] are the first two
        rows of K applied to [x, y, z, 1] divided by the fourth (= z for the K above); nothing is
        clamped, so a point at z = 0 projects to inf / nan and is culled by the rasterizer.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise PointAvatarError(f"project_points: points must be [B, N, 3], got {list(points.shape)}.")
    B = points.shape[0]
    if tuple(intrinsics.shape) != (B, 4, 4):
        raise PointAvatarError(
            f"project_points: intrinsics must be [B, 4, 4] with B = {B}, got {list(intrinsics.shape)}."
        )
    if tuple(cam_pose.shape) != (B, 3, 4):
        raise PointAvatarError(
            f"project_points: cam_pose must be [B, 3, 4] with B = {B}, got {list(cam_pose.shape)}."
        )
    intrinsics = intrinsics.to(points.dtype)
    cam_pose = cam_pose.to(points.dtype)
    R = cam_pose[:, :, :3]  # [B, 3, 3]
    T = cam_pose[:, :, 3]  # [B, 3]
    view = torch.bmm(points, R) + T.unsqueeze(1)  # [B, N, 3]
    hom = torch.cat([view, torch.ones_like(view[..., :1])], dim=-1)  # [B, N, 4]
    clip = torch.bmm(hom, intrinsics.transpose(1, 2))  # [B, N, 4] = (K @ hom^T)^T
    xy = clip[..., :2] / clip[..., 3:4]
    return torch.cat([xy, view[..., 2:3]], dim=-1)
