"""Coarse-to-fine point schedule: pruning invisible points and upsampling (spec §2.5, §5.12, §5.14).

The schedule resizes the point tensor and rebuilds the model optimizer. Faithful default: a fresh
Adam after every resize (the original's behaviour, which also resets the moments of the networks).
With ``keep_optimizer_state`` the moments survive: network moments are carried over as they are, and
the point moments are pruned or extended with zeros for the new points.
"""

from __future__ import annotations

import torch

from ..errors import PointAvatarError

# Hard-coded in the original (spec §10.4).
PRUNE_MIN_RADIUS = 0.006
UPSAMPLE_RADIUS_FACTOR = 0.75


def batch_size_for(n_points: int, max_points_training: int, max_batch: int) -> int:
    """B = min(floor(budget / N), max_batch), at least 1 (spec §2.7)."""
    return max(1, min(max_points_training // max(n_points, 1), max_batch))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=lr)


def rebuild_optimizer(
    model: torch.nn.Module,
    old: torch.optim.Optimizer,
    lr: float,
    keep_state: bool,
    old_names: dict[int, str],
    point_rows: torch.Tensor | None,
) -> torch.optim.Adam:
    """A new Adam over the model's current parameters.

    ``old_names`` maps ``id(param)`` of the parameters before the resize to their names;
    ``point_rows`` gives, for each row of the new point tensor, the row of the old one it came from
    (-1 for a new point). Used only with ``keep_state``.
    """
    # A fresh Adam at the base lr, as the original (spec §2.5); the trainer applies the decayed lr on
    # top when train.fix_lr_schedule is set.
    new = make_optimizer(model, lr)
    if not keep_state:
        return new
    by_name = {old_names[id(p)]: old.state[p] for p in old.state if id(p) in old_names}
    for name, param in model.named_parameters():
        state = by_name.get(name)
        if not state:
            continue
        if name.endswith("pc.points") or name == "pc.points":
            state = _resize_state(state, point_rows, param)
        if state is not None:
            new.state[param] = state
    return new


def _resize_state(state: dict, rows: torch.Tensor | None, param: torch.Tensor) -> dict | None:
    if rows is None:
        return None
    out = {}
    keep = rows >= 0
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] > 0 and value.dim() == param.dim():
            resized = torch.zeros_like(param)
            resized[keep] = value[rows[keep]]
            out[key] = resized
        else:
            out[key] = value
    return out


def prune(model, thresh_radius: float = PRUNE_MIN_RADIUS) -> torch.Tensor | None:
    """Keep the points flagged visible during the last epoch. Returns the kept rows, or None if skipped."""
    if model.radius < thresh_radius:
        return None
    visible = model.visible_points
    n_old = visible.shape[0]
    n_new = int(visible.sum())
    if n_new == 0:
        raise PointAvatarError(
            f"pruning would delete all {n_old} points: no point was visible in any training image during "
            "the last epoch. This usually means the cameras do not look at the head (wrong intrinsics or "
            "world_mat convention in flame_params.json) or the masks are empty/inverted. Check one frame "
            "with scripts/make_synthetic_subject.py's conventions (spec §3.5)."
        )
    print(f"Pruning points, original: {n_old}, new: {n_new}")
    rows = torch.nonzero(visible, as_tuple=False).squeeze(1)
    model.pc.prune(visible)
    return rows


def upsample(model, generator: torch.Generator | None = None) -> torch.Tensor:
    """Double the points with jittered copies and shrink the radius by 0.75 (spec §2.5 step 5).

    The jitter is U(-0.5, 0.5) per coordinate times the current raster radius, an NDC length used as a
    world-space distance exactly as in the original (spec §10.4). Returns the old-row map of the result.
    """
    points = model.pc.points.data
    n_old = points.shape[0]
    noise = torch.rand(points.shape, generator=generator, device="cpu").to(points)
    new_points = points + (noise - 0.5) * model.radius
    print(f"old radius: {model.radius:.6f}, new radius: {model.radius * UPSAMPLE_RADIUS_FACTOR:.6f}")
    print(f"old points: {n_old}, new points: {2 * n_old}")
    model.pc.upsample_points(new_points)
    model.radius = model.radius * UPSAMPLE_RADIUS_FACTOR
    rows = torch.arange(n_old, device=points.device)
    return torch.cat([rows, torch.full_like(rows, -1)])
