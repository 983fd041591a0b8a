"""Pure-PyTorch point rasterizer and alpha compositor: the readable reference twin of `_triton_impl`.

Semantics follow pytorch3d's `rasterize_points` / `AlphaCompositor` (spec §5.10, §5.11; DESIGN.md
"The renderer contract"). NDC: +x left, +y up; pixel (col c, row r) of an S x S image is centred at
(1 - (2c+1)/S, 1 - (2r+1)/S); row 0 is the top of the image.

The discrete choice of which K points cover a pixel runs without gradient; everything after it
(distances, alphas, weights, images) is ordinary autograd, so gradients reach the point x, y through
the squared distances exactly as pytorch3d's backward sends them.

How the selection stays within memory at training sizes: every point is expanded into the pixels of its
bounding square (pairs), the pairs are tested exactly, and the hits are sorted by pixel. Points are
visited in (z, packed index) order, so inside each pixel the hits arrive already ordered and the K
nearest are simply the first K. The points are processed in chunks with a bounded number of pairs; a
later chunk only holds points later in that order, so its hits are appended behind the earlier ones.

The binning helpers below (`pixel_centres`, `pixel_bounds`, `order_points`, `expand_boxes`) are shared
with the Triton path, which bins the same way at tile granularity.
"""

from __future__ import annotations

import torch

# Pairs expanded per chunk: bounds the selection's scratch memory (about 80 bytes a pair).
_PAIRS_PER_CHUNK_CPU = 1 << 21
_PAIRS_PER_CHUNK_CUDA = 1 << 23


def pixel_centres(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """NDC coordinate of the centres of pixels 0..size-1 along one axis: 1 - (2i+1)/size. [S]

    Both backends read distances against this one table, so they compare bit-identical floats.
    """
    i = torch.arange(size, device=device, dtype=dtype)
    return 1.0 - (2.0 * i + 1.0) / size


def pixel_bounds(coord: torch.Tensor, radius: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive range [lo, hi] of pixel indices along one axis whose centre may lie within `radius`.

    coord, radius: [M] NDC (finite). Returns int64 [M] clamped to [0, size-1]; lo > hi means none.
    Centre i = 1 - (2i+1)/S is within r of c for i in ((S(1-c-r)-1)/2, (S(1-c+r)-1)/2). The radius
    is inflated slightly so that rounding here can never drop a pixel that the exact float test
    d^2 < r^2 accepts; an extra pixel costs one rejected test.
    """
    r = radius * (1.0 + 1e-4) + 1e-5
    lo = torch.floor((size * (1.0 - coord - r) - 1.0) * 0.5)
    hi = torch.ceil((size * (1.0 - coord + r) - 1.0) * 0.5)
    # Clamp in floating point first: converting far-away values to int64 directly could overflow.
    lo = lo.clamp(-1.0, float(size)).to(torch.int64).clamp_(min=0)
    hi = hi.clamp(-1.0, float(size)).to(torch.int64).clamp_(max=size - 1)
    return lo, hi


def order_points(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Packed indices of the valid points in (z, packed index) order. z, valid: [B*N] -> [M] int64."""
    ids = valid.nonzero().squeeze(1)
    # +0.0 turns -0.0 into +0.0, so comparison sorts (CPU) and radix sorts (CUDA) agree on ties.
    zs = z[ids] + 0.0
    # A stable sort keeps ascending packed index among equal depths: ties go to the lower index.
    return ids[torch.sort(zs, stable=True).indices]


def valid_points(points: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Points that can be drawn: finite, in front of the camera (z >= 0) and with r > 0. [B*N] bool."""
    flat = points.reshape(-1, 3)
    return torch.isfinite(flat).all(dim=1) & (flat[:, 2] >= 0) & (r2.reshape(-1) > 0)


def expand_boxes(
    lo_x: torch.Tensor, hi_x: torch.Tensor, lo_y: torch.Tensor, hi_y: torch.Tensor, total: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All integer cells of M boxes, box by box: (owner [T] box index, col [T], row [T]), int64.

    Boxes must be non-empty (lo <= hi). `total` (the number of cells) avoids a device sync if known.
    """
    ncol = hi_x - lo_x + 1
    ncell = ncol * (hi_y - lo_y + 1)
    if total is None:
        total = int(ncell.sum())
    owner = torch.repeat_interleave(
        torch.arange(ncell.numel(), device=ncell.device), ncell, output_size=total
    )
    first = torch.cumsum(ncell, 0) - ncell
    local = torch.arange(total, device=ncell.device) - first[owner]
    nc = ncol[owner]
    return owner, lo_x[owner] + local % nc, lo_y[owner] + local // nc


def radius_squared(radius: float | torch.Tensor, B: int, N: int, dtype, device) -> torch.Tensor:
    """r^2 per point [B, N] in the points' dtype, computed once so that every backend and the
    compositor compare and divide by the very same float."""
    if isinstance(radius, torch.Tensor):
        r = radius.detach().to(device=device, dtype=dtype)
    else:
        r = torch.full((), float(radius), device=device, dtype=dtype)  # a fill, not a host-to-device copy
    # A scalar radius stays a stride-0 view: the Triton kernels then read one value.
    return (r * r).expand(B, N)


@torch.no_grad()
def select_points(
    points: torch.Tensor, r2: torch.Tensor, size: int, K: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The discrete part of rasterization: per pixel the first K covering points in (z, index) order.

    points: [B, N, 3] NDC x, y and view z; r2: [B, N] squared radius. Returns idx [B, S, S, K] int64
    (packed b*N+p), zbuf and dists [B, S, S, K] in the points' dtype, all -1 padded.
    """
    B, N, _ = points.shape
    device, dtype = points.device, points.dtype
    P = B * size * size
    idx = torch.full((P * K,), -1, dtype=torch.int64, device=device)
    zbuf = torch.full((P * K,), -1.0, dtype=dtype, device=device)
    dists = torch.full((P * K,), -1.0, dtype=dtype, device=device)
    filled = torch.zeros(P, dtype=torch.int64, device=device)
    centres = pixel_centres(size, dtype, device)

    flat = points.reshape(-1, 3)
    r2_flat = r2.reshape(-1)
    valid = valid_points(points, r2)
    order = order_points(flat[:, 2], valid)
    if order.numel() == 0:
        return _unflatten(idx, zbuf, dists, B, size, K)

    x, y, z = flat[order, 0], flat[order, 1], flat[order, 2]
    pr2 = r2_flat[order]
    r = pr2.sqrt()
    lo_x, hi_x = pixel_bounds(x, r, size)
    lo_y, hi_y = pixel_bounds(y, r, size)
    keep = (lo_x <= hi_x) & (lo_y <= hi_y)
    order, x, y, z, pr2 = order[keep], x[keep], y[keep], z[keep], pr2[keep]
    lo_x, hi_x, lo_y, hi_y = lo_x[keep], hi_x[keep], lo_y[keep], hi_y[keep]
    if order.numel() == 0:
        return _unflatten(idx, zbuf, dists, B, size, K)
    batch = order // N

    ncell = (hi_x - lo_x + 1) * (hi_y - lo_y + 1)
    budget = _PAIRS_PER_CHUNK_CUDA if device.type == "cuda" else _PAIRS_PER_CHUNK_CPU
    # Chunk boundaries on the host: one transfer of the running pair count.
    running = torch.cumsum(ncell, 0).cpu()
    start, M = 0, order.numel()
    while start < M:
        base = int(running[start - 1]) if start > 0 else 0
        stop = max(int(torch.searchsorted(running, base + budget, right=True)), start + 1)
        total = int(running[stop - 1]) - base
        sl = slice(start, stop)
        owner, col, row = expand_boxes(lo_x[sl], hi_x[sl], lo_y[sl], hi_y[sl], total)
        owner = owner + start
        # Same float operations as the Triton kernel (no fused multiply-add), so idx match exactly.
        dx = centres[col] - x[owner]
        dy = centres[row] - y[owner]
        d2 = dx * dx + dy * dy
        hit = d2 < pr2[owner]
        owner, d2 = owner[hit], d2[hit]
        pix = (batch[owner] * size + row[hit]) * size + col[hit]
        # Stable: pairs were generated in (z, index) order, which the sort keeps within each pixel.
        pix, perm = torch.sort(pix, stable=True)
        owner, d2 = owner[perm], d2[perm]
        n = pix.numel()
        if n:
            pos = torch.arange(n, device=device)
            first = torch.ones(n, dtype=torch.bool, device=device)
            first[1:] = pix[1:] != pix[:-1]
            seg_start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
            slot = filled[pix] + (pos - seg_start)
            w = slot < K
            dst = pix[w] * K + slot[w]
            idx[dst] = order[owner[w]]
            zbuf[dst] = z[owner[w]]
            dists[dst] = d2[w]
            filled.index_add_(0, pix, torch.ones_like(pix))
        start = stop
    return _unflatten(idx, zbuf, dists, B, size, K)


def _unflatten(idx, zbuf, dists, B, size, K):
    shape = (B, size, size, K)
    return idx.view(shape), zbuf.view(shape), dists.view(shape)


def differentiable_dists(points: torch.Tensor, idx: torch.Tensor, size: int) -> torch.Tensor:
    """Squared NDC distance from each selected point to its pixel centre, with autograd to points x, y.

    points: [B, N, 3]; idx: [B, S, S, K] packed, -1 padded. Returns [B, S, S, K], -1 padded. The float
    operations are those of `select_points`, so the values are bit-identical to the selection's.
    Only the filled slots are gathered: on CUDA, a gather whose empty slots all pointed at one index
    would make the backward accumulate millions of duplicates serially.
    """
    centres = pixel_centres(size, points.dtype, points.device)
    valid = idx >= 0
    slot = valid.nonzero()  # [M, 4] (b, row, col, k), row-major like masked_select
    pts = points.reshape(-1, 3).index_select(0, idx[valid])  # [M, 3]
    dx = centres[slot[:, 2]] - pts[:, 0]
    dy = centres[slot[:, 1]] - pts[:, 1]
    d2 = dx * dx + dy * dy
    return torch.full(idx.shape, -1.0, dtype=points.dtype, device=points.device).masked_scatter(valid, d2)


def rasterize_points(
    points: torch.Tensor, r2: torch.Tensor, size: int, K: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference rasterizer: (idx, zbuf, dists) [B, S, S, K]; dists carry gradient to points x, y."""
    idx, zbuf, dists = select_points(points.detach(), r2, size, K)
    if points.requires_grad:
        dists = differentiable_dists(points, idx, size)
    return idx, zbuf, dists


def alpha_composite(
    idx: torch.Tensor, dists: torch.Tensor, features: torch.Tensor, r2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference front-to-back compositing (spec §5.11).

    idx, dists: [B, H, W, K]; features: [B, N, C]; r2: [B, N] squared radius per point.
    alpha_k = 1 - d_k^2 / r_k^2 (0 for empty slots), w_k = alpha_k * prod_{l<k}(1 - alpha_l).
    Returns images [B, H, W, C] (differentiable) and weights [B, H, W, K] (detached).
    """
    B, H, W, K = idx.shape
    N, C = features.shape[1:]
    valid = idx >= 0
    pt = idx[valid]  # [M] filled slots only (see differentiable_dists)
    r2_slot = r2.reshape(-1).to(dists.dtype)[pt]
    alpha_v = 1.0 - dists[valid] / r2_slot
    alpha = torch.zeros_like(dists).masked_scatter(valid, alpha_v)
    # Exclusive transmittance prod_{l<k}(1 - alpha_l), a plain cumprod so autograd handles alpha = 1.
    one = torch.ones_like(alpha[..., :1])
    trans = torch.cat([one, torch.cumprod(1.0 - alpha[..., :-1], dim=-1)], dim=-1)
    weights = alpha * trans
    feats = features.reshape(B * N, C).index_select(0, pt)  # [M, C]
    contrib = weights[valid].unsqueeze(1) * feats
    pixel = valid.view(B * H * W, K).nonzero()[:, 0]  # [M] pixel of each filled slot
    images = torch.zeros(B * H * W, C, dtype=contrib.dtype, device=contrib.device).index_add(
        0, pixel, contrib
    )
    return images.view(B, H, W, C), weights.detach()


def mark_visible(
    idx: torch.Tensor, weights: torch.Tensor, n_points: int, thresh: float, visible: torch.Tensor
) -> None:
    """Reference of `api.mark_visible`: visible[p] |= p is the front-most point of a pixel (slot 0) or has
    a weight > thresh in any slot. idx, weights [B, H, W, K] (idx packed b * n_points + p, -1 empty)."""
    # Without boolean indexing (whose result size the host would wait for): slots that do not count are
    # sent to a spare entry n_points, then dropped.
    hits = torch.zeros(n_points + 1, dtype=torch.bool, device=visible.device)
    spare = torch.full((), n_points, dtype=idx.dtype, device=visible.device)
    front = idx[..., 0]
    heavy = (weights > thresh) & (idx >= 0)
    for slot_idx, counts in ((front, front >= 0), (idx, heavy)):
        hits.index_fill_(0, torch.where(counts, torch.remainder(slot_idx, n_points), spare).reshape(-1), True)
    visible |= hits[:n_points]
