"""The coarse-to-fine point schedule (spec §2.5, §2.7, §5.12, §5.14): one object owns every rule.

`PointSchedule` decides how the point cloud changes during training and resizes whatever depends on
its size together with it:

- visibility: during an epoch it ORs in, from each forward's fragments, the front-most point of every
  pixel and every point whose compositing weight exceeds ``model.prune_thresh``;
- prune: at the start of an epoch (not at the resumed epoch, unless the visibility was restored), the
  points not visible during the last epoch are removed, while the radius is >= 0.006;
- upsample: at epochs e % upsample_freq == 0, e != 0, while N <= max_points / 2, every point gets a
  jittered copy and the radius shrinks by 0.75;
- the optimizer after a resize: a fresh Adam at the base learning rate (the original; this also resets
  the networks' moments), or with ``train.keep_optimizer_state`` the old moments, the point moments
  pruned or extended with zeros for new points;
- the per-epoch derived values (batch size, FLAME-prior weight) through one function, the same for a
  fresh start and a resume.

On several ranks (engine/distributed.py) every rank runs the same schedule on the same cloud: the
visibility is OR-ed over the ranks at the end of each epoch (`finish_epoch`), the upsample jitter comes
from the generator state that all ranks share, and after every prune and upsample the ranks compare a
digest of the points and radius, stopping with a message if they differ.

The model only renders: its forward returns the fragments (``fragment_idx``, ``fragment_weights``) and
the cloud (``model.pc``) holds the points and the raster radius, which only this schedule changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import Conf, TrainConf
from ..engine.batching import batch_size_for
from ..engine.distributed import Ranks
from ..errors import PointAvatarError
from ..render import mark_visible

# Hard-coded in the original (spec §10.4).
PRUNE_MIN_RADIUS = 0.006
UPSAMPLE_RADIUS_FACTOR = 0.75


@dataclass(frozen=True)
class EpochValues:
    """Values derived from the epoch and the cloud size, identical for a fresh and a resumed run."""

    batch_size: int
    """Frames per step: min(max_points_training // N, max_batch), at least 1 (spec §2.7)."""
    lbs_weight: float
    """loss.lbs_weight times GT_lbs_factor for every GT_lbs_milestone <= epoch (spec §2.4 step 7)."""


@dataclass(frozen=True)
class EpochChange:
    """What `PointSchedule.begin_epoch` did to the cloud."""

    pruned: bool
    upsampled: bool

    @property
    def resized(self) -> bool:
        return self.pruned or self.upsampled


def make_optimizer(model: torch.nn.Module, lr: float, fused: bool = False) -> torch.optim.Adam:
    """Adam over the model's parameters. fused: torch's fused Adam (the same update in a few kernels for
    all the tensors instead of a few per tensor group: about 1 ms of a step on an H200 at small point
    counts otherwise; used on the fast path on CUDA, ``uses_fused_adam``); else torch's default."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True if fused else None)


def uses_fused_adam(model, device: torch.device) -> bool:
    """Whether training uses the fused Adam: on CUDA with the fast engine (``model.implementation``);
    the reference path keeps torch's default Adam."""
    return device.type == "cuda" and model.uses_fast_path(device)


def rank_lr_factor(train: TrainConf, world_size: int) -> float:
    """The factor of train.learning_rate on ``world_size`` ranks (``train.lr_rank_scaling``); 1 for one."""
    if world_size <= 1 or train.lr_rank_scaling == "none":
        return 1.0
    return float(world_size) if train.lr_rank_scaling == "linear" else math.sqrt(world_size)


class PointSchedule:
    """Radius, visibility, prune and upsample rules, optimizer resizing and per-epoch values.

    ``visible`` [N] bool accumulates over an epoch; `state_dict`/`load_state_dict` carry it across a
    resume (saved only with ``train.prune_on_resume``, as the ``visible_points`` entry of the model
    checkpoint). ``ranks``: the ranks of a run on several processes (default: a single process).
    """

    def __init__(self, conf: Conf, ranks: Ranks | None = None):
        self.ranks = ranks if ranks is not None else Ranks()
        self.lr_factor = rank_lr_factor(conf.train, self.ranks.world_size)
        # The base learning rate of every Adam (x 1.0 on one process: exactly train.learning_rate).
        self.learning_rate = conf.train.learning_rate * self.lr_factor
        self.train = conf.train
        self.max_points = conf.model.point_cloud.max_points
        self.prune_thresh = conf.model.prune_thresh
        self.base_lbs_weight = conf.loss.lbs_weight
        self.visible: torch.Tensor | None = None
        self.resumed_visibility = False

    # ------------------------------------------------------------------------------ derived values
    def epoch_values(self, epoch: int, n_points: int) -> EpochValues:
        tc = self.train
        decays = sum(1 for m in tc.GT_lbs_milestones if m <= epoch)
        return EpochValues(
            batch_size=batch_size_for(n_points, tc.max_points_training, tc.max_batch),
            lbs_weight=self.base_lbs_weight * tc.GT_lbs_factor**decays,
        )

    # ---------------------------------------------------------------------------------- visibility
    def reset_visibility(self, points: torch.Tensor) -> None:
        """visible := all False, sized and placed like ``points`` [N, 3]."""
        self.visible = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)

    @torch.no_grad()
    def observe(
        self,
        fragment_idx: torch.Tensor,
        fragment_weights: torch.Tensor,
        n_points: int,
        backend: str = "torch",
    ) -> None:
        """OR in the front-most point of every pixel and every point with weight > prune_thresh.

        fragment_idx [B, H, W, K] packed b * N + p (-1 empty); fragment_weights [B, H, W, K]. backend:
        the renderer's (model.render_backend): "cuda" marks them in one Triton pass.
        """
        vis = self.visible
        if vis is None or vis.shape != (n_points,) or vis.device != fragment_idx.device:
            vis = self.visible = torch.zeros(n_points, dtype=torch.bool, device=fragment_idx.device)
        mark_visible(fragment_idx, fragment_weights, n_points, self.prune_thresh, vis, backend=backend)

    def finish_epoch(self) -> None:
        """End of an epoch's steps: on several ranks, a point is visible if any rank saw it (so the
        checkpoint and the next prune see the visibility of all the epoch's frames)."""
        if self.ranks.distributed and self.visible is not None:
            self.visible = self.ranks.any(self.visible)

    def state_dict(self) -> dict:
        return {} if self.visible is None else {"visible_points": self.visible.detach().cpu().clone()}

    def load_state_dict(self, state: dict, points: torch.Tensor) -> None:
        """Restore the visibility of a checkpoint if it fits ``points`` (then the resumed epoch prunes)."""
        vis = state.get("visible_points")
        if vis is not None and vis.shape == (points.shape[0],):
            self.visible = vis.to(device=points.device, dtype=torch.bool)
            self.resumed_visibility = True

    # --------------------------------------------------------------------------------- epoch start
    def begin_epoch(
        self, epoch: int, start_epoch: int, model, optimizer: torch.optim.Optimizer
    ) -> tuple[EpochChange, torch.optim.Optimizer]:
        """Prune and upsample as the rules say, then reset the visibility for the new epoch.

        Returns what changed and the optimizer to use from now on (a new one after any resize).
        """
        pruned = upsampled = False
        if epoch != start_epoch or self.resumed_visibility:
            optimizer, pruned = self._resize(model, optimizer, self._prune, f"pruning at epoch {epoch}")
        if epoch % self.train.upsample_freq == 0 and epoch != 0 and model.pc.n_points <= self.max_points / 2:
            optimizer, upsampled = self._resize(
                model, optimizer, self._upsample, f"upsampling at epoch {epoch}"
            )
        self.reset_visibility(model.pc.points)
        return EpochChange(pruned, upsampled), optimizer

    def _resize(self, model, optimizer, op, label: str) -> tuple[torch.optim.Optimizer, bool]:
        old_points = model.pc.points
        rows = op(model)
        if rows is None:
            return optimizer, False
        self.ranks.check_agreement(f"the point cloud after {label}", [model.pc.points], [model.pc.radius])
        return self.rebuild_optimizer(model, optimizer, old_points, rows), True

    def _prune(self, model) -> torch.Tensor | None:
        """Keep the points visible during the last epoch. Returns the kept rows, or None if skipped."""
        pc = model.pc
        if pc.radius < PRUNE_MIN_RADIUS:
            return None
        visible = self.visible
        if visible is None or visible.shape != (pc.n_points,):
            visible = torch.zeros(pc.n_points, dtype=torch.bool, device=pc.points.device)
        n_old, n_new = visible.shape[0], int(visible.sum())
        if n_new == 0:
            raise PointAvatarError(
                f"pruning would delete all {n_old} points: no point was visible in any training image during "
                "the last epoch. This usually means the cameras do not look at the head (wrong intrinsics "
                "or world_mat convention in flame_params.json) or the masks are empty/inverted. Check one "
                "frame with scripts/make_synthetic_subject.py's conventions (spec §3.5)."
            )
        print(f"Pruning points, original: {n_old}, new: {n_new}")
        rows = torch.nonzero(visible, as_tuple=False).squeeze(1)
        pc.prune(visible)
        return rows

    def _upsample(self, model) -> torch.Tensor:
        """Double the points with jittered copies and shrink the radius by 0.75 (spec §2.5 step 5).

        The jitter is U(-0.5, 0.5) per coordinate times the current raster radius, an NDC length used
        as a world-space distance exactly as in the original (spec §10.4). Returns the old-row map.
        """
        pc = model.pc
        points = pc.points.data
        n_old = points.shape[0]
        noise = torch.rand(points.shape, device="cpu").to(points)
        new_points = points + (noise - 0.5) * pc.radius
        print(f"old radius: {pc.radius:.6f}, new radius: {pc.radius * UPSAMPLE_RADIUS_FACTOR:.6f}")
        print(f"old points: {n_old}, new points: {2 * n_old}")
        pc.upsample_points(new_points)
        pc.radius = pc.radius * UPSAMPLE_RADIUS_FACTOR
        rows = torch.arange(n_old, device=points.device)
        return torch.cat([rows, torch.full_like(rows, -1)])

    # ---------------------------------------------------------------------------------- optimizer
    def rebuild_optimizer(
        self,
        model: torch.nn.Module,
        old: torch.optim.Optimizer,
        old_points: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.optim.Adam:
        """A new Adam over the model's current parameters, at the base learning rate (fused as the old one).

        ``old_points`` is the point Parameter before the resize and ``rows`` gives, for each row of
        the new one, the old row it came from (-1 for a new point). With ``keep_optimizer_state`` the
        networks' moments move over unchanged (same Parameter objects) and the point moments are
        gathered by ``rows``, zero for new points. The caller applies the scheduled learning rate on
        top when ``train.fix_lr_schedule`` is set.
        """
        new = make_optimizer(model, self.learning_rate, fused=bool(old.defaults.get("fused")))
        if not self.train.keep_optimizer_state:
            return new
        points = model.pc.points
        for param in model.parameters():
            if param is points:
                state = old.state.get(old_points)
                if state:
                    new.state[param] = resize_point_state(state, rows, param)
            elif param in old.state:
                new.state[param] = old.state[param]
        return new


def resize_point_state(state: dict, rows: torch.Tensor, param: torch.Tensor) -> dict:
    """Adam state of the point tensor gathered by ``rows`` (-1 -> zeros); scalars (``step``) kept."""
    out = {}
    keep = rows >= 0
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() == param.dim() and value.shape[0] > 0:
            resized = torch.zeros_like(param)
            resized[keep] = value[rows[keep]]
            out[key] = resized
        else:
            out[key] = value
    return out
