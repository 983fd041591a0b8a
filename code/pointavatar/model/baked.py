"""The baked avatar: a trained PointAvatar whose frame-independent per-point work is done once.

Everything the forward pass computes before the frame's deformation depends on the canonical points
only: their SDF normals n_c and albedo (spec §5.6), and the deformer's per-point blendshapes E, pose
correctives P, skinning weights W and offset o with their derivatives along x_c, which the deformed
normals need (spec §5.7-5.8). `BakedAvatar.from_model` computes them once (no autograd graph, by
chunks of points); `BakedAvatar.render` then does per frame only what depends on the frame: FLAME's
joint transforms and pose feature, the expression/pose blend, the skinning and its Jacobian columns,
the deformed normals, the shading MLP, projection, rasterization and compositing. Its images equal the
eval forward's (``PointAvatar.eval()(input)``) up to float rounding.

The blend through the deformer's linear head. With h [D] the deformer's last hidden activation, the
head gives E = W_E h + b_E and P = W_P h + b_P, so FLAME's ``forward_pts`` (spec §4.7) is

    x_posed = y + sum_e dpsi_e E_e + sum_i dp_i P_i = y + M h + m,

with y = skin^-1(x'; A_c, W) the inverse skinning at the canonical frame, dpsi = psi - psi_c and
dp = p - p_c the frame's expression and pose feature relative to the canonical ones, and the frame's
M = sum_e dpsi_e W_E,e + sum_i dp_i W_P,i [3, D] and m [3] (the same sums of the biases). Along x_k
the tangent is dy/dx_k + M dh/dx_k (the bias has none). So per point the baked state is h and its
three tangents [4, D] and y and its three tangents [4, 3], and a frame costs one [4N, D] @ [D, 3]
product instead of reading E, P and their tangents ([12, E + 36] numbers a point). The skinning is
one more product: [W; dW/dx_k] [4N, J] @ the frame's transforms [J, 3 x 4].

Dimension letters: B frames, N points, D deformer width, J bones (6 with the ghost bone), E the
deformer's expressions (num_exp), Q = E + 36 blend coefficients, H = W = img_res, C channels.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pointavatar.errors import PointAvatarError
from pointavatar.flame.lbs import batch_rigid_transform, batch_rodrigues
from pointavatar.model.deform_explicit import skinning_with_tangents, trunk_with_tangents
from pointavatar.model.deformer import N_POSE_FEATURES
from pointavatar.model.point_avatar import ALBEDO_SCALE, POINTS_PER_PIXEL, PointAvatar, deformed_normals
from pointavatar.render import alpha_composite, project_points, rasterize_points

__all__ = ["BakedAvatar", "BakedFrame", "CHANNELS"]

CHANNELS = ("all", "rgb")
"""``render(channels=...)``: "all" composites 13 channels (colour, opacity, normal, shading, albedo),
"rgb" only 4 (colour, opacity): the same rgb and mask, less compositing work."""

BAKE_CHUNK = 65536  # points per bake step: bounds the bake's temporaries (~1 GB at the default widths)


@dataclass(frozen=True)
class BakedFrame:
    """Images of B frames from `BakedAvatar.render`, channels last, rows from the top of the image.

    The same values as the eval forward's ``PointAvatarOutputs`` (there flattened to [B, P, C]).
    """

    rgb: torch.Tensor
    """[B, H, W, 3] colour over the background (white, or the learned background), as ``rgb_image``."""
    mask: torch.Tensor
    """[B, H, W] accumulated opacity in [0, 1], as ``predicted_mask``."""
    normal: torch.Tensor | None = None
    """[B, H, W, 3] deformed normals (world frame) encoded as (n_d + 1) / 2, over white, as
    ``eval.normal_image``; None with ``channels="rgb"``."""
    shading: torch.Tensor | None = None
    """[B, H, W, 3] shading in (0, 1) over white, as ``eval.shading_image``; None with "rgb"."""
    albedo: torch.Tensor | None = None
    """[B, H, W, 3] albedo in (0, 1) over white, as ``eval.albedo_image``; None with "rgb"."""


def _plain_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` with its weight-norm parametrisations evaluated once into plain weights
    (the same values the parametrisation computes in every forward)."""
    # Plain Linear layers replace the parametrised ones in a copy. (remove_parametrizations on a copy
    # would delete the weight property of the class the copy shares with the original module.)
    plain = copy.deepcopy(module)
    for name, sub in module.named_modules():
        if not parametrize.is_parametrized(sub, "weight"):
            continue
        if not isinstance(sub, nn.Linear):
            raise TypeError(f"baking a parametrised {type(sub).__name__} ({name}) is not supported")
        weight = sub.weight.detach()
        lin = nn.Linear(
            sub.in_features,
            sub.out_features,
            bias=sub.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(weight)
            if sub.bias is not None:
                lin.bias.copy_(sub.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent_name) if parent_name else plain, child, lin)
    return plain.requires_grad_(False)


class BakedAvatar(nn.Module):
    """A PointAvatar reduced to what a frame needs; build it with `from_model`, draw with `render`.

    Holds tensors only (buffers, and a plain copy of the shading MLP): no reference to the model, so
    the model can be freed. ``.to(device)`` moves it; it keeps the model's dtype. ``nbytes()`` and
    ``memory_report()`` give its size.

    Per-point buffers (N points): ``normals_c`` [N, 3] unit canonical normals, ``albedo`` [N, 3],
    ``hidden`` [N, 4, D] (h and dh/dx_k), ``rest`` [N, 4, 3] (y and dy/dx_k), ``skin`` [N, 4, J]
    (W and dW/dx_k). Frame-independent constants: ``coef_weight`` [Q, 3 D] and ``coef_bias`` [Q, 3]
    (the head rows of E and P), ``canonical_coef`` [Q] (psi_c, p_c), FLAME's joint regression
    ``joints_template`` [5, 3] and ``joints_shapedirs`` [5, 3, 50], ``canonical_expression`` [1, 50],
    ``canonical_pose`` [1, 15] (the avatar's neutral frame), ``background`` [H, W, 3] (learned
    background, or an empty tensor for white).

    Attributes: ``img_res`` (H = W), ``radius`` (raster radius, NDC), ``render_backend`` ("auto",
    "torch" or "cuda"), ``num_exp`` (E), ``n_points`` (N).
    """

    def __init__(
        self,
        model: PointAvatar,
        chunk_size: int = BAKE_CHUNK,
        compile: bool | str = False,
        cuda_graph: bool = False,
    ):
        super().__init__()
        if compile and cuda_graph:
            raise ValueError(
                "BakedAvatar: choose compile or cuda_graph (compile='reduce-overhead' does both)"
            )
        flame = model.FLAMEServer
        deformer = model.deformer_network
        points = model.pc.points.detach()
        dtype, device = points.dtype, points.device
        self.img_res = int(model.img_res)
        self.radius = float(model.pc.radius)
        self.render_backend = model.render_backend
        self.num_exp = int(deformer.num_exp)
        self.n_exp_flame = int(flame.n_exp)
        self.ghostbone = bool(flame.ghostbone)
        self._parents = list(flame._parent_list)
        if any(p >= i for i, p in enumerate(self._parents[1:], start=1)):
            raise ValueError(f"BakedAvatar: the FLAME parents {self._parents} are not in topological order")

        with torch.no_grad():
            parts = [_bake_points(model, x) for x in points.split(max(1, int(chunk_size)))]
            for i, name in enumerate(("normals_c", "albedo", "hidden", "rest", "skin")):
                width = parts[0][i].shape[1:] if parts else _empty_width(model, name)
                value = torch.cat([p[i] for p in parts]) if parts else points.new_zeros(0, *width)
                self.register_buffer(name, value.contiguous())

            # Blend coefficients (psi, p) -> rows of the deformer's head (module docstring).
            n_p, n_s, n_e = deformer.n_posedirs, deformer.n_shapedirs, deformer.num_exp
            head_w, head_b = deformer.blendshapes.weight, deformer.blendshapes.bias
            d = head_w.shape[1]
            w_exp = head_w[n_p : n_p + n_s].reshape(3, n_e, d).transpose(0, 1)  # [E, 3, D]
            w_pose = head_w[:n_p].reshape(N_POSE_FEATURES, 3, d)  # [36, 3, D]
            b_exp = head_b[n_p : n_p + n_s].reshape(3, n_e).t()  # [E, 3]
            b_pose = head_b[:n_p].reshape(N_POSE_FEATURES, 3)  # [36, 3]
            self.register_buffer("coef_weight", torch.cat([w_exp, w_pose]).reshape(-1, 3 * d).contiguous())
            self.register_buffer("coef_bias", torch.cat([b_exp, b_pose]).contiguous())
            canonical_exp = flame.canonical_exp.to(dtype)
            if n_e > canonical_exp.shape[1]:  # zero-padded to num_exp as forward_pts does
                canonical_exp = F.pad(canonical_exp, [0, n_e - canonical_exp.shape[1]])
            canonical_coef = torch.cat([canonical_exp[0, :n_e], flame.canonical_pose_feature.to(dtype)[0]])
            self.register_buffer("canonical_coef", canonical_coef)

            # FLAME's joints are linear in the expression: J (v_template + S psi) = J v_template + (J S) psi.
            # Regressed once in float64, so only the frame's own products round in the model dtype.
            regressor = flame.J_regressor.double()
            exp_dirs = flame.shapedirs[:, :, flame.n_shape :].double()  # [V, 3, 50]
            joints = torch.einsum("ji,ik->jk", regressor, flame.v_template.double())
            joints_dirs = torch.einsum("ji,ikl->jkl", regressor, exp_dirs)
            self.register_buffer("joints_template", joints.to(dtype))
            self.register_buffer("joints_shapedirs", joints_dirs.to(dtype))
            self.register_buffer("canonical_expression", flame.canonical_exp.to(dtype).clone())
            self.register_buffer("canonical_pose", flame.canonical_pose.to(dtype).clone())
            bg = model.background_rgb()
            if torch.is_tensor(bg):
                bg = bg.detach().reshape(self.img_res, self.img_res, 3).to(dtype)
            else:
                bg = torch.zeros(0, dtype=dtype, device=device)
            self.register_buffer("background", bg.contiguous())
        self.shading = _plain_copy(model.rendering_network)

        self._compile = bool(compile)
        self._compile_mode = compile if isinstance(compile, str) and compile != "default" else None
        self._compiled = None
        self._compiled_for: set[tuple] = set()  # (B, all_channels, device) already compiled
        self._compile_failed = False
        self._cuda_graph = bool(cuda_graph)
        self._graphs: dict[tuple, tuple] = {}  # (B, all_channels, device) -> (graph, inputs, outputs)
        self._graph_failed = False

    @classmethod
    def from_model(
        cls,
        model: PointAvatar,
        chunk_size: int = BAKE_CHUNK,
        compile: bool | str = False,
        cuda_graph: bool = False,
    ) -> BakedAvatar:
        """Bake ``model`` (any mode; its weights are read, not changed) on its device and dtype.

        chunk_size: points per bake step (memory bound of the bake only). compile: run the per-frame
        work before rasterization through ``torch.compile`` (True or "default", or a torch.compile
        mode such as "reduce-overhead", which adds CUDA graphs); eager, with one warning, if
        compilation fails. cuda_graph: on CUDA, capture that work (eager kernels) in a CUDA graph
        per frame count and channel set, replayed per frame: no per-kernel launch cost (eager, with
        one warning, if capture fails). The results are the same either way, up to float rounding.
        """
        return cls(model, chunk_size=chunk_size, compile=compile, cuda_graph=cuda_graph)

    # ------------------------------------------------------------------------------------ info

    @property
    def n_points(self) -> int:
        """N, the number of points."""
        return self.normals_c.shape[0]

    @property
    def device(self) -> torch.device:
        return self.normals_c.device

    @property
    def dtype(self) -> torch.dtype:
        return self.normals_c.dtype

    def memory_report(self) -> dict[str, int]:
        """Bytes held, per buffer (and ``shading`` for the MLP's weights)."""
        report = {name: t.numel() * t.element_size() for name, t in self.named_buffers(recurse=False)}
        report["shading"] = sum(t.numel() * t.element_size() for t in self.shading.parameters())
        return report

    def nbytes(self) -> int:
        """Total bytes held by the baked tensors."""
        return sum(self.memory_report().values())

    # ------------------------------------------------------------------------------- per frame

    def flame_transforms(
        self, expression: torch.Tensor, flame_pose: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FLAME's pose feature [B, 36] and joint transforms [B, J, 4, 4] of a frame (as ``FLAME.forward``,
        without the vertices). expression [B, >=50], flame_pose [B, 15]."""
        b = expression.shape[0]
        betas = expression[:, : self.n_exp_flame]
        joints = self.joints_template + torch.einsum("bl,jkl->bjk", betas, self.joints_shapedirs)
        rot_mats = batch_rodrigues(flame_pose.reshape(-1, 3)).reshape(b, -1, 3, 3)
        ident = torch.eye(3, dtype=flame_pose.dtype, device=flame_pose.device)
        pose_feature = (rot_mats[:, 1:] - ident).reshape(b, -1)
        transforms = batch_rigid_transform(rot_mats, joints, self._parents)[1]  # no host copy
        if self.ghostbone:
            ghost = torch.eye(4, dtype=transforms.dtype, device=transforms.device).expand(b, 1, 4, 4)
            transforms = torch.cat([ghost, transforms], dim=1)
        return pose_feature, transforms

    def _deform(
        self, expression: torch.Tensor, pose_feature: torch.Tensor, transforms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x_d [B, N, 3], cols [3, B, N, 3] with cols[k] = d x_d / d x_k), as
        ``deform_with_jacobian_explicit`` from the baked state (module docstring)."""
        b = expression.shape[0]
        n, _, d = self.hidden.shape
        j = self.skin.shape[-1]
        coef = torch.cat([expression[:, : self.num_exp], pose_feature], dim=1) - self.canonical_coef  # [B, Q]
        mats = (coef @ self.coef_weight).reshape(b * 3, d)  # [3B, D]: rows (frame, xyz) of M
        offset = coef @ self.coef_bias  # [B, 3] = m
        blend = self.hidden.reshape(n * 4, d) @ mats.t()  # [4N, 3B]
        posed = blend.reshape(n, 4, b, 3).permute(2, 0, 1, 3) + self.rest  # [B, N, 4, 3]
        x_posed = posed[:, :, 0] + offset[:, None]  # [B, N, 3]
        t_posed = posed[:, :, 1:]  # [B, N, 3 (k), 3]

        # Skinning: (R, T) = sum_j W_j A_j and its tangents sum_j dW_j/dx_k A_j, one product.
        frame_tf = transforms[:, :, :3, :].permute(1, 0, 2, 3).reshape(j, b * 12)  # [J, 12B]
        skin = (self.skin.reshape(n * 4, j) @ frame_tf).reshape(n, 4, b, 3, 4).permute(2, 0, 1, 3, 4)
        rot, trans = skin[..., :3], skin[..., 3]  # [B, N, 4, 3, 3], [B, N, 4, 3]
        x_d = (rot[:, :, 0] * x_posed[:, :, None, :]).sum(-1) + trans[:, :, 0]
        # d x_d / d x_k = R t_k + (dR/dx_k) x_posed + dT/dx_k
        cols = (
            (rot[:, :, :1] * t_posed[:, :, :, None, :]).sum(-1)
            + (rot[:, :, 1:] * x_posed[:, :, None, None, :]).sum(-1)
            + trans[:, :, 1:]
        )  # [B, N, 3 (k), 3]
        return x_d, cols.permute(2, 0, 1, 3)

    def _frame_points(
        self,
        expression: torch.Tensor,
        flame_pose: torch.Tensor,
        intrinsics: torch.Tensor,
        cam_pose: torch.Tensor,
        all_channels: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything of a frame before rasterization -> (NDC points [B, N, 3], features [B, N, C])."""
        b, n = expression.shape[0], self.n_points
        pose_feature, transforms = self.flame_transforms(expression, flame_pose)
        x_d, cols = self._deform(expression, pose_feature, transforms)
        normals_d = deformed_normals(cols, self.normals_c)  # [B, N, 3]
        shading = self.shading(normals_d.reshape(-1, 3)).reshape(b, n, 3)
        color = torch.clamp(2.0 * shading * self.albedo, 0.0, 1.0)  # [B, N, 3]
        ones = torch.ones_like(color[..., :1])
        if all_channels:
            features = torch.cat(
                [color, ones, (normals_d + 1.0) / 2.0, shading, self.albedo.expand(b, -1, -1)], dim=-1
            )  # [B, N, 13]
        else:
            features = torch.cat([color, ones], dim=-1)  # [B, N, 4]
        return project_points(x_d, intrinsics, cam_pose), features

    def _points_stage(self, *args):
        """``_frame_points``, through ``torch.compile`` when asked.

        A call that compiles (the first for a frame count B and channel set: the graph is specialised
        to them) is guarded: if it fails, rendering goes on eagerly, with one warning. Later calls are
        not: an exception there is real.
        """
        if self._cuda_graph and not self._graph_failed and args[0].device.type == "cuda":
            return self._graphed(*args)
        if not self._compile or self._compile_failed:
            return self._frame_points(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self._frame_points, dynamic=False, mode=self._compile_mode)
        signature = (args[0].shape[0], args[-1], args[0].device)
        if signature in self._compiled_for:
            return self._compiled(*args)
        try:
            result = self._compiled(*args)
        except Exception as exc:  # a compiler problem must not stop rendering: the eager code is exact
            self._compile_failed = True
            warnings.warn(
                f"torch.compile of the baked renderer failed ({type(exc).__name__}: {exc}); rendering eagerly",
                stacklevel=3,
            )
            return self._frame_points(*args)
        self._compiled_for.add(signature)
        return result

    def _graphed(self, *args):
        """``_frame_points`` replayed from a CUDA graph captured on the first call per (B, channels).

        The outputs are the graph's own tensors, overwritten by its next replay: ``render`` consumes
        them at once.
        """
        signature = (args[0].shape[0], args[-1], args[0].device)
        entry = self._graphs.get(signature)
        if entry is None:
            try:
                entry = self._capture(args)
            except Exception as exc:  # a capture problem must not stop rendering: the eager code is exact
                self._graph_failed = True
                self._graphs.clear()
                warnings.warn(
                    f"CUDA graph capture of the baked renderer failed ({type(exc).__name__}: {exc}); "
                    "rendering eagerly",
                    stacklevel=3,
                )
                return self._frame_points(*args)
            self._graphs[signature] = entry
        graph, static_inputs, outputs = entry
        for static, value in zip(static_inputs, args[:-1], strict=True):
            static.copy_(value)
        graph.replay()
        return outputs

    def _capture(self, args: tuple) -> tuple:
        tensors, all_channels = [a.clone() for a in args[:-1]], args[-1]
        device = tensors[0].device
        # Warm-up on a side stream (cuBLAS handles and workspaces), as torch.cuda.graph asks.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._frame_points(*tensors, all_channels)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._frame_points(*tensors, all_channels)
        return graph, tensors, outputs

    def _apply(self, fn, *args, **kwargs):
        # Captured graphs and compiled code hold the old tensors: moved or cast buffers need new ones.
        self._graphs.clear()
        self._compiled = None
        self._compiled_for.clear()
        return super()._apply(fn, *args, **kwargs)

    def _inputs(self, where: str, expression, flame_pose, intrinsics=None, cam_pose=None) -> list:
        """The frame tensors on the avatar's device and dtype, shapes checked; expression zero-padded to
        the width FLAME and the deformer read."""
        expression = torch.as_tensor(expression, dtype=self.dtype, device=self.device)
        if expression.dim() != 2:
            raise PointAvatarError(f"{where}: expression must be [B, E], got {list(expression.shape)}.")
        b = expression.shape[0]
        width = max(self.num_exp, self.n_exp_flame)
        if expression.shape[1] < width:
            expression = F.pad(expression, [0, width - expression.shape[1]])
        out = [expression]
        for name, value, shape in (
            ("flame_pose", flame_pose, (b, 15)),
            ("intrinsics", intrinsics, (b, 4, 4)),
            ("cam_pose", cam_pose, (b, 3, 4)),
        ):
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=self.dtype, device=self.device)
            if tuple(value.shape) != shape:
                raise PointAvatarError(
                    f"{where}: {name} must be {list(shape)} (B = {b} frames), got {list(value.shape)}."
                )
            out.append(value)
        return out

    @torch.no_grad()
    def deform(self, expression: torch.Tensor, flame_pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deformed points and normals of B frames: expression [B, >=E], flame_pose [B, 15] ->
        (x_d [B, N, 3] world frame, n_d [B, N, 3] unit), as the eval forward's ``deformed_points`` and
        ``pnts_normal_deformed``."""
        expression, flame_pose = self._inputs("BakedAvatar.deform", expression, flame_pose)
        pose_feature, transforms = self.flame_transforms(expression, flame_pose)
        x_d, cols = self._deform(expression, pose_feature, transforms)
        return x_d, deformed_normals(cols, self.normals_c)

    @torch.no_grad()
    def render(
        self,
        expression: torch.Tensor,
        flame_pose: torch.Tensor,
        intrinsics: torch.Tensor,
        cam_pose: torch.Tensor,
        channels: Literal["all", "rgb"] = "all",
    ) -> BakedFrame:
        """Render B frames (the eval forward's images).

        Args:
            expression: [B, >=E] FLAME expression (narrower inputs are zero-padded).
            flame_pose: [B, 15] axis-angle root, neck, jaw, left eye, right eye (radians).
            intrinsics: [B, 4, 4] NDC intrinsics, cam_pose: [B, 3, 4] converted cameras (spec §3.5; the
                dataset's ``intrinsics`` and ``cam_pose``).
            channels: "all" (rgb, mask, normal, shading, albedo) or "rgb" (rgb and mask only; faster).

        Inputs may be on any device (they are moved to the avatar's device and dtype). No gradients.
        """
        if channels not in CHANNELS:
            raise PointAvatarError(
                f"BakedAvatar.render: channels must be one of {CHANNELS}, got {channels!r}."
            )
        inputs = self._inputs("BakedAvatar.render", expression, flame_pose, intrinsics, cam_pose)
        all_channels = channels == "all"
        ndc, features = self._points_stage(*inputs, all_channels)
        fragments = rasterize_points(
            ndc, self.img_res, self.radius, points_per_pixel=POINTS_PER_PIXEL, backend=self.render_backend
        )
        images, _ = alpha_composite(fragments, features, self.radius, backend=self.render_backend)
        del fragments
        mask = images[..., 3]  # [B, H, W]
        white_weight = (1.0 - mask).unsqueeze(-1)
        bg = self.background if self.background.numel() else 1.0
        rgb = images[..., :3] + white_weight * bg
        if not all_channels:
            return BakedFrame(rgb=rgb, mask=mask)
        return BakedFrame(
            rgb=rgb,
            mask=mask,
            normal=images[..., 4:7] + white_weight,
            shading=images[..., 7:10] + white_weight,
            albedo=images[..., 10:13] + white_weight,
        )


def _bake_points(
    model: PointAvatar, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frame-independent state of the points x [n, 3] (no grad) ->

    (normals_c [n, 3], albedo [n, 3], hidden [n, 4, D], rest [n, 4, 3], skin [n, 4, J]).

    The deformer part follows ``deform_with_jacobian_explicit`` step by step up to the frame's inputs.
    """
    # Canonical normals and albedo (spec §5.6): the explicit sweep, the same values as the eval
    # forward's double-backward-free gradient.
    out, grad = model.geometry_network.forward_with_gradient_explicit(x)
    normals_c = F.normalize(grad, dim=-1)
    albedo = torch.sigmoid(ALBEDO_SCALE * out[:, 1:4])

    deformer, flame = model.deformer_network, model.FLAMEServer
    h, t = trunk_with_tangents(deformer, x)
    hidden = torch.cat([h[None], t]).transpose(0, 1)  # [n, 4, D]

    weights, t_weights = skinning_with_tangents(deformer, h, t)  # [n, J], [3, n, J]
    skin = torch.cat([weights[None], t_weights]).transpose(0, 1)  # [n, 4, J]

    eye = torch.eye(3, dtype=x.dtype, device=x.device)[:, None, :]  # [3, 1, 3]
    if deformer.deform_c:
        lo = deformer.n_posedirs + deformer.n_shapedirs
        w, b = deformer.blendshapes.weight[lo : lo + 3], deformer.blendshapes.bias[lo : lo + 3]
        x_flame = x + F.linear(h, w, b)
        t_x_flame = eye + torch.matmul(t, w.t())  # [3, n, 3]
    else:
        x_flame = x
        t_x_flame = eye.expand(3, x.shape[0], 3)

    # Inverse skinning at the canonical frame: y = M_c^-1 [x'; 1], dy = M_c^-1 ([dx'; 0] - dM_c y).
    canonical_tf = flame.canonical_transformations.to(x.dtype)[0]  # [J, 4, 4]
    m_inv = torch.linalg.inv(torch.einsum("nj,jxy->nxy", weights, canonical_tf))  # [n, 4, 4]
    y = torch.einsum("nxy,ny->nx", m_inv, torch.cat([x_flame, torch.ones_like(x_flame[:, :1])], dim=-1))
    a_y = torch.einsum("jxy,ny->njx", canonical_tf, y)  # [n, J, 4]
    t_in = F.pad(t_x_flame, [0, 1]) - torch.einsum("knj,njx->knx", t_weights, a_y)  # [3, n, 4]
    t_y = torch.einsum("nxy,kny->knx", m_inv[:, :3, :], t_in)  # [3, n, 3]
    rest = torch.cat([y[None, :, :3], t_y]).transpose(0, 1)  # [n, 4, 3]
    return normals_c, albedo, hidden, rest, skin


def _empty_width(model: PointAvatar, name: str) -> tuple[int, ...]:
    """The trailing shape of a per-point buffer, for a model without points."""
    deformer = model.deformer_network
    d = deformer.blendshapes.weight.shape[1]
    return {
        "normals_c": (3,),
        "albedo": (3,),
        "hidden": (4, d),
        "rest": (4, 3),
        "skin": (4, deformer.num_bones),
    }[name]
