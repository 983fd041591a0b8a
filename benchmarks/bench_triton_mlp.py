"""Time the Triton MLP kernels (model/_triton_mlp.py) one at a time against cuBLAS and inductor, at the
geometry network's size (R rows of width 256, R = 819,200 for the 409,600-point step), over tile
settings, on CUDA. Every setting's result is checked against torch's (bf16 products, fp32 sums).

    python benchmarks/bench_triton_mlp.py --rows 819200 --out triton_mlp.json

Cases (each with the bytes it must move at least, for its GB/s):
- cuBLAS: the bf16 product [R, 256] @ [256, 256] and the weight gradient [256, R] @ [R, 256];
- inductor: one forward layer softplus(h @ W^T + b) compiled (cuBLAS and an elementwise pass), the
  step's way today;
- Triton ``linear``: plain (bf16 in, bf16 out); with the Softplus epilogue (the same layer as
  inductor's, in one kernel); with the Softplus prologue on a bf16 pre-activation; with the backward's
  "dz" prologue (four bf16 operands);
- Triton ``weight_grad``: plain bf16 operands, and the backward's (dz prologue on A, Softplus on B).
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

from pointavatar.model import _triton_mlp as tm  # noqa: E402

# (tile M, tile N, tile K, warps, stages)
LINEAR_SETTINGS = [
    (128, 128, 32, 8, 2),
    (128, 256, 64, 8, 3),
    (128, 256, 32, 8, 3),
    (128, 256, 64, 8, 4),
    (128, 256, 128, 8, 2),
    (64, 256, 64, 4, 3),
    (64, 256, 32, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (256, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
]
# (tile M, tile N, rows a reduction step, warps, stages, rows a program)
WGRAD_SETTINGS = [
    (128, 128, 16, 8, 2, 4096),
    (128, 128, 32, 8, 3, 4096),
    (128, 128, 64, 8, 3, 4096),
    (128, 128, 64, 8, 3, 8192),
    (128, 256, 64, 8, 3, 8192),
    (64, 128, 64, 4, 3, 4096),
    (128, 128, 64, 4, 3, 4096),
    (256, 128, 32, 8, 3, 8192),
    (128, 128, 32, 4, 4, 2048),
    (64, 64, 64, 4, 4, 4096),
]
BETA, THRESHOLD = 100.0, 20.0


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> float:
    """The largest error relative to the reference's largest magnitude; flagged above ``rtol``."""
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def _row(rows, kernel, ms, flops, moved, err=None):
    row = {"rows": rows, "kernel": kernel, "ms": ms, "tflops": flops / ms / 1e9, "gbps": moved / ms / 1e6}
    if err is not None:
        row["rel_err"] = err
    flag = "" if err is None or err < 2e-2 else "  RESULT DIFFERS"
    print(
        f"rows={rows} {kernel}: {ms:.3f} ms, {row['tflops']:.0f} TFLOP/s, {row['gbps']:.0f} GB/s"
        + ("" if err is None else f", rel err {err:.1e}")
        + flag,
        flush=True,
    )
    return row


def _sweep(rows, module, names, settings, cases, median, flops) -> list[dict]:
    """Each case (fn, keywords, reference, bytes moved) timed at each setting of ``module``'s tile constants
    ``names`` (restored afterwards), its result checked against the reference; a setting the compiler
    rejects (shared memory, registers) is reported and skipped."""
    default = tuple(getattr(module, name) for name in names)
    out = []
    try:
        for label, (fn, kw, ref, moved) in cases.items():
            for setting in settings:
                for name, value in zip(names, setting, strict=True):
                    setattr(module, name, value)
                try:
                    err = _close(fn(**kw), ref, 2e-2)
                    ms = median(lambda fn=fn, kw=kw: fn(**kw))
                except Exception as exc:
                    print(f"rows={rows} {label} {setting}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                out.append(_row(rows, f"{label} {setting}", ms, flops, moved, err))
    finally:
        for name, value in zip(names, default, strict=True):
            setattr(module, name, value)
    return out


def run(rows: int, width: int, warmup: int, repeat: int) -> list[dict]:
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16

    def rnd(*shape, scale=1.0, shift=0.0):
        return ((torch.rand(*shape, device="cuda", generator=g) - 0.5 + shift) * scale).to(bf)

    def median(fn):
        return statistics.median(timed(fn, dev, warmup, repeat))

    h = rnd(rows, width, scale=0.2, shift=0.5)  # an activation (positive)
    z = rnd(rows, width, scale=1.0)  # a pre-activation: beta z straddles the threshold
    d, u, v = rnd(rows, width, scale=2.0), rnd(rows, width, scale=2.0), rnd(rows, width, scale=2.0)
    w = (torch.randn(width, width, device="cuda", generator=g) / width**0.5).to(bf)
    bias = torch.randn(width, device="cuda", generator=g) * 0.05
    flops = 2 * rows * width * width
    act = rows * width * 2  # one bf16 [R, width] pass
    out = []

    # References in fp32 from the same bf16 operands.
    hf, zf = h.float(), z.float()
    sp_z = torch.nn.functional.softplus(zf, BETA, THRESHOLD)
    s = torch.ops.aten.softplus_backward(torch.ones_like(zf), zf, BETA, THRESHOLD)
    curv = torch.where(zf * BETA < THRESHOLD, BETA * s * (1 - s), torch.zeros_like(s))
    dz = d.float() * s + u.float() * v.float() * curv

    out.append(_row(rows, "cuBLAS mm bf16 [R, 256] @ [256, 256]", median(lambda: h @ w.T), flops, 2 * act))
    out.append(_row(rows, "cuBLAS mm bf16 [256, R] @ [R, 256] (weight gradient)", median(lambda: h.T @ d),
                    flops, 2 * act))  # fmt: skip
    layer = torch.compile(
        lambda h: torch.nn.functional.softplus((h @ w.T).float() + bias, BETA, THRESHOLD).to(bf),
        dynamic=False,
    )
    ref_layer = torch.nn.functional.softplus(hf @ w.float().T + bias, BETA, THRESHOLD)
    err = _close(layer(h), ref_layer, 2e-2)
    out.append(_row(rows, "inductor layer softplus(h @ W^T + b), bf16 out", median(lambda: layer(h)), flops,
                    2 * act, err))  # fmt: skip

    cases = {
        "linear plain, bf16 out": (
            dict(a=h, b=w.T, out_dtype=bf), hf @ w.float().T, 2 * act),
        "linear softplus epilogue, bf16 out": (
            dict(a=h, b=w.T, bias=bias, epilogue="softplus", out_dtype=bf), ref_layer, 2 * act),
        "linear softplus prologue, bf16 out": (
            dict(a=z, b=w.T, prologue="softplus", out_dtype=bf), sp_z @ w.float().T, 2 * act),
        "linear dz prologue, fp32 out": (
            dict(a=d, b=w.T, prologue="dz", z=z, u=u, v=v), dz @ w.float().T, 6 * act),
    }  # fmt: skip
    linear_names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "NUM_WARPS", "NUM_STAGES")
    out += _sweep(rows, tm, linear_names, LINEAR_SETTINGS,
                  {name: (tm.linear, *case) for name, case in cases.items()}, median, flops)  # fmt: skip

    wcases = {
        "weight_grad plain": (dict(a=d, b=h), d.float().T @ hf, 2 * act),
        "weight_grad dz / softplus prologues": (
            dict(a=d, a_prologue="dz", z=z, u=u, v=v, b=z, b_prologue="softplus"), dz.T @ sp_z, 5 * act),
    }  # fmt: skip
    wgrad_names = ("BLOCK_M", "BLOCK_N", "WGRAD_BLOCK_R", "NUM_WARPS", "NUM_STAGES", "ROWS_PER_PROGRAM")
    out += _sweep(rows, tm, wgrad_names, WGRAD_SETTINGS,
                  {name: (lambda **kw: tm.weight_grad(**kw)[0], *case) for name, case in wcases.items()}, median,
                  flops)  # fmt: skip

    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[819200])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton_mlp.py needs a CUDA device")
    rows_out = [r for rows in args.rows for r in run(rows, args.width, args.warmup, args.repeat)]
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
