"""Typed outputs of `PointAvatar.forward` (spec §5.6-§5.13).

Dimension letters: B frames, P = H * W pixels (row-major from the top row, H = W = ``img_res``),
N points, V FLAME vertices, J joints (5, or 6 with the ghost bone in column 0), E expressions
(``deformer_network.num_exp``), H, W, K points per pixel.

Field names are the keys of the original's output dict, so plots and the original's code read alike.
Fields marked ``per_frame`` in their metadata have the frames on axis 0; `PointAvatarOutputs.select`
keeps a subset of the frames in those and shares every other field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Field metadata: axis 0 of the tensor is the frame (B).
_PER_FRAME = {"per_frame": True}


def _per_frame_fields(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj) if f.metadata.get("per_frame")]


def _select_rows(obj, index: torch.Tensor):
    """A copy of dataclass `obj` with its per-frame tensors (None kept) indexed by `index` on axis 0."""
    updates = {}
    for name in _per_frame_fields(obj):
        value = getattr(obj, name)
        if value is not None:
            updates[name] = value.index_select(0, index.to(value.device))
    return dataclasses.replace(obj, **updates)


@dataclass(kw_only=True)
class EvalOutputs:
    """What an eval-mode forward adds: debug images, per-point exports and the landmark overlay.

    Images are composited over white. Tensors carry whatever autograd graph the forward built (none
    under ``torch.no_grad``); only the landmark images are always detached.
    """

    normal_image: torch.Tensor = field(metadata=_PER_FRAME)
    """[B, P, 3] deformed normals encoded as (n_d + 1) / 2, over white."""
    shading_image: torch.Tensor = field(metadata=_PER_FRAME)
    """[B, P, 3] shading s(n_d) in (0, 1), over white."""
    albedo_image: torch.Tensor = field(metadata=_PER_FRAME)
    """[B, P, 3] albedo in (0, 1), over white."""
    pnts_color_deformed: torch.Tensor = field(metadata=_PER_FRAME)
    """[B, N, 3] per-point colour clamp(2 * shading * albedo, 0, 1)."""
    pnts_normal_deformed: torch.Tensor = field(metadata=_PER_FRAME)
    """[B, N, 3] unit deformed normals n_d (world frame)."""
    deformed_points: torch.Tensor = field(metadata=_PER_FRAME)
    """[B, N, 3] deformed points x_d (world frame)."""
    deformed_verts: torch.Tensor = field(metadata=_PER_FRAME)
    """[B, V, 3] posed FLAME vertices (world frame)."""
    canonical_verts: torch.Tensor
    """[V, 3] canonical FLAME vertices (the FLAME module's buffer, not a copy)."""
    unconstrained_canonical_points: torch.Tensor
    """[N, 3] the raw point positions x (free x_c space)."""
    pnts_albedo: torch.Tensor
    """[N, 3] per-point albedo in (0, 1)."""
    rendered_landmarks: torch.Tensor | None = field(default=None, metadata=_PER_FRAME)
    """[B, P, 3] coverage alpha of the 68 landmark dots (the same value in each channel); None when the
    model has no landmark embedding."""
    rendered_landmarks_alpha: torch.Tensor | None = field(default=None, metadata=_PER_FRAME)
    """[B, P] the same alpha; plots blend img * (1 - alpha) + alpha * red. None without landmarks."""


@dataclass(kw_only=True)
class PointAvatarOutputs:
    """One forward of B frames.

    The FLAME pseudo ground truth of the loss (the FLAME module's lbs_weights, posedirs, shapedirs) is
    not copied here: the loss reads it from the FLAME module it is given.
    """

    img_res: int
    """Side of the square images in pixels (H = W)."""
    rgb_image: torch.Tensor = field(metadata=_PER_FRAME)
    """[B, P, 3] rendered colour over the background (white, or the learned background)."""
    predicted_mask: torch.Tensor = field(metadata=_PER_FRAME)
    """[B, P] accumulated opacity."""
    canonical_points: torch.Tensor
    """[N, 3] x' = x + o(x) of the detached points (FLAME canonical space)."""
    posedirs: torch.Tensor
    """[N, 36, 3] pose correctives of the detached-point deformer query."""
    shapedirs: torch.Tensor
    """[N, 3, E] expression blendshapes of the detached-point deformer query."""
    lbs_weights: torch.Tensor
    """[N, J] skinning weights of the detached-point deformer query."""
    sdf_values: torch.Tensor
    """[N] SDF at the points."""
    grad_thetas: torch.Tensor
    """[2N, 3] SDF gradients at the points and at jittered copies (eikonal samples)."""
    index_batch: torch.Tensor | None = None
    """[N] int64 nearest canonical FLAME vertex of each x' (training only, else None)."""
    fragment_idx: torch.Tensor | None = field(default=None, metadata=_PER_FRAME)
    """[B, H, W, K] int64 packed point index b * N + p of the rasterizer, -1 in empty slots (training
    only, else None). Detached; the point schedule accumulates visibility from it."""
    fragment_weights: torch.Tensor | None = field(default=None, metadata=_PER_FRAME)
    """[B, H, W, K] compositing weights of those slots, 0 in empty ones (training only, detached)."""
    eval: EvalOutputs | None = None
    """Eval-mode extras; None in training."""

    @property
    def batch_size(self) -> int:
        """B, the number of frames."""
        return self.rgb_image.shape[0]

    @property
    def n_points(self) -> int:
        """N, the number of points."""
        return self.canonical_points.shape[0]

    def select(self, rows: Sequence[int]) -> PointAvatarOutputs:
        """The outputs of the frames ``rows`` (indices into 0..B-1, in that order).

        Per-frame fields (images, fragments, deformed points, ...) are indexed on axis 0; per-point
        fields are shared, not copied. ``fragment_idx`` is re-packed so that frame j of the result
        points at j * N + p.
        """
        batch = self.batch_size
        rows = [int(r) for r in rows]
        if any(r < 0 or r >= batch for r in rows):
            raise IndexError(f"select: rows {rows} out of range for {batch} frames")
        index = torch.as_tensor(rows, dtype=torch.long, device=self.rgb_image.device)
        out = _select_rows(self, index)
        if out.fragment_idx is not None:
            n = self.n_points
            # Old frame offset rows[j] * N -> new offset j * N, empty slots stay -1.
            shift = (torch.arange(len(rows), device=index.device) - index) * n  # [B']
            shift = shift.to(out.fragment_idx.device).reshape(-1, *([1] * (out.fragment_idx.dim() - 1)))
            out.fragment_idx = torch.where(out.fragment_idx >= 0, out.fragment_idx + shift, out.fragment_idx)
        if out.eval is not None:
            out.eval = _select_rows(out.eval, index)
        return out
