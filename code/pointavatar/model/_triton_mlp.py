"""Triton kernels for the geometry MLP's forward and SDF-gradient sweep (``geometry_fused``'s forward pass).

One kernel, ``_linear_kernel``, computes C = (P(A) | E) * scale @ B (+ bias) for a row block, where the
operand's prologue P runs on the tile as it is loaded, instead of as a separate pass over [R, 256]
activations:

- "none": A itself (the encoding into layer 0);
- "softplus": softplus(A), A a layer's pre-activation z (the forward chain h = softplus(z));
- "slope": A * softplus'(Z), A the sweep vector g and Z the layer's z (torch's softplus_backward).

E (optional) is appended as extra columns of the operand, raw (the re-injected encoding at a skip layer),
and ``scale`` multiplies the whole operand (1 / sqrt 2 at a skip layer), as ``geometry_fused._forward_pass``
does it. The operand is rounded to bf16 before the product when ``dot_bf16`` (fp32 accumulation, as
``geometry_fused._mm`` with mm_dtype bf16), else the product is in full fp32 (``input_precision="ieee"``:
the reference mode of the tests). B is read through its strides, so W^T needs no copy.

Runs on CUDA tensors, or on any tensor under TRITON_INTERPRET=1 (the CPU tests; the interpreter's bf16
rounding is not torch's, so they use fp32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

PROLOGUES = {"none": 0, "softplus": 1, "slope": 2}
# Tile sizes (rows, output columns, reduction) and warps; not yet tuned on a GPU.
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 3


@triton.jit
def _softplus(z, beta, threshold):
    """torch's Softplus: z where beta z > threshold, else log(1 + exp(beta z)) / beta, with log1p written
    as log(u) * t / (u - 1) (u = 1 + t; exact to rounding where 1 + t rounds, t itself where u == 1)."""
    bz = z * beta
    t = tl.exp(tl.minimum(bz, threshold))
    u = 1.0 + t
    log1p = tl.where(u == 1.0, t, tl.log(u) * t / (u - 1.0))
    return tl.where(bz > threshold, z, log1p / beta)


@triton.jit
def _slope(z, beta, threshold):
    """softplus'(z) as torch's softplus_backward: sigmoid(beta z), 1 where beta z > threshold."""
    bz = z * beta
    return tl.where(bz > threshold, 1.0, tl.sigmoid(bz))


@triton.jit
def _mma(a, b, acc, DOT_BF16: tl.constexpr):
    """acc + a @ b: operands rounded to bf16 (fp32 accumulation), or in full fp32."""
    if DOT_BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _linear_kernel(
    a_ptr,
    z_ptr,
    e_ptr,
    b_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K1,
    K2,
    s_am,
    s_ak,
    s_zm,
    s_zk,
    s_em,
    s_ek,
    s_bk,
    s_bn,
    s_cm,
    s_cn,
    scale,
    beta,
    threshold,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_BF16: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K1, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K1
        am = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak, mask=am, other=0.0).to(tl.float32)
        if PROLOGUE == 1:
            a = _softplus(a, beta, threshold)
        if PROLOGUE == 2:
            z = tl.load(z_ptr + rm[:, None] * s_zm + rk[None, :] * s_zk, mask=am, other=0.0).to(tl.float32)
            a = a * _slope(z, beta, threshold)
        a = tl.where(am, a * scale, 0.0)
        b = tl.load(
            b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0
        )
        acc = _mma(a, b, acc, DOT_BF16)
    for k0 in range(0, K2, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K2
        am = m_ok[:, None] & k_ok[None, :]
        a = (
            tl.load(e_ptr + rm[:, None] * s_em + rk[None, :] * s_ek, mask=am, other=0.0).to(tl.float32)
            * scale
        )
        bk = K1 + rk
        b = tl.load(
            b_ptr + bk[:, None] * s_bk + rn[None, :] * s_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0
        )
        acc = _mma(a, b, acc, DOT_BF16)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def linear(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    prologue: str = "none",
    z: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    scale: float = 1.0,
    beta: float = 100.0,
    threshold: float = 20.0,
    dot_bf16: bool = True,
) -> torch.Tensor:
    """C [R, N] float32 = cat([P(a), extra], 1) * scale @ b (+ bias): a [R, K1] (any strides; a stride-0
    expand is read as is), z [R, K1] for prologue "slope", extra [R, K2] or None, b [K1 + K2, N] (any
    strides, e.g. W.T), bias [N]. See the module docstring."""
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {tuple(PROLOGUES)}, not {prologue!r}")
    if (prologue == "slope") != (z is not None):
        raise ValueError('z is given exactly with prologue "slope"')
    r, k1 = a.shape
    k2 = 0 if extra is None else extra.shape[1]
    if b.shape[0] != k1 + k2 or (z is not None and z.shape != a.shape):
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, extra {k2} columns, b {tuple(b.shape)}")
    n = b.shape[1]
    c = torch.empty(r, n, dtype=torch.float32, device=a.device)
    if r == 0:
        return c
    zz = a if z is None else z
    ee = a if extra is None else extra
    grid = (triton.cdiv(r, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _linear_kernel[grid](
        a,
        zz,
        ee,
        b,
        a if bias is None else bias,
        c,
        r,
        n,
        k1,
        k2,
        a.stride(0),
        a.stride(1),
        zz.stride(0),
        zz.stride(1),
        ee.stride(0),
        ee.stride(1),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        c.stride(1),
        float(scale),
        float(beta),
        float(threshold),
        PROLOGUE=PROLOGUES[prologue],
        HAS_BIAS=bias is not None,
        DOT_BF16=dot_bf16,
        BM=BLOCK_M,
        BN=BLOCK_N,
        BK=BLOCK_K,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return c


INV_SQRT2 = 1.0 / math.sqrt(2)
