"""What the fast path's pieces keep for the backward, per canonical point, measured on the CPU.

Builds the model of `confs/subject1.conf` on the synthetic FLAME model, then runs the training forward of
each fast-path piece (geometry, deformer, colour) on N points and B frames, counting the bytes of the
distinct storages autograd packs for the backward (`torch.autograd.graph.saved_tensors_hooks`; the
parameters' own storage excluded). It also counts the geometry piece's matrix products over a forward and
backward, which grow where the partitioner recomputes products (`--memory-budget` too low). With
`--compiled` the pieces go through torch.compile (inductor on the CPU), whose partitioner decides what
is kept much as it does on the GPU. On 2026-11-30 the figures
agreed with the H200's `bench_train.py` memory split (`forward_kept_*`, which also counts the pieces'
outputs): geometry with autocast bf16 24.10 GiB at 409,600 points here against 24.04 there, with the
fused bf16 backward 6.7 against about 6.6; the deformer 7.67 against 8.28 GiB (8 % less here). So
memory work can be checked without a GPU; times cannot.

    python benchmarks/kept_memory.py --compiled --geometry-backward fused --geometry-bf16
    python benchmarks/kept_memory.py --compiled --geometry-bf16 --memory-budget 0.3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from pointavatar.config import load_conf  # noqa: E402
from pointavatar.engine.memory import kept_bytes  # noqa: E402
from pointavatar.model.point_avatar import PointAvatar  # noqa: E402
from pointavatar.synthetic.generator import make_synthetic_flame  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--compiled", action="store_true", help="through torch.compile (inductor), as on CUDA")
    p.add_argument(
        "--geometry-backward", default="autograd", choices=["autograd", "fused", "fused_recompute"]
    )
    p.add_argument("--geometry-bf16", action="store_true")
    p.add_argument("--deformer-backward", default="autograd", choices=["autograd", "fused", "fused_bf16"])
    p.add_argument(
        "--memory-budget", type=float, default=1.0, help="model.activation_memory_budget (with --compiled)"
    )
    args = p.parse_args()

    flame_dir = Path(tempfile.mkdtemp())
    model_path, landmark_path = make_synthetic_flame(flame_dir, seed=0)
    conf = load_conf(ROOT / "confs" / "subject1.conf").override(
        {"model.flame_model_path": str(model_path), "model.flame_landmark_path": str(landmark_path)}
    )
    torch.manual_seed(0)
    model = PointAvatar(
        conf.model,
        shape_params=torch.zeros(1, 100),
        canonical_expression=torch.zeros(1, 50),
        canonical_pose=conf.dataset.canonical_pose,
        img_res=64,
        use_background=False,
    )
    model.implementation = "fast"
    model.geometry_backward = args.geometry_backward
    model.geometry_bf16 = args.geometry_bf16
    model.deformer_backward = args.deformer_backward
    model.activation_memory_budget = args.memory_budget
    if args.compiled:
        model._compiles = lambda device: True  # torch.compile on the CPU too
    model.train()
    n, b = args.points, args.batch
    model.pc.init(n)
    g = torch.Generator().manual_seed(1)
    expression = 0.3 * torch.randn(b, 50, generator=g)
    flame_pose = 0.05 * torch.randn(b, 15, generator=g)
    _, pose_feature, transformations = model.FLAMEServer(expression, flame_pose)
    betas = expression[:, : model.deformer_network.num_exp]
    points = model.pc.points
    jittered = points.detach() + 0.01
    params = list(model.parameters())
    call = model._compiled_call
    for _ in range(2):  # the first call compiles
        geometry, (normals, albedo, _, _) = kept_bytes(model._geometry_fast, points, jittered, exclude=params)
        frame = (betas, transformations, pose_feature)
        deform, (_, cols) = kept_bytes(model._deform_fast, points, *frame, exclude=params)
        colour, _ = kept_bytes(call, "colour", model._colour_piece, cols, normals, albedo, exclude=params)
        query, _ = kept_bytes(model._prior_query, points.detach(), True, exclude=params)
    sizes = {"geometry": geometry, "deformer": deform, "colour": colour, "FLAME prior query": query}
    mode = "compiled" if args.compiled else "eager"
    geometry_mode = args.geometry_backward + (" bf16" if args.geometry_bf16 else "")
    print(
        f"kept per point (N={n}, B={b}, {mode}, geometry {geometry_mode}, deformer {args.deformer_backward}, "
        f"memory budget {args.memory_budget:g}):"
    )
    for name, size in sizes.items():
        print(f"  {name}: {size / n:.0f} B a point, {size / n * 409600 / 2**30:.2f} GiB at 409,600 points")
    # Whether the partitioner recomputes products (a budget that is too low): the geometry piece's matrix
    # products over one forward and backward.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        normals, albedo, sdf, grad = model._geometry_fast(points, jittered)
        (normals.sum() + albedo.sum() + sdf.sum() + grad.square().sum()).backward()
    products = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"  geometry: {products} matrix products over its forward and backward")


if __name__ == "__main__":
    main()
