"""Frame time of the baked renderer (model/baked.py), one frame at a time, against the eval forward.

Builds the benchmark model as bench_train.py does (subject1.conf on the synthetic subject, the point
cloud re-initialised at N points with the radius the original would have at N), bakes it, and measures:

- the bake time (first bake, which includes the device's warm-up, and a second one);
- render() of one frame (B = 1), "rgb" (4 channels composited) and "all" (13 channels): the latency of
  a call (CUDA events around it, warm-up then median of --repeat; the test frames in turn), and the
  steady-state time per frame over --repeat frames rendered back to back; on CUDA also with the
  per-frame stage captured in a CUDA graph, and torch.compile'd (--compile modes);
- where the time goes: the per-frame stage before rasterization, the rasterizer, the compositor (each
  timed alone);
- the baked avatar's memory, and the peak memory of a render;
- the eval forward (``model.eval(); model(input)``) per frame, and the largest difference between its
  images and the baked ones on the test frames (the equivalence figures).

    python benchmarks/bench_baked.py --out bench_baked.json                          # CUDA: 409,600 points, 512x512
    python benchmarks/bench_baked.py --device cpu --out bench_baked_cpu.json         # CPU: the demo's size

Defaults by device: CUDA 409,600 points at 512x512; CPU 6,400 points at 128x128 (the demo's size: its
cloud stops growing at 3,200 to 6,400 points). TF32 stays off (fp32 matmuls), as in the exactness tests.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from bench_train import synthetic_conf, timed  # noqa: E402

from pointavatar.engine.batching import move_to  # noqa: E402
from pointavatar.engine.device import resolve_device  # noqa: E402
from pointavatar.engine.experiment import Experiment, build_model  # noqa: E402
from pointavatar.model.baked import BakedAvatar  # noqa: E402
from pointavatar.model.point_avatar import POINTS_PER_PIXEL  # noqa: E402
from pointavatar.render import alpha_composite, rasterize_points  # noqa: E402

IMAGES = ("rgb", "mask", "normal", "shading", "albedo")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def frame_inputs(dataset, device) -> list[dict]:
    """The test frames as B = 1 inputs on the device."""
    frames = []
    for i in range(len(dataset)):
        _, sample, _ = dataset.collate_fn([dataset[i]])
        frames.append(
            move_to({k: sample[k] for k in ("expression", "flame_pose", "intrinsics", "cam_pose")}, device)
        )
    return frames


def stats(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(times),
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "min_ms": ordered[0],
    }


def render_figures(
    baked: BakedAvatar, frames: list[dict], device, channels: str, warmup: int, repeat: int
) -> dict:
    counter = iter(range(10**9))

    def one():
        f = frames[next(counter) % len(frames)]
        return baked.render(f["expression"], f["flame_pose"], f["intrinsics"], f["cam_pose"], channels)

    latency = stats(timed(one, device, warmup, repeat))
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        one()
    sync(device)
    steady = (time.perf_counter() - start) * 1000 / repeat
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        one()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = float("nan")
    return {
        **latency,
        "fps": 1000.0 / latency["median_ms"],
        "steady_ms": steady,
        "steady_fps": 1000.0 / steady,
        "render_peak_extra_mib": peak,
    }


def stage_figures(
    baked: BakedAvatar, frames: list[dict], device, channels: str, warmup: int, repeat: int
) -> dict:
    """Each part of render() timed alone on the first test frame."""
    f = frames[0]
    args = baked._inputs("bench", f["expression"], f["flame_pose"], f["intrinsics"], f["cam_pose"])
    all_channels = channels == "all"
    # Copies: the outputs of a CUDA-graphed stage ("reduce-overhead") are overwritten by its next run.
    ndc, features = (t.clone() for t in baked._points_stage(*args, all_channels))
    fragments = rasterize_points(
        ndc, baked.img_res, baked.radius, POINTS_PER_PIXEL, backend=baked.render_backend
    )
    with torch.no_grad():
        out = {
            "points_stage": timed(lambda: baked._points_stage(*args, all_channels), device, warmup, repeat),
            "rasterize": timed(
                lambda: rasterize_points(
                    ndc, baked.img_res, baked.radius, POINTS_PER_PIXEL, backend=baked.render_backend
                ),
                device,
                warmup,
                repeat,
            ),
            "composite": timed(
                lambda: alpha_composite(fragments, features, baked.radius, backend=baked.render_backend),
                device,
                warmup,
                repeat,
            ),
        }
    return {k: statistics.median(v) for k, v in out.items()}


def equivalence(model, baked: BakedAvatar, frames: list[dict]) -> dict:
    """Largest and mean |baked - eval forward| per image over the frames, and the largest 8-bit difference
    (as the PNGs are written: truncated)."""
    res = model.img_res
    worst = {name: 0.0 for name in IMAGES}
    mean = {name: 0.0 for name in IMAGES}
    worst_u8 = 0
    model.eval()
    for f in frames:
        with torch.no_grad():
            out = model(f)
        ref = {
            "rgb": out.rgb_image.reshape(1, res, res, 3),
            "mask": out.predicted_mask.reshape(1, res, res),
            "normal": out.eval.normal_image.reshape(1, res, res, 3),
            "shading": out.eval.shading_image.reshape(1, res, res, 3),
            "albedo": out.eval.albedo_image.reshape(1, res, res, 3),
        }
        got = baked.render(f["expression"], f["flame_pose"], f["intrinsics"], f["cam_pose"])
        for name in IMAGES:
            diff = (getattr(got, name) - ref[name]).abs()
            worst[name] = max(worst[name], diff.max().item())
            mean[name] += diff.mean().item() / len(frames)

        def u8(x):
            return (x.clamp(0, 1) * 255).to(torch.uint8).int()

        worst_u8 = max(worst_u8, (u8(got.rgb) - u8(ref["rgb"])).abs().max().item())
    return {"max_abs": worst, "mean_abs": mean, "max_rgb_8bit_levels": worst_u8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--res", type=int, default=None, help="image size (default: 512 on CUDA, 128 on CPU)")
    p.add_argument("--points", type=int, default=None, help="N (default: 409600 on CUDA, 6400 on CPU)")
    p.add_argument("--backend", default="auto", help="model.render_backend")
    p.add_argument("--implementation", default="reference", choices=["reference", "fast", "auto"])
    p.add_argument(
        "--compile",
        nargs="*",
        default=None,
        help="also measure the torch.compile'd per-frame stage in these torch.compile modes ('default', "
        "'reduce-overhead', 'max-autotune-no-cudagraphs'); default: 'default' and 'reduce-overhead' on "
        "CUDA, none on CPU",
    )
    p.add_argument(
        "--no_cuda_graph",
        action="store_true",
        help="skip the CUDA-graph variant (measured by default on CUDA)",
    )
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--eval_repeat", type=int, default=5, help="repeats of the (slow) eval forward")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data", default=None, help="folder for the synthetic subject (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    res = args.res or (512 if cuda else 128)
    n = args.points or (409600 if cuda else 6400)
    modes = args.compile if args.compile is not None else (["default", "reduce-overhead"] if cuda else [])

    tmp = Path(tempfile.mkdtemp())
    data = Path(args.data) if args.data else tmp / "data"
    conf = synthetic_conf(data, tmp / "exp", res, args.backend, args.implementation)
    exp = Experiment(conf)
    test_set = exp.test_dataset(only_json=True)
    model = build_model(conf, exp.train_dataset(only_json=True), test_set.shape_params).to(device)
    torch.manual_seed(0)
    model.pc.init(n)
    model.pc.radius = 0.3 * 0.75 ** math.log2(n / 100)
    model.eval()
    frames = frame_inputs(test_set, device)
    print(
        f"{device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), N={n}, {res}x{res}", flush=True
    )

    bake_ms = []
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        baked = BakedAvatar.from_model(model)
        sync(device)
        bake_ms.append((time.perf_counter() - start) * 1000)
    print(
        f"bake {bake_ms[0]:.1f} ms (first), {bake_ms[1]:.1f} ms; {baked.nbytes() / 2**20:.1f} MiB", flush=True
    )

    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "res": res,
        "points": n,
        "radius": model.pc.radius,
        "implementation": args.implementation,
        "render_backend": args.backend,
        "bake_ms_first": bake_ms[0],
        "bake_ms": bake_ms[1],
        "baked_mib": baked.nbytes() / 2**20,
        "baked_memory_bytes": baked.memory_report(),
        "model_parameters_mib": sum(t.numel() * t.element_size() for t in model.parameters()) / 2**20,
        "render": {},
    }
    variants = [("eager", baked)]
    if cuda and not args.no_cuda_graph:
        variants.append(("cuda_graph", BakedAvatar.from_model(model, cuda_graph=True)))
    variants += [(f"compiled_{m}", BakedAvatar.from_model(model, compile=m)) for m in modes]
    for name, avatar in variants:
        for channels in ("rgb", "all"):
            key = f"{name}/{channels}"
            figures = render_figures(avatar, frames, device, channels, args.warmup, args.repeat)
            if avatar._compile_failed or avatar._graph_failed:
                figures["fell_back_to_eager"] = True
            figures["stages_ms"] = stage_figures(avatar, frames, device, channels, args.warmup, args.repeat)
            result["render"][key] = figures
            print(
                f"render {key}: {figures['median_ms']:.3f} ms ({figures['fps']:.0f} fps) per call, "
                f"{figures['steady_ms']:.3f} ms ({figures['steady_fps']:.0f} fps) back to back"
                + "; stages (ms): "
                + ", ".join(f"{k} {v:.3f}" for k, v in figures["stages_ms"].items()),
                flush=True,
            )

    def forward():
        with torch.no_grad():
            model(frames[0])

    eval_times = timed(forward, device, 1, args.eval_repeat)
    result["eval_forward_ms"] = statistics.median(eval_times)
    print(f"eval forward {result['eval_forward_ms']:.1f} ms per frame", flush=True)
    result["equivalence"] = equivalence(model, baked, frames)
    print(f"equivalence (max |baked - eval forward|): {result['equivalence']['max_abs']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
