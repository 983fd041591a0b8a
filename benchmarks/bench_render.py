"""Point renderer speed and memory: rasterize + composite, forward and backward, per backend.

    PYTHONPATH=code python benchmarks/bench_render.py [--backends torch cuda] [--reps 50] [--md out.md]

Setting (issue 3): a head-sized cloud (unit directions from a seeded normal distribution, radius
1 + 0.05 * normal noise, scaled by the semi-axes (0.38, 0.48, 0.4); x, y are NDC and z = 4 + the third
coordinate), features = random RGB plus a ones channel (C = 4, the training features), 512 x 512, K = 10,
the radius the original uses at that N (spec §5.14), both backends, B in {2, 8}, N in {10k, 100k, 409,600}.

Timing: CUDA events around forward + backward (the backward of (images * fixed cotangent).sum() w.r.t.
points and features), after warm-up (which also compiles the Triton kernels), median over --reps runs.
Memory: peak allocated during one forward + backward minus what was allocated before it (inputs).
`--sweep` also times the Triton kernel's tile / chunk / warp settings at B = 2, N = 409,600.
`--atomic-sem acq_rel` times the backward kernels with Triton's default memory order for atomic adds.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from pointavatar.render import alpha_composite, rasterize_points  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed  # noqa: E402

CUDA = torch.device("cuda")

SIZE, K = 512, 10


def head_cloud(B: int, N: int, seed: int = 0, device="cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, 3] NDC points on a noisy head-sized ellipsoid in front of the camera, and [B, N, 4] features."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(B, N, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    r = 1.0 + 0.05 * torch.randn(B, N, 1, generator=g)
    pts = d * r * torch.tensor([0.38, 0.48, 0.4])
    pts[..., 2] += 4.0
    feats = torch.cat([torch.rand(B, N, 3, generator=g), torch.ones(B, N, 1)], dim=-1)
    return pts.to(device), feats.to(device)


def radius_for(N: int) -> float:
    """The original's radius at this point count (spec §5.14): 0.0095 at 409,600, 0.0169 at ~100k."""
    if N >= 400_000:
        return 0.0095
    if N >= 90_000:
        return 0.0169
    return 0.3 * 0.75 ** math.log2(N / 100)


def run_once(points, feats, cot, radius, backend):
    frags = rasterize_points(points, SIZE, radius, K, backend=backend)
    images, _ = alpha_composite(frags, feats, radius, backend=backend)
    images.backward(cot)
    return frags


def measure(B: int, N: int, backend: str, reps: int, warmup: int = 3) -> dict:
    pts, feats = head_cloud(B, N)
    radius = radius_for(N)
    points = pts.clone().requires_grad_()
    features = feats.clone().requires_grad_()
    cot = torch.randn(B, SIZE, SIZE, 4, generator=torch.Generator().manual_seed(1)).cuda()

    for _ in range(warmup):
        points.grad = features.grad = None
        run_once(points, features, cot, radius, backend)
    torch.cuda.synchronize()

    points.grad = features.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    frags = run_once(points, features, cot, radius, backend)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    filled = (frags.idx >= 0).float().mean().item()
    del frags

    def clear_grads():
        points.grad = features.grad = None

    def median_ms(fn):
        return statistics.median(timed(fn, CUDA, 0, reps, setup=clear_grads))

    def forward():
        with torch.no_grad():
            frags = rasterize_points(points, SIZE, radius, K, backend=backend)
            alpha_composite(frags, features, radius, backend=backend)

    t_fwd = median_ms(forward)
    t_all = median_ms(lambda: run_once(points, features, cot, radius, backend))
    return dict(
        B=B, N=N, radius=radius, backend=backend, fwd=t_fwd, fwdbwd=t_all, peak_mb=peak / 2**20, filled=filled
    )


def sweep(reps: int) -> tuple[int, int, int]:
    """Time tile / chunk / warp settings of the Triton rasterizer (forward), check each against the
    default's idx, and return the fastest correct (tile, chunk, warps)."""
    from pointavatar.render import _triton_impl as tri

    B, N = 2, 409_600
    pts, _ = head_cloud(B, N)
    radius = radius_for(N)
    best, best_ms = (tri.TILE, tri.CHUNK, tri._NUM_WARPS_RASTER), float("inf")
    ref = rasterize_points(pts, SIZE, radius, K, backend="cuda")
    print("sweep (B=2, N=409600, rasterize forward only): tile chunk warps -> ms, idx equal")
    for tile in (8, 16):
        for chunk in (8, 16, 32):
            for warps in (1, 2, 4) if tile == 8 else (4, 8):
                tri.TILE, tri.CHUNK, tri._NUM_WARPS_RASTER = tile, chunk, warps
                try:
                    out = rasterize_points(pts, SIZE, radius, K, backend="cuda")
                    same = torch.equal(out.idx, ref.idx) and torch.equal(out.dists, ref.dists)
                    ms = statistics.median(
                        timed(lambda: rasterize_points(pts, SIZE, radius, K, backend="cuda"), CUDA, 0, reps)
                    )
                    print(f"  {tile:3d} {chunk:3d} {warps:2d} -> {ms:7.3f} ms  {same}", flush=True)
                    if same and ms < best_ms:
                        best, best_ms = (tile, chunk, warps), ms
                except Exception as exc:  # a setting the compiler rejects (e.g. out of registers)
                    print(
                        f"  {tile:3d} {chunk:3d} {warps:2d} -> failed: {type(exc).__name__}: {exc}",
                        flush=True,
                    )
    tri.TILE, tri.CHUNK, tri._NUM_WARPS_RASTER = best
    print(f"sweep: using tile {best[0]}, chunk {best[1]}, warps {best[2]}", flush=True)
    return best


def composite_sweep(reps: int, batches: list[int], points: list[int]) -> tuple[int, int]:
    """Time the compositing kernels' pixels per program and warps (rasterize +
    composite, forward and backward, B x 512 x 512), check each setting's images and feature gradients
    against the current one's, and return the fastest correct (block, warps) summed over the cases."""
    from pointavatar.render import _triton_impl as tri

    default = (tri._BLOCK_PIX, tri._NUM_WARPS_COMPOSITE)
    cases = []
    for B in batches:
        for N in points:
            pts, feats = head_cloud(B, N)
            cot = torch.randn(B, SIZE, SIZE, 4, generator=torch.Generator().manual_seed(1)).cuda()
            cases.append((N, pts, feats, cot))

    def images_and_grads(case):
        N, pts, feats, cot = case
        f = feats.clone().requires_grad_()
        frags = rasterize_points(pts.clone().requires_grad_(), SIZE, radius_for(N), K, backend="cuda")
        images, _ = alpha_composite(frags, f, radius_for(N), backend="cuda")
        images.backward(cot)
        return images.detach(), f.grad

    def fwd_bwd_ms(case) -> float:
        N, pts, feats, cot = case
        points, features = pts.clone().requires_grad_(), feats.clone().requires_grad_()

        def clear_grads():
            points.grad = features.grad = None

        def run():
            run_once(points, features, cot, radius_for(N), "cuda")

        return statistics.median(timed(run, CUDA, 0, reps, setup=clear_grads))

    refs = [images_and_grads(c) for c in cases]
    print("composite sweep: block warps -> fwd+bwd ms per case, images and gradients as the default's")
    grid = [(b, w) for b in (16, 32, 64, 128, 256) for w in (1, 2, 4, 8)]
    best, best_ms = default, float("inf")
    for block, warps in grid:
        tri._BLOCK_PIX, tri._NUM_WARPS_COMPOSITE = block, warps
        name = f"  {block:4d} {warps:2d}"
        try:
            same = True
            for case, (img, grad) in zip(cases, refs, strict=True):
                i, g = images_and_grads(case)
                same &= torch.allclose(i, img, rtol=1e-5, atol=1e-6)
                same &= torch.allclose(g, grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())
            per_case = [fwd_bwd_ms(case) for case in cases]
        except Exception as exc:  # a setting the compiler rejects
            print(f"{name} -> failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        total = sum(per_case)
        cells = "  ".join(f"{ms:7.3f}" for ms in per_case)
        print(f"{name} -> {cells}  (sum {total:7.3f})  {bool(same)}", flush=True)
        if same and total < best_ms:
            best, best_ms = (block, warps), total
    tri._BLOCK_PIX, tri._NUM_WARPS_COMPOSITE = best
    print(f"composite sweep: using block, warps {best} (default {default})", flush=True)
    return best


def profile() -> None:
    """Per-kernel CUDA times of one "cuda" forward + backward at B = 2, N = 409,600 (torch.profiler)."""
    B, N = 2, 409_600
    pts, feats = head_cloud(B, N)
    points, features = pts.requires_grad_(), feats.requires_grad_()
    cot = torch.randn(B, SIZE, SIZE, 4, device="cuda")
    for _ in range(3):
        run_once(points, features, cot, radius_for(N), "cuda")
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            run_once(points, features, cot, radius_for(N), "cuda")
        torch.cuda.synchronize()
    print("profile: 5 x cuda fwd+bwd, B=2, N=409600")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["torch", "cuda"])
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--points", nargs="+", type=int, default=[10_000, 100_000, 409_600])
    ap.add_argument(
        "--reps", type=int, default=50, help="timed runs per case (torch uses a fifth, at least 5)"
    )
    ap.add_argument("--sweep", action="store_true", help="also time the Triton kernel settings")
    ap.add_argument(
        "--composite-sweep",
        action="store_true",
        help="also time the compositing kernels' pixels per program and warps (at --batches x --points), "
        "then use the fastest for the table",
    )
    ap.add_argument("--profile", action="store_true", help="also print per-kernel times (torch.profiler)")
    ap.add_argument("--md", type=Path, help="write the markdown table here too")
    ap.add_argument(
        "--atomic-sem",
        choices=["relaxed", "acq_rel"],
        default="relaxed",
        help="memory order of the backward kernels' atomic adds (_triton_impl.ATOMIC_SEM; acq_rel is "
        "Triton's default)",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_render.py needs a CUDA device.")

    import triton

    from pointavatar.render import _triton_impl

    _triton_impl.ATOMIC_SEM = args.atomic_sem
    device = torch.cuda.get_device_name()
    header = (
        f"date {datetime.date.today()}, device {device}, torch {torch.__version__}, triton {triton.__version__}\n"
        f"command: {' '.join(sys.argv)}; atomic adds {args.atomic_sem}"
    )
    print(header, flush=True)
    if args.sweep:
        best = sweep(max(10, args.reps // 2))
        header += (
            f"\nTriton rasterizer settings from --sweep: tile {best[0]}, chunk {best[1]}, warps {best[2]}"
        )
    if args.composite_sweep:
        block, warps = composite_sweep(max(10, args.reps // 2), args.batches, args.points)
        header += f"\ncompositing settings from --composite-sweep: block {block}, warps {warps}"
    if args.profile:
        profile()

    rows = []
    for B in args.batches:
        for N in args.points:
            for backend in args.backends:
                reps = args.reps if backend == "cuda" else max(5, args.reps // 5)
                r = measure(B, N, backend, reps)
                rows.append(r)
                print(
                    f"  B={B} N={N} {backend:5s}: fwd {r['fwd']:8.3f} ms  fwd+bwd {r['fwdbwd']:8.3f} ms  "
                    f"peak +{r['peak_mb']:7.1f} MB  (slots filled {r['filled']:.3f})",
                    flush=True,
                )
                torch.cuda.empty_cache()

    lines = [
        "| B | N | radius | backend | forward (ms) | forward + backward (ms) | peak extra memory (MB) | speed-up fwd+bwd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        torch_row = next(
            (t for t in rows if t["B"] == r["B"] and t["N"] == r["N"] and t["backend"] == "torch"), None
        )
        speed = f"{torch_row['fwdbwd'] / r['fwdbwd']:.1f}x" if torch_row and r["backend"] == "cuda" else ""
        lines.append(
            f"| {r['B']} | {r['N']:,} | {r['radius']:.4f} | {r['backend']} | {r['fwd']:.2f} | {r['fwdbwd']:.2f} "
            f"| {r['peak_mb']:.0f} | {speed} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.md:
        args.md.write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
