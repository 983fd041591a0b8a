"""A small vectorized numpy triangle-mesh rasterizer for the synthetic subject.

This renderer exists only to draw the synthetic ground truth (`pointavatar.synthetic.generator`); it is
independent of the point renderer under test. It z-buffers triangles on a supersampled pixel grid and
returns, per sample, the visible triangle and its perspective-correct barycentric coordinates, so the
caller can interpolate any per-vertex attribute (normals, texture coordinates, labels) and box-filter
the result back to the output resolution (anti-aliasing, soft masks).

Conventions: screen coordinates are continuous pixel coordinates of the *supersampled* grid with the
image's top-left corner at (0, 0), u to the right, v down; sample (row r, col c) has its centre at
(c + 0.5, r + 0.5). Depth d > 0 is the distance along the viewing axis (spec §3.5: d = -(Z + t_z)).
"""

from __future__ import annotations

import numpy as np

__all__ = ["project_opengl", "rasterize", "interpolate", "vertex_normals", "box_downsample"]


def project_opengl(
    points: np.ndarray, fx: float, fy: float, cx: float, cy: float, t: np.ndarray
) -> np.ndarray:
    """Closed-form IMavatar projection (spec §3.5) of world points [N, 3] -> [N, 3] (u, v, d).

    The camera is world_mat = [I | t] in the OpenGL convention (looks along -z, y up); u, v are
    continuous pixel coordinates (top-left corner 0), d = -(Z + t_z) > 0 the depth. fx, fy, cx, cy are
    in pixels of the image the coordinates refer to.
    """
    p = np.asarray(points, dtype=np.float64)
    d = -(p[:, 2] + t[2])
    u = cx + fx * (p[:, 0] + t[0]) / d
    v = cy - fy * (p[:, 1] + t[1]) / d
    return np.stack([u, v, d], axis=1)


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals [V, 3] of a mesh with counter-clockwise (outward) faces."""
    v = np.asarray(verts, dtype=np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    fn = np.cross(b - a, c - a)  # length = 2 * area: area weighting for free
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def rasterize(
    screen: np.ndarray, faces: np.ndarray, height: int, width: int, cull_backfaces: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffered rasterization of triangles given in screen space.

    Args:
        screen: [V, 3] vertex (u, v, d) in sample coordinates of a height x width grid, d > 0 depth.
        faces: [F, 3] int vertex indices, counter-clockwise when seen from outside in a y-up frame
            (so clockwise on screen, whose v axis points down).
        height, width: sample grid size.
        cull_backfaces: drop triangles facing away from the camera (closed meshes).

    Returns:
        face_idx [height, width] int64, the visible face per sample, -1 where empty;
        bary [height, width, 3] float64 perspective-correct barycentric coordinates (0 where empty).
    """
    s = np.asarray(screen, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    p0, p1, p2 = s[faces[:, 0]], s[faces[:, 1]], s[faces[:, 2]]
    # Twice the signed screen area; with v pointing down an outward (CCW in y-up) face is negative.
    area = (p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (p2[:, 0] - p0[:, 0])
    keep = (p0[:, 2] > 1e-6) & (p1[:, 2] > 1e-6) & (p2[:, 2] > 1e-6) & (np.abs(area) > 1e-12)
    if cull_backfaces:
        keep &= area < 0
    # Sample-centre bounding boxes: sample c is covered when c + 0.5 lies in [min, max].
    uv_min = np.minimum(np.minimum(p0, p1), p2)[:, :2]
    uv_max = np.maximum(np.maximum(p0, p1), p2)[:, :2]
    x0 = np.clip(np.ceil(uv_min[:, 0] - 0.5), 0, width).astype(np.int64)
    x1 = np.clip(np.floor(uv_max[:, 0] - 0.5), -1, width - 1).astype(np.int64)
    y0 = np.clip(np.ceil(uv_min[:, 1] - 0.5), 0, height).astype(np.int64)
    y1 = np.clip(np.floor(uv_max[:, 1] - 0.5), -1, height - 1).astype(np.int64)
    bw = x1 - x0 + 1
    bh = y1 - y0 + 1
    keep &= (bw > 0) & (bh > 0)
    tri = np.nonzero(keep)[0]

    face_idx = np.full(height * width, -1, dtype=np.int64)
    bary = np.zeros((height * width, 3), dtype=np.float64)
    if tri.size == 0:
        return face_idx.reshape(height, width), bary.reshape(height, width, 3)

    # Affine barycentric functions per triangle: b_i(u, v) = A_i u + B_i v + C_i (screen space).
    q0, q1, q2 = p0[tri], p1[tri], p2[tri]
    inv_area = 1.0 / area[tri]
    coef = np.empty((tri.size, 3, 3))
    for i, (qa, qb) in enumerate(((q1, q2), (q2, q0), (q0, q1))):
        coef[:, i, 0] = (qa[:, 1] - qb[:, 1]) * inv_area
        coef[:, i, 1] = (qb[:, 0] - qa[:, 0]) * inv_area
        coef[:, i, 2] = (qa[:, 0] * qb[:, 1] - qb[:, 0] * qa[:, 1]) * inv_area
    inv_d = 1.0 / np.stack([q0[:, 2], q1[:, 2], q2[:, 2]], axis=1)  # [T, 3]

    # Enumerate every (triangle, sample in its bounding box) pair without a Python loop.
    n_pix = (bw[tri] * bh[tri]).astype(np.int64)
    starts = np.cumsum(n_pix) - n_pix
    owner = np.repeat(np.arange(tri.size), n_pix)
    local = np.arange(n_pix.sum(), dtype=np.int64) - starts[owner]
    w_rep = bw[tri][owner]
    px = x0[tri][owner] + local % w_rep
    py = y0[tri][owner] + local // w_rep
    del local, w_rep
    uc = px + 0.5
    vc = py + 0.5
    c = coef[owner]  # [P, 3, 3]
    b = c[:, :, 0] * uc[:, None] + c[:, :, 1] * vc[:, None] + c[:, :, 2]  # [P, 3]
    # Small tolerance so samples on shared edges are covered by at least one triangle.
    inside = (b >= -1e-9).all(axis=1)
    owner, px, py, b = owner[inside], px[inside], py[inside], b[inside]
    # 1/d is affine in screen space, so it interpolates linearly with the screen barycentrics.
    w = b * inv_d[owner]  # [P, 3]
    invz = w.sum(axis=1)
    pix = py * width + px
    zbuf = np.full(height * width, -np.inf)
    np.maximum.at(zbuf, pix, invz)  # nearest = largest 1/d
    win = invz >= zbuf[pix]
    # Duplicate winners (exact depth ties) resolve to the last one: deterministic.
    face_idx[pix[win]] = tri[owner[win]]
    bary[pix[win]] = w[win] / invz[win, None]
    return face_idx.reshape(height, width), bary.reshape(height, width, 3)


def interpolate(
    face_idx: np.ndarray, bary: np.ndarray, faces: np.ndarray, attrs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate per-vertex attributes [V, C] at the covered samples.

    Returns (flat indices of the covered samples [M], values [M, C]).
    """
    flat = np.nonzero(face_idx.reshape(-1) >= 0)[0]
    f = faces[face_idx.reshape(-1)[flat]]  # [M, 3]
    bc = bary.reshape(-1, 3)[flat]  # [M, 3]
    vals = (attrs[f] * bc[:, :, None]).sum(axis=1)
    return flat, vals


def box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter a supersampled [H*f, W*f, C] (or [H*f, W*f]) image down to [H, W, C]."""
    if factor == 1:
        return image
    h, w = image.shape[0] // factor, image.shape[1] // factor
    shape = (h, factor, w, factor) + image.shape[2:]
    return image.reshape(shape).mean(axis=(1, 3))
