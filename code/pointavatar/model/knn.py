"""Exact 1-nearest-neighbour search (replaces pytorch3d.ops.knn_points with K = 1).

`nearest_neighbor` is the reference (any device); `nearest_neighbor_fast` runs the Triton kernel of
`_knn_triton` on CUDA for 3-D float32 points and falls back to the reference elsewhere.
"""

from __future__ import annotations

import torch

_triton_knn = None
_triton_error: str | None = None


def _load_triton():
    """The Triton 1-NN module, or None (reason in `_triton_error`) if Triton cannot be imported."""
    global _triton_knn, _triton_error
    if _triton_knn is None and _triton_error is None:
        try:
            from . import _knn_triton

            _triton_knn = _knn_triton
        except Exception as exc:  # ImportError, or Triton failing to initialise its backend
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_knn


@torch.no_grad()
def nearest_neighbor_fast(query: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `nearest_neighbor`; the Triton kernel where it applies, else the reference."""
    if (
        query.is_cuda
        and query.dim() == 2
        and query.shape[1] == 3
        and query.dtype == torch.float32
        and ref.shape[0] > 0
        and _load_triton() is not None
    ):
        return _triton_knn.nearest_neighbor(query, ref)
    return nearest_neighbor(query, ref)


# Elements of the distance temporaries of one block of queries: 2^25 floats = 128 MiB in float32.
DEFAULT_BLOCK_ELEMENTS = 1 << 25


@torch.no_grad()
def nearest_neighbor(
    query: torch.Tensor,
    ref: torch.Tensor,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    candidates: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query point, the index of the closest reference point (Euclidean).

    query [N, D], ref [V, D] on one device -> (idx [N] int64, sq_dist [N] squared distance).
    Runs in blocks of queries so that about ``block_elements`` distance values exist at once.

    Two stages: the |a|^2 - 2ab + |b|^2 expansion (one matrix product, fast on CPU and GPU, but it
    loses a few bits to cancellation) picks ``candidates`` nearest candidates per query, and direct
    coordinate differences then rank those exactly; ties pick the lowest index. The true neighbour is
    missed only if more than ``candidates`` points lie within float32 rounding (~1e-6 relative) of its
    distance. No gradient.
    """
    if query.dim() != 2 or ref.dim() != 2 or query.shape[1] != ref.shape[1]:
        raise ValueError(
            f"nearest_neighbor expects [N, D] and [V, D], got {tuple(query.shape)}, {tuple(ref.shape)}"
        )
    n, v = query.shape[0], ref.shape[0]
    if v == 0:
        raise ValueError("nearest_neighbor: the reference set is empty")
    idx = torch.empty(n, dtype=torch.long, device=query.device)
    ref = ref.to(query.dtype)
    ref_sq = ref.square().sum(dim=1)  # [V]
    k = min(candidates, v)
    chunk = max(1, block_elements // (2 * v))  # about two [chunk, V] temporaries live at once
    for s in range(0, n, chunk):
        q = query[s : s + chunk]  # [c, D]
        approx = torch.addmm(ref_sq, q, ref.t(), alpha=-2.0)  # |r|^2 - 2 q.r: [c, V]
        cand = approx.topk(k, dim=1, largest=False).indices  # [c, k]
        exact = (q[:, None, :] - ref[cand]).square().sum(dim=-1)  # [c, k]
        best = exact.min(dim=1, keepdim=True).values
        # Lowest index among exact ties: non-minimal candidates are pushed past every valid index.
        tied = torch.where(exact == best, cand, torch.full_like(cand, v))
        idx[s : s + chunk] = tied.min(dim=1).values
    sq_dist = (query - ref[idx]).square().sum(dim=1)
    return idx, sq_dist
