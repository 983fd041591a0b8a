"""Linear blend skinning for FLAME (spec §4.4, §4.5) and the per-point deformation of spec §4.7.

Pure tensor functions: no in-place writes to inputs, no `.item()`, no control flow on tensor values,
so they run under autograd (float64 gradcheck), `torch.func.vmap` and `torch.func.jacfwd`. Points and
vertices are row vectors in the FLAME frame (scaled by 4 in the layer); transforms are 4x4 homogeneous
matrices acting on column vectors.

Dimension letters: B frames, N points, V vertices, J joints, L blendshape coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "batch_rodrigues",
    "transform_mat",
    "batch_rigid_transform",
    "lbs",
    "blend_shapes",
    "pose_correctives",
    "blend_transforms",
    "skin_points",
    "inverse_skin_points",
]


def batch_rodrigues(rot_vecs: torch.Tensor) -> torch.Tensor:
    """Axis-angle [M, 3] (radians) -> rotation matrices [M, 3, 3].

    The angle is ||r + 1e-8|| as in the original (spec §4.4): the offset keeps the division and the
    gradient finite at r = 0.
    """
    angle = torch.norm(rot_vecs + 1e-8, dim=1, keepdim=True)  # [M, 1]
    rot_dir = rot_vecs / angle  # [M, 3]
    cos = torch.cos(angle).unsqueeze(1)  # [M, 1, 1]
    sin = torch.sin(angle).unsqueeze(1)
    rx, ry, rz = rot_dir.unbind(dim=1)
    zeros = torch.zeros_like(rx)
    skew = torch.stack([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], dim=1).view(-1, 3, 3)
    ident = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device).unsqueeze(0)
    return ident + sin * skew + (1 - cos) * torch.bmm(skew, skew)


def transform_mat(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """Rotation [M, 3, 3] and translation [M, 3, 1] -> homogeneous transforms [M, 4, 4]."""
    return torch.cat([F.pad(rot, [0, 0, 0, 1]), F.pad(trans, [0, 0, 0, 1], value=1.0)], dim=2)


def batch_rigid_transform(
    rot_mats: torch.Tensor, joints: torch.Tensor, parents: Sequence[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rigid kinematic chain (spec §4.5 steps 5-6).

    Args:
        rot_mats: [B, J, 3, 3] local joint rotations.
        joints: [B, J, 3] rest-pose joint locations.
        parents: [J] parent index per joint, parents[0] = -1 (the root). A tensor is read once as
            structure (it is a constant of the model, never a traced value).

    Returns:
        posed_joints [B, J, 3] and the relative transforms A [B, J, 4, 4]: the global transform G_j
        with its translation replaced by t_j - R_j J_j, so A_j maps rest-pose points to posed ones.
    """
    parent_list = parents.tolist() if isinstance(parents, torch.Tensor) else list(parents)
    batch, n_joints = joints.shape[:2]
    # The parents' joints gathered by slicing: an index tensor made from the list would be a host-to-device
    # copy at every call, which CUDA-graph capture of a training step refuses.
    parent_joints = torch.stack([joints[:, p] for p in parent_list[1:]], dim=1)  # [B, J-1, 3]
    rel_joints = torch.cat([joints[:, :1], joints[:, 1:] - parent_joints], dim=1)  # [B, J, 3]
    local = transform_mat(rot_mats.reshape(-1, 3, 3), rel_joints.reshape(-1, 3, 1))
    local = local.reshape(batch, n_joints, 4, 4)
    chain = [local[:, 0]]
    for i in range(1, n_joints):
        chain.append(torch.matmul(chain[parent_list[i]], local[:, i]))
    transforms = torch.stack(chain, dim=1)  # [B, J, 4, 4] global G_j
    posed_joints = transforms[:, :, :3, 3]
    joints_homogen = F.pad(joints.unsqueeze(-1), [0, 0, 0, 1])  # [B, J, 4, 1], w = 0
    rel_transforms = transforms - F.pad(torch.matmul(transforms, joints_homogen), [3, 0])
    return posed_joints, rel_transforms


def lbs(
    betas: torch.Tensor,
    pose: torch.Tensor,
    v_template: torch.Tensor,
    shapedirs: torch.Tensor,
    posedirs: torch.Tensor,
    J_regressor: torch.Tensor,
    parents: Sequence[int] | torch.Tensor,
    lbs_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SMPL/FLAME linear blend skinning (spec §4.5).

    Args:
        betas: [B, L] shape/expression coefficients.
        pose: [B, 3J] axis-angle per joint (radians), joint 0 = root.
        v_template: [V, 3] or [B, V, 3] template vertices.
        shapedirs: [V, 3, L] blendshapes.
        posedirs: [9(J-1), 3V] pose-corrective basis (row i = pose-feature i, columns vertex-major).
        J_regressor: [J, V] dense joint regressor.
        parents: [J] kinematic tree, parents[0] = -1.
        lbs_weights: [V, J] skinning weights.

    Returns:
        vertices [B, V, 3], pose_feature [B, 9(J-1)] = (R_j - I) of joints 1.. flattened row-major,
        A [B, J, 4, 4] relative joint transforms.
    """
    batch = betas.shape[0]
    v_shaped = v_template + blend_shapes(betas, shapedirs)  # [B, V, 3]
    joints = torch.einsum("bik,ji->bjk", v_shaped, J_regressor)  # [B, J, 3]
    rot_mats = batch_rodrigues(pose.reshape(-1, 3)).reshape(batch, -1, 3, 3)
    ident = torch.eye(3, dtype=pose.dtype, device=pose.device)
    pose_feature = (rot_mats[:, 1:] - ident).reshape(batch, -1)  # [B, 36]
    v_posed = v_shaped + torch.matmul(pose_feature, posedirs).reshape(batch, -1, 3)
    _, A = batch_rigid_transform(rot_mats, joints, parents)
    vertices = skin_points(v_posed, A, lbs_weights)
    return vertices, pose_feature, A


def blend_shapes(betas: torch.Tensor, shapedirs: torch.Tensor) -> torch.Tensor:
    """blend(psi) = sum_l psi_l E[:, :, l]: betas [B, L], shapedirs [N, 3, L] -> [B, N, 3]."""
    return torch.einsum("bl,nkl->bnk", betas, shapedirs)


def pose_correctives(pose_feature: torch.Tensor, posedirs: torch.Tensor) -> torch.Tensor:
    """corr(p) = sum_i p_i P[:, i, :]: pose_feature [B, 36], per-point posedirs [N, 36, 3] -> [B, N, 3]."""
    return torch.einsum("bi,nik->bnk", pose_feature, posedirs)


def blend_transforms(transforms: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j W_j A_j: transforms [B, J, 4, 4], weights [N, J] or [B, N, J] -> [B, N, 4, 4]."""
    if weights.dim() == 2:
        return torch.einsum("nj,bjxy->bnxy", weights, transforms)
    return torch.einsum("bnj,bjxy->bnxy", weights, transforms)


def _apply(mats: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """mats [B, N, 4, 4] applied to homogeneous points [B, N, 3] (w = 1) -> [B, N, 3]."""
    return torch.einsum("bnxy,bny->bnx", mats[..., :3, :3], points) + mats[..., :3, 3]


def skin_points(points: torch.Tensor, transforms: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """skin(x; A, W) (spec §4.7): points [B, N, 3] (or [N, 3], broadcast over B) -> [B, N, 3]."""
    mats = blend_transforms(transforms, weights)
    return _apply(mats, points.expand(mats.shape[0], -1, -1))


def inverse_skin_points(
    points: torch.Tensor, transforms: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """skin^-1(x; A, W): applies the full 4x4 inverse of the blended matrix (as the original's
    torch.inverse), not a blend of inverses. points [B, N, 3] or [N, 3] -> [B, N, 3]."""
    mats = torch.linalg.inv(blend_transforms(transforms, weights))
    return _apply(mats, points.expand(mats.shape[0], -1, -1))
