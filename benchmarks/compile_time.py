"""Where the fast path's first, compiling training step spends its time: each compiled piece's first call
(tracing and compiling its forward; the backward compiles in the step's backward), the first steps' wall
times, and torch.compile's own phase times (``torch._dynamo.utils.compile_times``).

    python benchmarks/compile_time.py --points 2000 --out compile_time.json                 # a GPU
    python benchmarks/compile_time.py --device cpu --backend aot_eager_decomp_partition --fp32-geometry

On the CPU the pieces compile only because this script lets them (the trainer compiles on CUDA only);
``--backend aot_eager_decomp_partition`` stops after AOTAutograd's partition (no inductor codegen), and
``--static`` compiles for one point count (``dynamic=False``) instead of a dynamic one. Start each
measurement in a new process with an empty compile cache (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR),
or the cache's hits are what is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from bench_train import synthetic_conf  # noqa: E402

from pointavatar.engine.batching import move_to  # noqa: E402
from pointavatar.model import geometry_fused, point_avatar  # noqa: E402
from pointavatar.model.point_avatar import PointAvatar  # noqa: E402
from pointavatar.train.graphed_step import forward_loss_backward  # noqa: E402
from pointavatar.train.trainer import Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--points", type=int, default=2000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--res", type=int, default=64, help="image size of the synthetic subject")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--static", action="store_true", help="compile for one point count (dynamic=False)")
    p.add_argument("--compile-scope", default="all", choices=["per_point", "all", "geometry", "none"])
    p.add_argument("--deform-contractions", default="auto", choices=["auto", "einsum", "pointwise"])
    p.add_argument(
        "--fp32-geometry",
        action="store_true",
        help="model.geometry_bf16 off (on the CPU bf16 products are slow and their autocast step too)",
    )
    p.add_argument(
        "--float-inputs",
        action="store_true",
        help="trace without geometry_fused.constant_floats (as before step 13): Python floats become 0-d "
        "CPU graph inputs",
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--data", default=None, help="folder for the synthetic subject (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)

    compile_ = torch.compile

    def compile_as_asked(fn, **kwargs):
        if args.backend != "inductor":
            kwargs.pop("options", None)  # inductor's options (benchmarks' geometry_fused.COMPILE_OPTIONS)
            kwargs["backend"] = args.backend
        if args.static:
            kwargs["dynamic"] = False
        return compile_(fn, **kwargs)

    torch.compile = compile_as_asked
    if args.float_inputs:
        point_avatar.constant_floats = geometry_fused.constant_floats = contextlib.nullcontext

    tmp = Path(tempfile.mkdtemp())
    data = Path(args.data) if args.data else tmp / "data"
    conf = synthetic_conf(data, tmp / "exp", args.res, "auto", "fast")
    trainer = Trainer(conf, nepoch=0, device=device)
    model, loss_fn = trainer.model, trainer.loss
    model.compile_scope = args.compile_scope
    model.deform_contractions = args.deform_contractions
    if args.fp32_geometry:
        model.geometry_bf16 = False
    if device.type != "cuda":
        model._compiles = lambda device: not model._compile_failed
    torch.manual_seed(0)
    model.pc.init(args.points)
    model.pc.radius = model.pc.initial_radius()
    trainer.batch_size = args.batch
    indices, model_input, ground_truth = next(iter(trainer._loader()))
    ground_truth = trainer.batch_ground_truth(indices, ground_truth)
    model_input = move_to(model_input, device)

    first_calls: dict[str, float] = {}
    compiled_call = PointAvatar._compiled_call

    def timed_call(self, name, fn, *fn_args):
        if name in first_calls:
            return compiled_call(self, name, fn, *fn_args)
        sync(device)
        t0 = time.perf_counter()
        result = compiled_call(self, name, fn, *fn_args)
        sync(device)
        first_calls[name] = time.perf_counter() - t0
        return result

    PointAvatar._compiled_call = timed_call
    model.train()
    steps = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        forward_loss_backward(model, loss_fn, model_input, ground_truth, conf.loss.lbs_weight)
        sync(device)
        steps.append(time.perf_counter() - t0)
    PointAvatar._compiled_call = compiled_call
    from torch._dynamo.utils import compile_times

    names, totals = compile_times(repr="csv", aggregate=True)
    phases = {name: float(total) for name, total in zip(names, totals, strict=True)}
    shown = [
        "_compile.compile_inner",
        "bytecode_tracing",
        "create_aot_dispatcher_function",
        "aot_trace_joint_graph",
        "min_cut_rematerialization_partition",
        "compile_fx.<locals>.fw_compiler_base",
        "compile_fx.<locals>.bw_compiler",
        "GraphLowering.codegen",
        "async_compile.wait",
    ]
    print(
        f"{device} backend {args.backend}{' static' if args.static else ''}, {args.points} points, "
        f"batch {args.batch}, compile scope {args.compile_scope}, geometry_bf16 {model.geometry_bf16}; "
        f"compile failed: {model._compile_failed}"
    )
    print("steps (s): " + ", ".join(f"{t:.2f}" for t in steps))
    print("first calls (s): " + ", ".join(f"{k} {v:.1f}" for k, v in first_calls.items()))
    print("phases (s): " + ", ".join(f"{k} {phases[k]:.1f}" for k in shown if k in phases))
    if args.out:
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "args": vars(args),
            "steps_s": steps,
            "first_calls_s": first_calls,
            "phases_s": phases,
            "compile_failed": model._compile_failed,
        }
        Path(args.out).write_text(json.dumps(result, indent=2))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
