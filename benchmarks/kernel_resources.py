"""Registers and stack of the geometry MLP's Triton kernels (model/_triton_mlp.py) compiled for sm_90, on
any machine with Triton (no GPU needed): `triton.compile` to a cubin, then the `cuobjdump` that ships
with Triton's NVIDIA backend. benchmarks/RESULTS.md, steps 8 and 9:

    python benchmarks/kernel_resources.py                      # the modules' tile settings
    python benchmarks/kernel_resources.py --tiles 128 128 64 8 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from pointavatar.model import _triton_mlp as tm  # noqa: E402

FLOATS = ("scale", "beta", "threshold")


def compile_sm90(kernel, pointers: tuple[str, ...], constexprs: dict, num_warps: int, num_stages: int):
    """``kernel`` compiled for sm_90: ``pointers`` as fp32 pointers, the Softplus floats as fp32, the other
    arguments as i32, and the given constexpr values."""
    signature = {name: "i32" for name in kernel.arg_names}
    signature.update({name: "*fp32" for name in pointers})
    signature.update({name: "fp32" for name in FLOATS})
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()},
    )
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resources(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    usage = " ".join(x for x in out.split() if x.startswith(("REG", "STACK")))
    ptx = compiled.asm["ptx"]
    return (
        f"{usage}, cp.async {'cp.async' in ptx}, wgmma {'wgmma' in ptx}, "
        f"shared memory {compiled.metadata.shared / 1024:.0f} KB"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, nargs=5, metavar=("M", "N", "K", "WARPS", "STAGES"),
                   default=[tm.BLOCK_M, tm.BLOCK_N, tm.BLOCK_K, tm.NUM_WARPS, tm.NUM_STAGES])  # fmt: skip
    p.add_argument("--wgrad-rows", type=int, default=tm.WGRAD_BLOCK_R, help="weight_grad's rows a step")
    args = p.parse_args()
    bm, bn, bk, warps, stages = args.tiles
    linear_ptrs = ("x_ptr", "z_ptr", "u_ptr", "v_ptr", "e_ptr", "b_ptr", "bias_ptr", "c_ptr")
    for name, pro in tm.PROLOGUES.items():
        consts = {"PRO": pro, "HAS_BIAS": True, "DOT_BF16": True, "EPI": 0, "BM": bm, "BN": bn, "BK": bk}
        print(
            f"linear, prologue {name}: {resources(compile_sm90(tm._linear_kernel, linear_ptrs, consts, warps, stages))}"
        )
    wgrad_ptrs = ("ax_ptr", "az_ptr", "au_ptr", "av_ptr", "bx_ptr", "bz_ptr", "be_ptr", "c_ptr", "sum_ptr")
    for a_name, b_name in (("slope", "none"), ("slope", "slope"), ("dz", "softplus"), ("dz", "none")):
        consts = {"APRO": tm.PROLOGUES[a_name], "BPRO": tm.PROLOGUES[b_name], "SUM_A": True, "DOT_BF16": True,
                  "BM": bm, "BN": bn, "BR": args.wgrad_rows, "ROWS": tm.ROWS_PER_PROGRAM}  # fmt: skip
        compiled = compile_sm90(tm._wgrad_kernel, wgrad_ptrs, consts, warps, stages)
        print(f"weight_grad, prologues {a_name} / {b_name}: {resources(compiled)}")


if __name__ == "__main__":
    main()
