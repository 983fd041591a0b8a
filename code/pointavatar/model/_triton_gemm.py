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

Epilogues (``EPILOGUES``), on Z = A @ W^T + bias, with P and Q partner tensors of C's shape read in
the epilogue (any strides), and s(.) = softplus' as torch's softplus_backward (1 where beta p >
threshold, else sigmoid(beta p)):

- "none": Z (a plain product);
- "softplus": softplus(Z) as torch's Softplus(beta, threshold): Z where beta Z > threshold, else
  max(Z, 0) + log(1 + exp(-beta |Z|)) / beta (log1p's loss of relative accuracy where exp(-beta |Z|) <
  2^-24 is below 6e-8 / beta absolute). The forward chain: h_{l+1} = softplus(h_l W_l^T + b_l).
- "slope": Z * s(P), P a pre-activation z.
- "slope_h": Z * s(P), P the activation h = softplus(z) instead, from which the slope follows without z:
  exp(beta h) = 1 + exp(beta z), so s = 1 - exp(-beta h) (and h = z, s = 1 where beta h > threshold).
  The sweep, g_{l-1} = (Z = u_l W_l) * s(h_l), and the forward chain's adjoint (dh * s).
- "adjoint": two outputs from one product Z = dG_l W_l^T (the sweep's adjoint): C = Z * s(P) (dG_{l+1})
  and C2 = Z * Q * s'(P) with s' = beta s (1 - s) = softplus'' (0 where beta h >= threshold), P = h and
  Q = g (the sweep vector): the sweep's share of dz.
- "slope_add": Z * s(P) + Q, P = h, Q an addend (the forward chain's adjoint plus the sweep's dz).
- "slope_keep": two outputs, C = Z * s(P) and C2 = Z, P = h (the sweep, keeping both the vector g and
  g * s for the backward).

Operands: A [M, K] and W [N, K] (an nn.Linear weight as it is) row-major with 16-byte aligned rows, in
bf16 (fp32 accumulation) or fp32 (full fp32 products: the interpreter tests). Runs on CUDA (sm_90 for
TMA) or under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.tools.tensor_descriptor import TensorDescriptor

EPILOGUES = {
    "none": 0,
    "softplus": 1,
    "slope": 2,
    "slope_h": 3,
    "adjoint": 4,
    "slope_add": 5,
    "slope_keep": 6,
}
# The partner tensors each epilogue reads, and the epilogues with a second output.
PARTNERS = {"none": 0, "softplus": 0, "slope": 1, "slope_h": 1, "adjoint": 2, "slope_add": 2, "slope_keep": 1}
TWO_OUTPUTS = ("adjoint", "slope_keep")
# (tile M, tile N, tile K, warps, stages); not yet timed on a GPU (benchmarks/bench_triton_mlp.py sweeps
# them). Chosen on the CPU (benchmarks/kernel_resources.py, sm_90 cubins): at 128 x 128 x 64 on 8 warps
# with 4 stages, the epilogue on column halves, every epilogue compiles without spills (120 to 189
# registers) in 144 to 148 KB of shared memory; on whole tiles "adjoint" and "slope_add" spill, and at
# 128 x 256 the epilogues spill either way (benchmarks/RESULTS.md step 9).
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 4
# Programs per SM of the persistent grid.
PROGRAMS_PER_SM = 1
# The epilogue on the tile's two column halves one after the other (``_tma_linear_kernel``).
EPILOGUE_SUBTILE = True
_LOG2E = tl.constexpr(1.4426950408889634)  # globals read by a kernel must be constexpr
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _softplus_fast(z, beta, threshold, FAST_LOG: tl.constexpr):
    """torch's Softplus(beta, threshold) from exp2 and log2 (module docstring); with FAST_LOG the log2 is
    the hardware's approximate one (lg2.approx, relative error about 2^-22; libdevice's accurate log2 is
    a dozen FMAs an element), which Triton's interpreter cannot run."""
    bz = z * beta
    t = 1.0 + tl.exp2(-tl.abs(bz) * _LOG2E)
    log2 = libdevice.fast_log2f(t) if FAST_LOG else tl.log2(t)
    soft = tl.maximum(z, 0.0) + log2 * (_LN2 / beta)
    return tl.where(bz > threshold, z, soft)


@triton.jit
def _slope_fast(p, beta, threshold):
    """softplus'(p) as torch's softplus_backward: 1 where beta p > threshold, else sigmoid(beta p)."""
    bp = p * beta
    return tl.where(bp > threshold, 1.0, 1.0 / (1.0 + tl.exp2(-bp * _LOG2E)))


@triton.jit
def _load_tile(ptr, s0, s1, rm, rn, M, N):
    """The [BM, BN] tile of an [M, N] partner at rows rm, columns rn, in fp32 (0 outside)."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    return tl.load(ptr + rm[:, None] * s0 + rn[None, :] * s1, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _epilogue(acc, rm, rn, M, N, bias_ptr, p_ptr, q_ptr, sp0, sp1, sq0, sq1, beta, threshold,
              EPI: tl.constexpr, HAS_BIAS: tl.constexpr, FAST_LOG: tl.constexpr):  # fmt: skip
    """(C, C2) of the accumulator tile at rows rm, columns rn (module docstring); C2 is the product (with
    its bias) but for "adjoint"."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c2 = acc
    if EPI == 1:
        acc = _softplus_fast(acc, beta, threshold, FAST_LOG)
    if EPI == 2:
        acc = acc * _slope_fast(_load_tile(p_ptr, sp0, sp1, rm, rn, M, N), beta, threshold)
    if EPI >= 3:
        bh = _load_tile(p_ptr, sp0, sp1, rm, rn, M, N) * beta
        e = tl.exp2(-bh * _LOG2E)  # exp(-beta h) = 1 - s
        s = tl.where(bh > threshold, 1.0, 1.0 - e)
        if EPI == 4:
            q = _load_tile(q_ptr, sq0, sq1, rm, rn, M, N)
            c2 = acc * q * tl.where(bh < threshold, beta * s * e, 0.0)
        acc = acc * s
        if EPI == 5:
            acc += _load_tile(q_ptr, sq0, sq1, rm, rn, M, N)
    return acc, c2


@triton.jit
def _tma_linear_kernel(
    a_desc, w_desc, c_desc, c2_desc, bias_ptr, p_ptr, q_ptr,
    M, N, K, sp0, sp1, sq0, sq1, beta, threshold,
    EPI: tl.constexpr, HAS_BIAS: tl.constexpr, FP32: tl.constexpr, SUBTILE: tl.constexpr, FAST_LOG: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):  # fmt: skip
    """C [M, N] = epilogue(A [M, K] @ W [N, K]^T + bias), one program per NUM_PROGRAMS-th output tile. With
    SUBTILE the epilogue runs on the tile's two column halves one after the other (half the registers
    live at once; the output descriptors then have [BM, BN / 2] blocks)."""
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
        rm = off_m + tl.arange(0, BM)
        if SUBTILE:
            halves = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            for i in tl.static_range(2):
                rn = off_n + i * (BN // 2) + tl.arange(0, BN // 2)
                c, c2 = _epilogue(halves[i], rm, rn, M, N, bias_ptr, p_ptr, q_ptr, sp0, sp1, sq0, sq1, beta,
                                  threshold, EPI, HAS_BIAS, FAST_LOG)  # fmt: skip
                c_desc.store([off_m, off_n + i * (BN // 2)], c.to(c_desc.dtype))
                if EPI == 4 or EPI == 6:
                    c2_desc.store([off_m, off_n + i * (BN // 2)], c2.to(c2_desc.dtype))
        else:
            rn = off_n + tl.arange(0, BN)
            c, c2 = _epilogue(acc, rm, rn, M, N, bias_ptr, p_ptr, q_ptr, sp0, sp1, sq0, sq1, beta, threshold,
                              EPI, HAS_BIAS, FAST_LOG)  # fmt: skip
            c_desc.store([off_m, off_n], c.to(c_desc.dtype))
            if EPI == 4 or EPI == 6:
                c2_desc.store([off_m, off_n], c2.to(c2_desc.dtype))


def _descriptor(t: torch.Tensor, block: list[int], name: str) -> TensorDescriptor:
    if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
        raise ValueError(
            f"{name} must be a 2-D row-major tensor with 16-byte aligned rows, not {tuple(t.shape)}"
        )
    return TensorDescriptor.from_tensor(t, block)


def tma_linear(
    a: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    epilogue: str = "none",
    p: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    out2: torch.Tensor | None = None,
    beta: float = 100.0,
    threshold: float = 20.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """epilogue(a @ w^T + bias) [M, N] in ``out_dtype`` (default a's dtype), and for "adjoint" and
    "slope_keep" their second output too: a [M, K], w [N, K] of a's dtype (bf16, or fp32 for
    full-precision products), bias [N] or None, the partners ``p`` (and ``q``) [M, N] as the epilogue reads
    them (module docstring). ``out`` (``out2``): [M, N] tensors (views with 16-byte aligned rows, e.g. the
    first columns of a wider buffer) to write the outputs into, instead of new ones."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {tuple(EPILOGUES)}, not {epilogue!r}")
    given = [t for t in (p, q) if t is not None]
    wanted = PARTNERS[epilogue]
    if len(given) != wanted or (wanted == 1 and p is None):
        reads = ("no partner", "the partner p", "the partners p and q")[wanted]
        raise ValueError(f'epilogue "{epilogue}" reads {reads}')
    if a.dtype != w.dtype or a.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"a and w must both be bf16 or both fp32, not {a.dtype} and {w.dtype}")
    m, k = a.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, w {tuple(w.shape)}")
    if any(t.shape != (m, n) for t in given):
        raise ValueError(f"the partners must have the output's shape {(m, n)}")
    two = epilogue in TWO_OUTPUTS
    for t, name in ((out, "out"), (out2, "out2")):
        if t is not None and t.shape != (m, n):
            raise ValueError(f"{name} must have the output's shape {(m, n)}, not {tuple(t.shape)}")
    c = torch.empty(m, n, dtype=out_dtype or a.dtype, device=a.device) if out is None else out
    c2 = (torch.empty_like(c) if out2 is None else out2) if two else c
    if m == 0:
        return (c, c2) if two else c
    bm, bn, bk = BLOCK_M, BLOCK_N, BLOCK_K
    bo = bn // 2 if EPILOGUE_SUBTILE else bn  # the output blocks
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if a.is_cuda:
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count * PROGRAMS_PER_SM
    else:
        sms = 4  # the interpreter: several programs, several tiles each
    programs = min(sms, tiles)
    pp = c if p is None else p
    qq = c if q is None else q
    _tma_linear_kernel[(programs,)](
        _descriptor(a, [bm, bk], "a"), _descriptor(w, [bn, bk], "w"), _descriptor(c, [bm, bo], "the output"),
        _descriptor(c2, [bm, bo], "the output"), a if bias is None else bias, pp, qq,
        m, n, k, pp.stride(0), pp.stride(1), qq.stride(0), qq.stride(1), float(beta), float(threshold),
        EPI=EPILOGUES[epilogue], HAS_BIAS=bias is not None, FP32=a.dtype == torch.float32,
        SUBTILE=EPILOGUE_SUBTILE, FAST_LOG=a.is_cuda, BM=bm, BN=bn, BK=bk, NUM_PROGRAMS=programs, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )  # fmt: skip
    return (c, c2) if two else c
