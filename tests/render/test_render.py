"""Point renderer (pointavatar.render) on the CPU: the "torch" backend against brute-force loops,
gradchecks, the camera helper, input checks, and the Triton kernels under the Triton interpreter."""

import os
import textwrap
import warnings

import pytest
import torch
from interpreter import run_under_interpreter
from tolerances import assert_close

from pointavatar.errors import PointAvatarError
from pointavatar.render import alpha_composite, mark_visible, project_points, rasterize_points
from pointavatar.render._torch_impl import pixel_centres


def brute_rasterize(points, size, radius, K):
    """Loop reference: every pixel tests every point, keeps the K smallest (z, index)."""
    B, N, _ = points.shape
    r = torch.as_tensor(radius, dtype=points.dtype)
    r2 = (r * r).expand(B, N)
    centres = pixel_centres(size, points.dtype, points.device)
    idx = torch.full((B, size, size, K), -1, dtype=torch.int64)
    zbuf = torch.full((B, size, size, K), -1.0, dtype=points.dtype)
    dists = zbuf.clone()
    for b in range(B):
        x, y, z = points[b, :, 0], points[b, :, 1], points[b, :, 2]
        finite = torch.isfinite(points[b]).all(-1)
        for row in range(size):
            for col in range(size):
                dx = centres[col] - x
                dy = centres[row] - y
                d2 = dx * dx + dy * dy
                ok = (d2 < r2[b]) & (z >= 0) & finite
                cand = sorted((float(z[p]), p) for p in ok.nonzero().flatten().tolist())[:K]
                for k, (_, p) in enumerate(cand):
                    idx[b, row, col, k] = b * N + p
                    zbuf[b, row, col, k] = z[p]
                    dists[b, row, col, k] = d2[p]
    return idx, zbuf, dists


def brute_composite(idx, dists, features, radius):
    """Loop reference of front-to-back compositing, empty slots skipped."""
    B, H, W, K = idx.shape
    N, C = features.shape[1:]
    r = torch.as_tensor(radius, dtype=dists.dtype).expand(B, N).reshape(-1)
    flat = features.reshape(-1, C)
    images = torch.zeros(B, H, W, C, dtype=features.dtype)
    weights = torch.zeros(B, H, W, K, dtype=dists.dtype)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                trans = 1.0
                for k in range(K):
                    p = int(idx[b, i, j, k])
                    if p < 0:
                        continue
                    alpha = 1.0 - float(dists[b, i, j, k]) / float(r[p]) ** 2
                    weights[b, i, j, k] = alpha * trans
                    images[b, i, j] += alpha * trans * flat[p]
                    trans *= 1.0 - alpha
    return images, weights


def random_points(B, N, seed, dtype=torch.float32):
    """Points inside and outside the image, some behind the camera, many on shared depths."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(B, N, 3, generator=g, dtype=dtype) * 2.6 - 1.3
    # Depths on a coarse grid: equal depths are common (ties by index), -0.5 is behind the camera.
    pts[..., 2] = torch.randint(0, 6, (B, N), generator=g).to(dtype) * 0.5 - 0.5
    return pts


@pytest.mark.parametrize("per_point", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_rasterizer_matches_brute_force(per_point, seed):
    B, N, S, K = 2, 70, 13, 4
    pts = random_points(B, N, seed)
    g = torch.Generator().manual_seed(100 + seed)
    radius = 0.05 + 0.3 * torch.rand(B, N, generator=g) if per_point else 0.27
    frags = rasterize_points(pts, S, radius, K, backend="torch")
    ref_idx, ref_z, ref_d = brute_rasterize(pts, S, radius, K)
    assert (frags.idx >= 0).any() and (frags.idx == -1).any()  # the case is neither empty nor full
    assert torch.equal(frags.idx, ref_idx)
    # zbuf holds copies of the inputs and dists the very same float operations: equal, not just close.
    assert torch.equal(frags.zbuf, ref_z)
    assert torch.equal(frags.dists, ref_d)


def test_rasterizer_edge_cases():
    S, K, r = 8, 3, 0.25
    c = pixel_centres(S, torch.float32, torch.device("cpu"))  # dyadic values: exact in float32
    pts = torch.tensor(
        [
            [c[1], c[3], 1.0],  # centred on pixel (row 3, col 1); its 4 neighbours lie exactly on the radius
            [c[5], c[5], -0.5],  # behind the camera
            [3.0, 3.0, 1.0],  # outside the image, far from every pixel
            [c[6], c[6], 2.0],  # equal depths: index 3 before 4
            [c[6], c[6], 2.0],
            [c[6], c[6], 1.5],  # nearer: first
            [c[0], c[0], -0.0],  # z = -0.0 counts as z >= 0
            [float("nan"), c[0], 1.0],  # non-finite points are skipped
            [c[6] + 0.01, c[6], 2.0],  # fourth candidate at pixel (6, 6): dropped, K = 3
        ]
    ).unsqueeze(0)
    frags = rasterize_points(pts, S, r, K, backend="torch")
    ref = brute_rasterize(pts, S, r, K)
    assert (
        torch.equal(frags.idx, ref[0])
        and torch.equal(frags.zbuf, ref[1])
        and torch.equal(frags.dists, ref[2])
    )
    assert frags.idx[0, 6, 6].tolist() == [5, 3, 4]
    assert frags.idx[0, 3, 1].tolist() == [0, -1, -1] and frags.dists[0, 3, 1, 0] == 0
    for row, col in [(3, 0), (3, 2), (2, 1), (4, 1)]:  # d^2 == r^2 exactly: not covered (strict <)
        assert 0 not in frags.idx[0, row, col].tolist()
    assert frags.idx[0, 0, 0].tolist() == [6, -1, -1]  # fewer than K candidates: -1 padding
    assert frags.zbuf[0, 0, 0].tolist() == [0.0, -1.0, -1.0] and frags.dists[0, 0, 0, 1:].tolist() == [
        -1.0,
        -1.0,
    ]
    assert not (frags.idx == 1).any() and not (frags.idx == 2).any() and not (frags.idx == 7).any()


def test_chunked_selection_matches_single_chunk(monkeypatch):
    """The selection processes points in chunks of pairs; tiny chunks must give the same fragments."""
    from pointavatar.render import _torch_impl

    pts = random_points(2, 300, seed=3)
    whole = rasterize_points(pts, 24, 0.2, 5, backend="torch")
    monkeypatch.setattr(_torch_impl, "_PAIRS_PER_CHUNK_CPU", 37)
    chunked = rasterize_points(pts, 24, 0.2, 5, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))


def test_dists_with_grad_equal_selection_values():
    pts = random_points(2, 80, seed=4)
    plain = rasterize_points(pts, 16, 0.3, 6, backend="torch")
    grad = rasterize_points(pts.clone().requires_grad_(), 16, 0.3, 6, backend="torch")
    assert grad.dists.requires_grad and not grad.zbuf.requires_grad
    assert torch.equal(plain.dists, grad.dists.detach())


@pytest.mark.parametrize("per_point", [False, True])
def test_torch_composite_matches_loop(per_point):
    B, N, S, K, C = 2, 50, 10, 4, 5
    pts = random_points(B, N, seed=5)
    g = torch.Generator().manual_seed(6)
    radius = 0.1 + 0.3 * torch.rand(B, N, generator=g) if per_point else 0.3
    feats = torch.rand(B, N, C, generator=g)
    frags = rasterize_points(pts, S, radius, K, backend="torch")
    images, weights = alpha_composite(frags, feats, radius, backend="torch")
    ref_img, ref_w = brute_composite(frags.idx, frags.dists, feats, radius)
    # float32 products of at most K = 4 factors: a few ulp of values <= C (observed <= 1.2e-7).
    assert_close(images, ref_img, atol=1e-6)
    assert_close(weights, ref_w, atol=1e-6)
    assert not weights.requires_grad


def test_composite_gradcheck_float64():
    B, N, S, K, C = 2, 25, 8, 4, 3
    g = torch.Generator().manual_seed(7)
    pts = torch.rand(B, N, 3, generator=g, dtype=torch.float64) * 2 - 1
    pts[..., 2] = torch.rand(B, N, generator=g, dtype=torch.float64) + 0.5
    feats = torch.rand(B, N, C, generator=g, dtype=torch.float64)
    radius = 0.2 + 0.2 * torch.rand(B, N, generator=g, dtype=torch.float64)

    def render(p, f):
        frags = rasterize_points(p, S, radius, K, backend="torch")
        return alpha_composite(frags, f, radius, backend="torch")[0]

    assert (rasterize_points(pts, S, radius, K).idx >= 0).sum() > 40  # enough covered slots to test
    # Finite differences of 1e-6 never move a point across a pixel's radius for these random points,
    # so the discrete selection is constant and the check sees the smooth part only.
    assert torch.autograd.gradcheck(
        render, (pts.requires_grad_(), feats.requires_grad_()), eps=1e-6, atol=1e-6
    )


def test_composite_gradient_with_opaque_slot():
    """A point exactly on a pixel centre has alpha = 1: the slots behind it get zero weight and the
    gradient stays finite (pytorch3d guards its division by 1 - alpha the same way)."""
    c = pixel_centres(4, torch.float64, torch.device("cpu"))
    pts = torch.tensor(
        [[[c[1], c[1], 1.0], [c[1] + 0.1, c[1], 2.0]]], dtype=torch.float64, requires_grad=True
    )
    feats = torch.rand(1, 2, 3, dtype=torch.float64, requires_grad=True)
    frags = rasterize_points(pts, 4, 0.4, 2, backend="torch")
    images, weights = alpha_composite(frags, feats, 0.4, backend="torch")
    assert weights[0, 1, 1].tolist() == [1.0, 0.0]
    images.sum().backward()
    assert torch.isfinite(pts.grad).all() and torch.isfinite(feats.grad).all()


def imavatar_camera(B, g):
    """Converted IMavatar cameras (spec §3.5): K and (R, T) with R = diag(-1, 1, -1), plus the raw values."""
    fx, fy = (
        4.0 + torch.rand(B, generator=g, dtype=torch.float64),
        4.2 + torch.rand(B, generator=g, dtype=torch.float64),
    )
    cx, cy = (
        0.5 + 0.05 * torch.randn(B, generator=g, dtype=torch.float64),
        0.5 + 0.05 * torch.randn(B, generator=g, dtype=torch.float64),
    )
    t = torch.randn(B, 3, generator=g, dtype=torch.float64) * 0.1
    t[:, 2] -= 4.0  # IMavatar cameras sit at about -4 in z in the scaled FLAME frame... looking at +z faces
    K = torch.zeros(B, 4, 4, dtype=torch.float64)
    K[:, 0, 0] = 2 * fx  # fx here in units of image width (the JSON's i0 is -fx)
    K[:, 1, 1] = 2 * fy
    K[:, 0, 2] = -(2 * cx - 1)
    K[:, 1, 2] = -(2 * cy - 1)
    K[:, 3, 2] = 1
    K[:, 2, 3] = 1
    pose = torch.zeros(B, 3, 4, dtype=torch.float64)
    pose[:, :, :3] = torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64))
    pose[:, :, 3] = torch.stack([-t[:, 0], t[:, 1], -t[:, 2]], dim=1)
    return K, pose, (fx, fy, cx, cy, t)


def test_project_points_closed_form_and_gradcheck():
    B, N, size = 2, 30, 512
    g = torch.Generator().manual_seed(8)
    K, pose, (fx, fy, cx, cy, t) = imavatar_camera(B, g)
    X = torch.randn(B, N, 3, generator=g, dtype=torch.float64) * 0.3
    ndc = project_points(X, K, pose)
    # Spec §3.5 closed form in pixels: u = cx + fx (X + tx) / d, v = cy - fy (Y + ty) / d, d = -(Z + tz).
    d = -(X[..., 2] + t[:, None, 2])
    u = size * (cx[:, None] + fx[:, None] * (X[..., 0] + t[:, None, 0]) / d)
    v = size * (cy[:, None] - fy[:, None] * (X[..., 1] + t[:, None, 1]) / d)
    # pytorch3d NDC to continuous pixel coordinates (top-left corner 0): u = S (1 - x) / 2.
    # float64, a different grouping of the same products; u, v are pixels (up to ~1e3), hence atol 1e-9.
    assert_close(size * (1 - ndc[..., 0]) / 2, u, rtol=1e-12, atol=1e-9)
    assert_close(size * (1 - ndc[..., 1]) / 2, v, rtol=1e-12, atol=1e-9)
    assert_close(ndc[..., 2], d, rtol=1e-12, atol=1e-12)
    inputs = (X[:, :6].clone().requires_grad_(), K.requires_grad_(), pose.requires_grad_())
    assert torch.autograd.gradcheck(project_points, inputs)  # its defaults (atol 1e-5, rtol 1e-3), float64


def test_input_checks_and_backend_choice():
    pts = random_points(1, 10, seed=9)
    with pytest.raises(PointAvatarError, match="square"):
        rasterize_points(pts, (16, 32), 0.1)
    with pytest.raises(PointAvatarError, match=r"\[B, N, 3\]"):
        rasterize_points(pts[..., :2], 16, 0.1)
    with pytest.raises(PointAvatarError, match="radius"):
        rasterize_points(pts, 16, torch.ones(3))
    with pytest.raises(PointAvatarError, match="backend"):
        rasterize_points(pts, 16, 0.1, backend="opengl")
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Without Triton the error says so; with it, that "cuda" needs CUDA tensors.
        with pytest.raises(PointAvatarError, match="CUDA tensors|needs Triton"):
            rasterize_points(pts, 16, 0.1, backend="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" on CPU tensors is the normal path: no warning
        frags = rasterize_points(pts, (16, 16), 0.1, 2)
        images, _ = alpha_composite(frags, torch.rand(1, 10, 3), 0.1)
    assert frags.idx.shape == (1, 16, 16, 2) and images.shape == (1, 16, 16, 3)


def test_fixed_binning_context_checks_restores_and_leaves_torch_backend_alone():
    """The budget is checked, nests and is restored on exit (also after an error); the "torch" backend
    gives the same fragments inside (the "cuda" backend's use of it is tested under the interpreter)."""
    from pointavatar.render import api, fixed_binning

    needed = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match="capacity"):
        with fixed_binning(0, needed):
            pass
    with pytest.raises(ValueError, match="0-d int64"):
        with fixed_binning(10, torch.zeros(1)):
            pass
    assert getattr(api._binning, "budget", None) is None
    pts = random_points(1, 40, seed=2)
    plain = rasterize_points(pts, 16, 0.2, 3, backend="torch")
    with fixed_binning(5, needed) as outer:
        with fixed_binning(None, needed):
            assert api._binning.budget.capacity is None
        assert api._binning.budget is outer and outer.capacity == 5
        inside = rasterize_points(pts, 16, 0.2, 3, backend="torch")
        with pytest.raises(RuntimeError):
            with fixed_binning(7, needed):
                raise RuntimeError("boom")
        assert api._binning.budget is outer
    assert api._binning.budget is None
    assert all(torch.equal(a, b) for a, b in zip(plain, inside, strict=True))
    assert int(needed) == 0  # the reference rasterizer has no pair list to count


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import triton_interp_compat  # noqa: F401  (Triton 3.6 interpreter with NumPy 2.4)
    import torch
    from tolerances import assert_close
    from pointavatar.render import alpha_composite, fixed_binning, mark_visible, rasterize_points

    ULP = "sums of K float32 products; a division may differ by an ulp between Triton and PyTorch"
    ORDER = "gradients sum over many pixels in another order (atomics vs index_put): float32 rounding"

    from pointavatar.render import _triton_impl

    cases = list(enumerate([(2, 90, 20, 5, 4, False), (1, 300, 35, 3, 13, True), (2, 12, 40, 4, 4, False)]))
    # Every case with the default settings and with another number of pixels a program for the compositing
    # kernels (partly filled last programs); the backward kernels' atomic adds in the other memory order on
    # the first case only (the interpreter runs them as plain adds: the option must compile and keep the sums).
    saved = (_triton_impl.ATOMIC_SEM, _triton_impl._BLOCK_PIX)
    other = 32 if saved[1] != 32 else 128
    runs = [(("relaxed", saved[1]), c) for c in cases] + [(("relaxed", other), c) for c in cases]
    runs.append((("acq_rel", saved[1]), cases[0]))
    for (sem, block), (seed, (B, N, S, K, C, per_point)) in runs:
        _triton_impl.ATOMIC_SEM, _triton_impl._BLOCK_PIX = sem, block
        g = torch.Generator().manual_seed(seed)
        pts = torch.rand(B, N, 3, generator=g) * 2.6 - 1.3
        pts[..., 2] = torch.randint(0, 6, (B, N), generator=g).float() * 0.5 - 0.5
        radius = 0.05 + 0.3 * torch.rand(B, N, generator=g) if per_point else 0.3
        feats = torch.rand(B, N, C, generator=g)
        cot = torch.randn(B, S, S, C, generator=g)
        out = {}
        for backend in ("torch", "cuda"):
            p = pts.clone().requires_grad_()
            f = feats.clone().requires_grad_()
            frags = rasterize_points(p, S, radius, K, backend=backend)
            images, weights = alpha_composite(frags, f, radius, backend=backend)
            (images * cot).sum().backward()
            out[backend] = (frags, images, weights, p.grad, f.grad)
        (ft, it, wt, gpt, gft), (fc, ic, wc, gpc, gfc) = out["torch"], out["cuda"]
        assert torch.equal(ft.idx, fc.idx) and torch.equal(ft.zbuf, fc.zbuf)
        assert torch.equal(ft.dists.detach(), fc.dists.detach())
        assert_close(ic, it, rtol=1e-5, atol=1e-6, reason=ULP)
        assert_close(wc, wt, rtol=1e-5, atol=1e-6, reason=ULP)
        assert_close(gfc, gft, rtol=1e-5, atol=1e-5, reason=ORDER)
        assert_close(gpc, gpt, rtol=1e-4, atol=1e-4 * gpt.abs().max().item(), reason=ORDER)
        # The visibility of these fragments: the Triton pass marks the points the reference marks.
        for thresh, w in ((0.3, wt), (0.3, wt.to(torch.bfloat16)), (0.05, wt)):
            vis = {b: torch.zeros(N, dtype=torch.bool) for b in ("torch", "cuda")}
            vis["cuda"][::7] = True  # OR-ed into, not overwritten
            vis["torch"][::7] = True
            for b in vis:
                mark_visible(ft.idx, w, N, thresh, vis[b], backend=b)
            assert torch.equal(vis["cuda"], vis["torch"]) and vis["torch"][1::7].any()
    _triton_impl.ATOMIC_SEM, _triton_impl._BLOCK_PIX = saved

    # A fixed binning budget (no host sync, for CUDA graphs): the same fragments when it is large
    # enough, and needed > capacity (results to discard) when it is one pair short.
    g = torch.Generator().manual_seed(7)
    pts = torch.rand(2, 120, 3, generator=g) * 2.2 - 1.1
    pts[..., 2] = torch.rand(2, 120, generator=g)
    needed = torch.zeros((), dtype=torch.int64)
    with fixed_binning(None, needed):  # the usual allocation, the count recorded
        plain = rasterize_points(pts, 24, 0.2, 4, backend="cuda")
    n_pairs = int(needed)
    assert 0 < n_pairs < 100000
    needed.zero_()
    with fixed_binning(100000, needed):
        roomy = rasterize_points(pts, 24, 0.2, 4, backend="cuda")
    assert int(needed) == n_pairs
    assert all(torch.equal(a, b) for a, b in zip(plain, rasterize_points(pts, 24, 0.2, 4, backend="cuda")))
    needed.zero_()
    with fixed_binning(n_pairs, needed):
        exact = rasterize_points(pts, 24, 0.2, 4, backend="cuda")
    assert int(needed) == n_pairs
    for frags in (roomy, exact):
        assert all(torch.equal(a, b) for a, b in zip(plain, frags))
    needed.zero_()
    with fixed_binning(n_pairs - 1, needed):
        short = rasterize_points(pts, 24, 0.2, 4, backend="cuda")
    assert int(needed) == n_pairs and not torch.equal(short.idx, plain.idx)

    # float64: the Triton compositing and rasterizer backward kernels give the gradients of the reference
    # (itself gradchecked element by element in test_composite_gradcheck_float64) to float64 rounding, and
    # pass gradcheck's fast mode on their own (one random projection: a full gradcheck under the
    # interpreter took a minute of CI).
    g = torch.Generator().manual_seed(5)
    pts = torch.rand(1, 30, 3, generator=g, dtype=torch.float64) * 2 - 1
    pts[..., 2] += 2.0
    feats = torch.rand(1, 30, 2, generator=g, dtype=torch.float64)
    radius = 0.25 + 0.2 * torch.rand(1, 30, generator=g, dtype=torch.float64)
    cot = torch.randn(1, 8, 8, 2, generator=g, dtype=torch.float64)

    def render(p, f, backend="cuda"):
        frags = rasterize_points(p, 8, radius, 4, backend=backend)
        return alpha_composite(frags, f, radius, backend=backend)[0]

    grads = {}
    for backend in ("torch", "cuda"):
        p, f = pts.clone().requires_grad_(), feats.clone().requires_grad_()
        images = render(p, f, backend)
        (images * cot).sum().backward()
        grads[backend] = (images.detach(), p.grad, f.grad)
    assert (grads["torch"][1][..., :2] != 0).sum() > 20  # enough points reach pixels to test
    assert_close(grads["cuda"], grads["torch"], rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        render, (pts.requires_grad_(), feats.requires_grad_()), eps=1e-6, atol=1e-6, fast_mode=True
    )
    print("INTERPRETER-OK")
    """
)


def test_triton_kernels_under_interpreter():
    """The "cuda" backend's kernels run by the Triton interpreter on the CPU against "torch"."""
    run_under_interpreter(_INTERPRETER_SCRIPT, timeout=300)


def test_mark_visible_refuses_mismatched_inputs():
    idx = torch.full((1, 4, 4, 3), -1, dtype=torch.int64)
    idx[0, 1, 2] = torch.tensor([2, 0, -1])
    weights = torch.zeros(1, 4, 4, 3)
    weights[0, 1, 2, 1] = 0.9
    vis = torch.zeros(5, dtype=torch.bool)
    mark_visible(idx, weights, 5, 0.5, vis, backend="torch")
    assert vis.tolist() == [True, False, True, False, False]  # point 2 in front, point 0 heavy
    with pytest.raises(PointAvatarError, match="share one shape"):
        mark_visible(idx, weights[..., :2], 5, 0.5, vis)
    with pytest.raises(PointAvatarError, match=r"contiguous bool tensor of shape \[5\]"):
        mark_visible(idx, weights, 5, 0.5, torch.zeros(6, dtype=torch.bool))
