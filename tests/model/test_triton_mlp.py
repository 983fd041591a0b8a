"""The geometry MLP's Triton forward pass (model/_triton_mlp.py, geometry_fused._forward_pass_triton): under
the Triton interpreter on the CPU in float32 against the PyTorch passes, and on a GPU in bf16."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import math
    import torch
    from test_geometry_fused import SMALL, _loss, make_net, make_points
    from pointavatar.model import _triton_mlp as tm, geometry_fused
    from pointavatar.model.geometry_fused import _forward_pass, _forward_pass_triton, forward_with_gradient_fused

    # Small tiles: several programs per dimension, several reduction steps, partly filled last tiles.
    tm.BLOCK_M, tm.BLOCK_N, tm.BLOCK_K = 32, 16, 16

    def close(got, ref, rtol, what):
        err = (got - ref).abs().max().item()
        bound = rtol * ref.abs().max().item() + 1e-7
        assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"

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

    # 3. forward_with_gradient_fused with the Triton forward: the same values and parameter gradients.
    net = make_net(dtype=torch.float32)
    x = make_points(97, dtype=torch.float32)
    results = []
    for flag in (False, True):
        geometry_fused.TRITON_FORWARD = flag
        net.zero_grad()
        out, grad = forward_with_gradient_fused(net, x)
        _loss(out, grad).backward()
        results.append((out.detach(), grad.detach(), [p.grad.clone() for p in net.parameters()]))
    (o0, g0, p0), (o1, g1, p1) = results
    close(o1, o0, 1e-5, "fused out")
    close(g1, g0, 1e-5, "fused grad")
    for i, (u, v) in enumerate(zip(p1, p0, strict=True)):
        close(u, v, 1e-4, f"parameter gradient {i}")
    print("INTERPRETER-OK")
    """
)


def test_triton_forward_pass_under_interpreter():
    """The kernel's three prologues, the appended encoding and the scale, and the whole forward pass
    with its sweep, against the PyTorch ones in float32 (the interpreter rounds bf16 unlike torch, so
    the bf16 mode is checked on the GPU below). Tolerances: float32 products summed in another order."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    paths = [str(ROOT / "code"), str(ROOT / "tests"), str(ROOT / "tests" / "model")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "INTERPRETER-OK" in proc.stdout, proc.stdout + proc.stderr


def test_linear_refuses_inconsistent_arguments():
    pytest.importorskip("triton")
    from pointavatar.model import _triton_mlp as tm

    a, w = torch.zeros(4, 3), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="prologue must be one of"):
        tm.linear(a, w, prologue="relu")
    with pytest.raises(ValueError, match="exactly with prologue"):
        tm.linear(a, w, prologue="slope")
    with pytest.raises(ValueError, match="do not chain"):
        tm.linear(a, torch.zeros(5, 2))


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
