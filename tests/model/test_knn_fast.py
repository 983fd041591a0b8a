"""The fast 1-NN (Triton on CUDA) against the reference search; CPU falls back to the reference."""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreter import run_under_interpreter
from tolerances import assert_close

from pointavatar.model.knn import nearest_neighbor, nearest_neighbor_fast


def test_fast_path_on_cpu_is_the_reference():
    torch.manual_seed(0)
    q, r = torch.randn(500, 3), torch.randn(300, 3)
    fast, ref = nearest_neighbor_fast(q, r), nearest_neighbor(q, r)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "n, v, spread",
    [(1, 1, 0.2), (1000, 5023, 0.2), (409_600, 5023, 0.2), (409_600, 5023, 0.1), (777, 65, 0.2)],
)
def test_triton_matches_reference(n, v, spread):
    """spread 0.1: denser vertices, where some queries have two vertices within float32 rounding of
    each other (a contracted multiply-add in the kernel picked the other one of such pairs)."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(n + v)
    ref_pts = torch.randn(v, 3, generator=g) * spread
    # Queries near the reference points (as canonical points near FLAME vertices), plus exact copies.
    q = ref_pts[torch.randint(0, v, (n,), generator=g)] + 0.01 * torch.randn(n, 3, generator=g)
    q[: min(n, 10)] = ref_pts[: min(n, 10)]
    q, ref_pts = q.cuda(), ref_pts.cuda()
    idx_fast, d_fast = nearest_neighbor_fast(q, ref_pts)
    idx_ref, d_ref = nearest_neighbor(q, ref_pts)
    # Both rank by direct coordinate differences in float32; a different index is only acceptable
    # for an exact tie in distance (then the lower index wins in both), so indices must be equal.
    assert torch.equal(idx_fast, idx_ref)
    assert_close(d_fast, d_ref, rtol=1e-6, atol=0)  # same three products and sums


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_ties_pick_the_lowest_index():
    pytest.importorskip("triton")
    ref_pts = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]] * 40).cuda()
    q = torch.zeros(5, 3).cuda()  # every reference point is at distance 1: ties everywhere
    idx, d = nearest_neighbor_fast(q, ref_pts)
    assert idx.tolist() == [0] * 5 and torch.all(d == 1.0)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import triton_interp_compat  # noqa: F401  (Triton 3.6 interpreter with NumPy 2.4)
    import torch
    from pointavatar.model import _knn_triton
    from pointavatar.model.knn import nearest_neighbor

    cases = [(1, 1, 0.2, 0), (300, 257, 0.2, 1), (513, 70, 0.05, 2)]
    for n, v, spread, seed in cases:
        g = torch.Generator().manual_seed(seed)
        ref_pts = torch.randn(v, 3, generator=g) * spread
        q = ref_pts[torch.randint(0, v, (n,), generator=g)] + 0.01 * torch.randn(n, 3, generator=g)
        q[: min(n, 10)] = ref_pts[: min(n, 10)]  # exact copies: distance 0
        idx, d = _knn_triton.nearest_neighbor(q, ref_pts)
        idx_ref, d_ref = nearest_neighbor(q, ref_pts)
        assert torch.equal(idx, idx_ref), (n, v)
        assert torch.allclose(d, d_ref, rtol=1e-6, atol=0), (n, v)
    # Ties: every reference point at distance 1, duplicates included: the lowest index wins.
    ref_pts = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]] * 40)
    idx, d = _knn_triton.nearest_neighbor(torch.zeros(5, 3), ref_pts)
    assert idx.tolist() == [0] * 5 and torch.all(d == 1.0)
    print("INTERPRETER-OK")
    """
)


def test_triton_kernel_under_interpreter():
    """The Triton 1-NN kernel run by the Triton interpreter on the CPU (README "Tests": needs triton)
    against the reference search: the same indices, ties to the lowest index."""
    run_under_interpreter(_INTERPRETER_SCRIPT, timeout=300)
