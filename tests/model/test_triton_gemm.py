"""The persistent TMA GEMM with elementwise epilogues (model/_triton_gemm.py): under the Triton interpreter
on the CPU in float32 against torch, and on a GPU in bf16."""

from __future__ import annotations

import textwrap

import pytest
import torch
from gpu_passes import bf16_errors
from interpreter import run_under_interpreter

_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import triton_interp_compat  # noqa: F401  (Triton 3.6 interpreter with NumPy 2.4)
    from interpreter import close
    import torch
    from pointavatar.model import _triton_gemm as tg

    # Small tiles: several tiles a program (4 programs), several reduction steps, partly filled last
    # tiles in rows, columns and the reduction.
    tg.BLOCK_M, tg.BLOCK_N, tg.BLOCK_K = 32, 16, 16

    def check(got, ref, what):  # float32 sums in another order
        close(got, ref, 1e-5, f"{what} (subtile {tg.EPILOGUE_SUBTILE})")

    g = torch.Generator().manual_seed(0)
    m, k, n = 203, 52, 44
    a = torch.rand(m, k, generator=g) - 0.5
    w = torch.randn(n, k, generator=g) * 0.1
    b = torch.randn(n, generator=g) * 0.1
    p = torch.rand(m, n, generator=g) - 0.5  # beta p straddles the threshold 20
    z = a @ w.T + b
    assert ((z * 100 > 20).any() and (z * 100 < 20).any() and (z < -0.2).any()), "z must straddle the branches"
    assert (p * 100 > 20).any() and (p * 100 < 20).any()
    for subtile in (True, False):  # the epilogue on the tile's column halves, or on the whole tile
        tg.EPILOGUE_SUBTILE = subtile
        check(tg.tma_linear(a, w, b), z, "plain")
        check(tg.tma_linear(a, w), a @ w.T, "no bias")
        check(tg.tma_linear(a, w, b, epilogue="softplus"), torch.nn.functional.softplus(z, 100.0, 20.0), "softplus")
        slope = torch.ops.aten.softplus_backward(torch.ones_like(p), p, 100.0, 20.0)
        check(tg.tma_linear(a, w, b, epilogue="slope", p=p), z * slope, "slope")
        # The slope from the activation h = softplus(p) (a strided view: partners are read through their
        # strides), the sweep adjoint's two outputs, and the slope plus an addend.
        h = torch.nn.functional.softplus(torch.stack([p, -p], -1), 100.0, 20.0)[..., 0]  # strides (2n, 2)
        assert h.stride() == (2 * n, 2)
        curv = torch.where(p * 100 < 20, 100 * slope * (1 - slope), torch.zeros_like(slope))
        q = torch.randn(m, n, generator=g)
        check(tg.tma_linear(a, w, b, epilogue="slope_h", p=h), z * slope, "slope_h")
        got, got2 = tg.tma_linear(a, w, b, epilogue="adjoint", p=h, q=q)
        check(got, z * slope, "adjoint, first output")
        check(got2, z * q * curv, "adjoint, second output")
        check(tg.tma_linear(a, w, b, epilogue="slope_add", p=h, q=q), z * slope + q, "slope_add")
        got, got2 = tg.tma_linear(a, w, b, epilogue="slope_keep", p=h)
        check(got, z * slope, "slope_keep, first output")
        check(got2, z, "slope_keep, second output")
        # Into given outputs: the first columns of wider buffers (rows of 48 floats, 16-byte aligned).
        buf, buf2 = torch.full((m, n + 4), 7.0), torch.full((m, n + 4), 7.0)
        tg.tma_linear(a, w, b, epilogue="slope_keep", p=h, out=buf[:, :n], out2=buf2[:, :n])
        check(buf[:, :n], z * slope, "out")
        check(buf2[:, :n], z, "out2")
        assert (buf[:, n:] == 7).all() and (buf2[:, n:] == 7).all(), "wrote past the given columns"
    assert tg.tma_linear(a[:0], w).shape == (0, n)
    print("INTERPRETER-OK")
    """
)


def test_tma_linear_under_interpreter():
    """Each epilogue (and the bias, partial tiles, several tiles a program) against torch in float32;
    the bf16 mode is checked on the GPU below (the interpreter rounds bf16 unlike torch)."""
    run_under_interpreter(_INTERPRETER_SCRIPT, timeout=600)


def test_tma_linear_refuses_bad_arguments():
    pytest.importorskip("triton")
    from pointavatar.model import _triton_gemm as tg

    a, w = torch.zeros(4, 8), torch.zeros(6, 8)
    with pytest.raises(ValueError, match="epilogue must be one of"):
        tg.tma_linear(a, w, epilogue="relu")
    with pytest.raises(ValueError, match='epilogue "slope" reads the partner p'):
        tg.tma_linear(a, w, epilogue="slope")
    with pytest.raises(ValueError, match='epilogue "none" reads no partner'):
        tg.tma_linear(a, w, p=torch.zeros(4, 6))
    with pytest.raises(ValueError, match='epilogue "adjoint" reads the partners p and q'):
        tg.tma_linear(a, w, epilogue="adjoint", p=torch.zeros(4, 6))
    with pytest.raises(ValueError, match="the output's shape"):
        tg.tma_linear(a, w, epilogue="slope", p=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="both be bf16 or both fp32"):
        tg.tma_linear(a, w.double())
    with pytest.raises(ValueError, match="do not chain"):
        tg.tma_linear(a, torch.zeros(6, 7))
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        tg.tma_linear(torch.zeros(4, 3), torch.zeros(6, 3))  # 12-byte rows: TMA cannot read them


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "epilogue", ["none", "softplus", "slope", "slope_h", "adjoint", "slope_add", "slope_keep"]
)
def test_tma_linear_bf16_on_gpu(epilogue):
    """bf16 operands, fp32 accumulation, bf16 output, at the geometry's width over several settings: within
    a bf16 rounding of the float32 result of the same bf16 operands (torch's epilogue ops in fp32)."""
    pytest.importorskip("triton")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or later")
    from pointavatar.model import _triton_gemm as tg

    g = torch.Generator(device="cuda").manual_seed(0)
    m, k, n = 10_000, 256, 256
    a = ((torch.rand(m, k, device="cuda", generator=g) - 0.3) * 0.2).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) / 16).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", generator=g) * 0.05
    zp = torch.rand(m, n, device="cuda", generator=g) - 0.5  # a pre-activation: beta zp straddles 20
    q = torch.randn(m, n, device="cuda", generator=g).to(torch.bfloat16)
    z = a.float() @ w.float().T + b
    # The partner as the epilogue reads it (z, or h = softplus(z)), rounded to bf16 as stored; the
    # reference's slope from the same rounded value.
    p = (zp if epilogue == "slope" else torch.nn.functional.softplus(zp, 100.0, 20.0)).to(torch.bfloat16)
    pf = p.float()
    if epilogue == "slope":
        slope = torch.ops.aten.softplus_backward(torch.ones_like(z), pf, 100.0, 20.0)
    else:
        slope = torch.where(pf * 100 > 20, torch.ones_like(pf), 1 - torch.exp(-100 * pf))
    curv = torch.where(pf * 100 < 20, 100 * slope * (1 - slope), torch.zeros_like(pf))
    ref = {
        "none": z,
        "softplus": torch.nn.functional.softplus(z, 100.0, 20.0),
        "slope": z * slope,
        "slope_h": z * slope,
        "adjoint": z * slope,
        "slope_add": z * slope + q.float(),
    }[epilogue]
    partners = {
        "slope": {"p": p},
        "slope_h": {"p": p},
        "adjoint": {"p": p, "q": q},
        "slope_add": {"p": p, "q": q},
    }
    default = (tg.BLOCK_M, tg.BLOCK_N, tg.BLOCK_K, tg.NUM_WARPS, tg.NUM_STAGES)
    try:
        for setting in ((128, 128, 64, 8, 4), (128, 128, 64, 4, 3), default):
            tg.BLOCK_M, tg.BLOCK_N, tg.BLOCK_K, tg.NUM_WARPS, tg.NUM_STAGES = setting
            got = tg.tma_linear(a, w, b, epilogue=epilogue, **partners.get(epilogue, {}))
            if epilogue == "adjoint":
                got, got2 = got
                err2 = (
                    (got2.float() - z * q.float() * curv).abs() / (z * q.float() * curv).abs().max()
                ).max()
                assert err2.item() < 1e-2, (setting, err2.item())
            assert got.dtype == torch.bfloat16
            err = ((got.float() - ref).abs() / (ref.abs() + 1e-3)).max().item()
            assert err < 1e-2, (setting, err)  # bf16's rounding is 2^-9 relative, the sums' order 1e-6
    finally:
        tg.BLOCK_M, tg.BLOCK_N, tg.BLOCK_K, tg.NUM_WARPS, tg.NUM_STAGES = default


_PASSES_SCRIPT = textwrap.dedent(
    """
    import triton_interp_compat  # noqa: F401  (Triton 3.6 interpreter with NumPy 2.4)
    from interpreter import close
    import torch
    from test_geometry_fused import _loss, make_net, make_points
    from pointavatar.config import GeometryNetworkConf
    from pointavatar.model import _triton_gemm as tg, geometry_fused, geometry_tma
    from pointavatar.model.geometry import GeometryNetwork
    from pointavatar.model.geometry_fused import forward_with_gradient_fused

    tg.BLOCK_M, tg.BLOCK_N, tg.BLOCK_K = 32, 16, 16

    torch.manual_seed(0)
    big = GeometryNetwork(GeometryNetworkConf()).float()  # the paper's: 9 x 256, skip at 4 (217 + 39)
    with torch.no_grad():
        for p in big.parameters():
            p.add_(0.02 * torch.randn_like(p))
    nets = {
        "skip inside": make_net(dims=(16, 24, 16), skip_in=(2,), multires=2, dtype=torch.float32),
        "skip at the output layer": make_net(dims=(16, 24), skip_in=(2,), multires=2, dtype=torch.float32),
        "no skip": make_net(dims=(16, 16, 16), skip_in=(), multires=2, dtype=torch.float32),
        "the paper's": big,
    }
    unsupported = make_net(dims=(8, 20, 8), skip_in=(2,), multires=2, dtype=torch.float32)  # 5 + 15 columns at the skip
    lins = [getattr(unsupported, f"lin{l}") for l in range(unsupported.num_layers - 1)]
    assert not geometry_tma.supported([l.weight for l in lins], (2,), 15)
    for name, net in nets.items():
        # Small tiles on the small networks (several a dimension); larger on the paper's (interpreter time).
        tg.BLOCK_M, tg.BLOCK_N, tg.BLOCK_K = (64, 128, 64) if name == "the paper's" else (32, 16, 16)
        lins = [getattr(net, f"lin{l}") for l in range(net.num_layers - 1)]
        n_enc = 3 * (1 + 2 * net.embed.multires)
        assert geometry_tma.supported([l.weight for l in lins], net.skip_in, n_enc), name
        # The small networks also in chunks of rows (16, 16 and 8 of the 40: kept per chunk, the weight
        # gradients summed over them).
        modes = [(False, 1 << 17), (True, 1 << 17)] + ([] if name == "the paper's" else [(False, 16), (True, 16)])
        for recompute_sweep, row_chunk in modes:
            results = []
            for passes in ("torch", "tma"):
                net.zero_grad()
                x = make_points(40, dtype=torch.float32).requires_grad_(True)
                out, grad = forward_with_gradient_fused(
                    net, x, recompute_sweep=recompute_sweep, row_chunk=row_chunk, passes=passes
                )
                _loss(out, grad).backward()
                results.append((out.detach(), grad.detach(), x.grad, [p.grad.clone() for p in net.parameters()]))
            (o0, g0, x0, p0), (o1, g1, x1, p1) = results
            what = f"{name}, recompute_sweep {recompute_sweep}, row_chunk {row_chunk}"
            close(o1, o0, 1e-5, f"out, {what}")
            close(g1, g0, 1e-5, f"grad, {what}")
            close(x1, x0, 1e-4, f"x gradient, {what}")
            for i, (a_, b_) in enumerate(zip(p1, p0, strict=True)):
                close(a_, b_, 1e-4, f"parameter gradient {i}, {what}")
    # The module switch (benchmarks) does the same as passes="tma"; an unknown value is refused.
    geometry_fused.TMA_PASSES = True
    x = make_points(40, dtype=torch.float32)
    close(forward_with_gradient_fused(big, x)[1], forward_with_gradient_fused(big, x, passes="tma")[1], 0.0,
          "TMA_PASSES")
    geometry_fused.TMA_PASSES = False
    try:
        forward_with_gradient_fused(big, x, passes="cuda")
    except ValueError as exc:
        assert "passes must be one of" in str(exc)
    else:
        raise AssertionError("passes='cuda' was accepted")
    print("INTERPRETER-OK")
    """
)


def test_tma_passes_under_interpreter():
    """The fused geometry node on the TMA GEMM (geometry_tma.py: kept activations instead of
    pre-activations, skip buffers, the epilogues) against its PyTorch passes in float32: values and
    gradients (parameters and x), sweep kept or recomputed, a skip inside, at the output layer or none, and
    the paper's network (217 + 39 = 256 columns at its skip). Tolerances: float32 sums in another order."""
    run_under_interpreter(_PASSES_SCRIPT, timeout=900)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recompute_sweep", [False, True])
def test_tma_passes_bf16_on_gpu(monkeypatch, recompute_sweep):
    """The fused geometry node in bf16 on the TMA passes: its values and gradients (parameters and x)
    against the float32 node are within 4x the PyTorch bf16 passes' error (the TMA passes also round the
    products they keep or hand on, u, dz and the sweep's share of dz, to bf16; the PyTorch passes form
    those in fp32)."""
    pytest.importorskip("triton")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or later")
    for i, (err_torch, err_tma) in enumerate(bf16_errors(monkeypatch, recompute_sweep, "tma")):
        assert err_tma <= 4 * err_torch + 1e-4, (i, err_tma, err_torch)
