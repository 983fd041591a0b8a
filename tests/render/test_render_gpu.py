"""Point renderer on CUDA: the Triton ("cuda") backend against the "torch" reference, forward and backward."""

import warnings

import pytest
import torch
from tolerances import assert_close

from pointavatar.render import alpha_composite, mark_visible, rasterize_points

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def head_cloud(B, N, seed):
    """Noisy head-sized ellipsoid in NDC in front of the camera (as benchmarks/bench_render.py)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(B, N, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    pts = d * (1.0 + 0.05 * torch.randn(B, N, 1, generator=g)) * torch.tensor([0.38, 0.48, 0.4])
    pts[..., 2] += 4.0
    return pts


def uniform_cloud(B, N, seed):
    """Points inside and outside the image, some behind the camera, many equal depths."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(B, N, 3, generator=g) * 2.6 - 1.3
    pts[..., 2] = torch.randint(0, 8, (B, N), generator=g).float() * 0.5 - 0.5
    return pts


def run(points, feats, cot, size, radius, K, backend):
    p = points.clone().requires_grad_()
    f = feats.clone().requires_grad_()
    frags = rasterize_points(p, size, radius, K, backend=backend)
    images, weights = alpha_composite(frags, f, radius, backend=backend)
    (images * cot).sum().backward()
    return frags, images, weights, p.grad, f.grad


def assert_composited_alike(fast, reference):
    """The "cuda" backend's (images, weights, point gradients, feature gradients), as `run` returns them
    after the fragments, against the "torch" reference's."""
    (ic, wc, gpc, gfc), (it, wt, gpt, gft) = fast, reference
    ulp = "sums of K <= 10 float32 products; a division may differ by an ulp between Triton and PyTorch"
    assert_close(ic, it, rtol=1e-5, atol=1e-5, reason=ulp)
    assert_close(wc, wt, rtol=1e-5, atol=1e-6, reason=ulp)
    # float32 rounding relative to the largest entry.
    order = "gradients sum over many pixels in different orders (atomics vs index_put)"
    assert_close(gfc, gft, rtol=1e-4, atol=1e-5 * gft.abs().max().item(), reason=order)
    assert_close(gpc, gpt, rtol=1e-4, atol=1e-5 * gpt.abs().max().item(), reason=order)


CASES = [
    # (cloud, B, N, size, radius, K, C)
    ("uniform", 1, 500, 64, 0.08, 5, 4),
    ("uniform", 3, 4_000, 100, "per-point", 7, 13),  # size not a multiple of the tile
    ("head", 2, 20_000, 256, 0.03, 10, 4),
    ("head", 2, 100_000, 512, 0.0169, 10, 4),
    ("head", 1, 409_600, 512, 0.0095, 10, 4),
    ("head", 2, 3_000, 128, 0.2, 10, 4),  # large discs: dense tiles, early exit when all pixels are full
]


@pytest.mark.parametrize("sem", ["relaxed", "acq_rel"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-B{c[1]}-N{c[2]}-S{c[3]}" for c in CASES])
def test_cuda_backend_matches_torch(case, sem, monkeypatch):
    """sem: the memory order of the backward kernels' atomic adds (the default "relaxed", and Triton's
    own default); the visibility marked from the fragments, as the trainer does after each step."""
    from pointavatar.render import _triton_impl

    monkeypatch.setattr(_triton_impl, "ATOMIC_SEM", sem)
    cloud, B, N, size, radius, K, C = case
    seed = N + size
    pts = (head_cloud if cloud == "head" else uniform_cloud)(B, N, seed).cuda()
    g = torch.Generator().manual_seed(seed + 1)
    if radius == "per-point":
        radius = (0.02 + 0.1 * torch.rand(B, N, generator=g)).cuda()
    feats = torch.rand(B, N, C, generator=g).cuda()
    cot = torch.randn(B, size, size, C, generator=g).cuda()

    ft, it, wt, gpt, gft = run(pts, feats, cot, size, radius, K, "torch")
    fc, ic, wc, gpc, gfc = run(pts, feats, cot, size, radius, K, "cuda")

    assert (ft.idx >= 0).any()
    assert torch.equal(fc.idx, ft.idx)
    # zbuf copies the inputs and dists are the same float32 operations (no fused multiply-add): equal.
    assert torch.equal(fc.zbuf, ft.zbuf)
    assert torch.equal(fc.dists.detach(), ft.dists.detach())
    assert_composited_alike((ic, wc, gpc, gfc), (it, wt, gpt, gft))

    for thresh, w in ((0.5, wt), (0.3, wt.to(torch.bfloat16)), (0.02, wt)):
        vis = {b: torch.zeros(N, dtype=torch.bool, device="cuda") for b in ("torch", "cuda")}
        for b in vis:
            vis[b][::11] = True  # OR-ed into, not overwritten
            mark_visible(ft.idx, w, N, thresh, vis[b], backend=b)
        assert torch.equal(vis["cuda"], vis["torch"])
        assert vis["torch"].sum() > (N + 10) // 11


@pytest.mark.parametrize(("block", "warps"), [(16, 1), (32, 2), (32, 4), (128, 4), (64, 8), (256, 8)])
def test_compositing_settings_match_torch(block, warps, monkeypatch):
    """The compositing kernels' pixels per program and warps (bench_render.py --composite-sweep's choices):
    the same images and gradients as the reference, here with a last program of the image only partly
    filled (100 x 100 pixels)."""
    from pointavatar.render import _triton_impl

    monkeypatch.setattr(_triton_impl, "_BLOCK_PIX", block)
    monkeypatch.setattr(_triton_impl, "_NUM_WARPS_COMPOSITE", warps)
    B, N, size, K, C = 2, 3_000, 100, 10, 4
    pts = head_cloud(B, N, 5).cuda()
    g = torch.Generator().manual_seed(6)
    feats = torch.rand(B, N, C, generator=g).cuda()
    cot = torch.randn(B, size, size, C, generator=g).cuda()
    _, *reference = run(pts, feats, cot, size, 0.05, K, "torch")
    _, *fast = run(pts, feats, cot, size, 0.05, K, "cuda")
    assert_composited_alike(fast, reference)


def test_auto_uses_cuda_backend_without_warning():
    pts = head_cloud(1, 2_000, 0).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = rasterize_points(pts, 64, 0.05, 4)
    fast = rasterize_points(pts, 64, 0.05, 4, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(auto, fast, strict=True))


def test_cuda_backend_without_grad_and_repeatable():
    """No autograd inputs: no gradient buffers; two runs give identical fragments and images."""
    pts = uniform_cloud(2, 3_000, 1).cuda()
    feats = torch.rand(2, 3_000, 4).cuda()
    runs = []
    for _ in range(2):
        frags = rasterize_points(pts, 96, 0.1, 6, backend="cuda")
        images, weights = alpha_composite(frags, feats, 0.1, backend="cuda")
        assert not images.requires_grad and not frags.dists.requires_grad
        runs.append((frags, images, weights))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True))
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])
