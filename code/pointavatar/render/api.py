"""Public rasterize / composite functions with the `backend` switch (DESIGN.md "The renderer contract").

Backends:
- "torch": pure PyTorch (`_torch_impl`), any device; the reference in tests and the CPU path.
- "cuda": Triton kernels (`_triton_impl`), CUDA tensors only (or any tensor under TRITON_INTERPRET=1,
  the Triton interpreter the CPU tests use).
- "auto": "cuda" for CUDA tensors when Triton imports, else "torch". On CUDA tensors without Triton it
  warns once and falls back; on CPU tensors "torch" is the normal choice and nothing is said.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch

from ..errors import PointAvatarError
from . import _torch_impl

BACKENDS = ("auto", "torch", "cuda")

_triton_module = None
_triton_error: str | None = None
_warned_fallback = False


class BinningBudget(NamedTuple):
    """A fixed size for the "cuda" rasterizer's list of (tile, point) pairs (see `fixed_binning`)."""

    capacity: int | None  # None: allocate what is needed (the usual host read), only record it
    needed: torch.Tensor  # int64, 0-d, on the points' device: the most pairs any call asked for


_binning = threading.local()


@contextlib.contextmanager
def fixed_binning(capacity: int | None, needed: torch.Tensor) -> Iterator[BinningBudget]:
    """Inside this block the "cuda" backend's rasterizer never waits for the device.

    By default it reads the number of (tile, point) pairs back to the host to allocate them, which
    stops a CUDA graph from being captured. Here it allocates ``capacity`` pairs instead and raises
    ``needed`` (an int64 0-d tensor on the device, which the caller zeroes) to the number it needed.
    The fragments are exact when ``needed <= capacity`` after the calls; otherwise pairs were dropped
    and the caller must discard the results (and retry with a larger capacity). ``capacity=None``
    keeps the usual allocation and only records ``needed`` (to size a later budget). The "torch"
    backend ignores the budget.
    """
    if capacity is not None and capacity < 1:
        raise ValueError(f"fixed_binning: capacity must be positive, got {capacity}")
    if needed.dtype != torch.int64 or needed.dim() != 0:
        raise ValueError("fixed_binning: needed must be a 0-d int64 tensor")
    previous = getattr(_binning, "budget", None)
    _binning.budget = BinningBudget(None if capacity is None else int(capacity), needed)
    try:
        yield _binning.budget
    finally:
        _binning.budget = previous


class PointFragments(NamedTuple):
    """Per-pixel output of `rasterize_points`, all [B, H, W, K] and padded with -1 in empty slots.

    idx: int64 packed point index b * N + p. zbuf: view-space depth of the point (no gradient).
    dists: squared NDC distance from the point to the pixel centre (gradient to the point's x, y).
    Slots are ordered by ascending z, ties by ascending point index.
    """

    idx: torch.Tensor
    zbuf: torch.Tensor
    dists: torch.Tensor


def _load_triton():
    """The Triton backend module, or None (with the reason in `_triton_error`) if it cannot load."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from . import _triton_impl

            _triton_module = _triton_impl
        except Exception as exc:  # ImportError, or a broken Triton install failing in its own import
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_module


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _resolve_backend(backend: str, device: torch.device, where: str) -> str:
    global _warned_fallback
    if backend not in BACKENDS:
        raise PointAvatarError(f"{where}: backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return "torch"
    if backend == "cuda":
        if _load_triton() is None:
            raise PointAvatarError(
                f"{where}: backend='cuda' needs Triton, which failed to import ({_triton_error}). Install "
                "triton (it comes with CUDA builds of PyTorch) or use backend='torch' "
                "(conf key model.render_backend)."
            )
        if device.type != "cuda" and not _interpreting():
            raise PointAvatarError(
                f"{where}: backend='cuda' needs CUDA tensors, got tensors on {device}. Use backend='torch' "
                "or 'auto' (conf key model.render_backend)."
            )
        return "cuda"
    if device.type != "cuda":
        return "torch"
    if _load_triton() is not None:
        return "cuda"
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"pointavatar.render: Triton is not available ({_triton_error}); rendering CUDA tensors with the "
            "slower pure-PyTorch backend. Install triton to use the fast path.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


def _image_size(image_size) -> int:
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2 or int(image_size[0]) != int(image_size[1]):
            raise PointAvatarError(
                f"rasterize_points: only square images are supported (pytorch3d's NDC convention for "
                f"non-square images is not implemented), got image_size={tuple(image_size)}; pass one int."
            )
        image_size = image_size[0]
    size = int(image_size)
    if size <= 0 or size != image_size:
        raise PointAvatarError(f"rasterize_points: image_size must be a positive int, got {image_size!r}.")
    return size


def _radius_sq(radius, B: int, N: int, ref: torch.Tensor, where: str) -> torch.Tensor:
    """Squared radius per point [B, N] in `ref`'s dtype and device (no gradient: radii are not learned)."""
    if isinstance(radius, torch.Tensor):
        if radius.dim() != 0 and tuple(radius.shape) != (B, N):
            raise PointAvatarError(
                f"{where}: radius must be a float or a [B, N] = [{B}, {N}] tensor, got shape {list(radius.shape)}."
            )
    else:
        try:
            radius = float(radius)
        except (TypeError, ValueError):
            raise PointAvatarError(
                f"{where}: radius must be a float or a [B, N] tensor, got {radius!r}."
            ) from None
        if not radius > 0:
            raise PointAvatarError(f"{where}: radius must be positive, got {radius}.")
    return _torch_impl.radius_squared(radius, B, N, ref.dtype, ref.device)


def rasterize_points(
    points: torch.Tensor,
    image_size: int,
    radius: float | torch.Tensor,
    points_per_pixel: int = 10,
    backend: str = "auto",
) -> PointFragments:
    """Rasterize points as discs: per pixel the up-to-K nearest points that cover its centre.

    Args:
        points: [B, N, 3] NDC x (+x left), NDC y (+y up) and view-space depth z (pytorch3d conventions,
            spec §3.5, §5.10); float32 (float64 works with backend "torch").
        image_size: S, the side of a square S x S image (an int, or an (S, S) pair). Pixel (col c,
            row r) is centred at NDC (1 - (2c+1)/S, 1 - (2r+1)/S); row 0 is the top of the image.
        radius: NDC disc radius, a float or a [B, N] tensor of per-point radii (no gradient).
        points_per_pixel: K.
        backend: "auto" | "torch" | "cuda" (module docstring).

    Returns:
        PointFragments(idx, zbuf, dists), each [B, S, S, K], -1 padded. A point covers a pixel when
        z >= 0 and its squared distance to the pixel centre is strictly below r^2; the K covering points
        with the smallest z are kept, ascending, ties by point index. Non-finite points are skipped.
        dists carries the gradient to the points' x, y when `points` requires grad (pytorch3d's rasterizer
        backward); idx and zbuf carry none.
    """
    where = "rasterize_points"
    if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[-1] != 3:
        shape = list(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise PointAvatarError(f"{where}: points must be a [B, N, 3] tensor, got {shape}.")
    if not points.is_floating_point():
        raise PointAvatarError(f"{where}: points must be floating point, got {points.dtype}.")
    K = int(points_per_pixel)
    if K < 1 or K != points_per_pixel:
        raise PointAvatarError(f"{where}: points_per_pixel must be a positive int, got {points_per_pixel!r}.")
    size = _image_size(image_size)
    B, N, _ = points.shape
    r2 = _radius_sq(radius, B, N, points, where)
    if _resolve_backend(backend, points.device, where) == "cuda":
        budget = getattr(_binning, "budget", None)
        idx, zbuf, dists = _load_triton().rasterize_points(points, r2, size, K, budget)
    else:
        idx, zbuf, dists = _torch_impl.rasterize_points(points, r2, size, K)
    return PointFragments(idx, zbuf, dists)


def alpha_composite(
    fragments: PointFragments,
    features: torch.Tensor,
    radius: float | torch.Tensor,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back alpha compositing of point features (spec §5.11, pytorch3d's AlphaCompositor).

    Args:
        fragments: output of `rasterize_points` (idx, dists [B, H, W, K]; zbuf unused).
        features: [B, N, C] per-point features (PointAvatar: [rgb, 1] in training, 13 channels in eval).
        radius: the radius given to `rasterize_points` (a float or [B, N]); alpha = 1 - d^2 / r_p^2 with
            r_p the radius of the slot's point.
        backend: "auto" | "torch" | "cuda".

    Returns:
        images [B, H, W, C] = sum_k w_k f_k, and weights [B, H, W, K] with
        w_k = alpha_k * prod_{l<k}(1 - alpha_l); empty slots (idx -1) contribute nothing (weight 0).
        images are differentiable w.r.t. features and, through fragments.dists, point x, y; weights are
        detached. No background is added: the caller blends with (1 - accumulated alpha).
    """
    where = "alpha_composite"
    idx, dists = fragments.idx, fragments.dists
    if idx.dim() != 4 or idx.shape != dists.shape or idx.dtype != torch.int64:
        raise PointAvatarError(
            f"{where}: fragments must hold idx (int64) and dists of one shape [B, H, W, K], got "
            f"{list(idx.shape)} {idx.dtype} and {list(dists.shape)}."
        )
    if features.dim() != 3 or features.shape[0] != idx.shape[0]:
        raise PointAvatarError(
            f"{where}: features must be [B, N, C] with B = {idx.shape[0]}, got {list(features.shape)}."
        )
    B, N, _ = features.shape
    r2 = _radius_sq(radius, B, N, dists, where)
    if _resolve_backend(backend, features.device, where) == "cuda":
        return _load_triton().alpha_composite(idx, dists, features, r2)
    return _torch_impl.alpha_composite(idx, dists, features, r2)


@torch.no_grad()
def mark_visible(
    fragment_idx: torch.Tensor,
    fragment_weights: torch.Tensor,
    n_points: int,
    thresh: float,
    visible: torch.Tensor,
    backend: str = "auto",
) -> None:
    """OR into ``visible`` [n_points] (bool, in place) the front-most point of every pixel and every point
    whose compositing weight exceeds ``thresh`` in some slot (spec §2.5's visibility, before a prune).

    fragment_idx [B, H, W, K] packed b * n_points + p (-1 empty), fragment_weights [B, H, W, K] (the
    weights `alpha_composite` returns). backend: "auto" | "torch" | "cuda", as for the renderer.
    """
    where = "mark_visible"
    if fragment_idx.shape != fragment_weights.shape or fragment_idx.dim() != 4:
        raise PointAvatarError(
            f"{where}: fragment_idx and fragment_weights must share one shape [B, H, W, K], got "
            f"{list(fragment_idx.shape)} and {list(fragment_weights.shape)}."
        )
    if visible.shape != (n_points,) or visible.dtype != torch.bool or not visible.is_contiguous():
        raise PointAvatarError(
            f"{where}: visible must be a contiguous bool tensor of shape [{n_points}], got "
            f"{list(visible.shape)} {visible.dtype}."
        )
    if _resolve_backend(backend, fragment_idx.device, where) == "cuda":
        _load_triton().mark_visible(fragment_idx, fragment_weights, n_points, thresh, visible)
    else:
        _torch_impl.mark_visible(fragment_idx, fragment_weights, n_points, thresh, visible)
