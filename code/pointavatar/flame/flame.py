"""The FLAME layer as PointAvatar uses it (spec §4.3-§4.9, state-dict names of spec Appendix A).

Frame: FLAME's model frame scaled by 4 (spec §4.3). Joints: 0 root, 1 neck, 2 jaw, 3 left eye,
4 right eye; with the ghost bone an identity transform is prepended at index 0 (spec §4.4).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from pointavatar.errors import PointAvatarError
from pointavatar.flame.io import read_flame_file, read_landmark_embedding
from pointavatar.flame.lbs import (
    batch_rodrigues,
    blend_shapes,
    inverse_skin_points,
    lbs,
    pose_correctives,
    skin_points,
)

__all__ = ["FLAME", "FLAME_SCALE"]

# The original scales v_template, shapedirs and posedirs by 4 (spec §4.3, §10.4).
FLAME_SCALE = 4.0
_REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
_NECK_IDX = 1
# Dynamic contour table: rows 0..39 for y-angles 0..39 degrees, 40..78 for -1..-39 (DECA).
_MAX_CONTOUR_ANGLE = 39


def _as_row(value: Any, width: int, name: str) -> torch.Tensor:
    """A [1, width] float32 tensor from None (zeros), a tensor or an array."""
    if value is None:
        return torch.zeros(1, width)
    t = torch.as_tensor(np.asarray(value.detach().cpu() if torch.is_tensor(value) else value))
    t = t.reshape(1, -1).float()
    if t.shape[1] < width:
        raise PointAvatarError(f"FLAME: {name} has {t.shape[1]} values, at least {width} are needed.")
    return t[:, :width]


class FLAME(nn.Module):
    """FLAME with the subject's identity baked in, plus the canonical state PointAvatar deforms from.

    Args:
        flame_model_path: generic_model.pkl (or a .npz with its keys), spec §4.2.
        lmk_embedding_path: landmark_embedding.npy, or None to skip landmarks (find_landmarks then
            raises); landmarks are only used for debug overlays (spec §4.8).
        n_shape, n_exp: identity / expression components kept (100, 50).
        shape_params: [1, n_shape] subject identity, baked into v_template (None = zeros).
        canonical_expression: [1, n_exp] canonical expression psi_c (None = zeros).
        canonical_pose: jaw opening of the canonical pose (radians about x), spec §4.6.
        ghostbone: prepend an identity "ghost" transform to every transform set (J = 6).

    Buffers (state dict, spec Appendix A): parents [5], lmk_* (when a landmark file is given),
    neck_kin_chain [2], faces_tensor [F, 3], v_template [V, 3], shapedirs [V, 3, n_shape + n_exp],
    posedirs [36, 3V], J_regressor [5, V], lbs_weights [V, 5]; parameters eye_pose [1, 6] and
    neck_pose [1, 3] (zeros, frozen). Non-persistent buffers (follow .to(), not saved):
    canonical_exp [1, n_exp], canonical_pose [1, 15], canonical_verts [V, 3],
    canonical_pose_feature [1, 36], canonical_transformations [1, J, 4, 4].
    """

    def __init__(
        self,
        flame_model_path: str | os.PathLike,
        lmk_embedding_path: str | os.PathLike | None,
        n_shape: int = 100,
        n_exp: int = 50,
        shape_params: Any = None,
        canonical_expression: Any = None,
        canonical_pose: float = 0.4,
        ghostbone: bool = True,
    ) -> None:
        super().__init__()
        model = read_flame_file(flame_model_path)
        missing = [k for k in _REQUIRED_KEYS if k not in model]
        if missing:
            raise PointAvatarError(
                f"{flame_model_path} is not a FLAME model: it lacks the keys {missing} "
                f"(expected {list(_REQUIRED_KEYS)})."
            )
        self.n_shape = n_shape
        self.n_exp = n_exp
        self.ghostbone = ghostbone
        dtype = torch.float32

        shapedirs_all = np.asarray(model["shapedirs"], dtype=np.float64)
        n_total = shapedirs_all.shape[2]
        # FLAME 2020 stores 300 identity then 100 expression components (spec §4.3).
        if n_total < 300 + n_exp or n_shape > 300:
            raise PointAvatarError(
                f"{flame_model_path}: shapedirs has {n_total} components; FLAME stores 300 identity "
                f"+ 100 expression components and {n_shape} identity / {n_exp} expression are used."
            )
        shapedirs = np.concatenate([shapedirs_all[:, :, :n_shape], shapedirs_all[:, :, 300 : 300 + n_exp]], 2)
        shapedirs_t = torch.from_numpy(shapedirs).to(dtype) * FLAME_SCALE  # [V, 3, n_shape + n_exp]
        shape = _as_row(shape_params, n_shape, "shape_params")
        v_template = torch.from_numpy(np.asarray(model["v_template"], dtype=np.float64)).to(dtype)
        # Identity baked into the template; the shape betas are then zero in every forward.
        v_template = v_template * FLAME_SCALE + blend_shapes(shape, shapedirs_t[:, :, :n_shape])[0]
        n_verts = v_template.shape[0]
        posedirs = np.asarray(model["posedirs"], dtype=np.float64)
        n_pose_basis = posedirs.shape[-1]
        # (V, 3, 36) -> (3V, 36) -> (36, 3V): row i = pose feature i, columns vertex-major then xyz.
        posedirs_t = torch.from_numpy(posedirs.reshape(-1, n_pose_basis).T.copy()).to(dtype) * FLAME_SCALE

        kintree = np.asarray(model["kintree_table"]).astype(np.int64)
        parents = torch.from_numpy(kintree[0].copy())
        parents[0] = -1  # stored as max uint32 (4294967295) in the file
        n_joints = parents.shape[0]
        if n_pose_basis != 9 * (n_joints - 1):
            raise PointAvatarError(
                f"{flame_model_path}: posedirs has {n_pose_basis} pose components but the kinematic "
                f"tree has {n_joints} joints (expected {9 * (n_joints - 1)})."
            )

        self.register_parameter("eye_pose", nn.Parameter(torch.zeros(1, 6, dtype=dtype), requires_grad=False))
        self.register_parameter(
            "neck_pose", nn.Parameter(torch.zeros(1, 3, dtype=dtype), requires_grad=False)
        )
        self.register_buffer("parents", parents)
        self.has_landmarks = lmk_embedding_path is not None
        if lmk_embedding_path is not None:
            # The face count lets the reader check the landmark faces against this model.
            lmk = read_landmark_embedding(lmk_embedding_path, n_faces=int(np.asarray(model["f"]).shape[0]))
            self.register_buffer("lmk_faces_idx", torch.from_numpy(lmk["static_lmk_faces_idx"]).long())
            self.register_buffer("lmk_bary_coords", torch.from_numpy(lmk["static_lmk_bary_coords"]).to(dtype))
            self.register_buffer(
                "dynamic_lmk_faces_idx", torch.from_numpy(lmk["dynamic_lmk_faces_idx"]).long()
            )
            self.register_buffer(
                "dynamic_lmk_bary_coords", torch.from_numpy(lmk["dynamic_lmk_bary_coords"]).to(dtype)
            )
            self.register_buffer("full_lmk_faces_idx", torch.from_numpy(lmk["full_lmk_faces_idx"]).long())
            self.register_buffer(
                "full_lmk_bary_coords", torch.from_numpy(lmk["full_lmk_bary_coords"]).to(dtype)
            )
        chain = [_NECK_IDX]
        while parents[chain[-1]] >= 0:
            chain.append(int(parents[chain[-1]]))
        self.register_buffer("neck_kin_chain", torch.tensor(chain, dtype=torch.long))  # [1, 0]
        self.register_buffer("faces_tensor", torch.from_numpy(np.asarray(model["f"]).astype(np.int64)))
        self.register_buffer("v_template", v_template)
        self.register_buffer("shapedirs", shapedirs_t)
        self.register_buffer("posedirs", posedirs_t)
        self.register_buffer(
            "J_regressor", torch.from_numpy(np.asarray(model["J_regressor"], dtype=np.float64)).to(dtype)
        )
        self.register_buffer(
            "lbs_weights", torch.from_numpy(np.asarray(model["weights"], dtype=np.float64)).to(dtype)
        )
        # The kinematic tree as plain ints: structure, not data (keeps lbs free of .item()).
        self._parent_list = parents.tolist()
        self.n_verts = n_verts
        self.n_joints = n_joints

        # Canonical state (spec §4.6): not saved, recomputed from the buffers at construction.
        canonical_pose_t = torch.zeros(1, 3 * n_joints, dtype=dtype)
        canonical_pose_t[:, 6] = float(canonical_pose)  # jaw rotation about x (mouth open)
        canonical_exp = _as_row(canonical_expression, n_exp, "canonical_expression")
        self.register_buffer("canonical_exp", canonical_exp, persistent=False)
        self.register_buffer("canonical_pose", canonical_pose_t, persistent=False)
        with torch.no_grad():
            verts, pose_feature, transforms = self.forward(canonical_exp, canonical_pose_t)
        self.register_buffer("canonical_verts", verts[0], persistent=False)  # [V, 3]
        self.register_buffer("canonical_pose_feature", pose_feature, persistent=False)  # [1, 36]
        self.register_buffer("canonical_transformations", transforms, persistent=False)  # [1, J, 4, 4]

    # ------------------------------------------------------------------------------------ forward

    def forward(
        self, expression: torch.Tensor, full_pose: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FLAME at expression [B, >=n_exp] and full_pose [B, 15] (axis-angle root, neck, jaw, eyes).

        Returns vertices [B, V, 3], pose_feature [B, 36] and the relative transforms
        [B, J, 4, 4] (J = 6 with the ghost identity at index 0 when ghostbone, else 5).
        """
        # The shape betas are zero (identity is in v_template), so only the expression part blends.
        betas = expression[:, : self.n_exp]
        verts, pose_feature, transforms = lbs(
            betas,
            full_pose,
            self.v_template,
            self.shapedirs[:, :, self.n_shape :],
            self.posedirs,
            self.J_regressor,
            self._parent_list,
            self.lbs_weights,
        )
        if self.ghostbone:
            transforms = self._prepend_ghost(transforms)
        return verts, pose_feature, transforms

    @staticmethod
    def _prepend_ghost(transforms: torch.Tensor) -> torch.Tensor:
        ghost = torch.eye(4, dtype=transforms.dtype, device=transforms.device)
        ghost = ghost.expand(transforms.shape[0], 1, 4, 4)
        return torch.cat([ghost, transforms], dim=1)

    def forward_pts(
        self,
        pnts_c: torch.Tensor,
        betas: torch.Tensor,
        transformations: torch.Tensor,
        pose_feature: torch.Tensor,
        shapedirs: torch.Tensor,
        posedirs: torch.Tensor,
        lbs_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Deform canonical points to a frame (spec §4.7).

        x_0 = skin^-1(x'; A_c, W) - blend(psi_c) - corr(p_c), then x_d = skin(x_0 + blend(psi) +
        corr(p); A, W), where A_c, psi_c, p_c are the canonical transforms, expression and pose
        feature of this layer.

        Args:
            pnts_c: [N, 3] canonical points x' (FLAME frame, scaled).
            betas: [B, L] expression of the frame (L = shapedirs' last dim, normally 50).
            transformations: [B, J, 4, 4] frame transforms (ghost bone included when ghostbone).
            pose_feature: [B, 36] frame pose feature.
            shapedirs: [N, 3, L], posedirs: [N, 36, 3], lbs_weights: [N, J] per-point attributes.

        Returns:
            [B, N, 3] deformed points (world = FLAME frame).
        """
        canonical_exp = self.canonical_exp.to(betas.dtype)
        n_blend = shapedirs.shape[-1]
        if n_blend > canonical_exp.shape[1]:  # zero-pad psi_c to the blendshape width (spec §4.7)
            canonical_exp = torch.nn.functional.pad(canonical_exp, [0, n_blend - canonical_exp.shape[1]])
        else:
            canonical_exp = canonical_exp[:, :n_blend]
        canonical_tf = self.canonical_transformations.to(pnts_c.dtype)
        canonical_pf = self.canonical_pose_feature.to(pnts_c.dtype)
        x0 = (
            inverse_skin_points(pnts_c.unsqueeze(0), canonical_tf, lbs_weights)
            - blend_shapes(canonical_exp, shapedirs)
            - pose_correctives(canonical_pf, posedirs)
        )[0]  # [N, 3] FLAME rest-pose position with zero expression
        x_posed = x0 + blend_shapes(betas, shapedirs) + pose_correctives(pose_feature, posedirs)  # [B, N, 3]
        return skin_points(x_posed, transformations, lbs_weights)

    # ------------------------------------------------------------------------ FLAME as a prior

    def get_pseudo_gt(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pseudo ground truth at FLAME vertices `index` [N] (spec §4.9).

        Returns W_gt [N, J] (FLAME weights, with a zero ghost column first when ghostbone),
        E_gt [N, 3, n_exp] (the scaled expression blendshapes), P_gt [N, 36, 3] (scaled posedirs).
        """
        weights = self.lbs_weights[index]
        if self.ghostbone:
            weights = torch.nn.functional.pad(weights, [1, 0])
        exp_dirs = self.shapedirs[index, :, self.n_shape :]
        posedirs = self.posedirs.reshape(self.posedirs.shape[0], -1, 3).transpose(0, 1)[index]
        return weights, exp_dirs, posedirs

    # ------------------------------------------------------------------------------- landmarks

    def _require_landmarks(self) -> None:
        if not self.has_landmarks:
            raise PointAvatarError(
                "FLAME landmarks are unavailable: the layer was built without a landmark embedding. "
                "Set model.flame_landmark_path to landmark_embedding.npy (code/flame/FLAME2020/)."
            )

    def _vertices2landmarks(
        self, verts: torch.Tensor, faces_idx: torch.Tensor, bary: torch.Tensor
    ) -> torch.Tensor:
        """Barycentric interpolation: verts [B, V, 3], faces_idx [B, L], bary [B, L, 3] -> [B, L, 3]."""
        tri = self.faces_tensor[faces_idx]  # [B, L, 3] vertex ids
        batch_idx = torch.arange(verts.shape[0], device=verts.device).view(-1, 1, 1)
        corners = verts[batch_idx, tri]  # [B, L, 3 corners, 3 xyz]
        return torch.einsum("blfi,blf->bli", corners, bary.to(verts.dtype))

    def _dynamic_contour_rows(self, full_pose: torch.Tensor) -> torch.Tensor:
        """Row of the dynamic contour table per frame [B] from the y-rotation of root * neck (DECA)."""
        batch = full_pose.shape[0]
        aa = full_pose.reshape(batch, -1, 3)[:, self.neck_kin_chain]  # [B, 2, 3] neck, root
        rots = batch_rodrigues(aa.reshape(-1, 3)).reshape(batch, -1, 3, 3)
        rel = torch.eye(3, dtype=full_pose.dtype, device=full_pose.device).expand(batch, 3, 3)
        for i in range(rots.shape[1]):
            rel = torch.matmul(rots[:, i], rel)  # R_root @ R_neck
        sy = torch.sqrt(rel[:, 0, 0] ** 2 + rel[:, 1, 0] ** 2)
        y_deg = torch.atan2(-rel[:, 2, 0], sy) * 180.0 / np.pi
        angle = torch.round(torch.clamp(y_deg, max=_MAX_CONTOUR_ANGLE)).long()
        # 0..39 -> rows 0..39; -1..-39 -> rows 40..78; below -39 -> row 78.
        neg_rows = torch.where(
            angle < -_MAX_CONTOUR_ANGLE, 2 * _MAX_CONTOUR_ANGLE, _MAX_CONTOUR_ANGLE - angle
        )
        return torch.where(angle < 0, neg_rows, angle)

    def find_landmarks(self, verts: torch.Tensor, full_pose: torch.Tensor) -> torch.Tensor:
        """The 68 landmarks (17 pose-dependent contour + 51 static) on verts [B, V, 3] -> [B, 68, 3].

        full_pose [B, 15] chooses the contour by the head's y-rotation, clamped to [-39, 39] degrees.
        """
        self._require_landmarks()
        batch = verts.shape[0]
        rows = self._dynamic_contour_rows(full_pose)
        faces_idx = torch.cat(
            [self.dynamic_lmk_faces_idx[rows], self.lmk_faces_idx.unsqueeze(0).expand(batch, -1)], dim=1
        )
        bary = torch.cat(
            [self.dynamic_lmk_bary_coords[rows], self.lmk_bary_coords.unsqueeze(0).expand(batch, -1, -1)],
            dim=1,
        )
        return self._vertices2landmarks(verts, faces_idx, bary)

    def find_full_landmarks(self, verts: torch.Tensor) -> torch.Tensor:
        """The 68 "full" 3D landmarks on verts [B, V, 3] -> [B, 68, 3] (pose independent)."""
        self._require_landmarks()
        batch = verts.shape[0]
        faces_idx = self.full_lmk_faces_idx.expand(batch, -1)
        bary = self.full_lmk_bary_coords.expand(batch, -1, -1)
        return self._vertices2landmarks(verts, faces_idx, bary)
