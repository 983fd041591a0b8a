"""Triton kernels for the geometry MLP's passes (``geometry_fused``: the forward with its SDF-gradient
sweep, and the hand-written backward), each a layer's product with the elementwise work on its operand
done as the operand is loaded, instead of as separate passes over [R, 256] activations.

``linear``: C = cat([P(X), E], 1) * scale @ B (+ bias), one row block a program. ``weight_grad``: a layer's
weight gradient P(A)^T @ cat([Q(B), E], 1) * scale summed over the rows (split into blocks of rows, added
atomically), and optionally P(A)'s column sums (the bias gradient). The prologues P, Q:

- "none": X itself (the encoding into layer 0, an upstream gradient);
- "softplus": softplus(X), X a layer's pre-activation z (the forward chain h = softplus(z));
- "slope": X * softplus'(Z), X a sweep vector g (or its adjoint) and Z the layer's z;
- "dz": X * softplus'(Z) + U * V * softplus''(Z): the backward's gradient of a pre-activation from the
  chain's (X) and the sweep's (U the sweep's adjoint, V the sweep vector).

E (optional) is appended as extra columns, raw (the re-injected encoding at a skip layer), and ``scale``
multiplies the whole operand (1 / sqrt 2 there). Operands are rounded to bf16 before the product when
``dot_bf16`` (fp32 accumulation, as ``geometry_fused._mm`` with mm_dtype bf16), else the product is in
full fp32 (``input_precision="ieee"``: the reference mode of the tests). B is read through its strides,
so W^T needs no copy.

Runs on CUDA tensors, or on any tensor under TRITON_INTERPRET=1 (the CPU tests; the interpreter's bf16
rounding is not torch's, so they use fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PROLOGUES = {"none": 0, "softplus": 1, "slope": 2, "dz": 3}
EPILOGUES = {"none": 0, "softplus": 1}
# Tile sizes (rows, output columns, reduction), warps and pipeline stages. Chosen by registers (sm_90
# cubins compiled on the CPU, cuobjdump; benchmarks/RESULTS.md step 8), then timed on an H200 (step 9,
# benchmarks/bench_triton_mlp.py): other settings are up to 1.8x faster per kernel (e.g. 128 x 256 x 32
# on 8 warps, 3 stages), but at none do these kernels beat cuBLAS with inductor's elementwise passes,
# so the geometry's Triton passes stay off (geometry_fused.TRITON_PASSES) and the tiles as they were.
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 32
NUM_WARPS = 8
NUM_STAGES = 2
# The weight-gradient kernel: rows a step of its reduction loads (its operands' prologues hold more
# registers: 16 is the setting without spills at 128 x 128 on 8 warps, 32 spills 200 to 272 bytes), and
# rows a program sums before its atomic add.
WGRAD_BLOCK_R = 16
ROWS_PER_PROGRAM = 4096


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
def _operand(x_ptr, z_ptr, u_ptr, v_ptr, sx, sz, su, sv, r, k, mask, beta, threshold, PRO: tl.constexpr):
    """P(x) at rows r, columns k (broadcastable index tensors; s* = (row stride, column stride) pairs):
    x, softplus(x), x softplus'(z), or x softplus'(z) + u v softplus''(z) (the fused backward's dz)."""
    x = tl.load(x_ptr + r * sx[0] + k * sx[1], mask=mask, other=0.0).to(tl.float32)
    if PRO == 1:
        x = _softplus(x, beta, threshold)
    if PRO >= 2:
        z = tl.load(z_ptr + r * sz[0] + k * sz[1], mask=mask, other=0.0).to(tl.float32)
        s = _slope(z, beta, threshold)
        x = x * s
        if PRO == 3:
            u = tl.load(u_ptr + r * su[0] + k * su[1], mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + r * sv[0] + k * sv[1], mask=mask, other=0.0).to(tl.float32)
            # softplus''(z) = beta s (1 - s), 0 where beta z >= threshold (as geometry.softplus_curvature)
            x += u * v * tl.where(z * beta < threshold, beta * s * (1.0 - s), 0.0)
    return tl.where(mask, x, 0.0)


@triton.jit
def _linear_kernel(
    x_ptr, z_ptr, u_ptr, v_ptr, e_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K1, K2,
    sx0, sx1, sz0, sz1, su0, su1, sv0, sv1, se0, se1, sb0, sb1, sc0, sc1,
    scale, beta, threshold,
    PRO: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_BF16: tl.constexpr, EPI: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """C [M, N] = cat([P(X), E], 1) * scale @ B (+ bias); X [M, K1], E [M, K2], B [K1 + K2, N]; with EPI 1,
    softplus of it."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # Two loops without branches (for the software pipeliner): X's columns, then E's, each masking its
    # last partly filled step.
    for k0 in range(0, K1, BK):
        rk = k0 + tl.arange(0, BK)
        a = _operand(x_ptr, z_ptr, u_ptr, v_ptr, (sx0, sx1), (sz0, sz1), (su0, su1), (sv0, sv1),
                     rm[:, None], rk[None, :], m_ok[:, None] & (rk < K1)[None, :], beta, threshold, PRO)  # fmt: skip
        b = tl.load(
            b_ptr + rk[:, None] * sb0 + rn[None, :] * sb1, mask=(rk < K1)[:, None] & n_ok[None, :], other=0.0
        )
        acc = _mma(a * scale, b, acc, DOT_BF16)
    for k0 in range(0, K2, BK):
        rk = k0 + tl.arange(0, BK)
        em = m_ok[:, None] & (rk < K2)[None, :]
        a = tl.load(e_ptr + rm[:, None] * se0 + rk[None, :] * se1, mask=em, other=0.0).to(tl.float32)
        bk = K1 + rk
        b = tl.load(
            b_ptr + bk[:, None] * sb0 + rn[None, :] * sb1, mask=(rk < K2)[:, None] & n_ok[None, :], other=0.0
        )
        acc = _mma(a * scale, b, acc, DOT_BF16)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EPI == 1:
        acc = _softplus(acc, beta, threshold)
    tl.store(
        c_ptr + rm[:, None] * sc0 + rn[None, :] * sc1,
        acc.to(c_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _wgrad_kernel(
    ax_ptr, az_ptr, au_ptr, av_ptr,
    bx_ptr, bz_ptr, be_ptr, c_ptr, sum_ptr,
    R, M, K1, K2,
    sax0, sax1, saz0, saz1, sau0, sau1, sav0, sav1,
    sbx0, sbx1, sbz0, sbz1, sbe0, sbe1, sc0, sc1,
    scale, beta, threshold,
    APRO: tl.constexpr, BPRO: tl.constexpr, SUM_A: tl.constexpr, DOT_BF16: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """C [M, K1 + K2] += P(A)^T @ cat([Q(B), E], 1) * scale over this program's ROWS rows (atomic adds);
    A [R, M], B [R, K1], E [R, K2]. With SUM_A, sum [M] += P(A)'s column sums (programs of column 0)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < K1 + K2
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    col_sum = tl.zeros((BM,), dtype=tl.float32)
    first = tl.program_id(2) * ROWS
    for r0 in range(first, first + ROWS, BR):
        rr = r0 + tl.arange(0, BR)
        r_ok = (rr < R) & (rr < first + ROWS)
        a = _operand(ax_ptr, az_ptr, au_ptr, av_ptr, (sax0, sax1), (saz0, saz1), (sau0, sau1), (sav0, sav1),
                     rr[:, None], rm[None, :], r_ok[:, None] & m_ok[None, :], beta, threshold, APRO)  # fmt: skip
        bm = r_ok[:, None] & (rn < K1)[None, :]
        b = _operand(bx_ptr, bz_ptr, bx_ptr, bx_ptr, (sbx0, sbx1), (sbz0, sbz1), (0, 0), (0, 0),
                     rr[:, None], rn[None, :], bm, beta, threshold, BPRO)  # fmt: skip
        em = r_ok[:, None] & (rn >= K1)[None, :] & n_ok[None, :]
        b += tl.load(be_ptr + rr[:, None] * sbe0 + (rn - K1)[None, :] * sbe1, mask=em, other=0.0).to(
            tl.float32
        )
        if SUM_A:
            col_sum += tl.sum(a, axis=0)
        acc = _mma(tl.trans(a), b * scale, acc, DOT_BF16)
    tl.atomic_add(
        c_ptr + rm[:, None] * sc0 + rn[None, :] * sc1, acc, mask=m_ok[:, None] & n_ok[None, :], sem="relaxed"
    )
    if SUM_A:
        tl.atomic_add(sum_ptr + rm, col_sum, mask=m_ok & (tl.program_id(1) == 0), sem="relaxed")


def _pairs(*tensors):
    """The (row stride, column stride) of each tensor, flattened, for the kernels' arguments."""
    return [st for t in tensors for st in (t.stride(0), t.stride(1))]


def _partners(x, prologue, z, u, v):
    """The partner tensors of a prologue (z for "slope"; z, u and v for "dz"), x itself where unused."""
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {tuple(PROLOGUES)}, not {prologue!r}")
    wanted = {"none": 0, "softplus": 0, "slope": 1, "dz": 3}[prologue]
    given = [t for t in (z, u, v) if t is not None]
    if len(given) != wanted or (wanted == 1 and z is None):
        takes = ("no partner", "the partner z", "", "the partners z, u and v")[wanted]
        raise ValueError(f'prologue "{prologue}" takes {takes}')
    if any(t.shape != x.shape for t in given):
        raise ValueError(f"the partners must have the operand's shape {tuple(x.shape)}")
    return [x if t is None else t for t in (z, u, v)]


def linear(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    prologue: str = "none",
    z: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    scale: float = 1.0,
    beta: float = 100.0,
    threshold: float = 20.0,
    dot_bf16: bool = True,
    epilogue: str = "none",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """C [R, N] = cat([P(a), extra], 1) * scale @ b (+ bias), in ``out_dtype``: a [R, K1] (any strides; a
    stride-0 expand is read as is), the prologue's partners z (and u, v for "dz") of a's shape, extra
    [R, K2] or None, b [K1 + K2, N] (any strides, e.g. W.T), bias [N]; with ``epilogue`` "softplus",
    softplus(C) (the next layer's activation, computed once per output instead of once per read). See
    the module docstring."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {tuple(EPILOGUES)}, not {epilogue!r}")
    zz, uu, vv = _partners(a, prologue, z, u, v)
    r, k1 = a.shape
    k2 = 0 if extra is None else extra.shape[1]
    if b.shape[0] != k1 + k2:
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, extra {k2} columns, b {tuple(b.shape)}")
    n = b.shape[1]
    c = torch.empty(r, n, dtype=out_dtype, device=a.device)
    if r == 0:
        return c
    ee = a if extra is None else extra
    grid = (triton.cdiv(r, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _linear_kernel[grid](
        a, zz, uu, vv, ee, b, a if bias is None else bias, c,
        r, n, k1, k2,
        *_pairs(a, zz, uu, vv, ee, b, c),
        float(scale), float(beta), float(threshold),
        PRO=PROLOGUES[prologue], HAS_BIAS=bias is not None, DOT_BF16=dot_bf16, EPI=EPILOGUES[epilogue],
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return c


def weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    a_prologue: str = "none",
    z: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    b_prologue: str = "none",
    b_z: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    scale: float = 1.0,
    sum_a: bool = False,
    beta: float = 100.0,
    threshold: float = 20.0,
    dot_bf16: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(P(a)^T @ cat([Q(b), extra], 1) * scale [M, K1 + K2] float32, P(a).sum(0) [M] if ``sum_a``): a
    layer's weight gradient (and its bias gradient) from the rows' operands, a [R, M], b [R, K1], extra
    [R, K2]; P as ``linear``'s prologue (partners z, u, v), Q "none", "softplus" or "slope" (partner b_z)."""
    za, ua, va = _partners(a, a_prologue, z, u, v)
    if b_prologue == "dz":
        raise ValueError('b_prologue "dz" is not supported')
    zb, _, _ = _partners(b, b_prologue, b_z, None, None)
    r, m = a.shape
    k1 = b.shape[1]
    k2 = 0 if extra is None else extra.shape[1]
    if b.shape[0] != r or (extra is not None and extra.shape[0] != r):
        raise ValueError(f"the operands must have the same rows: a {tuple(a.shape)}, b {tuple(b.shape)}")
    c = torch.zeros(m, k1 + k2, dtype=torch.float32, device=a.device)
    col_sum = torch.zeros(m, dtype=torch.float32, device=a.device) if sum_a else None
    if r == 0:
        return c, col_sum
    ee = b if extra is None else extra
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(k1 + k2, BLOCK_N), triton.cdiv(r, ROWS_PER_PROGRAM))
    _wgrad_kernel[grid](
        a, za, ua, va, b, zb, ee, c, c if col_sum is None else col_sum,
        r, m, k1, k2,
        *_pairs(a, za, ua, va, b, zb, ee, c),
        float(scale), float(beta), float(threshold),
        APRO=PROLOGUES[a_prologue], BPRO=PROLOGUES[b_prologue], SUM_A=sum_a, DOT_BF16=dot_bf16,
        BM=BLOCK_M, BN=BLOCK_N, BR=WGRAD_BLOCK_R, ROWS=ROWS_PER_PROGRAM, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return c, col_sum
