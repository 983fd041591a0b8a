"""Angle error of the normals when matrix products use TF32 or bf16 instead of full fp32 (issue 10).

Builds the model of `bench_train.py` (synthetic subject, subject1 conf) at N points, perturbs its
weights away from the initialisation (a trained model is not at init), and compares with full fp32:

- `--compare tf32` (default): the canonical SDF normals and the deformed normals of one eval forward
  with TF32 off and on, and the relative error of the rendered RGB;
- `--compare bf16`: the canonical normals and SDF of the training-time geometry piece (fast path) with
  `model.geometry_bf16` off and on (TF32 off), as training computes them.

Prints the mean, 99.9th percentile and maximum angle in degrees.

    python benchmarks/normals_precision.py --points 409600 [--compare bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from bench_train import synthetic_conf  # noqa: E402

from pointavatar.engine.batching import move_to  # noqa: E402
from pointavatar.train.trainer import Trainer  # noqa: E402


def angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos)).reshape(-1)


def report(name: str, err: torch.Tensor) -> None:
    print(
        f"{name}: mean {err.mean():.4f} deg, p99.9 {torch.quantile(err.float(), 0.999):.4f} deg, "
        f"max {err.max():.4f} deg over {err.numel()} normals"
    )


def compare_bf16(model) -> None:
    """The training-time geometry piece with model.geometry_bf16 off and on, TF32 off, same samples."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model.train()
    points = model.pc.points
    torch.manual_seed(2)
    jittered = points.detach() + (torch.rand_like(points) - 0.5) * 0.5
    results = {}
    with torch.no_grad():
        for bf16 in (False, True):
            model.geometry_bf16 = bf16
            results[bf16] = model._geometry_piece(points, jittered)
    report("canonical normals (bf16 geometry)", angles_deg(results[True][0], results[False][0]))
    report("eikonal-sample gradients (bf16 geometry)", angles_deg(results[True][3], results[False][3]))
    sdf_err = (results[True][2] - results[False][2]).abs()
    print(f"sdf: max abs difference {sdf_err.max():.2e}, mean {sdf_err.mean():.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=409600)
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--implementation", default="fast")
    p.add_argument("--compare", choices=["tf32", "bf16"], default="tf32")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke test
    tmp = Path(tempfile.mkdtemp())
    conf = synthetic_conf(tmp / "data", tmp / "exp", args.res, "auto", args.implementation)
    trainer = Trainer(conf, nepoch=0, device=device)
    model = trainer.model
    torch.manual_seed(0)
    model.pc.init(args.points)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=g).to(param))
    _, model_input, _ = next(iter(trainer._loader()))
    model_input = move_to({k: v[:2] if torch.is_tensor(v) else v[:2] for k, v in model_input.items()}, device)
    if args.compare == "bf16":
        compare_bf16(model)
        return
    model.eval()
    results = {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.manual_seed(2)
        normals_c = model.canonical_geometry(model.pc.points)[0]
        out = model(model_input)
        results[tf32] = (normals_c, out.eval.pnts_normal_deformed, out.rgb_image)
    for name, i in (("canonical normals", 0), ("deformed normals", 1)):
        report(name, angles_deg(results[True][i], results[False][i]))
    rgb32, rgbtf = results[False][2], results[True][2]
    print(
        f"rgb: max abs difference {(rgbtf - rgb32).abs().max():.2e}, relative L2 "
        f"{((rgbtf - rgb32).norm() / rgb32.norm()):.2e}"
    )


if __name__ == "__main__":
    main()
