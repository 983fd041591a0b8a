"""A persistent Triton GEMM for the geometry MLP's layers on Hopper: C = A @ W^T (+ bias) with the elementwise
work that today runs as separate passes between the products done in the epilogue, on the tile in
registers, before the one store.

Step 9 (benchmarks/RESULTS.md) measured ``_triton_mlp``'s kernels, which load their operands through
pointers and apply the elementwise work as they load them: their plain product is 1.5x cuBLAS and every
fused prologue or epilogue costs more than the pass it replaces. This kernel is the other design: the
operand tiles come in through TMA descriptors (``TensorDescriptor``: the copy engine, no address
arithmetic in registers), one program per SM loops over the output tiles (persistent, the loop nest
flattened so that the next tile's loads are in flight during this tile's epilogue), and the epilogue's
math is the cheap form (exp2 and log2, no division in the Softplus).

Epilogues (``EPILOGUES``), on Z = A @ W^T + bias:

- "none": Z (a plain product);
- "softplus": softplus(Z) as torch's Softplus(beta, threshold): Z where beta Z > threshold, else
  max(Z, 0) + log(1 + exp(-beta |Z|)) / beta (log1p's loss of relative accuracy where exp(-beta |Z|) <
  2^-24 is below 6e-8 / beta absolute);
- "slope": Z * softplus'(P), P a partner tensor of C's shape (a layer's pre-activation): the sweep's
  g * softplus'(z) and the backward's dh * softplus'(z), with torch's slope (1 where beta P > threshold,
  else sigmoid(beta P)).

Operands: A [M, K] and W [N, K] (an nn.Linear weight as it is) row-major with 16-byte aligned rows, in
bf16 (fp32 accumulation) or fp32 (full fp32 products: the interpreter tests). Runs on CUDA (sm_90 for
TMA) or under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

EPILOGUES = {"none": 0, "softplus": 1, "slope": 2}
# (tile M, tile N, tile K, warps, stages); not yet timed on a GPU (benchmarks/bench_triton_mlp.py sweeps
# them). Chosen on the CPU (benchmarks/kernel_resources.py, sm_90 cubins): at 128 x 128 x 64 on 8 warps
# with 4 stages every epilogue compiles without spills (101, 185 and 218 registers) in 164 to 197 KB of
# shared memory; at 128 x 256 the epilogues spill and "slope" needs 279 KB (the H200 has 227 KB).
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 4
# Programs per SM of the persistent grid.
PROGRAMS_PER_SM = 1
_LOG2E = tl.constexpr(1.4426950408889634)  # globals read by a kernel must be constexpr
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _softplus_fast(z, beta, threshold):
    """torch's Softplus(beta, threshold) from exp2 and log2 (module docstring)."""
    bz = z * beta
    soft = tl.maximum(z, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(bz) * _LOG2E)) * (_LN2 / beta)
    return tl.where(bz > threshold, z, soft)


@triton.jit
def _slope_fast(p, beta, threshold):
    """softplus'(p) as torch's softplus_backward: 1 where beta p > threshold, else sigmoid(beta p)."""
    bp = p * beta
    return tl.where(bp > threshold, 1.0, 1.0 / (1.0 + tl.exp2(-bp * _LOG2E)))


@triton.jit
def _tma_linear_kernel(
    a_desc, w_desc, c_desc, p_desc, bias_ptr,
    M, N, K, beta, threshold,
    EPI: tl.constexpr, HAS_BIAS: tl.constexpr, FP32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):  # fmt: skip
    """C [M, N] = epilogue(A [M, K] @ W [N, K]^T + bias), one program per NUM_PROGRAMS-th output tile."""
    tiles_n = tl.cdiv(N, BN)
    num_tiles = tl.cdiv(M, BM) * tiles_n
    k_steps = tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        off_m = (tile // tiles_n) * BM
        off_n = (tile % tiles_n) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ks in range(k_steps):
            a = a_desc.load([off_m, ks * BK])
            w = w_desc.load([off_n, ks * BK])
            if FP32:
                acc = tl.dot(a, w.T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.T, acc)
        if HAS_BIAS:
            rn = off_n + tl.arange(0, BN)
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if EPI == 1:
            acc = _softplus_fast(acc, beta, threshold)
        if EPI == 2:
            acc = acc * _slope_fast(p_desc.load([off_m, off_n]).to(tl.float32), beta, threshold)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def _descriptor(t: torch.Tensor, block: list[int], name: str) -> TensorDescriptor:
    if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
        raise ValueError(f"{name} must be a 2-D row-major tensor with 16-byte aligned rows, not {tuple(t.shape)}")
    return TensorDescriptor.from_tensor(t, block)


def tma_linear(
    a: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    epilogue: str = "none",
    partner: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    beta: float = 100.0,
    threshold: float = 20.0,
) -> torch.Tensor:
    """epilogue(a @ w^T + bias) [M, N] in ``out_dtype`` (default a's dtype): a [M, K], w [N, K] of a's dtype
    (bf16, or fp32 for full-precision products), bias [N] or None, ``partner`` [M, N] for "slope" (see the
    module docstring)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {tuple(EPILOGUES)}, not {epilogue!r}")
    if (partner is not None) != (epilogue == "slope"):
        raise ValueError('a partner tensor is given with the "slope" epilogue, and only with it')
    if a.dtype != w.dtype or a.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"a and w must both be bf16 or both fp32, not {a.dtype} and {w.dtype}")
    m, k = a.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, w {tuple(w.shape)}")
    if partner is not None and partner.shape != (m, n):
        raise ValueError(f"the partner must have the output's shape {(m, n)}, not {tuple(partner.shape)}")
    c = torch.empty(m, n, dtype=out_dtype or a.dtype, device=a.device)
    if m == 0:
        return c
    bm, bn, bk = BLOCK_M, BLOCK_N, BLOCK_K
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if a.is_cuda:
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count * PROGRAMS_PER_SM
    else:
        sms = 4  # the interpreter: several programs, several tiles each
    programs = min(sms, tiles)
    _tma_linear_kernel[(programs,)](
        _descriptor(a, [bm, bk], "a"), _descriptor(w, [bn, bk], "w"), _descriptor(c, [bm, bn], "the output"),
        _descriptor(c if partner is None else partner, [bm, bn], "the partner"), a if bias is None else bias,
        m, n, k, float(beta), float(threshold),
        EPI=EPILOGUES[epilogue], HAS_BIAS=bias is not None, FP32=a.dtype == torch.float32,
        BM=bm, BN=bn, BK=bk, NUM_PROGRAMS=programs, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return c
