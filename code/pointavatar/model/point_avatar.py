"""The PointAvatar module: canonical points -> deformed, shaded, splatted images (spec §5.6-§5.13).

Frames and conventions: canonical points live in the free x_c space; x' = x + o(x) is in FLAME
canonical space; deformed points x_d and normals n_d are in world space (the FLAME frame scaled by 4,
spec §3.5). Images are row-major from the top row, P = H * W pixels, channels last.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from functools import partial

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
from torch import nn

from pointavatar.config import ModelConf
from pointavatar.flame import FLAME
from pointavatar.model import geometry_fused
from pointavatar.model.deform_explicit import deform_with_jacobian_explicit, flame_with_tangents
from pointavatar.model.deform_fused import skinning_with_tangents_fused, trunk_with_tangents_fused
from pointavatar.model.deformer import ForwardDeformer
from pointavatar.model.geometry import GeometryNetwork
from pointavatar.model.geometry_fused import constant_floats, forward_with_gradient_fused
from pointavatar.model.knn import nearest_neighbor, nearest_neighbor_fast
from pointavatar.model.outputs import EvalOutputs, PointAvatarOutputs
from pointavatar.model.point_cloud import PointCloud
from pointavatar.model.shading import RenderingNetwork
from pointavatar.render import PointFragments, alpha_composite, project_points, rasterize_points

POINTS_PER_PIXEL = 10  # K of the point rasterizer (spec §5.10)
EIKONAL_JITTER = 0.5  # second half of the eikonal samples: x + (U[0,1) - 0.5) * 0.5 (spec §5.6)
ALBEDO_SCALE = 10.0  # albedo = sigmoid(10 * logits) (spec §5.6)
BACKGROUND_SCALE = 100.0  # learned background = sigmoid(100 * beta) (spec §5.11)
LANDMARK_RADIUS = 0.007  # NDC radius of the debug landmark dots (spec §5.10)
N_LANDMARKS = 68

_INPUT_KEYS = ("intrinsics", "expression", "flame_pose", "cam_pose")


def deformed_normals(cols: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """normalize(J^{-T} n) from the Jacobian's columns (spec §5.8).

    cols [3, ..., 3]: cols[k] = d x_d / d x_k (column k of J); normals [..., 3] (broadcast) -> [..., 3].

    With columns j0, j1, j2, J^{-1} has rows (j1 x j2, j2 x j0, j0 x j1) / det J, so
    J^{-T} n = (n0 j1 x j2 + n1 j2 x j0 + n2 j0 x j1) / det J. Only the sign of det J survives the
    normalisation, so it is applied as a sign: no 3x3 inverse, and a singular J gives a zero normal
    instead of inf/nan.
    """
    j0, j1, j2 = cols.unbind(0)
    c12 = torch.linalg.cross(j1, j2, dim=-1)
    c20 = torch.linalg.cross(j2, j0, dim=-1)
    c01 = torch.linalg.cross(j0, j1, dim=-1)
    n0, n1, n2 = normals.unbind(-1)
    v = n0.unsqueeze(-1) * c12 + n1.unsqueeze(-1) * c20 + n2.unsqueeze(-1) * c01
    det = (j0 * c12).sum(dim=-1, keepdim=True)
    return F.normalize(v * torch.sign(det).detach(), dim=-1)


def checkpointed_chunks(fn, chunk: int, per_point: tuple[torch.Tensor, ...], *shared) -> list:
    """``fn(*rows, *shared)`` for each chunk of ``chunk`` rows of the ``per_point`` tensors, under
    ``torch.utils.checkpoint``: each chunk's activations are recomputed in its backward instead of kept.
    Nothing random may run inside ``fn`` (the RNG state is not replayed)."""
    return [
        torch.utils.checkpoint.checkpoint(
            fn,
            *(t[start : start + chunk] for t in per_point),
            *shared,
            use_reentrant=False,
            preserve_rng_state=False,
        )
        for start in range(0, per_point[0].shape[0], chunk)
    ]


def joined_sdf_gradients(sdfs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Chunks' SDF gradients, each [its points; its jittered samples], as one [all points; all samples]
    (``sdfs``: the chunks' SDF values, one row a point)."""
    halves = [g[: s.shape[0]] for s, g in zip(sdfs, grads, strict=True)]
    halves += [g[s.shape[0] :] for s, g in zip(sdfs, grads, strict=True)]
    return torch.cat(halves, dim=0)


# model.geometry_backward / deformer_backward "auto" by the GPU's memory, at 409,600 points on an H200
# (benchmarks/RESULTS.md, steps 8, 11 and 13): both "autograd" on GPUs of LEAN_BELOW_GIB and more, and on
# smaller ones where the deformer's products run in bf16 (model.deformer_bf16 on a GPU with bf16 tensor
# cores); else the geometry's "fused_recompute" with the deformer's "fused_bf16" (103.5 ms, 10.4 GiB).
# With "autograd": from LEAN_BELOW_GIB up all activations kept (the fastest: 71.1 ms, 34.2 GiB); below it
# the compiled pieces partitioned under an activation memory budget of BUDGET_BELOW_LEAN
# (model.activation_memory_budget "auto": 75.4 ms, 13.7 GiB), and below GEOMETRY_CHUNK_BELOW_GIB the
# geometry recomputed by chunks of GEOMETRY_CHUNK points as well (model.geometry_recompute_chunk "auto":
# 89.5 ms, 5.5 GiB; 20 GB cards, which the VGG loss and the training images also use).
LEAN_BELOW_GIB = 44.0
BUDGET_BELOW_LEAN = 0.3
GEOMETRY_CHUNK_BELOW_GIB = 22.0
GEOMETRY_CHUNK = 131072
# model.prior_query_chunk "auto" where a lean backward applies: the prior's query by chunks of this many
# points, recomputed in the backward (2.0 GiB less at 409,600 points; one pass is 4 ms faster there).
PRIOR_CHUNK_LEAN = 65536


def gpu_memory_gib(device: torch.device) -> float:
    """Total memory of a CUDA device, GiB."""
    return torch.cuda.get_device_properties(device).total_memory / 2**30


# Whether this torch can tell torch.compile the size to tune for (model.compile_size_hint).
HINT_OVERRIDE = "hint_override" in inspect.signature(torch._dynamo.mark_dynamic).parameters


def mark_point_dims(args: tuple, point_dims: tuple[int | None, ...], hint: int) -> None:
    """Marks each argument's point dimension (``point_dims``, aligned with ``args``) dynamic with ``hint``
    as the size torch.compile tunes the kernels for (``model.compile_size_hint``). No-op for hint 0 or
    on torch builds without ``hint_override`` (added in torch 2.9)."""
    if hint <= 0 or not HINT_OVERRIDE or not point_dims:
        return
    n = args[0].shape[point_dims[0]]
    for arg, dim in zip(args, point_dims, strict=False):
        if dim is None:
            continue
        if arg.shape[dim] != n:
            raise ValueError(
                f"point dimension {dim} of a {tuple(arg.shape)} argument is not the point count {n}"
            )
        torch._dynamo.mark_dynamic(arg, dim, hint_override=hint)


def _bf16_pays(device: torch.device) -> bool:
    """Whether bf16 products pay on ``device``: on the CPU (tests) and on GPUs with bf16 tensor cores
    (compute capability 8.0, Ampere, and later)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8


class PointAvatar(nn.Module):
    """Deformable point-based head avatar (spec §5): the forward pass only, no training state.

    Args:
        conf: the ``model`` block; each submodule gets its own part of it.
        shape_params: [1, 100] subject FLAME identity, baked into the template.
        canonical_expression: [1, 50] canonical FLAME expression (mean training expression or zeros).
        canonical_pose: canonical jaw opening (radians, spec §4.6; ``dataset.canonical_pose``).
        img_res: square image size H = W in pixels (an int, or [H, W] with H = W).
        use_background: learn a per-pixel background colour instead of white
            (``dataset.use_background``).

    Submodules, registered in the order of spec Appendix A: ``FLAMEServer``, ``geometry_network``,
    ``deformer_network`` (holding ``FLAMEServer`` again), ``rendering_network``, ``pc`` and, with
    ``use_background``, the Parameter ``background`` [H*W, 3].

    The point cloud ``pc`` holds the points and the raster radius ``pc.radius`` (float, NDC) that the
    forward renders with; the trainer's point schedule changes both, and checkpoints store the radius
    beside the state dict.
    """

    def __init__(
        self,
        conf: ModelConf,
        shape_params: torch.Tensor,
        canonical_expression: torch.Tensor,
        canonical_pose: float,
        img_res: int | list[int] | tuple[int, int],
        use_background: bool,
    ):
        super().__init__()
        if not isinstance(img_res, int):
            res = [int(r) for r in img_res]
            if len(res) != 2 or res[0] != res[1]:
                raise ValueError(f"PointAvatar renders square images; img_res {list(img_res)} is not [S, S]")
            img_res = res[0]
        self.img_res = int(img_res)
        self.render_backend = conf.render_backend
        self.implementation = conf.implementation
        self.recompute_chunk = int(conf.recompute_chunk)
        self.prior_query_chunk = conf.prior_query_chunk  # "auto" or an int (``prior_chunk``)
        self.geometry_recompute_chunk = conf.geometry_recompute_chunk  # "auto" or an int (``geometry_chunk``)
        self.activation_memory_budget = conf.activation_memory_budget  # "auto" or a float (``memory_budget``)
        self.compile_size_hint = conf.compile_size_hint  # "auto" or a point count (``size_hint``)
        self.compile_prior_query = bool(conf.compile_prior_query)
        self.geometry_bf16 = bool(conf.geometry_bf16)
        self.deformer_bf16 = bool(conf.deformer_bf16)
        # "auto" resolves per device (``backwards``): the fastest on large GPUs, the lean ones below.
        self.geometry_backward = conf.geometry_backward
        self.deformer_backward = conf.deformer_backward
        self._compiled = {}  # torch.compile'd fast-path pieces, built on the first fast CUDA forward
        self._compile_failed = False
        # What the fast path compiles on CUDA: "all" (the geometry, deformer and colour pieces, three
        # graphs; fastest on the H200, benchmarks/RESULTS.md), "per_point" (geometry and deformer),
        # "geometry" (the geometry piece only) or "none". Benchmarks set it.
        self.compile_scope = "all"
        # How the fast path's FLAME algebra contracts its small per-point dimensions: "einsum" (batched
        # matrix products), "pointwise" (products and sums that torch.compile fuses; same values) or
        # "auto": pointwise where the deformer piece is compiled (15 % off the H200 step at 409,600
        # points, with compile_scope "all"), einsum where it runs eagerly (pointwise would materialise
        # every product).
        self.deform_contractions = "auto"
        self.inverse_skinning = conf.inverse_skinning  # "closed_form" or "lu" (deform_explicit)
        # torch.compile's mode for the fast-path pieces: None (default) or e.g.
        # "max-autotune-no-cudagraphs" (Triton matmul templates with fused epilogues; long compiles).
        # Benchmarks set it (bench_train.py --compile-mode); not measured yet.
        self.compile_mode: str | None = None
        self.use_background = bool(use_background)

        self.FLAMEServer = FLAME(
            conf.flame_model_path,
            conf.flame_landmark_path or None,
            n_shape=100,
            n_exp=50,
            shape_params=shape_params,
            canonical_expression=canonical_expression,
            canonical_pose=canonical_pose,
            ghostbone=conf.deformer_network.ghostbone,
        )
        self.geometry_network = GeometryNetwork(conf.geometry_network)
        self.deformer_network = ForwardDeformer(conf.deformer_network, self.FLAMEServer)
        self.rendering_network = RenderingNetwork(conf.rendering_network)
        self.pc = PointCloud(conf.point_cloud)
        if self.use_background:
            self.background = nn.Parameter(torch.zeros(self.img_res * self.img_res, 3))

    # ------------------------------------------------------------------ pieces of the forward pass

    def uses_fast_path(self, device: torch.device) -> bool:
        """Whether the forward takes the fast path (``model.implementation``) on ``device``."""
        return self.implementation == "fast" or (self.implementation == "auto" and device.type == "cuda")

    def _nearest_neighbor(self, query: torch.Tensor, ref: torch.Tensor):
        if self.uses_fast_path(query.device):
            return nearest_neighbor_fast(query, ref)
        return nearest_neighbor(query, ref)

    @property
    def compile_fell_back(self) -> bool:
        """Whether a torch.compile of the fast path failed (a piece here, or the fused passes) and its eager
        code runs instead."""
        return self._compile_failed or bool(geometry_fused._COMPILE_FAILED)

    def _compiles(self, device: torch.device) -> bool:
        """Whether ``_compiled_call`` compiles on ``device`` (CUDA only; tests may say otherwise)."""
        return device.type == "cuda" and not self._compile_failed

    def size_hint(self) -> int:
        """``compile_size_hint`` as it applies: "auto" is half of the cloud's ``max_points``; 0 = none."""
        if self.compile_size_hint == "auto":
            return int(self.pc.max_points) // 2
        return int(self.compile_size_hint)

    def _compiled_call(self, name: str, fn, *args, point_dims: tuple[int | None, ...] = ()):
        """``fn(*args)``, on CUDA compiled once with ``torch.compile`` (dynamic point count), which the
        double-backward reference cannot be. If the first, compiling call fails, the fast path runs
        eagerly from then on, with a message. Later calls are not guarded: an exception there is
        real (or belongs to ``torch.utils.checkpoint``'s recomputation, which must see it).

        ``point_dims``: for each of ``args`` its point dimension (None: it has none), marked dynamic
        with ``size_hint`` as the size inductor generates the kernels for (``compile_size_hint``).
        Every argument with a point dimension must be named: sizes of one symbol must agree.

        Parameters and views among ``args`` are passed as copies (differentiable, N x 3 for the
        points): torch.compile keeps a Parameter's shape static (``force_parameter_static_shapes``)
        and guards on a view's base size, so either would recompile when the cloud is pruned or
        grows (measured: a 70-s recompile in the first epoch over one recomputation chunk)."""
        if not self._compiles(args[0].device):
            return fn(*args)
        args = tuple(
            a.clone()
            if isinstance(a, torch.Tensor) and (isinstance(a, nn.Parameter) or a._base is not None)
            else a
            for a in args
        )
        mark_point_dims(args, point_dims, self.size_hint())
        compiled = self._compiled.get(name)
        if compiled is not None:
            with self._compile_settings(args[0].device):  # a recompile (new guard) sees the same budget
                return compiled(*args)
        compiled = torch.compile(fn, dynamic=True, mode=self.compile_mode)
        try:
            with self._compile_settings(args[0].device):
                result = compiled(*args)
        except Exception as exc:  # a compiler problem must not stop training: the eager code is exact
            self._compile_failed = True
            warnings.warn(
                f"torch.compile of the fast path failed ({type(exc).__name__}: {exc}); running it eagerly",
                stacklevel=2,
            )
            return fn(*args)
        self._compiled[name] = compiled
        return result

    @contextmanager
    def _compile_settings(self, device: torch.device):
        """The context the compiled pieces are compiled in: ``memory_budget`` for the partitioner, which
        decides what each piece's forward keeps for its backward, and floats compiled as constants
        (``geometry_fused.constant_floats``)."""
        with functorch_config.patch(activation_memory_budget=self.memory_budget(device)), constant_floats():
            yield

    def backwards(self, device: torch.device) -> tuple[str, str]:
        """``geometry_backward`` and ``deformer_backward`` as they apply on ``device``, "auto" resolved by
        ``auto_backwards``."""
        geometry, deformer = self.geometry_backward, self.deformer_backward
        if "auto" in (geometry, deformer):
            (auto_geometry, auto_deformer), _ = self.auto_backwards(device)
            geometry = auto_geometry if geometry == "auto" else geometry
            deformer = auto_deformer if deformer == "auto" else deformer
        return geometry, deformer

    def auto_backwards(self, device: torch.device) -> tuple[tuple[str, str], str]:
        """What "auto" is on ``device`` for (geometry_backward, deformer_backward), and why: "autograd" for
        both off CUDA, on a GPU with at least ``LEAN_BELOW_GIB`` of memory, and on a smaller one where the
        deformer's products run in bf16 (there with ``memory_budget`` and ``geometry_chunk`` keeping less);
        else the lean pair, "fused_recompute" and "fused_bf16"."""
        fastest = ("autograd", "autograd")
        if device.type != "cuda":
            return fastest, "not a GPU"
        gib = gpu_memory_gib(device)
        gpu = f"a {gib:.1f} GiB GPU"
        if gib >= LEAN_BELOW_GIB:
            return fastest, f"{gpu}, at least {LEAN_BELOW_GIB:g} GiB"
        if not (self.deformer_bf16 and _bf16_pays(device)):
            lean = ("fused_recompute", "fused_bf16")
            return lean, f"{gpu}, below {LEAN_BELOW_GIB:g} GiB, deformer products in fp32"
        return fastest, f"{gpu}, below {LEAN_BELOW_GIB:g} GiB"

    def _small_gpu(self, device: torch.device, below_gib: float) -> bool:
        """Whether ``device`` is a GPU of less than ``below_gib`` and both backwards are "autograd" there (the
        tiers of ``memory_budget`` and ``geometry_chunk``)."""
        return (
            device.type == "cuda"
            and gpu_memory_gib(device) < below_gib
            and self.backwards(device) == ("autograd", "autograd")
        )

    def memory_budget(self, device: torch.device) -> float:
        """``activation_memory_budget`` as it applies on ``device``: "auto" is ``BUDGET_BELOW_LEAN`` on a GPU
        below ``LEAN_BELOW_GIB`` with both backwards "autograd" (13.7 GiB at 409,600 points on an H200,
        34.2 GiB at 1.0), 1.0 (what the partitioner chooses: the fastest) otherwise."""
        if self.activation_memory_budget != "auto":
            return float(self.activation_memory_budget)
        return BUDGET_BELOW_LEAN if self._small_gpu(device, LEAN_BELOW_GIB) else 1.0

    def geometry_chunk(self, device: torch.device) -> int:
        """``geometry_recompute_chunk`` as it applies on ``device`` (geometry backward "autograd" only):
        "auto" is ``GEOMETRY_CHUNK`` on a GPU below ``GEOMETRY_CHUNK_BELOW_GIB`` with both backwards
        "autograd" (its activations recomputed: 5.5 GiB a step at 409,600 points, 13.7 without), 0 (one
        pass, the faster) otherwise."""
        if self.backwards(device)[0] != "autograd":
            return 0
        if self.geometry_recompute_chunk != "auto":
            return int(self.geometry_recompute_chunk)
        return GEOMETRY_CHUNK if self._small_gpu(device, GEOMETRY_CHUNK_BELOW_GIB) else 0

    def prior_chunk(self, device: torch.device) -> int:
        """``prior_query_chunk`` as it applies on ``device``: "auto" is 65536 (its activations
        recomputed, 2.0 GiB less at 409,600 points) where a lean backward applies, 0 (one pass, the
        faster) otherwise."""
        if self.prior_query_chunk != "auto":
            return int(self.prior_query_chunk)
        return PRIOR_CHUNK_LEAN if self.backwards(device) != ("autograd", "autograd") else 0

    def _geometry_fast(
        self, points: torch.Tensor, jittered: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_geometry_piece``, compiled on CUDA unless ``compile_scope`` is "none"; in training by
        chunks of ``geometry_chunk`` points recomputed in the backward where that is not 0."""
        if self.backwards(points.device)[0] != "autograd":
            # The fused geometry compiles its own forward and backward passes (geometry_fused.py).
            return self._geometry_piece(points, jittered)
        if self.compile_scope == "none":
            run = self._geometry_piece
        else:
            run = partial(self._compiled_call, "geometry", self._geometry_piece, point_dims=(0, 0))
        chunk = self.geometry_chunk(points.device)
        if chunk <= 0 or not torch.is_grad_enabled() or points.shape[0] <= chunk:
            return run(points, jittered)
        parts = checkpointed_chunks(run, chunk, (points, jittered))
        normals_c, albedo, sdf = (torch.cat([p[i] for p in parts], dim=0) for i in range(3))
        return normals_c, albedo, sdf, joined_sdf_gradients([p[2] for p in parts], [p[3] for p in parts])

    def _geometry_piece(
        self, points: torch.Tensor, jittered: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Canonical geometry of c points (fast path): the explicit SDF sweep at the points and at
        their eikonal samples -> (normals n_c [c, 3], albedo [c, 3], sdf [c], grad [2c, 3])."""
        c = points.shape[0]
        y = torch.cat([points.detach(), jittered], dim=0)
        geometry_backward = self.backwards(y.device)[0]
        if geometry_backward != "autograd":  # "fused" or "fused_recompute"
            # model.geometry_bf16: the products' operands and the kept activations in bf16.
            # Like autocast, it rounds float32 only (float64 tests stay exact).
            bf16 = torch.bfloat16 if self._geometry_in_bf16(y.device) and y.dtype == torch.float32 else None
            compiled = self._compiles(y.device) and self.compile_scope != "none"
            out, grad = forward_with_gradient_fused(
                self.geometry_network,
                y,
                save_dtype=bf16,
                mm_dtype=bf16,
                compiled=compiled,
                recompute_sweep=geometry_backward == "fused_recompute",
            )
        else:
            # model.geometry_bf16: bf16 matmuls with fp32 accumulation; outputs back in y's dtype.
            bf16 = self._geometry_in_bf16(y.device)
            with torch.autocast(device_type=y.device.type, dtype=torch.bfloat16, enabled=bf16):
                out, grad = self.geometry_network.forward_with_gradient_explicit(y)
            out, grad = out.to(y.dtype), grad.to(y.dtype)  # no-ops in full precision
        normals_c = F.normalize(grad[:c], dim=-1)
        albedo = torch.sigmoid(ALBEDO_SCALE * out[:c, 1:4])
        return normals_c, albedo, out[:c, 0], grad

    def _geometry_in_bf16(self, device: torch.device) -> bool:
        """``model.geometry_bf16`` where it pays: on the CPU (tests) and on GPUs with bf16 tensor cores
        (compute capability 8.0, Ampere, and later); older GPUs keep the geometry in fp32."""
        return self.geometry_bf16 and _bf16_pays(device)

    def _deformer_mm_dtype(self, points: torch.Tensor) -> torch.dtype | None:
        """bf16 for the deformer network's products under ``model.deformer_bf16`` (float32 points only,
        where bf16 pays: as ``_geometry_in_bf16``), else None."""
        if self.deformer_bf16 and points.dtype == torch.float32 and _bf16_pays(points.device):
            return torch.bfloat16
        return None

    def _deform_fast(
        self,
        points: torch.Tensor,
        betas: torch.Tensor,
        transformations: torch.Tensor,
        pose_feature: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Deformed points and Jacobian columns (fast path): ``_deform_piece``, compiled with
        ``compile_scope`` "per_point" or "all"; with ``model.deformer_backward = "fused"`` the deformer's
        Softplus layers run first as fused nodes that compile their own passes (deform_fused.py) and
        the blendshape head and FLAME algebra are the compiled piece."""
        frame = (betas, transformations, pose_feature)
        compiled = self._compiles_deformer(points.device)
        deformer_backward = self.backwards(points.device)[1]
        if deformer_backward == "autograd":
            if compiled:
                return self._compiled_call("deform", self._deform_piece, points, *frame, point_dims=(0,))
            return self._deform_piece(points, *frame)
        bf16 = deformer_backward == "fused_bf16" and points.dtype == torch.float32
        kept = {"save_dtype": torch.bfloat16 if bf16 else None, "compiled": compiled}
        h, t = trunk_with_tangents_fused(self.deformer_network, points, **kept)
        weights, t_weights = skinning_with_tangents_fused(self.deformer_network, h, t, **kept)
        fields = (h, t, weights, t_weights)
        if compiled:
            dims = (0, 0, 1, 0, 1)  # points, h [c, D], t [3, c, D], weights [c, J], t_weights [3, c, J]
            return self._compiled_call("flame", self._flame_piece, points, *fields, *frame, point_dims=dims)
        return self._flame_piece(points, *fields, *frame)

    def _compiles_deformer(self, device: torch.device) -> bool:
        """Whether the deformer's piece is compiled on ``device`` (``compile_scope`` "per_point" or "all")."""
        return self._compiles(device) and self.compile_scope in ("per_point", "all")

    def _contractions(self, device: torch.device) -> str:
        """``deform_contractions`` resolved: "auto" is pointwise where the piece is compiled."""
        if self.deform_contractions != "auto":
            return self.deform_contractions
        return "pointwise" if self._compiles_deformer(device) else "einsum"

    def _flame_piece(self, points, h, t, weights, t_weights, betas, transformations, pose_feature):
        """The blendshape head and FLAME's forward_pts with tangents (``deformer_backward`` "fused")."""
        return flame_with_tangents(
            self.deformer_network,
            self.FLAMEServer,
            points,
            (h, t, weights, t_weights),
            betas,
            transformations,
            pose_feature,
            contractions=self._contractions(points.device),
            inverse=self.inverse_skinning,
        )

    def _deform_piece(
        self,
        points: torch.Tensor,
        betas: torch.Tensor,
        transformations: torch.Tensor,
        pose_feature: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Deformed points and Jacobian columns of c points (fast path, explicit tangents)."""
        return deform_with_jacobian_explicit(
            self.deformer_network,
            self.FLAMEServer,
            points,
            betas,
            transformations,
            pose_feature,
            contractions=self._contractions(points.device),
            inverse=self.inverse_skinning,
            mm_dtype=self._deformer_mm_dtype(points),
        )

    def _per_point_fast(
        self,
        points: torch.Tensor,
        jittered: torch.Tensor,
        betas: torch.Tensor,
        transformations: torch.Tensor,
        pose_feature: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything of the training forward that is per point, for a chunk of c points (fast path).

        points [c, 3] (differentiable), jittered [c, 3] eikonal samples, frame tensors as
        ``deform_with_jacobian`` -> (x_d [B, c, 3], color [B, c, 3], sdf [c], grad [2c, 3] (SDF
        gradients at the points, then at the jittered samples)).

        On CUDA the geometry piece and, with ``compile_scope`` "per_point" or "all", the deformer
        piece (and with "all" the colour piece) are compiled with ``torch.compile`` (dynamic point
        count), as separate graphs: as one graph, the compiled backward specialised on the point count
        (torch 2.11), so every prune recompiled (about 40 s each on the H200 machine's CPU).

        Points are independent of each other here, so chunks of points can be recomputed in the
        backward instead of stored (``model.recompute_chunk``).
        """
        normals_c, albedo, sdf, grad = self._geometry_fast(points, jittered)
        x_d, cols = self._deform_fast(points, betas, transformations, pose_feature)
        if self.compile_scope == "all":
            dims = (2, 0, 0)  # cols [3, B, c, 3], normals_c and albedo [c, 3]
            color = self._compiled_call(
                "colour", self._colour_piece, cols, normals_c, albedo, point_dims=dims
            )
        else:
            color = self._colour_piece(cols, normals_c, albedo)
        return x_d, color, sdf, grad

    def _colour_piece(
        self, cols: torch.Tensor, normals_c: torch.Tensor, albedo: torch.Tensor
    ) -> torch.Tensor:
        """Colour of c points in B frames (fast path training; the normals and shading are not kept)."""
        return self._shade(cols, normals_c, albedo)[2]

    def _shade(
        self, cols: torch.Tensor, normals_c: torch.Tensor, albedo: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Jacobian columns [3, B, N, 3], canonical normals [N, 3], albedo [N, 3] -> deformed normals,
        shading and colour [B, N, 3] (spec §5.8-5.9)."""
        normals_d = deformed_normals(cols, normals_c)
        b, n = normals_d.shape[0], normals_d.shape[1]
        shading = self.rendering_network(normals_d.reshape(-1, 3)).reshape(b, n, 3)
        return normals_d, shading, torch.clamp(2.0 * shading * albedo, 0.0, 1.0)

    def _prior_query(
        self, points: torch.Tensor, fast: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``deformer_network.query_weights`` at detached points for the FLAME prior. On the fast path in
        training it runs on chunks of ``prior_chunk`` points (0: all at once) under
        ``torch.utils.checkpoint``: its activations (5.2 KB a point kept without it, 2.0 GiB at 409,600
        points; benchmarks/RESULTS.md, step 5) are recomputed in the backward, one chunk at a time, and
        with ``compile_prior_query`` each chunk is a compiled call. Same values and gradients."""
        query = self.deformer_network.query_weights
        if not (fast and self.training and torch.is_grad_enabled()):
            return query(points)
        if self.compile_prior_query:
            query = partial(
                self._compiled_call, "prior", self.deformer_network.query_weights, point_dims=(0,)
            )
        chunk = self.prior_chunk(points.device)
        if chunk <= 0:
            return query(points)
        parts = checkpointed_chunks(query, chunk, (points,))
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))

    def _per_point_fast_chunked(
        self,
        points: torch.Tensor,
        betas: torch.Tensor,
        transformations: torch.Tensor,
        pose_feature: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_per_point_fast`` over all points, by chunks of ``recompute_chunk`` points whose
        activations are recomputed in the backward (``torch.utils.checkpoint``) instead of stored;
        one pass without recomputation when ``recompute_chunk`` is 0. Same values and gradients
        either way (the eikonal jitter is drawn once, outside the chunks)."""
        x = points.detach()
        jittered = x + (torch.rand_like(x) - 0.5) * EIKONAL_JITTER
        chunk = self.recompute_chunk
        if chunk <= 0 or not torch.is_grad_enabled():
            x_d, color, sdf, grad = self._per_point_fast(
                points, jittered, betas, transformations, pose_feature
            )
            return x_d, color, sdf, grad
        parts = checkpointed_chunks(
            self._per_point_fast, chunk, (points, jittered), betas, transformations, pose_feature
        )
        x_d = torch.cat([p[0] for p in parts], dim=1)
        color = torch.cat([p[1] for p in parts], dim=1)
        sdf = torch.cat([p[2] for p in parts], dim=0)
        return x_d, color, sdf, joined_sdf_gradients([p[2] for p in parts], [p[3] for p in parts])

    def canonical_geometry(
        self, points: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Canonical normals, sdf and albedo (spec §5.6). Points receive no gradient from these.

        points [N, 3] -> (normals n_c [N, 3] unit, sdf [N], albedo [N, 3] in (0, 1),
        grad_thetas [2N, 3]: sdf gradients at x and at x jittered by U(-0.25, 0.25) per axis).

        The sdf and albedo at x come from the same pass as the gradients (the original runs a
        second forward at x; the values and their gradients w.r.t. the weights are identical).
        In eval mode all four are detached.
        """
        x = points.detach()
        n = x.shape[0]
        jittered = x + (torch.rand_like(x) - 0.5) * EIKONAL_JITTER
        # The second-order graph only serves training (eikonal, normals -> geometry weights); eval
        # (incl. test-time tracking, which optimises the inputs only) skips it to save memory.
        create_graph = self.training and torch.is_grad_enabled()
        if create_graph and self.uses_fast_path(x.device):
            # Same values and weight gradients, first-order autograd only (no double backward).
            normals, albedo, sdf, grad = self._geometry_fast(points, jittered)
            return normals, sdf, albedo, grad
        y = torch.cat([x, jittered], dim=0)  # [2N, 3]
        out, grad = self.geometry_network.forward_with_gradient(y, create_graph=create_graph)
        normals = F.normalize(grad[:n], dim=-1)
        sdf = out[:n, 0]
        albedo = torch.sigmoid(ALBEDO_SCALE * out[:n, 1:4])
        return normals, sdf, albedo, grad

    def _deform_fn(self, betas: torch.Tensor, transformations: torch.Tensor, pose_feature: torch.Tensor):
        """x [N, 3] -> x_d [B, N, 3]: deformer query, x' = x + o, then FLAME's forward_pts (§5.7)."""

        def deform(x: torch.Tensor) -> torch.Tensor:
            shapedirs, posedirs, lbs_weights, x_flame = self.deformer_network.query_weights(x)
            return self.FLAMEServer.forward_pts(
                x_flame, betas, transformations, pose_feature, shapedirs, posedirs, lbs_weights
            )

        return deform

    def deform_with_jacobian(
        self,
        points: torch.Tensor,
        betas: torch.Tensor,
        transformations: torch.Tensor,
        pose_feature: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Deformed points and the columns of J = d x_d / d x (spec §5.7-5.8).

        points [N, 3] (x_c), betas [B, E], transformations [B, J, 4, 4], pose_feature [B, 36] ->
        (x_d [B, N, 3], cols [3, B, N, 3] with cols[k] = d x_d / d x_k).

        Points are independent, so column k of every point's J is one forward-mode JVP of the whole
        point set with the tangent e_k at every point; the three JVPs are vmapped, so the deformer
        MLP runs once for the primal and once (batched over 3) for the tangents, and x_d comes from
        the same pass. Forward-mode AD works under ``torch.no_grad``; with grad enabled both outputs
        stay differentiable (points, deformer weights, FLAME inputs).
        """
        deform = self._deform_fn(betas, transformations, pose_feature)
        eye = torch.eye(3, dtype=points.dtype, device=points.device)
        tangents = eye[:, None, :].expand(3, points.shape[0], 3)  # [3, N, 3]

        def jvp(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.func.jvp(deform, (points,), (t,))

        with warnings.catch_warnings():
            # PyTorch's own forward-AD set-up scripts decompositions with torch.jit on first use and
            # warns about it; nothing a user can act on.
            warnings.filterwarnings(
                "ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning
            )
            x_d, cols = torch.func.vmap(jvp, in_dims=0, out_dims=(None, 0))(tangents)
        return x_d, cols

    def _composite(
        self, points_world: torch.Tensor, features: torch.Tensor, input: dict, radius: float, k: int
    ) -> tuple[torch.Tensor, PointFragments, torch.Tensor]:
        """Project, rasterize and composite: -> (images [B, H, W, C], fragments, weights [B, H, W, K])."""
        ndc = project_points(points_world, input["intrinsics"], input["cam_pose"])
        fragments = rasterize_points(
            ndc, self.img_res, radius, points_per_pixel=k, backend=self.render_backend
        )
        images, weights = alpha_composite(fragments, features, radius, backend=self.render_backend)
        return images, fragments, weights

    def background_rgb(self) -> torch.Tensor | float:
        """[P, 3] learned background in (0, 1), or 1.0 (white)."""
        if self.use_background:
            return torch.sigmoid(BACKGROUND_SCALE * self.background)
        return 1.0

    # ------------------------------------------------------------------ forward

    def forward(self, input: dict) -> PointAvatarOutputs:
        """Render B frames.

        input: intrinsics [B, 4, 4], cam_pose [B, 3, 4] (converted cameras, spec §3.5),
        expression [B, >=num_exp], flame_pose [B, 15] (other keys are ignored).

        Returns the fields of `PointAvatarOutputs` (shapes there). In training mode ``index_batch``,
        ``fragment_idx`` and ``fragment_weights`` are set and ``eval`` is None; in eval mode the
        reverse, with ``eval`` holding the debug images, per-point exports and (when the FLAME landmark
        file was given) the landmark overlay.
        """
        missing = [k for k in _INPUT_KEYS if k not in input]
        if missing:
            raise KeyError(f"PointAvatar.forward: input dict lacks {missing}")
        flame = self.FLAMEServer
        expression = input["expression"]
        flame_pose = input["flame_pose"]
        b = expression.shape[0]
        num_exp = self.deformer_network.num_exp
        betas = expression[:, :num_exp]

        verts, pose_feature, transformations = flame(expression, flame_pose)

        points = self.pc.points  # [N, 3], not detached: positions get gradients via x_d and n_d
        fast = self.uses_fast_path(points.device)
        if fast and self.training and torch.is_grad_enabled():
            # Same values and gradients, first-order autograd only: explicit SDF sweep (no double
            # backward) and explicit deformer Jacobian, optionally recomputed by chunks of points.
            x_d, color, sdf, grad_thetas = self._per_point_fast_chunked(
                points, betas, transformations, pose_feature
            )
            normals_d = shading = albedo = None  # eval-only exports
        else:
            normals_c, sdf, albedo, grad_thetas = self.canonical_geometry(points)
            if fast:
                # The same Jacobian columns with the three tangents propagated by hand (no vmap/JVP).
                x_d, cols = deform_with_jacobian_explicit(
                    self.deformer_network, self.FLAMEServer, points, betas, transformations, pose_feature
                )
            else:
                x_d, cols = self.deform_with_jacobian(points, betas, transformations, pose_feature)
            normals_d, shading, color = self._shade(cols, normals_c, albedo)  # [B, N, 3] each
            del cols

        ones = torch.ones_like(color[..., :1])
        if self.training:
            features = torch.cat([color, ones], dim=-1)  # [B, N, 4]
        else:
            features = torch.cat(
                [color, ones, (normals_d + 1.0) / 2.0, shading, albedo.expand(b, -1, -1)], dim=-1
            )  # [B, N, 13]
        images, fragments, weights = self._composite(x_d, features, input, self.pc.radius, POINTS_PER_PIXEL)
        # The fragments feed the visibility bookkeeping of the point schedule (training only).
        fragment_idx = fragments.idx.detach() if self.training else None
        fragment_weights = weights.detach() if self.training else None
        del fragments, weights
        images = images.reshape(b, -1, features.shape[-1])  # [B, P, C]
        mask = images[..., 3]
        white_weight = (1.0 - mask).unsqueeze(-1)
        bg = self.background_rgb()
        rgb = images[..., :3] + white_weight * bg

        # Second deformer query on detached points: the FLAME prior trains the deformer only (§5.13).
        shapedirs, posedirs, lbs_weights, canonical_points = self._prior_query(points.detach(), fast)
        # The 1-NN only feeds the FLAME prior of the training loss; at N = 409,600 it costs as much as
        # rendering, so eval (renders, test-time tracking) skips it.
        index_batch = (
            self._nearest_neighbor(canonical_points.detach(), flame.canonical_verts)[0]
            if self.training
            else None
        )

        eval_outputs = None
        if not self.training:
            landmarks = landmarks_alpha = None
            if flame.has_landmarks:
                landmarks_alpha = self._render_landmarks(verts, flame_pose, input)
                landmarks = landmarks_alpha.unsqueeze(-1).expand(-1, -1, 3)
            eval_outputs = EvalOutputs(
                normal_image=images[..., 4:7] + white_weight,
                shading_image=images[..., 7:10] + white_weight,
                albedo_image=images[..., 10:13] + white_weight,
                pnts_color_deformed=color,
                pnts_normal_deformed=normals_d,
                deformed_points=x_d,
                deformed_verts=verts,
                canonical_verts=flame.canonical_verts,
                unconstrained_canonical_points=points,
                pnts_albedo=albedo,
                rendered_landmarks=landmarks,
                rendered_landmarks_alpha=landmarks_alpha,
            )
        return PointAvatarOutputs(
            img_res=self.img_res,
            rgb_image=rgb,
            predicted_mask=mask,
            canonical_points=canonical_points,
            posedirs=posedirs,
            shapedirs=shapedirs,
            lbs_weights=lbs_weights,
            sdf_values=sdf,
            grad_thetas=grad_thetas,
            index_batch=index_batch,
            fragment_idx=fragment_idx,
            fragment_weights=fragment_weights,
            eval=eval_outputs,
        )

    def _render_landmarks(self, verts: torch.Tensor, flame_pose: torch.Tensor, input: dict) -> torch.Tensor:
        """The 68 FLAME landmarks as dots (radius 0.007, K = 1; debug overlay, spec §2.10).

        Returns the dots' coverage alpha [B, P] (no gradient); plots blend
        img * (1 - alpha) + alpha * red.
        """
        with torch.no_grad():
            lmks = self.FLAMEServer.find_landmarks(verts, flame_pose)  # [B, 68, 3]
            ones = torch.ones_like(lmks[..., :1])  # [B, 68, 1]
            images, _, _ = self._composite(lmks, ones, input, LANDMARK_RADIUS, 1)
        return images.reshape(lmks.shape[0], -1)  # [B, P]
