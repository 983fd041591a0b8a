"""Fast point rasterizer and alpha compositor in Triton (the "cuda" backend), forward and backward.

Same semantics as `_torch_impl` (the reference); tests compare the two. Imported lazily: importing this
module needs Triton, running it needs a CUDA device (or TRITON_INTERPRET=1, which runs the kernels on the
CPU for tests, slowly).

Rasterization in three steps:
1. Binning (torch ops): every drawable point is expanded into the TILE x TILE-pixel tiles its bounding square
   touches. Points are visited in (z, packed index) order and the (tile, point) pairs are stably sorted
   by tile, so each tile's candidate list is already ordered nearest-first, ties by index.
2. One program per tile scans its candidates in chunks of CB, tests every pixel of the tile against the
   chunk (d^2 < r^2, float32 operations identical to the reference: fused multiply-add disabled), and
   writes each hit straight into its slot: slot = hits so far + running count within the chunk. The
   first K hits are the K nearest, so selection is "take the first K". A tile stops once all of its
   pixels hold K points; the remaining slots are padded with -1.
3. The distances are an autograd output: their backward scatters 2 (x - px) * grad into point x, y
   (pytorch3d's rasterizer backward).

Compositing: one program per block of pixels reads the K slots of its pixels as one coalesced block,
walks them front to back in registers, writes weights and the transmittance (for backward) and
accumulates the features. Its backward walks the slots back to front
with the suffix composite S_k, so dI/dalpha_k = T_k (f_k - S_k) needs no division by (1 - alpha_k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _torch_impl as ref

TILE = 8  # tile side in pixels; a program handles TILE * TILE pixels
CHUNK = 32  # candidates tested per step of the scan
_NUM_WARPS_RASTER = 1  # tile 8, chunk 32, 1 warp: fastest in the H100 sweep (benchmarks/RESULTS.md)
_BLOCK_BIN = 512  # points per program in the binning kernels
# Pixels per program and warps of the compositing kernels: 32 on 2 warps was the fastest setting of
# bench_render.py --composite-sweep on the H200 (benchmarks/RESULTS.md, step 8).
_BLOCK_PIX = 32
_NUM_WARPS_COMPOSITE = 2
_BLOCK_SLOTS = 1024  # fragment slots per program in the rasterizer backward and in mark_visible
# Memory order of the backward kernels' atomic adds (gradient sums: only the final value matters, nothing
# else is read around them): "relaxed" drops the fence that Triton's default "acq_rel" puts around each.
# Same sums (their order is unspecified either way); benchmarks/bench_render.py --atomic-sem times both.
ATOMIC_SEM = "relaxed"


@triton.jit
def _tile_box(x, y, r2, S, TILE: tl.constexpr):
    """Inclusive tile range touched by each disc, as `_torch_impl.pixel_bounds` (same inflated radius,
    so it never misses a pixel the exact test accepts), then divided by the tile size."""
    r = tl.sqrt(r2) * (1.0 + 1e-4) + 1e-5
    lo_x = tl.floor((S * (1.0 - x - r) - 1.0) * 0.5)
    hi_x = tl.ceil((S * (1.0 - x + r) - 1.0) * 0.5)
    lo_y = tl.floor((S * (1.0 - y - r) - 1.0) * 0.5)
    hi_y = tl.ceil((S * (1.0 - y + r) - 1.0) * 0.5)
    # Clamp in floating point before converting, as far-away points could overflow int32.
    lo_x = tl.maximum(tl.minimum(lo_x, S * 1.0), 0.0).to(tl.int32)
    hi_x = tl.minimum(tl.maximum(hi_x, -1.0), S - 1.0).to(tl.int32)
    lo_y = tl.maximum(tl.minimum(lo_y, S * 1.0), 0.0).to(tl.int32)
    hi_y = tl.minimum(tl.maximum(hi_y, -1.0), S - 1.0).to(tl.int32)
    nonempty = (lo_x <= hi_x) & (lo_y <= hi_y)
    tx0 = lo_x // TILE
    ty0 = lo_y // TILE
    nbx = tl.where(nonempty, hi_x // TILE - tx0 + 1, 1)
    nby = tl.where(nonempty, hi_y // TILE - ty0 + 1, 0)
    return tx0, ty0, nbx, nby


@triton.jit
def _bin_count_kernel(
    points_ptr,  # [B*N, 3]
    r2_ptr,  # r^2, read at point * r2_stride (stride 0: one radius for all)
    r2_stride,
    zkey_ptr,  # [B*N] out: depth sort key, +inf for points that draw nothing
    ntile_ptr,  # [B*N] int32 out: number of tiles each point touches
    BN,
    S,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < BN
    x = tl.load(points_ptr + i * 3, mask=m, other=0.0)
    y = tl.load(points_ptr + i * 3 + 1, mask=m, other=0.0)
    z = tl.load(points_ptr + i * 3 + 2, mask=m, other=-1.0)
    r2 = tl.load(r2_ptr + i * r2_stride, mask=m, other=0.0)
    inf = float("inf")
    finite = (tl.abs(x) < inf) & (tl.abs(y) < inf) & (tl.abs(z) < inf)  # false for nan too
    valid = m & finite & (z >= 0.0) & (r2 > 0.0)
    x = tl.where(valid, x, 0.0)
    y = tl.where(valid, y, 0.0)
    _, _, nbx, nby = _tile_box(x, y, tl.where(valid, r2, 0.0), S, TILE)
    n = tl.where(valid, nbx * nby, 0)
    # -0.0 -> +0.0 so that the radix sort orders it like the reference's comparison sort.
    zkey = tl.where(n > 0, tl.where(z == 0.0, 0.0, z), inf)
    tl.store(zkey_ptr + i, zkey, mask=m)
    tl.store(ntile_ptr + i, n, mask=m)


@triton.jit
def _bin_fill_kernel(
    order_ptr,  # [B*N] int64: points in (z, packed index) order
    ntile_ptr,  # [B*N] int32 tiles per point (by point)
    offset_ptr,  # [B*N] int64: inclusive running sum of the tile counts, in order
    points_ptr,
    r2_ptr,
    r2_stride,
    key_ptr,  # [M] int32 out: b * NT + tile
    cand_ptr,  # [M] int32 out: packed point index
    M,  # pairs allocated: those beyond are dropped (only with a fixed budget too small)
    BN,
    N,
    S,
    NTX,
    NT,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = j < BN
    p = tl.load(order_ptr + j, mask=m, other=0)
    n = tl.load(ntile_ptr + p, mask=m, other=0)
    first = tl.load(offset_ptr + j, mask=m, other=0) - n
    x = tl.load(points_ptr + p * 3, mask=n > 0, other=0.0)
    y = tl.load(points_ptr + p * 3 + 1, mask=n > 0, other=0.0)
    r2 = tl.load(r2_ptr + p * r2_stride, mask=n > 0, other=0.0)
    tx0, ty0, nbx, _ = _tile_box(x, y, r2, S, TILE)
    base = (p // N).to(tl.int32) * NT
    n_max = tl.max(n, axis=0)
    t = n_max * 0  # a while loop, as the Triton interpreter cannot range() over a reduced tensor
    while t < n_max:
        act = (t < n) & (first + t < M)
        key = base + (ty0 + t // nbx) * NTX + tx0 + t % nbx
        tl.store(key_ptr + first + t, key, mask=act)
        tl.store(cand_ptr + first + t, p.to(tl.int32), mask=act)
        t += 1


@triton.jit
def _rasterize_fwd_kernel(
    tile_bounds_ptr,  # [B * NT + 1] int64: candidates of tile t are cand[bounds[t]:bounds[t+1]]
    cand_ptr,  # [M] int32 packed point index, sorted by (tile, z, index)
    points_ptr,  # [B*N, 3]
    r2_ptr,
    r2_stride,
    centre_ptr,  # [S] pixel centres (NDC)
    idx_ptr,  # [B, S, S, K] int64 out
    zbuf_ptr,  # [B, S, S, K] out
    dist_ptr,  # [B, S, S, K] out
    S,
    NTX,
    NT,
    K: tl.constexpr,
    KP: tl.constexpr,
    TILE_SIZE: tl.constexpr,
    CB: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NT
    t = pid % NT
    p = tl.arange(0, TILE_SIZE * TILE_SIZE)
    row = (t // NTX) * TILE_SIZE + p // TILE_SIZE
    col = (t % NTX) * TILE_SIZE + p % TILE_SIZE
    pv = (row < S) & (col < S)
    px = tl.load(centre_ptr + col, mask=pv, other=0.0)
    py = tl.load(centre_ptr + row, mask=pv, other=0.0)
    base = ((b * S + row) * S + col) * K  # first slot of each pixel; the host keeps this < 2^31

    start = tl.load(tile_bounds_ptr + pid).to(tl.int32)
    end = tl.load(tile_bounds_ptr + pid + 1).to(tl.int32)
    cnt = tl.zeros([TILE_SIZE * TILE_SIZE], dtype=tl.int32)
    c = tl.arange(0, CB)
    i = start
    go = i < end
    while go:
        offs = i + c
        cm = offs < end
        pt = tl.load(cand_ptr + offs, mask=cm, other=0)
        x = tl.load(points_ptr + pt * 3, mask=cm, other=0.0)
        y = tl.load(points_ptr + pt * 3 + 1, mask=cm, other=0.0)
        z = tl.load(points_ptr + pt * 3 + 2, mask=cm, other=0.0)
        r2 = tl.load(r2_ptr + pt * r2_stride, mask=cm, other=0.0)
        dx = px[:, None] - x[None, :]
        dy = py[:, None] - y[None, :]
        d2 = dx * dx + dy * dy  # launched with enable_fp_fusion=False: bit-identical to the reference
        hit = (d2 < r2[None, :]) & cm[None, :] & pv[:, None]
        h = hit.to(tl.int32)
        slot = cnt[:, None] + tl.cumsum(h, axis=1) - 1
        w = hit & (slot < K)
        off = base[:, None] + slot
        tl.store(
            idx_ptr + off, tl.broadcast_to(pt.to(tl.int64)[None, :], [TILE_SIZE * TILE_SIZE, CB]), mask=w
        )
        tl.store(zbuf_ptr + off, tl.broadcast_to(z[None, :], [TILE_SIZE * TILE_SIZE, CB]), mask=w)
        tl.store(dist_ptr + off, d2, mask=w)
        cnt += tl.sum(h, axis=1)
        i += CB
        go = (i < end) & (tl.min(tl.where(pv, cnt, K), axis=0) < K)

    s = tl.arange(0, KP)
    pad = pv[:, None] & (s[None, :] >= cnt[:, None]) & (s[None, :] < K)
    off = base[:, None] + s[None, :]
    neg = tl.full([TILE_SIZE * TILE_SIZE, KP], -1, tl.int64)
    tl.store(idx_ptr + off, neg, mask=pad)
    tl.store(zbuf_ptr + off, neg.to(zbuf_ptr.dtype.element_ty), mask=pad)
    tl.store(dist_ptr + off, neg.to(dist_ptr.dtype.element_ty), mask=pad)


@triton.jit
def _rasterize_bwd_kernel(
    idx_ptr,  # [B*S*S*K] int64
    grad_dist_ptr,  # [B*S*S*K]
    points_ptr,  # [B*N, 3]
    centre_ptr,  # [S]
    grad_points_ptr,  # [B*N, 3] accumulated with atomics
    total,
    S,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    SEM: tl.constexpr,
):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = off < total
    pt = tl.load(idx_ptr + off, mask=m, other=-1)
    g = tl.load(grad_dist_ptr + off, mask=m, other=0.0)
    act = (pt >= 0) & (g != 0.0)
    pix = off // K
    col = pix % S
    row = (pix // S) % S
    px = tl.load(centre_ptr + col, mask=act, other=0.0)
    py = tl.load(centre_ptr + row, mask=act, other=0.0)
    x = tl.load(points_ptr + pt * 3, mask=act, other=0.0)
    y = tl.load(points_ptr + pt * 3 + 1, mask=act, other=0.0)
    # d = (px - x)^2 + (py - y)^2  =>  dd/dx = 2 (x - px), dd/dy = 2 (y - py)
    tl.atomic_add(grad_points_ptr + pt * 3, 2.0 * g * (x - px), mask=act, sem=SEM)
    tl.atomic_add(grad_points_ptr + pt * 3 + 1, 2.0 * g * (y - py), mask=act, sem=SEM)


@triton.jit
def _slot_alpha(idx_ptr, dist_ptr, r2_ptr, r2_stride, off, pm):
    """One slot of each pixel (flat offsets ``off``): its point index, whether it is filled, the point's
    squared radius and alpha = 1 - d / r^2 (0 for an empty slot, which then changes nothing)."""
    pt = tl.load(idx_ptr + off, mask=pm, other=-1)
    valid = pt >= 0
    d = tl.load(dist_ptr + off, mask=pm, other=0.0)
    r2 = tl.load(r2_ptr + pt * r2_stride, mask=valid, other=1.0)
    return pt, valid, r2, tl.where(valid, 1.0 - d / r2, 0.0)


@triton.jit
def _composite_fwd_kernel(
    idx_ptr,  # [P, K] int64
    dist_ptr,  # [P, K]
    r2_ptr,  # squared radius, read at point * r2_stride
    r2_stride,
    feat_ptr,  # [B*N, C]
    image_ptr,  # [P, C] out
    weight_ptr,  # [P, K] out
    trans_ptr,  # [P, K] out: transmittance before each slot (for backward), if STORE_T
    P,
    C,
    K: tl.constexpr,
    CP: tl.constexpr,
    BLOCK: tl.constexpr,
    STORE_T: tl.constexpr,
):
    """Front-to-back compositing of BLOCK pixels. It reads and writes one slot of every pixel at a time
    (strided by K; the block's slots stay in L1 across the loop) rather than holding the pixels' K slots as
    [BLOCK, K] register arrays, which spilled (benchmarks/RESULTS.md, step 8)."""
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pm = pix < P
    ch = tl.arange(0, CP)
    cm = ch < C
    acc = tl.zeros([BLOCK, CP], dtype=feat_ptr.dtype.element_ty)
    trans = tl.full([BLOCK], 1.0, dtype=dist_ptr.dtype.element_ty)
    for k in tl.static_range(K):
        off = pix * K + k
        pt, valid, r2, alpha = _slot_alpha(idx_ptr, dist_ptr, r2_ptr, r2_stride, off, pm)
        w = alpha * trans
        tl.store(weight_ptr + off, w, mask=pm)
        if STORE_T:
            tl.store(trans_ptr + off, trans, mask=pm)
        f = tl.load(feat_ptr + pt[:, None] * C + ch[None, :], mask=valid[:, None] & cm[None, :], other=0.0)
        acc += w[:, None] * f
        trans = trans * (1.0 - alpha)
    tl.store(image_ptr + pix[:, None] * C + ch[None, :], acc, mask=pm[:, None] & cm[None, :])


@triton.jit
def _composite_bwd_kernel(
    idx_ptr,  # [P, K] int64
    dist_ptr,  # [P, K]
    r2_ptr,
    r2_stride,
    feat_ptr,  # [B*N, C]
    weight_ptr,  # [P, K] saved weights
    trans_ptr,  # [P, K] saved transmittance
    grad_image_ptr,  # [P, C]
    grad_feat_ptr,  # [B*N, C] accumulated with atomics
    grad_dist_ptr,  # [P, K] out
    P,
    C,
    K: tl.constexpr,
    CP: tl.constexpr,
    BLOCK: tl.constexpr,
    SEM: tl.constexpr,
):
    """The compositing backward, back to front, one slot of every pixel at a time (see
    `_composite_fwd_kernel`)."""
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pm = pix < P
    ch = tl.arange(0, CP)
    cm = ch < C
    g = tl.load(grad_image_ptr + pix[:, None] * C + ch[None, :], mask=pm[:, None] & cm[None, :], other=0.0)
    suffix = tl.zeros([BLOCK], dtype=dist_ptr.dtype.element_ty)
    for kr in tl.static_range(K):
        off = pix * K + (K - 1 - kr)
        pt, valid, r2, alpha = _slot_alpha(idx_ptr, dist_ptr, r2_ptr, r2_stride, off, pm)
        w = tl.load(weight_ptr + off, mask=pm, other=0.0)
        trans = tl.load(trans_ptr + off, mask=pm, other=0.0)
        fm = valid[:, None] & cm[None, :]
        f = tl.load(feat_ptr + pt[:, None] * C + ch[None, :], mask=fm, other=0.0)
        gf = tl.sum(g * f, axis=1)
        # I = sum_{l<k} w_l f_l + T_k (alpha_k f_k + (1 - alpha_k) S_k)  =>  dI/dalpha_k = T_k (f_k - S_k)
        grad_alpha = trans * (gf - suffix)
        # alpha = 1 - d / r^2  =>  d alpha / d d = -1 / r^2; empty slots get no gradient.
        tl.store(grad_dist_ptr + off, tl.where(valid, -grad_alpha / r2, 0.0), mask=pm)
        tl.atomic_add(grad_feat_ptr + pt[:, None] * C + ch[None, :], w[:, None] * g, mask=fm, sem=SEM)
        suffix = tl.where(valid, alpha * gf + (1.0 - alpha) * suffix, suffix)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_centre_cache: dict = {}


def _centres(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`_torch_impl.pixel_centres`, cached: saves five launches per call."""
    key = (size, dtype, device)
    if key not in _centre_cache:
        _centre_cache[key] = ref.pixel_centres(size, dtype, device)
    return _centre_cache[key]


def _flat_r2(r2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """r^2 [B, N] -> (flat tensor, stride): a scalar radius expanded with stride 0 stays one value."""
    if r2.stride() == (0, 0):
        return r2.reshape(-1)[:1].to(dtype), 0
    return r2.to(dtype).contiguous().reshape(-1), 1


@torch.no_grad()
def _rasterize_forward(points: torch.Tensor, r2: torch.Tensor, size: int, K: int, budget=None):
    """Binning + the tile kernel. points [B, N, 3] contiguous, r2 [B, N] -> idx, zbuf, dists [B, S, S, K].

    Launches: two binning kernels, two sorts, a running sum, a search and the tile kernel; one device
    sync (the number of (tile, point) pairs, to allocate them), or none with a ``budget``
    (`api.fixed_binning`): then ``budget.capacity`` pairs are allocated, the unused ones keyed past the
    last tile so that the sort puts them last, and ``budget.needed`` is raised to the count.
    """
    B, N, _ = points.shape
    device, dtype = points.device, points.dtype
    if B * size * size * K >= 2**31 or B * N >= 2**31:
        raise ValueError(
            "rasterize_points (cuda backend): B * S * S * K must stay below 2^31; split the batch."
        )
    BN = B * N
    r2_flat, r2_stride = _flat_r2(r2, dtype)
    ntx = triton.cdiv(size, TILE)
    nt = ntx * ntx
    grid = (triton.cdiv(BN, _BLOCK_BIN),)

    zkey = torch.empty(BN, dtype=dtype, device=device)
    ntile = torch.empty(BN, dtype=torch.int32, device=device)
    _bin_count_kernel[grid](points, r2_flat, r2_stride, zkey, ntile, BN, size, TILE=TILE, BLOCK=_BLOCK_BIN)
    # Stable: among equal depths the lower packed index comes first (the tie rule).
    order = torch.sort(zkey, stable=True).indices
    offsets = torch.cumsum(ntile[order], 0)
    if budget is not None and BN:
        torch.maximum(budget.needed, offsets[-1], out=budget.needed)
    if budget is None or budget.capacity is None:
        total = int(offsets[-1]) if BN else 0
        keys = torch.empty(total, dtype=torch.int32, device=device)
        cand = torch.empty(total, dtype=torch.int32, device=device)
    else:
        total = budget.capacity
        keys = torch.full((total,), B * nt, dtype=torch.int32, device=device)  # past every tile
        cand = torch.zeros(total, dtype=torch.int32, device=device)
    if total and BN:
        _bin_fill_kernel[grid](
            order,
            ntile,
            offsets,
            points,
            r2_flat,
            r2_stride,
            keys,
            cand,
            total,
            BN,
            N,
            size,
            ntx,
            nt,
            TILE=TILE,
            BLOCK=_BLOCK_BIN,
        )
        # Stable sort by tile keeps the (z, index) order inside each tile.
        keys, perm = torch.sort(keys, stable=True)
        cand = cand[perm]
    tile_ids = torch.arange(B * nt + 1, dtype=torch.int32, device=device)
    bounds = torch.searchsorted(keys, tile_ids)

    idx = torch.empty((B, size, size, K), dtype=torch.int64, device=device)
    zbuf = torch.empty((B, size, size, K), dtype=dtype, device=device)
    dists = torch.empty((B, size, size, K), dtype=dtype, device=device)
    _rasterize_fwd_kernel[(B * nt,)](
        bounds,
        cand,
        points,
        r2_flat,
        r2_stride,
        _centres(size, dtype, device),
        idx,
        zbuf,
        dists,
        size,
        ntx,
        nt,
        K=K,
        KP=_next_pow2(K),
        TILE_SIZE=TILE,
        CB=CHUNK,
        num_warps=_NUM_WARPS_RASTER,
        enable_fp_fusion=False,
    )
    return idx, zbuf, dists


class _RasterizePoints(torch.autograd.Function):
    @staticmethod
    def forward(ctx, points, r2, size, K, budget):
        points_c = points.detach().contiguous()
        idx, zbuf, dists = _rasterize_forward(points_c, r2, size, K, budget)
        ctx.mark_non_differentiable(idx, zbuf)
        ctx.save_for_backward(points_c, idx)
        ctx.size = size
        return idx, zbuf, dists

    @staticmethod
    def backward(ctx, grad_idx, grad_zbuf, grad_dists):
        points, idx = ctx.saved_tensors
        if grad_dists is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        size = ctx.size
        K = idx.shape[-1]
        grad_points = torch.zeros_like(points)
        total = idx.numel()
        _rasterize_bwd_kernel[(triton.cdiv(total, _BLOCK_SLOTS),)](
            idx,
            grad_dists.contiguous().to(points.dtype),
            points,
            _centres(size, points.dtype, points.device),
            grad_points,
            total,
            size,
            K=K,
            BLOCK=_BLOCK_SLOTS,
            SEM=ATOMIC_SEM,
        )
        return grad_points, None, None, None, None


class _AlphaComposite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, dists, features, r2):
        B, H, W, K = idx.shape
        C = features.shape[-1]
        P = B * H * W
        idx_c = idx.contiguous()
        dists_c = dists.detach().contiguous()
        feats = features.detach().contiguous()
        r2_c, r2_stride = _flat_r2(r2, dists_c.dtype)
        ctx.r2_stride = r2_stride
        images = torch.empty((B, H, W, C), dtype=feats.dtype, device=feats.device)
        weights = torch.empty((B, H, W, K), dtype=dists_c.dtype, device=feats.device)
        need_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        trans = torch.empty_like(weights) if need_grad else weights
        args = (idx_c, dists_c, r2_c, r2_stride, feats, images, weights, trans, P, C)
        grid = (triton.cdiv(P, _BLOCK_PIX),)
        common = dict(
            K=K, CP=_next_pow2(C), BLOCK=_BLOCK_PIX, STORE_T=need_grad, num_warps=_NUM_WARPS_COMPOSITE
        )
        _composite_fwd_kernel[grid](*args, **common)
        ctx.mark_non_differentiable(weights)
        if need_grad:
            ctx.save_for_backward(idx_c, dists_c, r2_c, feats, weights, trans)
        return images, weights

    @staticmethod
    def backward(ctx, grad_images, grad_weights):
        idx, dists, r2, feats, weights, trans = ctx.saved_tensors
        B, H, W, K = idx.shape
        C = feats.shape[-1]
        P = B * H * W
        grad_feats = torch.zeros_like(feats)
        grad_dists = torch.empty_like(dists)
        args = (
            idx,
            dists,
            r2,
            ctx.r2_stride,
            feats,
            weights,
            trans,
            grad_images.contiguous().to(feats.dtype),
            grad_feats,
            grad_dists,
            P,
            C,
        )
        grid = (triton.cdiv(P, _BLOCK_PIX),)
        common = dict(K=K, CP=_next_pow2(C), BLOCK=_BLOCK_PIX, SEM=ATOMIC_SEM, num_warps=_NUM_WARPS_COMPOSITE)
        _composite_bwd_kernel[grid](*args, **common)
        return (
            None,
            grad_dists if ctx.needs_input_grad[1] else None,
            grad_feats if ctx.needs_input_grad[2] else None,
            None,
        )


def rasterize_points(points: torch.Tensor, r2: torch.Tensor, size: int, K: int, budget=None):
    """Fast rasterizer: (idx, zbuf, dists) [B, S, S, K]; dists carry gradient to points x, y.
    ``budget``: an `api.BinningBudget` (no host sync), or None."""
    return _RasterizePoints.apply(points, r2.detach(), size, K, budget)


def alpha_composite(idx: torch.Tensor, dists: torch.Tensor, features: torch.Tensor, r2: torch.Tensor):
    """Fast compositing: (images [B, H, W, C], weights [B, H, W, K] detached)."""
    features = features.to(dists.dtype)
    return _AlphaComposite.apply(idx, dists, features, r2.detach())


@triton.jit
def _mark_visible_kernel(
    idx_ptr,  # [B*H*W*K] int64, packed b * n_points + p
    weight_ptr,  # [B*H*W*K]
    visible_ptr,  # [n_points] bool, viewed as uint8
    total,
    n_points,
    thresh,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = off < total
    pt = tl.load(idx_ptr + off, mask=m, other=-1)
    w = tl.load(weight_ptr + off, mask=m, other=0.0)
    hit = (pt >= 0) & (((off % K) == 0) | (w > thresh))
    # Every thread that writes an entry writes the same 1: no atomics needed.
    tl.store(visible_ptr + pt % n_points, tl.full([BLOCK], 1, tl.uint8), mask=hit)


@torch.no_grad()
def mark_visible(
    idx: torch.Tensor, weights: torch.Tensor, n_points: int, thresh: float, visible: torch.Tensor
) -> None:
    """`_torch_impl.mark_visible` in one pass over the slots (the reference makes about ten)."""
    total = idx.numel()
    if total == 0:
        return
    # The reference compares in the weights' dtype: round the threshold to it first.
    thresh = float(torch.tensor(thresh, dtype=weights.dtype))
    _mark_visible_kernel[(triton.cdiv(total, _BLOCK_SLOTS),)](
        idx.contiguous(),
        weights.contiguous(),
        visible.view(torch.uint8),
        total,
        n_points,
        thresh,
        K=idx.shape[-1],
        BLOCK=_BLOCK_SLOTS,
    )
