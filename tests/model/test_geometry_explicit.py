"""Explicit SDF gradient (GeometryNetwork.forward_with_gradient_explicit) vs the autograd reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tolerances import assert_close

from pointavatar.config import GeometryNetworkConf
from pointavatar.model.geometry import GeometryNetwork

N = 64  # points

# float64 tolerance: both paths do the same products in a different order; rounding stays ~1e-15
# relative, 1e-12 leaves room for the sums over 16-wide layers and the loss' normalisation.
TOL64 = dict(rtol=1e-12, atol=1e-12)


def make_net(
    dims=(16, 16, 16, 16, 16),
    skip_in=(2,),
    multires=2,
    weight_norm=True,
    geometric_init=True,
    dtype=torch.float64,
    seed=0,
) -> GeometryNetwork:
    torch.manual_seed(seed)
    conf = dataclasses.replace(
        GeometryNetworkConf(),
        dims=list(dims),
        skip_in=list(skip_in),
        multires=multires,
        weight_norm=weight_norm,
        geometric_init=geometric_init,
    )
    net = GeometryNetwork(conf).to(dtype)
    # Geometric init zeroes the encoding weights; perturb every parameter so all paths are exercised.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def make_points(n=N, dtype=torch.float64, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g, dtype=dtype) * 2.0 - 1.0


NET_CASES = [
    dict(multires=2, weight_norm=True),
    dict(multires=2, weight_norm=False),
    dict(multires=0, weight_norm=True),
    dict(multires=0, weight_norm=False),
    dict(multires=2, weight_norm=True, skip_in=()),
    dict(multires=1, weight_norm=True, skip_in=(1, 3)),
    dict(multires=2, weight_norm=False, geometric_init=False),
]
NET_IDS = [
    "mr2-wn",
    "mr2",
    "mr0-wn",
    "mr0",
    "mr2-wn-noskip",
    "mr1-wn-2skips",
    "mr2-noinit",
]


LEAN = pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])


def _explicit(net, x, lean):
    return net.forward_with_gradient_explicit(x, lean=lean)


def _loss(out: torch.Tensor, grad: torch.Tensor, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Drawn in float64 and cast, so the float32 and float64 tests see the same loss.
    a = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    b = torch.randn(grad.shape, generator=g, dtype=torch.float64).to(grad.dtype)
    c = torch.randn(grad.shape, generator=g, dtype=torch.float64).to(grad.dtype)
    normal = torch.nn.functional.normalize(grad, dim=-1)
    return (a * out).sum() + (b * grad).sum() + (c * normal).sum()


def _param_and_x_grads(net, x, lean=None):
    """d loss / d (every parameter, x); lean None = the reference (double backward)."""
    x = x.clone().requires_grad_(True)
    if lean is None:
        out, grad = net.forward_with_gradient(x, create_graph=True)
    else:
        out, grad = _explicit(net, x, lean)
    named = dict(net.named_parameters())
    grads = torch.autograd.grad(_loss(out, grad), [*named.values(), x])
    return dict(zip([*named, "x"], grads, strict=True))


def _assert_all_close(got: dict, ref: dict, **tol):
    assert got.keys() == ref.keys()
    for name in ref:
        assert_close(got[name], ref[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@LEAN
@pytest.mark.parametrize("kwargs", NET_CASES, ids=NET_IDS)
def test_values_match_reference(kwargs, lean):
    net = make_net(**kwargs)
    x = make_points()
    out_ref, grad_ref = net.forward_with_gradient(x, create_graph=True)
    out, grad = _explicit(net, x, lean)
    assert out.shape == out_ref.shape and grad.shape == grad_ref.shape == (N, 3)
    assert_close(out, out_ref, **TOL64)
    assert_close(grad, grad_ref, **TOL64)


@LEAN
@pytest.mark.parametrize("kwargs", NET_CASES, ids=NET_IDS)
def test_backward_matches_double_backward(kwargs, lean):
    net = make_net(**kwargs)
    x = make_points()
    _assert_all_close(_param_and_x_grads(net, x, lean), _param_and_x_grads(net, x), **TOL64)


@LEAN
def test_gradcheck_wrt_x(lean):
    net = make_net(dims=(12, 12, 12), skip_in=(1,), multires=1)
    x = make_points(n=5).requires_grad_(True)
    # gradcheck's and gradgradcheck's default tolerances (atol 1e-5, rtol 1e-3), float64.
    assert torch.autograd.gradcheck(lambda p: _explicit(net, p, lean), (x,))
    # The eikonal/normal losses differentiate grad, so its own derivative is checked too.
    assert torch.autograd.gradgradcheck(lambda p: _explicit(net, p, lean)[1], (x,))


@LEAN
def test_near_softplus_threshold(lean):
    """Pre-activations straddling torch's Softplus threshold (beta z = 20) still match."""
    net = make_net(dims=(16, 16, 16), skip_in=(), multires=0, weight_norm=False)
    beta, threshold = net.softplus.beta, net.softplus.threshold
    x = make_points(n=N)
    with torch.no_grad():
        # Shrink layer 0 and centre its pre-activations on threshold / beta: beta z spans ~20 +- 0.5.
        net.lin0.weight.mul_(1e-2)
        net.lin0.bias.add_(threshold / beta - net.lin0(x).mean(0))
        z0 = net.lin0(x) * beta
    assert (z0 > threshold).any() and (z0 <= threshold).any()
    out_ref, grad_ref = net.forward_with_gradient(x, create_graph=True)
    out, grad = _explicit(net, x, lean)
    assert_close(out, out_ref, **TOL64)
    assert_close(grad, grad_ref, **TOL64)
    _assert_all_close(_param_and_x_grads(net, x, lean), _param_and_x_grads(net, x), **TOL64)


@LEAN
def test_no_grad_inference(lean):
    net = make_net()
    x = make_points()
    out_ref, grad_ref = net.forward_with_gradient(x, create_graph=False)
    with torch.no_grad():
        out, grad = _explicit(net, x, lean)
    assert not out.requires_grad and not grad.requires_grad
    assert_close(out, out_ref, **TOL64)
    assert_close(grad, grad_ref, **TOL64)


@LEAN
def test_float32_matches_reference(lean):
    net = make_net(dims=(64,) * 5, dtype=torch.float32)
    x = make_points(dtype=torch.float32)
    out_ref, grad_ref = net.forward_with_gradient(x, create_graph=True)
    out, grad = _explicit(net, x, lean)

    # float32: same ops in a different summation order; observed differences are ~1e-6 of each
    # tensor's largest entry (sums over 64 points of 64-wide layers), so 1e-5 of it is the bound.
    def close32(a, b, name=""):
        atol = 1e-5 * float(b.detach().abs().max())
        order = "float32 sums over 64 points of 64-wide layers in another order"
        assert_close(a, b, rtol=1e-5, atol=atol, reason=order, msg=lambda m: f"{name}: {m}")

    close32(out, out_ref)
    close32(grad, grad_ref)
    ref = _param_and_x_grads(net, x)
    got = _param_and_x_grads(net, x, lean)
    for name in ref:
        close32(got[name], ref[name], name)


@LEAN
def test_default_conf_float64(lean):
    """The original's network (9 x 256, skip at 4, multires 6, weight norm) on a few points."""
    torch.manual_seed(0)
    net = GeometryNetwork(GeometryNetworkConf()).double()
    x = make_points(n=16)
    out_ref, grad_ref = net.forward_with_gradient(x, create_graph=True)
    out, grad = _explicit(net, x, lean)
    assert_close(out, out_ref, **TOL64)
    assert_close(grad, grad_ref, **TOL64)
