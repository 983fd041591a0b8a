"""FLOPs of one fast-path training step by operator (torch.utils.flop_counter), on the CPU.

The step's matrix products per point count do not depend on the device, so a CPU run at a smaller
point count gives the GPU step's work (scale the per-point part with N). benchmarks/RESULTS.md, step 8:

    python benchmarks/count_flops.py --points 102400 --batch 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from bench_train import synthetic_conf  # noqa: E402

from pointavatar.train.graphed_step import forward_loss_backward  # noqa: E402
from pointavatar.train.trainer import Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=102_400)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--data", default=None, help="folder for the synthetic subject (default: a temp dir)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    data = Path(args.data) if args.data else tmp / "data"
    conf = synthetic_conf(data, tmp / "exp", 512, "auto", "fast", tf32=True, recompute_chunk=0,
                          geometry_bf16=True, geometry_backward="autograd", deformer_backward="autograd")  # fmt: skip
    trainer = Trainer(conf, nepoch=0, device="cpu")
    model, loss_fn = trainer.model, trainer.loss
    torch.manual_seed(0)
    model.pc.init(args.points)
    trainer.batch_size = args.batch
    indices, model_input, ground_truth = next(iter(trainer._loader()))
    ground_truth = trainer.batch_ground_truth(indices, ground_truth)
    model_input = {k: v[: args.batch] for k, v in model_input.items()}
    ground_truth = {k: v[: args.batch] for k, v in ground_truth.items()}
    model.train()
    with FlopCounterMode(display=False) as counter:
        forward_loss_backward(model, loss_fn, model_input, ground_truth, conf.loss.lbs_weight)
    ops = counter.get_flop_counts()["Global"]
    for op, flops in sorted(ops.items(), key=lambda item: -item[1]):
        print(f"{str(op):30s} {flops / 1e9:10.1f} GFLOP")
    print(f"total {sum(ops.values()) / 1e9:.1f} GFLOP at N = {args.points}, B = {args.batch}")


if __name__ == "__main__":
    main()
