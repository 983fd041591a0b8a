"""Time and peak memory of the geometry network's training work alone (forward, SDF-gradient sweep,
backward), for the fast path's variants, on CUDA.

The geometry piece is most of the 409,600-point training step (benchmarks/RESULTS.md, step 6): this
isolates it, so that a change to it can be measured in seconds instead of a whole-model benchmark.
Rows = 2 N (the points and their eikonal samples). A variant is MODE[:KEY=VALUE,...]:

- MODE: "autocast" (geometry_backward "autograd" with geometry_bf16: the default on large GPUs),
  "fp32" (autograd, no bf16), "fused" or "fused_recompute" (the hand-written backward, bf16);
- KEY=VALUE: torch._inductor options for the compile (e.g. realize_reads_threshold=16), applied to
  the autocast piece or to the fused passes (geometry_fused.COMPILE_OPTIONS); except ``budget=F``
  (autocast and fp32 modes): the partitioner's activation memory budget (model.activation_memory_budget).

    python benchmarks/bench_geometry.py --rows 819200 --variants autocast fused_recompute \\
        fused_recompute:realize_reads_threshold=16 --out bench_geometry.json

Each variant's weight gradients are compared with the first variant's (relative error of the
largest), as a check that the variants compute the same thing.

`--floor` also times the building blocks at each row count, for the floor of the geometry's kernels:
one hidden layer's products in bf16 (activations @ W^T, and the weight gradient's [256, R] @ [R, 256])
and in TF32, one elementwise pass over an [R, 256] activation (Softplus) in fp32 and in bf16, and a
forward layer with its bias and activation in bf16 three ways (cuBLAS's addmm then a Softplus pass;
addmm alone; cuBLASLt's fused bias + GELU epilogue through torch._addmm_activation, a stand-in for a
Softplus fused into the product at cuBLAS's speed, which torch does not offer), each with its achieved
TFLOP/s or GB/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch._functorch.config as functorch_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from timing import timed  # noqa: E402

from pointavatar.config import load_conf  # noqa: E402
from pointavatar.model import geometry_fused  # noqa: E402
from pointavatar.model.geometry import GeometryNetwork  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = ("autocast", "fp32", "fused", "fused_recompute")


def parse_variant(spec: str) -> tuple[str, dict]:
    mode, _, rest = spec.partition(":")
    if mode not in MODES:
        raise SystemExit(f"variant {spec!r}: the mode must be one of {', '.join(MODES)}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value else True
    return mode, options


def make_step(net: GeometryNetwork, mode: str, options: dict):
    """A function y -> (out, grad) for the variant, compiled as the fast path compiles it."""
    torch._dynamo.reset()
    geometry_fused._COMPILED.clear()
    options = dict(options)
    budget = float(options.pop("budget", 1.0))
    geometry_fused.COMPILE_OPTIONS = options or None
    if mode in ("autocast", "fp32"):

        def piece(y):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "autocast"):
                out, grad = net.forward_with_gradient_explicit(y)
            return out.float(), grad.float()

        compiled = torch.compile(piece, dynamic=True, options=options or None)

        def under_budget(y):  # traced and partitioned at the first call, as PointAvatar._compiled_call
            with functorch_config.patch(activation_memory_budget=budget):
                return compiled(y)

        return under_budget
    bf16 = torch.bfloat16
    return lambda y: geometry_fused.forward_with_gradient_fused(
        net, y, save_dtype=bf16, mm_dtype=bf16, compiled=True, recompute_sweep=mode == "fused_recompute"
    )


def floor_rows(rows: int, width: int, warmup: int, repeat: int) -> list[dict]:
    """Median times of the geometry's building blocks at ``rows`` x ``width`` (see the module docstring)."""
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "tf32")):
        a = torch.randn(rows, width, device="cuda", generator=g).to(dtype)
        w = torch.randn(width, width, device="cuda", generator=g).to(dtype)
        size = a.element_size()
        # Bytes each product must move at least: the [R, width] operand read once and the result written.
        cases = {
            f"mm {name} [R, {width}] @ [{width}, {width}]": (
                lambda a=a, w=w: a @ w.T,
                2 * rows * width * size,
            ),
            f"mm {name} [{width}, R] @ [R, {width}] (weight gradient)": (
                lambda a=a: a.T @ a,
                rows * width * size,
            ),
        }
        for label, (fn, moved) in cases.items():
            ms = statistics.median(timed(fn, dev, warmup, repeat))
            flops = 2 * rows * width * width
            out.append({"rows": rows, "kernel": label, "ms": ms, "tflops": flops / ms / 1e9,
                        "gbps": moved / ms / 1e6})  # fmt: skip
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        z = torch.randn(rows, width, device="cuda", generator=g).to(dtype)
        ms = statistics.median(timed(lambda z=z: torch.nn.functional.softplus(z, 100.0), dev, warmup, repeat))
        moved = 2 * rows * width * z.element_size()
        out.append({"rows": rows, "kernel": f"softplus {name} [R, {width}]", "ms": ms, "tflops": 0.0,
                    "gbps": moved / ms / 1e6})  # fmt: skip
    out += epilogue_rows(rows, width, warmup, repeat)
    for row in out:
        print(
            f"rows={rows} {row['kernel']}: {row['ms']:.3f} ms, {row['tflops']:.0f} TFLOP/s, {row['gbps']:.0f} GB/s"
        )
    return out


def epilogue_rows(rows: int, width: int, warmup: int, repeat: int) -> list[dict]:
    """A forward layer act(h @ W^T + b) in bf16: the product and a separate Softplus pass (today's), the
    product with its bias alone, and cuBLASLt's product with a fused bias + GELU epilogue. If the last
    costs about the second, an epilogue at cuBLAS's speed saves the pass; the GELU result is checked."""
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(2)
    h = (torch.rand(rows, width, device="cuda", generator=g) * 0.2).to(torch.bfloat16)
    w = (torch.randn(width, width, device="cuda", generator=g) / width**0.5).to(torch.bfloat16)
    b = (torch.randn(width, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
    z = h.float() @ w.float().T + b.float()
    err = (
        (torch._addmm_activation(b, h, w.T, use_gelu=True).float() - torch.nn.functional.gelu(z))
        .abs()
        .max()
        .item()
    )
    if err > 2e-2 * z.abs().max().item():
        raise RuntimeError(f"the GELU epilogue's result differs from the reference by {err:.3g}")
    cases = {
        "layer bf16: addmm, then a Softplus pass": lambda: torch.nn.functional.softplus(
            torch.addmm(b, h, w.T), 100.0
        ),
        "layer bf16: addmm with bias only": lambda: torch.addmm(b, h, w.T),
        "layer bf16: addmm with cuBLASLt's bias + GELU epilogue": lambda: torch._addmm_activation(
            b, h, w.T, use_gelu=True
        ),
    }
    flops, moved = 2 * rows * width * width, 2 * rows * width * h.element_size()
    out = []
    for label, fn in cases.items():
        ms = statistics.median(timed(fn, dev, warmup, repeat))
        out.append(
            {"rows": rows, "kernel": label, "ms": ms, "tflops": flops / ms / 1e9, "gbps": moved / ms / 1e6}
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[819200])
    parser.add_argument("--variants", nargs="+", default=["autocast", "fused_recompute"])
    parser.add_argument("--conf", default=str(ROOT / "confs" / "subject1.conf"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--profile", default=None, help="a variant to profile (two steps, kernel table)")
    parser.add_argument("--floor", action="store_true", help="also time the building blocks (docstring)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_geometry.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True  # model.tf32, the default
    torch.manual_seed(0)
    net = GeometryNetwork(load_conf(args.conf).model.geometry_network).cuda()
    params = [p for p in net.parameters() if p.requires_grad]
    rows_out = []
    for rows in args.rows:
        if args.floor:
            rows_out += floor_rows(rows, net.lin1.weight.shape[0], args.warmup, args.repeat)
        y = (torch.rand(rows, 3, device="cuda") - 0.5) * 1.2
        with torch.no_grad():
            width = net(y[:1]).shape[1]  # sdf and the albedo logits
        r_out = torch.randn(rows, width, device="cuda")
        r_grad = torch.randn(rows, 3, device="cuda")
        first_grads = None
        for spec in args.variants:
            mode, options = parse_variant(spec)
            step_fn = make_step(net, mode, options)

            def step(step_fn=step_fn, y=y, r_out=r_out, r_grad=r_grad):
                for p in params:
                    p.grad = None
                out, grad = step_fn(y)
                loss = (out * r_out).sum() + (grad * r_grad).sum()
                loss.backward()

            timed(step, torch.device("cuda"), args.warmup, 0)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            times = timed(step, torch.device("cuda"), 0, args.repeat)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            grads = [p.grad.float().clone() for p in params]
            if first_grads is None:
                first_grads, err = grads, 0.0
            else:
                err = max(
                    float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for a, b in zip(grads, first_grads, strict=True)
                )
            row = {"rows": rows, "variant": spec, "step_ms": statistics.median(times), "peak_gib": peak,
                   "grad_rel_err_vs_first": err}  # fmt: skip
            rows_out.append(row)
            print(
                f"rows={rows} {spec}: {row['step_ms']:.2f} ms, peak +{peak:.2f} GiB, grads vs first {err:.2e}"
            )
            if args.profile == spec:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    step()
                    step()
                    torch.cuda.synchronize()
                print(
                    prof.key_averages().table(
                        sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90
                    )
                )
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
