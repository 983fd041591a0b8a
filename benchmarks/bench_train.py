"""Training-step time and peak memory of the full PointAvatar at fixed point counts (and render time).

One training iteration = forward (canonical SDF/normals with the second-order graph, deformation with
the Jacobian normals, rasterization and compositing of B full images), the loss of spec §6 (VGG off,
as in the reference figures of the original), backward, and the Adam step. B follows the original's rule
B = min(floor(819200 / N), 8) and the radius the original would have at N (0.3 * 0.75^log2(N/100)).

    python benchmarks/bench_train.py --res 512 --points 6400 25600 102400 409600 --out bench_train.json

On CUDA the times are CUDA-event medians after warm-up; TF32 is off, like the reference figures.
`--cuda-graph` replays forward, loss and backward from a CUDA graph as the trainer does on CUDA
(train.cuda_graph, the default); the first two steps per point count (eager, capture) are warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from timing import timed  # noqa: E402

from pointavatar.config import load_conf  # noqa: E402
from pointavatar.engine.batching import (
    batch_size_for,  # noqa: E402
    move_to,  # noqa: E402
)
from pointavatar.model import point_avatar  # noqa: E402
from pointavatar.model.deform_explicit import INVERSES  # noqa: E402
from pointavatar.train.graphed_step import GraphedStep, forward_loss_backward  # noqa: E402
from pointavatar.train.schedule import make_optimizer, uses_fused_adam  # noqa: E402
from pointavatar.train.trainer import Trainer, backwards_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def auto_or(kind):
    """argparse type of a conf key that takes "auto" or a value of ``kind``."""
    return lambda v: v if v == "auto" else kind(v)


def synthetic_conf(data: Path, out: Path, res: int, backend: str, implementation: str, **model_keys):
    """subject1.conf on the synthetic subject; ``model_keys`` are further ``model.<key>`` overrides."""
    from pointavatar.synthetic import ensure_synthetic_subject

    ensure_synthetic_subject(data, "synthetic", res=res, train_frames=8, test_frames=4, seed=0)
    flame = data / "synthetic" / "flame"
    return load_conf(ROOT / "confs" / "subject1.conf").override(
        {
            "train.exps_folder": str(out),
            "train.num_workers": 0,
            "loss.vgg_feature_weight": 0.0,
            "dataset.data_folder": str(data),
            "dataset.subject_name": "synthetic",
            "dataset.train.sub_dir": ["train0", "train1"],
            "dataset.train.img_res": [res, res],
            "dataset.test.sub_dir": ["test"],
            "dataset.test.img_res": [res, res],
            "model.flame_model_path": str(flame / "generic_model.pkl"),
            "model.flame_landmark_path": str(flame / "landmark_embedding.npy"),
            "model.render_backend": backend,
            "model.implementation": implementation,
            **{f"model.{k}": v for k, v in model_keys.items()},
        }
    )


def memory_split(model, loss_fn, conf, model_input, ground_truth, optimizer) -> dict:
    """Where one step's memory goes (GiB): what the forward keeps for the backward, what the loss adds,
    and the backward's peak above that; the resident part (weights, points, Adam moments) besides."""
    gib = 2**-30
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    pieces: dict[str, int] = {}
    compiled_call = model._compiled_call

    def measured_call(name, fn, *args):
        # What a fast-path piece adds to the allocated memory: its outputs and what it keeps for the
        # backward (the forward's kept memory, by piece; the rest is FLAME, rasterizer and compositing).
        before = torch.cuda.memory_allocated()
        result = compiled_call(name, fn, *args)
        pieces[name] = pieces.get(name, 0) + torch.cuda.memory_allocated() - before
        return result

    model._compiled_call = measured_call
    try:
        out = model(model_input)
    finally:
        del model._compiled_call  # back to the class's method
    after_forward = torch.cuda.memory_allocated()
    forward_peak = torch.cuda.max_memory_allocated()
    losses = loss_fn(out, ground_truth, flame=model.FLAMEServer, lbs_weight=conf.loss.lbs_weight)
    after_loss = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    losses["loss"].backward()
    backward_peak = torch.cuda.max_memory_allocated()
    del out, losses
    optimizer.zero_grad(set_to_none=True)
    return {
        "resident_gib": base * gib,
        "forward_kept_gib": (after_forward - base) * gib,
        **{f"forward_kept_{name}_gib": v * gib for name, v in pieces.items()},
        "forward_transient_gib": (forward_peak - after_forward) * gib,
        "loss_kept_gib": (after_loss - after_forward) * gib,
        "backward_extra_gib": (backward_peak - after_loss) * gib,
    }


def profile_steps(step, device, path: Path) -> None:
    """Two profiled steps: the kernel table by device time, then the operators by self device time and
    input shapes (which matmul is which), written to ``path``; the first table's head printed."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
    self_sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    shapes = prof.key_averages(group_by_input_shape=True).table(
        sort_by=self_sort, row_limit=60, max_name_column_width=40, max_shapes_column_width=90
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{table}\n\nBy operator and input shapes (self time):\n{shapes}\n")
    print("\n".join(table.splitlines()[:25]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--points", type=int, nargs="+", default=[6400, 25600, 102400, 409600])
    p.add_argument("--backend", default="auto")
    p.add_argument(
        "--implementation",
        default="reference",
        choices=["reference", "fast", "auto"],
        help="model.implementation",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="model.tf32 (off unless given, as in the reference figures; the conf default is on)",
    )
    p.add_argument(
        "--deform-contractions",
        choices=["auto", "einsum", "pointwise"],
        default="auto",
        help="how the fast path's FLAME algebra contracts small per-point dimensions",
    )
    p.add_argument(
        "--geometry-bf16", action="store_true", help="model.geometry_bf16 (fast path, experimental)"
    )
    p.add_argument(
        "--geometry-backward",
        choices=["autograd", "fused", "fused_recompute"],
        default="autograd",
        help="model.geometry_backward (fast path): autograd, or the hand-written fused backward",
    )
    p.add_argument(
        "--deformer-backward",
        choices=["autograd", "fused", "fused_bf16"],
        default="autograd",
        help="model.deformer_backward (fast path): autograd, or the fused Softplus chains",
    )
    p.add_argument("--recompute-chunk", type=int, default=0, help="model.recompute_chunk (fast path)")
    p.add_argument(
        "--prior-query-chunk",
        type=auto_or(int),
        default="auto",
        help='model.prior_query_chunk (fast path; 0: one pass; "auto": 65536 with a lean backward, else 0)',
    )
    p.add_argument(
        "--eager-prior-query",
        action="store_true",
        help="model.compile_prior_query = false (fast path, CUDA: the prior's query eager)",
    )
    p.add_argument(
        "--adam",
        choices=["auto", "default", "fused"],
        default="auto",
        help="the Adam: as the trainer (auto: fused on CUDA with the fast path), torch's default, or fused",
    )
    p.add_argument(
        "--inverse",
        choices=list(INVERSES),
        default="closed_form",
        help="model.inverse_skinning: the inverse skinning's 4 x 4 inverse on the fast path",
    )
    p.add_argument(
        "--deformer-bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="model.deformer_bf16 (the trainer's default: on): the deformer network's products in bf16 "
        "(deformer backward autograd); --no-deformer-bf16 keeps them in fp32",
    )
    p.add_argument(
        "--geometry-recompute-chunk",
        type=auto_or(int),
        default="auto",
        help="model.geometry_recompute_chunk (geometry backward autograd): its compiled piece by chunks of this "
        'many points, recomputed in the backward (0: one pass; "auto": 131072 on GPUs below 22 GiB, else 0)',
    )
    p.add_argument(
        "--memory-budget",
        type=auto_or(float),
        default="auto",
        help="model.activation_memory_budget: the compiled pieces' partitioner keeps at most about this "
        'fraction of its activations and recomputes the rest in the backward (1.0: as it chooses; "auto": '
        "0.3 on GPUs below 44 GiB, else 1.0)",
    )
    p.add_argument(
        "--compile-size-hint",
        type=auto_or(int),
        default="auto",
        help="model.compile_size_hint: the point count torch.compile tunes the compiled pieces' kernels for "
        '("auto": half of point_cloud.max_points, 204800 for subject1.conf; 0: the first size benchmarked, '
        "as before 2026-12-01)",
    )
    p.add_argument(
        "--visibility",
        choices=["renderer", "torch"],
        default="renderer",
        help="the per-step visibility marking: on the renderer's backend, as the trainer (one Triton pass on "
        "CUDA), or the PyTorch reference",
    )
    p.add_argument(
        "--atomic-sem",
        choices=["relaxed", "acq_rel"],
        default="relaxed",
        help="memory order of the renderer backward's atomic adds (render/_triton_impl.ATOMIC_SEM)",
    )
    p.add_argument(
        "--compile-scope",
        default="all",
        choices=["per_point", "all", "geometry", "none"],
        help="what the fast path compiles on CUDA",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        help='torch.compile mode of the fast path\'s pieces, e.g. "max-autotune-no-cudagraphs" (default: none)',
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="train.cuda_graph: replay forward, loss and backward from a CUDA graph (CUDA only)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="also profile two steps at this point count (torch.profiler); the table goes to --out's folder",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--data", default=None, help="folder for the synthetic subject (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        from pointavatar.render import _triton_impl

        _triton_impl.ATOMIC_SEM = args.atomic_sem
    tmp = Path(tempfile.mkdtemp())
    data = Path(args.data) if args.data else tmp / "data"
    conf = synthetic_conf(
        data,
        tmp / "exp",
        args.res,
        args.backend,
        args.implementation,
        tf32=args.tf32,
        recompute_chunk=args.recompute_chunk,
        geometry_bf16=args.geometry_bf16,
        geometry_backward=args.geometry_backward,
        deformer_backward=args.deformer_backward,
    )
    trainer = Trainer(conf, nepoch=0, device=device)  # applies model.tf32
    model, loss_fn = trainer.model, trainer.loss
    model.compile_scope = args.compile_scope
    model.prior_query_chunk = args.prior_query_chunk
    model.inverse_skinning = args.inverse
    model.deformer_bf16 = args.deformer_bf16
    model.compile_prior_query = not args.eager_prior_query
    model.geometry_recompute_chunk = args.geometry_recompute_chunk
    model.activation_memory_budget = args.memory_budget
    model.compile_size_hint = args.compile_size_hint
    model.deform_contractions = args.deform_contractions
    model.compile_mode = args.compile_mode
    if model.uses_fast_path(device):  # the trainer's line with this benchmark's settings applied
        print(f"Benchmarked: {backwards_line(model, device)[len('Fast path: ') :]}")
    batch_iter = None
    rows = []
    for n in args.points:
        torch.manual_seed(0)
        model.pc.init(n)
        model.pc.radius = 0.3 * 0.75 ** math.log2(n / 100)
        bs = batch_size_for(n, conf.train.max_points_training, conf.train.max_batch)
        trainer.batch_size = bs
        loader = trainer._loader()
        batch_iter = iter(loader)
        indices, model_input, ground_truth = next(batch_iter)
        ground_truth = trainer.batch_ground_truth(indices, ground_truth)  # on the device, as in training
        while model_input["idx"].shape[0] < bs:  # fewer frames than B: repeat them
            model_input = {
                k: torch.cat([v, v]) if torch.is_tensor(v) else v + v for k, v in model_input.items()
            }
            ground_truth = {k: torch.cat([v, v]) for k, v in ground_truth.items()}
        model_input = {k: v[:bs] for k, v in model_input.items()}
        ground_truth = {k: v[:bs] for k, v in ground_truth.items()}
        model_input = move_to(model_input, device)
        fused = uses_fused_adam(model, device) if args.adam == "auto" else args.adam == "fused"
        optimizer = make_optimizer(model, conf.train.learning_rate, fused=fused)
        model.train()
        graphed = GraphedStep(model, loss_fn) if args.cuda_graph and device.type == "cuda" else None

        def step(model_input=model_input, ground_truth=ground_truth, optimizer=optimizer, graphed=graphed):
            optimizer.zero_grad(set_to_none=True)
            # The FLAME-prior weight of epoch 0 (the conf's lbs_weight).
            step_fn = graphed if graphed is not None else partial(forward_loss_backward, model, loss_fn)
            _, fragment_idx, fragment_weights = step_fn(model_input, ground_truth, conf.loss.lbs_weight)
            visibility = model.render_backend if args.visibility == "renderer" else "torch"
            trainer.schedule.observe(fragment_idx, fragment_weights, model.pc.n_points, visibility)
            optimizer.step()

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        times = timed(step, device, args.warmup, args.repeat)
        # Warm-up plus timed steps, wall clock: includes torch.compile's (re)compilation at this size.
        first_steps_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        memory = (
            memory_split(model, loss_fn, conf, model_input, ground_truth, optimizer)
            if device.type == "cuda"
            else {}
        )
        if graphed is not None:
            print(
                f"  cuda graph: {graphed.captures} captures ({graphed.capture_seconds:.2f} s), "
                f"{graphed.eager_steps} eager steps ({graphed.eager_seconds:.2f} s, the first compiling), "
                f"{graphed.overflows} overflows, budget {graphed.capacity} pairs",
                flush=True,
            )
        if n == args.profile:
            profile_steps(step, device, Path(args.out or "bench_train.json").with_suffix(f".profile{n}.txt"))

        model.eval()

        def render(model_input=model_input):
            model(model_input)

        render_times = timed(render, device, 1, max(3, args.repeat // 3))
        model.train()
        row = {
            "points": n,
            "batch": bs,
            "radius": model.pc.radius,
            "train_step_ms": statistics.median(times),
            "peak_gib": peak,
            "first_steps_s": first_steps_s,
            "render_ms_per_frame": statistics.median(render_times) / bs,
            **memory,
        }
        rows.append(row)
        print(
            f"N={n:>7} B={bs} r={model.pc.radius:.4f}: step {row['train_step_ms']:.1f} ms, peak {peak:.2f} GiB, "
            f"render {row['render_ms_per_frame']:.1f} ms/frame; first {args.warmup + args.repeat} steps "
            f"{first_steps_s:.1f} s wall",
            flush=True,
        )
        if memory:
            print("  memory (GiB): " + ", ".join(f"{k[:-4]} {v:.2f}" for k, v in memory.items()), flush=True)
        optimizer = step = graphed = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "res": args.res,
        "implementation": args.implementation,
        "tf32": args.tf32,
        "geometry_bf16": args.geometry_bf16,
        "geometry_backward": args.geometry_backward,
        "deformer_backward": args.deformer_backward,
        "adam": args.adam,
        "visibility": args.visibility,
        "inverse": args.inverse,
        "deformer_bf16": args.deformer_bf16,
        "atomic_sem": args.atomic_sem,
        "deform_contractions": args.deform_contractions,
        "recompute_chunk": args.recompute_chunk,
        "geometry_recompute_chunk": args.geometry_recompute_chunk,
        "geometry_recompute_chunk_applied": model.geometry_chunk(device),
        "activation_memory_budget": args.memory_budget,
        "activation_memory_budget_applied": model.memory_budget(device),
        "compile_size_hint": args.compile_size_hint,
        "compile_size_hint_applied": model.size_hint() if point_avatar.HINT_OVERRIDE else 0,
        "prior_query_chunk": args.prior_query_chunk,
        "compile_prior_query": not args.eager_prior_query,
        "compile_scope": args.compile_scope,
        "cuda_graph": args.cuda_graph,
        "compile_mode": args.compile_mode,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
