"""Time of the fast 1-nearest-neighbour search (Triton) against the reference, on CUDA.

The FLAME prior looks up, for every canonical point, its nearest FLAME vertex (V = 5,023) once a
training step. This times `knn.nearest_neighbor_fast` (the Triton kernel) at the benchmark's point
counts, for the kernel's shipped block sizes and, with --sweep, for other block sizes, and checks each
result against the reference search (`knn.nearest_neighbor`).

    python benchmarks/bench_knn.py --points 409600 102400 --sweep --out bench_knn.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from timing import timed  # noqa: E402

from pointavatar.model import _knn_triton  # noqa: E402
from pointavatar.model.knn import nearest_neighbor, nearest_neighbor_fast  # noqa: E402

SWEEP = [(64, 64, 4), (128, 64, 4), (128, 64, 8), (64, 32, 4), (32, 64, 4), (128, 32, 4), (64, 128, 8)]


def time_ms(fn, repeat: int) -> float:
    """Median CUDA time of fn() in ms, after two untimed calls."""
    return statistics.median(timed(fn, torch.device("cuda"), 2, repeat))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[409600, 102400, 25600, 6400])
    parser.add_argument("--vertices", type=int, default=5023)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--sweep", action="store_true", help="also other block sizes (BLOCK_Q, BLOCK_R, warps)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_knn.py needs a CUDA device")
    g = torch.Generator().manual_seed(0)
    ref = (torch.randn(args.vertices, 3, generator=g) * 0.1).cuda()
    shipped = (_knn_triton.BLOCK_Q, _knn_triton.BLOCK_R, _knn_triton.NUM_WARPS)
    configs = [shipped] + ([c for c in SWEEP if c != shipped] if args.sweep else [])
    rows = []
    for n in args.points:
        # Queries near the vertices, as canonical points near the FLAME surface.
        q = ref[torch.randint(0, args.vertices, (n,), generator=g).cuda()] + 0.01 * torch.randn(n, 3).cuda()
        idx_ref, d_ref = nearest_neighbor(q, ref)
        row = {"points": n, "reference_ms": time_ms(lambda q=q: nearest_neighbor(q, ref), args.repeat)}
        for bq, br, warps in configs:
            _knn_triton.BLOCK_Q, _knn_triton.BLOCK_R, _knn_triton.NUM_WARPS = bq, br, warps
            name = f"triton_{bq}x{br}w{warps}"
            try:
                idx, _ = nearest_neighbor_fast(q, ref)
                row[f"{name}_ms"] = time_ms(lambda q=q: nearest_neighbor_fast(q, ref), args.repeat)
                row[f"{name}_mismatches"] = int((idx != idx_ref).sum())
            except Exception as exc:  # a block size the compiler rejects (registers, shared memory)
                row[name] = f"failed: {type(exc).__name__}"
        _knn_triton.BLOCK_Q, _knn_triton.BLOCK_R, _knn_triton.NUM_WARPS = shipped
        rows.append(row)
        print(
            " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True,
        )
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "vertices": args.vertices}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
