"""The geometry MLP's Triton forward pass (model/_triton_mlp.py, geometry_fused._forward_pass_triton): under
the Triton interpreter on the CPU in float32 against the PyTorch passes, and on a GPU in bf16."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from interpreter import run_under_interpreter

ROOT = Path(__file__).resolve().parents[2]

_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import triton_interp_compat  # noqa: F401  (Triton 3.6 interpreter with NumPy 2.4)
    from interpreter import close
    import math
    import torch
    from test_geometry_fused import SMALL, _loss, make_net, make_points
    from pointavatar.model import _triton_mlp as tm, geometry_fused
    from pointavatar.model.geometry_fused import _forward_pass, _forward_pass_triton, forward_with_gradient_fused

    # Small tiles: several programs per dimension, several reduction steps, partly filled last tiles.
    tm.BLOCK_M, tm.BLOCK_N, tm.BLOCK_K = 32, 16, 16

    # 1. linear: each prologue, an appended operand, a scale, a bias, B read through W.T's strides.
    g = torch.Generator().manual_seed(0)
    r, k1, k2, n = 70, 50, 15, 40
    a = torch.rand(r, k1, generator=g) - 0.5  # beta z = 100 a straddles the threshold 20
    z = torch.rand(r, k1, generator=g) - 0.5
    e = torch.randn(r, k2, generator=g)
    w = torch.randn(n, k1 + k2, generator=g)
    bias = torch.randn(n, generator=g)
    sp = torch.nn.functional.softplus(a, 100.0, 20.0)
    slope = torch.ops.aten.softplus_backward(torch.ones_like(z), z, 100.0, 20.0)
    s = 1 / math.sqrt(2)
    for prologue, operand, extra, zz in (("none", a, None, None), ("softplus", sp, e, None),
                                         ("slope", a * slope, e, z)):
        full = operand if extra is None else torch.cat([operand, extra], 1)
        ref = full * s @ w[:, : full.shape[1]].T + bias
        got = tm.linear(a, w[:, : full.shape[1]].T, bias, prologue=prologue, z=zz, extra=extra, scale=s,
                        dot_bf16=False)
        close(got, ref, 1e-5, prologue)
    # A stride-0 operand (the sweep's first vector, an expand of a weight row), no bias.
    row = w[:1, :k1].expand(r, -1)
    close(tm.linear(row, w[:, :k1].T, dot_bf16=False), row @ w[:, :k1].T, 1e-5, "expand")
    assert tm.linear(a[:0], w[:, :k1].T, dot_bf16=False).shape == (0, n)
    # The Softplus epilogue: the next layer's activation from the product and the bias.
    pre = a @ w[:, :k1].T * 0.1 + bias * 0.1
    assert (pre * 100 > 20).any() and (pre * 100 < 20).any(), "the case must straddle the threshold"
    ref = torch.nn.functional.softplus(pre, 100.0, 20.0)
    got = tm.linear(a, w[:, :k1].T * 0.1, bias * 0.1, epilogue="softplus", dot_bf16=False)
    close(got, ref, 1e-5, "softplus epilogue")

    # 2. The forward pass: out, grad and the kept z and g as the PyTorch pass's, float32. Two networks
    # as the conf builds them, and raw weights with the encoding re-injected at layer 0 and at the last
    # layer (which GeometryNetwork's sizing does not build; the sweep's top vector is then split).
    x = make_points(97, dtype=torch.float32)
    cases = []
    for spec in (dict(), SMALL):
        net = make_net(dtype=torch.float32, **spec)
        lins = [getattr(net, f"lin{l}") for l in range(net.num_layers - 1)]
        cases.append(([l.weight.detach() for l in lins], [l.bias.detach() for l in lins],
                      net.embed.multires, tuple(net.skip_in)))
    n_enc = 3 * (1 + 2 * 2)
    shapes = [(6, 2 * n_enc), (5, 6), (4, 5 + n_enc)]
    cases.append(([0.3 * torch.randn(sh, generator=g) for sh in shapes],
                  [0.1 * torch.randn(sh[0], generator=g) for sh in shapes], 2, (0, 2)))
    for ws, bs, multires, skip_in in cases:
        args = (x, ws, bs, multires, skip_in, 100.0, 20.0, None, None, False)
        ref, got = _forward_pass(*args), _forward_pass_triton(*args)
        close(got[0], ref[0], 1e-5, f"out {skip_in}")
        close(got[1], ref[1], 1e-5, f"grad {skip_in}")
        assert len(got[2]) == len(ref[2]) and len(got[3]) == len(ref[3])
        for i, (t, u) in enumerate(zip(got[2] + got[3], ref[2] + ref[3], strict=True)):
            close(t, u, 1e-5, f"kept {i} {skip_in}")

    # 3. weight_grad: each prologue of A (dz with its three partners) and of B, the appended columns, the
    # scale and the column sums, against torch; rows over several programs (ROWS_PER_PROGRAM 64).
    tm.ROWS_PER_PROGRAM = 64
    r, m = 150, 21
    u = torch.randn(r, m, generator=g)
    v = torch.randn(r, m, generator=g)
    za = torch.rand(r, m, generator=g) - 0.5
    xa = torch.randn(r, m, generator=g)
    sa = torch.ops.aten.softplus_backward(torch.ones_like(za), za, 100.0, 20.0)
    ca = torch.where(za * 100 < 20, 100 * sa * (1 - sa), torch.zeros_like(sa))
    a_cases = {"none": (xa, {}), "slope": (xa * sa, {"z": za}), "dz": (xa * sa + u * v * ca, {"z": za, "u": u, "v": v})}
    zb = torch.rand(r, k1, generator=g) - 0.5
    xb = torch.randn(r, k1, generator=g)
    b_cases = {"none": (xb, {}), "softplus": (torch.nn.functional.softplus(xb * 0.3, 100.0, 20.0), {}),
               "slope": (xb * torch.ops.aten.softplus_backward(torch.ones_like(zb), zb, 100.0, 20.0), {"b_z": zb})}
    for (apro, (a_ref, a_kw)), (bpro, (b_ref, b_kw)) in [(x, y) for x in a_cases.items() for y in b_cases.items()]:
        b_in = xb * 0.3 if bpro == "softplus" else xb
        for extra in (None, e[:r] if e.shape[0] >= r else torch.randn(r, k2, generator=g)):
            full = b_ref if extra is None else torch.cat([b_ref, extra], 1)
            got, sums = tm.weight_grad(xa, b_in, a_prologue=apro, **a_kw, b_prologue=bpro, **b_kw, extra=extra,
                                       scale=s, sum_a=True, dot_bf16=False)
            close(got, a_ref.T @ (full * s), 1e-5, f"weight_grad {apro} {bpro} {extra is not None}")
            close(sums, a_ref.sum(0), 1e-5, f"column sums {apro}")
    close(tm.linear(xa, w[:, :m].T, prologue="dz", z=za, u=u, v=v, dot_bf16=False),
          a_cases["dz"][0] @ w[:, :m].T, 1e-5, "linear dz")

    # 4. forward_with_gradient_fused with the Triton passes (forward and backward): the same values and
    # gradients (parameters and x), sweep vectors kept or recomputed, several row chunks.
    for spec, modes in ((dict(dims=(48,) * 3, skip_in=(2,)), ((False, 1 << 17),)), (SMALL, ((False, 1 << 17), (True, 40)))):
        net = make_net(dtype=torch.float32, **spec)
        for recompute_sweep, row_chunk in modes:
            results = []
            for flag in (False, True):
                geometry_fused.TRITON_PASSES = flag
                net.zero_grad()
                x = make_points(97, dtype=torch.float32).requires_grad_(True)
                out, grad = forward_with_gradient_fused(net, x, recompute_sweep=recompute_sweep, row_chunk=row_chunk)
                _loss(out, grad).backward()
                results.append((out.detach(), grad.detach(), x.grad, [p.grad.clone() for p in net.parameters()]))
            (o0, g0, x0, p0), (o1, g1, x1, p1) = results
            what = f"{spec} {recompute_sweep}"
            close(o1, o0, 1e-5, f"fused out {what}")
            close(g1, g0, 1e-5, f"fused grad {what}")
            close(x1, x0, 1e-4, f"x gradient {what}")
            for i, (a_, b_) in enumerate(zip(p1, p0, strict=True)):
                close(a_, b_, 1e-4, f"parameter gradient {i} {what}")
    geometry_fused.TRITON_PASSES = False
    print("INTERPRETER-OK")
    """
)


def test_triton_forward_pass_under_interpreter():
    """The kernel's three prologues, the appended encoding and the scale, and the whole forward pass
    with its sweep, against the PyTorch ones in float32 (the interpreter rounds bf16 unlike torch, so
    the bf16 mode is checked on the GPU below). Tolerances: float32 products summed in another order."""
    run_under_interpreter(_INTERPRETER_SCRIPT, timeout=600)


def test_linear_refuses_inconsistent_arguments():
    pytest.importorskip("triton")
    from pointavatar.model import _triton_mlp as tm

    a, w = torch.zeros(4, 3), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="prologue must be one of"):
        tm.linear(a, w, prologue="relu")
    with pytest.raises(ValueError, match='prologue "slope" takes the partner z'):
        tm.linear(a, w, prologue="slope")
    with pytest.raises(ValueError, match='prologue "dz" takes the partners z, u and v'):
        tm.linear(a, w, prologue="dz", z=a)
    with pytest.raises(ValueError, match="the operand's shape"):
        tm.linear(a, w, prologue="slope", z=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same rows"):
        tm.weight_grad(a, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="do not chain"):
        tm.linear(a, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="epilogue must be one of"):
        tm.linear(a, w, epilogue="relu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_forward_pass_bf16_on_gpu():
    """bf16 operands with fp32 accumulation, as the PyTorch pass with mm_dtype bf16: against the float32
    pass, the Triton pass's error is within twice the PyTorch bf16 pass's (the same roundings of the
    operands; the sums in another order can round a later operand the other way)."""
    pytest.importorskip("triton")
    from pointavatar.config import load_conf
    from pointavatar.model.geometry import GeometryNetwork
    from pointavatar.model.geometry_fused import _forward_pass, _forward_pass_triton

    torch.manual_seed(0)
    net = GeometryNetwork(load_conf(ROOT / "confs" / "subject1.conf").model.geometry_network).cuda()
    x = (torch.rand(20_000, 3, device="cuda") - 0.5) * 1.2
    lins = [getattr(net, f"lin{l}") for l in range(net.num_layers - 1)]
    ws, bs = [lin.weight.detach() for lin in lins], [lin.bias.detach() for lin in lins]
    beta, threshold = float(net.softplus.beta), float(net.softplus.threshold)
    settings = (net.embed.multires, tuple(net.skip_in), beta, threshold, None)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference in full float32
    try:
        exact = _forward_pass(x, ws, bs, *settings, None, False)
        torch_bf16 = _forward_pass(x, ws, bs, *settings, torch.bfloat16, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    triton_bf16 = _forward_pass_triton(x, ws, bs, *settings, torch.bfloat16, False)
    for i, name in enumerate(("out", "grad")):
        err_torch = (torch_bf16[i] - exact[i]).abs().max().item()
        err_triton = (triton_bf16[i] - exact[i]).abs().max().item()
        assert err_triton <= 2 * err_torch + 1e-6, (name, err_triton, err_torch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recompute_sweep", [False, True])
def test_triton_passes_bf16_gradients_on_gpu(monkeypatch, recompute_sweep):
    """The fused geometry node in bf16 (saved activations and products, as the lean training path) with
    the Triton passes: its values and gradients (parameters and x) against the float32 node are within
    twice the PyTorch passes' error (same roundings, sums in another order)."""
    pytest.importorskip("triton")
    from pointavatar.config import load_conf
    from pointavatar.model import geometry_fused
    from pointavatar.model.geometry import GeometryNetwork

    torch.manual_seed(0)
    net = GeometryNetwork(load_conf(ROOT / "confs" / "subject1.conf").model.geometry_network).cuda()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off the geometric init, so every path carries gradient
    x0 = (torch.rand(20_000, 3, device="cuda") - 0.5) * 1.2
    g = torch.Generator(device="cuda").manual_seed(1)

    def run(dtype, triton):
        monkeypatch.setattr(geometry_fused, "TRITON_PASSES", triton)
        net.zero_grad()
        x = x0.clone().requires_grad_(True)
        out, grad = geometry_fused.forward_with_gradient_fused(
            net, x, save_dtype=dtype, mm_dtype=dtype, recompute_sweep=recompute_sweep
        )
        g.manual_seed(1)
        loss = (torch.randn(out.shape, device="cuda", generator=g) * out).sum()
        loss = loss + (torch.randn(grad.shape, device="cuda", generator=g) * grad).sum()
        loss.backward()
        return [out.detach(), grad.detach(), x.grad] + [p.grad.clone() for p in net.parameters()]

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        exact = run(None, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    torch_bf16, triton_bf16 = run(torch.bfloat16, False), run(torch.bfloat16, True)
    for i, (e, t, r) in enumerate(zip(exact, torch_bf16, triton_bf16, strict=True)):
        scale = e.abs().max().item() + 1e-30
        err_torch, err_triton = (t - e).abs().max().item() / scale, (r - e).abs().max().item() / scale
        assert err_triton <= 2 * err_torch + 1e-5, (i, err_triton, err_torch)
