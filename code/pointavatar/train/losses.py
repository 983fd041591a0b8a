"""Training losses (spec §6).

Dimension letters: B frames, P = H*W pixels, N points, V FLAME vertices, J joints (5, or 6 with the
ghost bone in column 0).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from pointavatar.config import LossConf
from pointavatar.model import PointAvatarOutputs
from pointavatar.train.vgg import VGGPerceptualLoss

LOSS_KEYS = (
    "rgb_loss",
    "mask_loss",
    "vgg_loss",
    "sdf_consistency",
    "eikonal",
    "lbs_loss",
    "posedirs_loss",
    "shapedirs_loss",
)


# Variances at or below this are treated as "this expression never changes in training".
MIN_EXPRESSION_VARIANCE = 1e-8


def usable_expression_variance(var_expression: torch.Tensor) -> torch.Tensor:
    """The per-expression variance [1, E] that the blendshape prior divides by, made safe.

    The original divides by the variance as it is, so an expression dimension that is constant over
    the training frames (variance 0) makes the loss infinite and the first step turns every weight
    into NaN. Such dimensions get the smallest variance among the others instead, with one warning.
    """
    var = torch.as_tensor(var_expression).reshape(1, -1).detach().clone()
    if not var.is_floating_point():
        var = var.float()
    bad = ~(var > MIN_EXPRESSION_VARIANCE)  # also catches NaN
    if bad.any():
        good = var[~bad]
        floor = float(good.min()) if good.numel() else 1.0
        dims = bad.nonzero()[:, 1].tolist()
        warnings.warn(
            f"Expression dimensions {dims} do not vary over the training frames, so the blendshape "
            f"prior cannot scale by their variance (it would divide by zero); using {floor:.3g} for "
            "them. Set dataset.use_var_expression = False for an unscaled prior.",
            stacklevel=2,
        )
        var[bad] = floor
    return var


def _need(d: dict, key: str, where: str) -> torch.Tensor:
    if key not in d:
        raise KeyError(f"Loss: `{where}` has no entry '{key}', which an enabled loss term needs")
    return d[key]


def rgb_l1(rgb_pred: torch.Tensor, rgb_gt: torch.Tensor) -> torch.Tensor:
    """Mean |pred - gt| over B*P*3; both [B, P, 3] already composited over the same background."""
    return (rgb_pred.reshape(-1, 3) - rgb_gt.reshape(-1, 3)).abs().mean()


class FlamePrior(Protocol):
    """The FLAME buffers the FLAME-guided losses read; the FLAME module (``model.FLAMEServer``) has them."""

    lbs_weights: torch.Tensor
    """[V, 5] skinning weights."""
    posedirs: torch.Tensor
    """[36, 3V] pose correctives, FLAME's layout (row k = pose feature k, vertex-major xyz)."""
    shapedirs: torch.Tensor
    """[V, 3, 150] 100 shape then 50 expression blendshapes."""


def flame_prior_targets(
    index_batch: torch.Tensor,
    flame_lbs_weights: torch.Tensor,
    flame_posedirs: torch.Tensor,
    flame_shapedirs: torch.Tensor,
    num_joints: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pseudo ground truth from each point's nearest canonical FLAME vertex (spec §6, §4.9).

    index_batch [N] int64 vertex index; flame_lbs_weights [V, 5]; flame_posedirs [36, 3V] (FLAME's
    layout: row k holds the 3V displacement of pose feature k, vertex-major xyz); flame_shapedirs
    [V, 3, 150] (100 shape then 50 expression components). Returns W_gt [N, J] (a zero ghost-bone column
    prepended when J = 6), P_gt [N, 36, 3] and E_gt [N, 3, 50] (the expression part).
    """
    w = flame_lbs_weights[index_batch]  # [N, 5]
    if num_joints == flame_lbs_weights.shape[1] + 1:
        # Ghost bone: its pseudo-GT weight is always 0 (spec §10.6).
        w = torch.cat([w.new_zeros(w.shape[0], 1), w], dim=1)
    n_pose = flame_posedirs.shape[0]
    p = flame_posedirs.reshape(n_pose, -1, 3).permute(1, 0, 2)[index_batch]  # [N, 36, 3]
    e = flame_shapedirs[index_batch, :, 100:150]  # [N, 3, 50]
    return w, p, e


class Loss(nn.Module):
    """PointAvatar's training loss (spec §6).

    total = rgb + mask_w*mask + vgg_w*vgg + sdf_w*sdf_consistency + eik_w*eikonal
            + lbs_weight * (0.1*lbs + 10*posedirs + 10*shapedirs)

    Args:
        conf: the ``loss`` block. Its ``lbs_weight`` is the weight at epoch 0 only: the FLAME-prior
            weight decays during training, so each call passes the current one (the point schedule's
            epoch values).
        var_expression: [1, 50] per-expression variance over the training frames, or None (then the
            expression-blendshape prior is a plain MSE of the x10 values).
        vgg: a module `(pred [B,3,H,W], gt [B,3,H,W]) -> scalar` to use as the perceptual loss (tests
            inject one); by default VGGPerceptualLoss is built from the weight file, only when
            vgg_feature_weight > 0.
        vgg_path: explicit path of `vgg16-397923af.pth` (otherwise searched in the torch hub folder).

    The FLAME pseudo ground truth is not part of the model outputs: each call is given the FLAME
    module (or any object with its ``lbs_weights``, ``posedirs`` and ``shapedirs`` buffers, see
    `FlamePrior`). Terms whose weight is 0 are not computed (their logged value is 0); SDF consistency
    and eikonal are each gated on their own weight.
    """

    def __init__(
        self,
        conf: LossConf,
        var_expression: torch.Tensor | None = None,
        vgg: nn.Module | None = None,
        vgg_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.conf = conf
        if var_expression is not None:
            var_expression = usable_expression_variance(var_expression)
        # Non-persistent: it belongs to the dataset, not to any checkpoint; a buffer so that .to(device)
        # moves it once (a copy from the host at every step would also stop CUDA-graph capture).
        self.register_buffer("var_expression", var_expression, persistent=False)
        self.vgg: nn.Module | None = None
        if conf.vgg_feature_weight > 0:
            self.vgg = vgg if vgg is not None else VGGPerceptualLoss(weight_path=vgg_path)

    # -- individual terms ----------------------------------------------------------------------------

    @staticmethod
    def mask_loss(predicted_mask: torch.Tensor, object_mask: torch.Tensor) -> torch.Tensor:
        """Mean |M_pred - M_gt| over B*P (M_gt is the soft alpha)."""
        return (predicted_mask.reshape(-1).to(object_mask.dtype) - object_mask.reshape(-1)).abs().mean()

    @staticmethod
    def sdf_consistency_loss(sdf_values: torch.Tensor) -> torch.Tensor:
        """mean f(x_i)^2 over the N points."""
        return (sdf_values * sdf_values).mean()

    @staticmethod
    def eikonal_loss(grad_thetas: torch.Tensor) -> torch.Tensor:
        """mean (||grad f|| - 1)^2 over the 2N samples; grad_thetas [2N, 3]."""
        if grad_thetas.dim() != 2 or grad_thetas.shape[1] != 3:
            raise ValueError(f"grad_thetas must be [2N, 3], got {tuple(grad_thetas.shape)}")
        return ((grad_thetas.norm(dim=1) - 1.0) ** 2).mean()

    def vgg_loss(self, outputs: PointAvatarOutputs, ground_truth: dict) -> torch.Tensor:
        assert self.vgg is not None
        h = w = int(outputs.img_res)  # square images
        pred = outputs.rgb_image.reshape(-1, h, w, 3).permute(0, 3, 1, 2)  # [B, 3, H, W]
        gt = _need(ground_truth, "rgb", "ground_truth").reshape(-1, h, w, 3).permute(0, 3, 1, 2)
        return self.vgg(pred, gt)

    def flame_prior_losses(
        self, outputs: PointAvatarOutputs, flame: FlamePrior
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lbs_loss, posedirs_loss, shapedirs_loss), unweighted (spec §6)."""
        if outputs.index_batch is None:
            raise ValueError(
                "Loss: the FLAME prior needs outputs.index_batch, which the model computes in training "
                "mode only (call model.train() before the forward)"
            )
        lbs = outputs.lbs_weights  # [N, J]
        posedirs = outputs.posedirs  # [N, 36, 3]
        shapedirs = outputs.shapedirs  # [N, 3, 50]
        n = lbs.shape[0]
        w_gt, p_gt, e_gt = flame_prior_targets(
            outputs.index_batch, flame.lbs_weights, flame.posedirs, flame.shapedirs, num_joints=lbs.shape[1]
        )
        lbs_loss = ((lbs - w_gt) ** 2).mean()
        # The x10 inside the square is the original's (spec §10.4): it scales the prior by 100.
        posedirs_loss = ((posedirs.reshape(n, -1) * 10 - p_gt.reshape(n, -1) * 10) ** 2).mean()
        e = shapedirs.reshape(n, 3, -1)[:, :, :50]
        sq = (e * 10 - e_gt * 10) ** 2  # [N, 3, 50]
        if self.var_expression is not None:
            var = self.var_expression.to(sq).reshape(1, 1, -1)  # [1, 1, 50], broadcast over xyz
            sq = sq / var / 50
        shapedirs_loss = sq.mean()
        return lbs_loss, posedirs_loss, shapedirs_loss

    # -- total ---------------------------------------------------------------------------------------

    def forward(
        self,
        outputs: PointAvatarOutputs,
        ground_truth: dict,
        *,
        flame: FlamePrior | None,
        lbs_weight: float,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one batch.

        outputs: a training forward's outputs (rgb_image, predicted_mask, img_res, sdf_values,
            grad_thetas, lbs_weights, posedirs, shapedirs, index_batch; only enabled terms read theirs).
        ground_truth: rgb [B, P, 3] over the background, object_mask [B, P] soft alpha.
        flame: source of the FLAME pseudo ground truth (``model.FLAMEServer``); may be None only when
            ``lbs_weight`` is 0.
        lbs_weight: current global weight of the three FLAME-guided terms (decayed at
            train.GT_lbs_milestones by the caller).
        Returns the unweighted terms (LOSS_KEYS) and the weighted total under 'loss'.
        """
        conf = self.conf
        rgb = outputs.rgb_image
        zero = rgb.new_zeros(())
        out = dict.fromkeys(LOSS_KEYS, zero)
        out["rgb_loss"] = rgb_l1(rgb, _need(ground_truth, "rgb", "ground_truth"))
        total = out["rgb_loss"]
        if conf.mask_weight != 0:
            out["mask_loss"] = self.mask_loss(
                outputs.predicted_mask, _need(ground_truth, "object_mask", "ground_truth")
            )
            total = total + conf.mask_weight * out["mask_loss"]
        if self.vgg is not None and conf.vgg_feature_weight > 0:
            out["vgg_loss"] = self.vgg_loss(outputs, ground_truth)
            total = total + conf.vgg_feature_weight * out["vgg_loss"]
        if conf.sdf_consistency_weight != 0:
            out["sdf_consistency"] = self.sdf_consistency_loss(outputs.sdf_values)
            total = total + conf.sdf_consistency_weight * out["sdf_consistency"]
        if conf.eikonal_weight != 0:
            out["eikonal"] = self.eikonal_loss(outputs.grad_thetas)
            total = total + conf.eikonal_weight * out["eikonal"]
        if lbs_weight != 0:
            if flame is None:
                raise ValueError("Loss: lbs_weight != 0 needs the FLAME module (flame=model.FLAMEServer)")
            lbs_loss, posedirs_loss, shapedirs_loss = self.flame_prior_losses(outputs, flame)
            out["lbs_loss"], out["posedirs_loss"], out["shapedirs_loss"] = (
                lbs_loss,
                posedirs_loss,
                shapedirs_loss,
            )
            total = total + lbs_weight * (0.1 * lbs_loss + 10.0 * posedirs_loss + 10.0 * shapedirs_loss)
        out["loss"] = total
        return out
