"""The fused geometry forward + SDF-gradient node (geometry_fused) vs the explicit sweep it replaces."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tolerances import assert_close

from pointavatar.config import GeometryNetworkConf
from pointavatar.engine.memory import kept_bytes
from pointavatar.model import geometry_fused
from pointavatar.model.geometry import GeometryNetwork
from pointavatar.model.geometry_fused import _FusedGeometry, forward_with_gradient_fused

N = 64  # points

# float64: the same products summed in another order (the backward's sums over N and the layers);
# rounding stays ~1e-15 relative, 1e-12 leaves room for 48-wide layers and gradients of ~1e3.
TOL64 = dict(rtol=1e-12, atol=1e-12)


def make_net(
    dims=(48,) * 5, skip_in=(2,), multires=6, dtype=torch.float64, seed=0, bias_shift=0.3
) -> GeometryNetwork:
    """Geometric init + weight norm as the project conf, every parameter perturbed (not a sphere), and
    layer 1's biases raised so many of its pre-activations lie above the Softplus threshold."""
    torch.manual_seed(seed)
    conf = dataclasses.replace(
        GeometryNetworkConf(), dims=list(dims), skip_in=list(skip_in), multires=multires
    )
    net = GeometryNetwork(conf).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if len(dims) > 1:
            net.lin1.bias.add_(bias_shift)
    return net


# A small network (widths 8; layer 1 outputs 20 - 15 = 5, the 15-wide encoding fills the rest of layer
# 2's input) for gradcheck and torch.compile.
SMALL = dict(dims=(8, 20, 8), skip_in=(2,), multires=2)


def assert_grads_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        assert_close(got[name], ref[name], **TOL64, msg=lambda m, n=name: f"{n}: {m}")


def make_points(n=N, dtype=torch.float64, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g, dtype=dtype) * 2.0 - 1.0


def _hidden_preactivations(net, x) -> list[torch.Tensor]:
    with torch.no_grad():
        enc = h = net.embed(x)
        zs = []
        for l in range(net.num_layers - 2):
            if l in net.skip_in:
                h = torch.cat([h, enc], dim=-1) / 2**0.5
            zs.append(getattr(net, f"lin{l}")(h))
            h = net.softplus(zs[-1])
    return zs


def _loss(out: torch.Tensor, grad: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """Random linear terms on out and grad plus an eikonal term."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    b = torch.randn(grad.shape, generator=g, dtype=torch.float64).to(grad.dtype)
    return (a * out).sum() + (b * grad).sum() + ((grad.norm(dim=-1) - 1) ** 2).mean()


def _param_and_x_grads(net, x, fn):
    x = x.clone().requires_grad_(True)
    out, grad = fn(net, x)
    named = dict(net.named_parameters())
    grads = torch.autograd.grad(_loss(out, grad), [*named.values(), x])
    return dict(zip([*named, "x"], grads, strict=True))


def _explicit(net, x):
    return net.forward_with_gradient_explicit(x)


def _fused(net, x):
    return forward_with_gradient_fused(net, x)


def test_network_straddles_softplus_threshold():
    """The data exercise both Softplus branches (slope 1 and sigmoid) in every hidden layer."""
    net = make_net()
    beta, threshold = net.softplus.beta, net.softplus.threshold
    for z in _hidden_preactivations(net, make_points()):
        assert (beta * z > threshold).any() and (beta * z < threshold).any()
    assert {"lin0.parametrizations.weight.original0", "lin0.parametrizations.weight.original1"} <= set(
        dict(net.named_parameters())
    )


def test_values_match_explicit():
    net = make_net()
    x = make_points()
    out_ref, grad_ref = net.forward_with_gradient_explicit(x)
    out, grad = forward_with_gradient_fused(net, x)
    assert out.shape == out_ref.shape == (N, 4) and grad.shape == grad_ref.shape == (N, 3)
    assert_close(out, out_ref, **TOL64)
    assert_close(grad, grad_ref, **TOL64)


@pytest.mark.parametrize("recompute_sweep", [False, True], ids=["keep_g", "recompute_g"])
@pytest.mark.parametrize("skip_in", [(2,), (), (1, 3)], ids=["skip2", "noskip", "skips13"])
def test_backward_matches_explicit(skip_in, recompute_sweep):
    net = make_net(skip_in=skip_in)
    x = make_points()

    def fused(net, x):
        return forward_with_gradient_fused(net, x, recompute_sweep=recompute_sweep)

    assert_grads_close(_param_and_x_grads(net, x, fused), _param_and_x_grads(net, x, _explicit))


def test_recompute_sweep_keeps_only_the_pre_activations():
    net = make_net()
    x = make_points()
    out, _ = forward_with_gradient_fused(net, x, recompute_sweep=True)
    n_lin = net.num_layers - 1
    lins = [getattr(net, f"lin{l}") for l in range(n_lin)]
    expected = [tuple(x.shape)] + [tuple(lin.weight.shape) for lin in lins]
    expected += [(N, lin.weight.shape[0]) for lin in lins[:-1]]  # z of every hidden layer, no g
    assert [tuple(t.shape) for t in out.grad_fn.saved_tensors] == expected

    def lean(net, x):
        return forward_with_gradient_fused(net, x, recompute_sweep=True)

    assert _packed_bytes(net, lean, x) < _packed_bytes(net, _fused, x)


def test_x_without_grad():
    """x detached (the project's case): the parameters train, and no x gradient is asked for."""
    net = make_net()
    x = make_points()
    params = list(net.parameters())
    got = torch.autograd.grad(_loss(*forward_with_gradient_fused(net, x)), params)
    ref = torch.autograd.grad(_loss(*net.forward_with_gradient_explicit(x)), params)
    for a, b in zip(got, ref, strict=True):
        assert_close(a, b, **TOL64)


def test_gradcheck():
    net = make_net(**SMALL)
    lins = [getattr(net, f"lin{l}") for l in range(net.num_layers - 1)]
    weights = [lin.weight.detach().clone().requires_grad_(True) for lin in lins]
    biases = [lin.bias.detach().clone().requires_grad_(True) for lin in lins]
    x = make_points(n=5).requires_grad_(True)
    beta, threshold = float(net.softplus.beta), float(net.softplus.threshold)

    def fn(x, *params):
        return _FusedGeometry.apply(x, 2, (2,), beta, threshold, None, None, False, False, 1 << 17, *params)

    # gradcheck's default tolerances (atol 1e-5, rtol 1e-3), float64, both outputs.
    assert torch.autograd.gradcheck(fn, (x, *weights, *biases))


def test_gradcheck_skip_at_first_and_last_layer():
    """Skips GeometryNetwork's sizing does not build, on raw weights: the encoding re-injected at layer
    0 (input cat([enc, enc]) / sqrt 2) and at the last layer (the sweep's top vector is split)."""
    gen = torch.Generator().manual_seed(3)
    n_enc = 3 * (1 + 2 * 2)
    shapes = [(6, 2 * n_enc), (5, 6), (4, 5 + n_enc)]  # [out_l, in_l]; skips at 0 and 2
    weights = [
        (0.3 * torch.randn(s, generator=gen, dtype=torch.float64)).requires_grad_(True) for s in shapes
    ]
    biases = [
        (0.1 * torch.randn(s[0], generator=gen, dtype=torch.float64)).requires_grad_(True) for s in shapes
    ]
    x = make_points(n=5).requires_grad_(True)

    def fn(x, *params):
        return _FusedGeometry.apply(x, 2, (0, 2), 100.0, 20.0, None, None, False, False, 1 << 17, *params)

    # gradcheck's default tolerances (atol 1e-5, rtol 1e-3), float64, both outputs.
    assert torch.autograd.gradcheck(fn, (x, *weights, *biases))


def test_bf16_saved_activations():
    net = make_net(dtype=torch.float32)
    x = make_points(dtype=torch.float32)
    out_ref, grad_ref = forward_with_gradient_fused(net, x)
    out, grad = forward_with_gradient_fused(net, x, save_dtype=torch.bfloat16)
    assert torch.equal(out, out_ref) and torch.equal(grad, grad_ref)

    def fused_bf16(net, x):
        return forward_with_gradient_fused(net, x, save_dtype=torch.bfloat16)

    ref = _param_and_x_grads(net, x, _fused)
    got = _param_and_x_grads(net, x, fused_bf16)
    for name in ref:
        # The backward recomputes softplus, slopes and curvatures from z and g rounded to bf16 (8-bit
        # mantissa, 2^-9 relative); observed errors are below 0.4% of each tensor's largest entry.
        atol = 1e-2 * float(ref[name].abs().max())
        assert_close(
            got[name],
            ref[name],
            rtol=0.0,
            atol=atol,
            reason="z and g saved in bfloat16 (2^-9 relative rounding)",
            msg=lambda m, n=name: f"{n}: {m}",
        )


def test_default_conf_float64():
    """The original's network (9 x 256, skip at 4, multires 6, weight norm) on a few points."""
    torch.manual_seed(0)
    net = GeometryNetwork(GeometryNetworkConf()).double()
    x = make_points(n=16)
    out_ref, grad_ref = net.forward_with_gradient_explicit(x)
    out, grad = forward_with_gradient_fused(net, x)
    assert_close(out, out_ref, **TOL64)
    assert_close(grad, grad_ref, **TOL64)
    assert_grads_close(_param_and_x_grads(net, x, _fused), _param_and_x_grads(net, x, _explicit))


def _packed_bytes(net, fn, x) -> int:
    """Bytes autograd keeps during fn(net, x), the parameters' own storage not counted."""
    return kept_bytes(fn, net, x, exclude=net.parameters())[0]


def test_saved_tensors():
    net = make_net()
    x = make_points()
    out, grad = forward_with_gradient_fused(net, x)
    assert out.grad_fn is grad.grad_fn is not None
    saved = out.grad_fn.saved_tensors
    n_lin = net.num_layers - 1
    lins = [getattr(net, f"lin{l}") for l in range(n_lin)]
    widths = [lin.weight.shape[0] for lin in lins[:-1]]  # hidden widths out_l
    # x, the weights (no copy: the parametrisation's outputs), z for each hidden layer, g below the top.
    expected = [tuple(x.shape)] + [tuple(lin.weight.shape) for lin in lins]
    expected += [(N, w) for w in widths] + [(N, w) for w in widths[:-1]]
    assert [tuple(t.shape) for t in saved] == expected
    assert saved[0].data_ptr() == x.data_ptr()
    n_act = sum(t.numel() for t in saved[1 + n_lin :])
    assert n_act <= 2 * N * sum(widths)

    # Everything autograd keeps for the call, weight norm's graph included.
    elt = x.element_size()
    weights = sum(lin.weight.numel() + lin.weight.shape[0] for lin in lins)  # weight and its norms
    bound = elt * (2 * N * sum(widths) + x.numel() + weights)
    fused = _packed_bytes(net, _fused, x)
    explicit = _packed_bytes(net, _explicit, x)
    assert fused <= bound < explicit

    def fused_bf16(net, x):
        return forward_with_gradient_fused(net, x, save_dtype=torch.bfloat16)

    assert _packed_bytes(net, fused_bf16, x) == fused - (elt - 2) * n_act


def test_no_grad_keeps_nothing():
    net = make_net()
    x = make_points()
    out_ref, grad_ref = net.forward_with_gradient_explicit(x)
    with torch.no_grad():
        assert _packed_bytes(net, _fused, x) == 0
        out, grad = forward_with_gradient_fused(net, x)
    assert out.grad_fn is None and grad.grad_fn is None
    assert not out.requires_grad and not grad.requires_grad
    assert_close(out, out_ref, **TOL64)
    assert_close(grad, grad_ref, **TOL64)


def test_autocast_refused_with_grad():
    """The backward does not replay autocast: refused while recording, fine for inference."""
    net = make_net(**SMALL, dtype=torch.float32)
    x = make_points(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="autocast"):
            forward_with_gradient_fused(net, x)
        with torch.no_grad():
            out, grad = forward_with_gradient_fused(net, x)
    out_ref, grad_ref = forward_with_gradient_fused(net, x)
    why = "autocast rounds the matmul operands to bfloat16 (2^-9 relative)"
    assert_close(out.float(), out_ref, rtol=0.0, atol=2e-2 * float(out_ref.abs().max()), reason=why)
    assert_close(grad.float(), grad_ref, rtol=0.0, atol=5e-2 * float(grad_ref.abs().max()), reason=why)


@pytest.mark.slow
def test_compiled_passes_match_eager(monkeypatch, eager_kernel_compile):
    """compiled=True (the fast path on CUDA): the forward and backward passes run through torch.compile
    (dynamic point count; inductor's kernels replaced by eager ones here, see ``eager_kernel_compile``,
    checked on the GPU) as plain tensor functions; same values and gradients, and a second point count
    reuses the compiled passes."""
    torch._dynamo.reset()
    monkeypatch.setattr(geometry_fused, "_COMPILED", {})
    monkeypatch.setattr(geometry_fused, "_COMPILE_FAILED", [])
    net = make_net(**SMALL)

    def compiled(net, x):
        # Chunks of 23 rows: every size's passes run on several chunks, the last one shorter.
        return forward_with_gradient_fused(net, x, compiled=True, row_chunk=23)

    for n in (N, N + 7):  # two sizes: one dynamic graph
        x = make_points(n=n)
        out_ref, grad_ref = forward_with_gradient_fused(net, x)
        out, grad = compiled(net, x)
        assert_close(out, out_ref, **TOL64)
        assert_close(grad, grad_ref, **TOL64)
        assert_grads_close(_param_and_x_grads(net, x, compiled), _param_and_x_grads(net, x, _fused))
    assert not geometry_fused._COMPILE_FAILED
    assert set(geometry_fused._COMPILED) == {"forward", "backward"}


def test_bf16_matmuls():
    """mm_dtype=bfloat16 (model.geometry_bf16 with the fused backward): every product's operands rounded
    to bf16, forward and backward; values and gradients near the float32 ones, and not equal to them."""
    net = make_net(dtype=torch.float32)
    x = make_points(dtype=torch.float32)
    out_ref, grad_ref = forward_with_gradient_fused(net, x)
    out, grad = forward_with_gradient_fused(net, x, save_dtype=torch.bfloat16, mm_dtype=torch.bfloat16)
    assert out.dtype == grad.dtype == torch.float32
    assert not torch.equal(out, out_ref)
    why = "matmul operands rounded to bfloat16 (2^-9 relative), errors growing through the layers"
    assert_close(out, out_ref, rtol=0.0, atol=2e-2 * float(out_ref.abs().max()), reason=why)
    assert_close(grad, grad_ref, rtol=0.0, atol=5e-2 * float(grad_ref.abs().max()), reason=why)

    def fused_bf16(net, x):
        return forward_with_gradient_fused(net, x, save_dtype=torch.bfloat16, mm_dtype=torch.bfloat16)

    ref = _param_and_x_grads(net, x, _fused)
    got = _param_and_x_grads(net, x, fused_bf16)
    for name in ref:
        # Up to 5 % of the largest entry here (this network's raised layer-1 biases amplify the rounding).
        atol = 1e-1 * float(ref[name].abs().max())
        assert_close(got[name], ref[name], rtol=0.0, atol=atol, reason=why, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("recompute_sweep", [False, True], ids=["keep_g", "recompute_g"])
def test_row_chunks_give_the_same_values_and_gradients(recompute_sweep):
    """The passes on chunks of 23 rows (the last one shorter, and x requiring grad): the same outputs, and
    the weight gradients summed over the chunks; the kept activations are per chunk."""
    net = make_net()
    x = make_points().requires_grad_(True)
    assert N % 23

    def chunked(net, x):
        return forward_with_gradient_fused(net, x, recompute_sweep=recompute_sweep, row_chunk=23)

    out, grad = chunked(net, x)
    out_ref, grad_ref = forward_with_gradient_fused(net, x)
    assert_close(out, out_ref, **TOL64)
    assert_close(grad, grad_ref, **TOL64)
    n_chunks = -(-N // 23)
    n_hidden = net.num_layers - 2
    per_chunk = n_hidden if recompute_sweep else 2 * n_hidden - 1
    assert len(out.grad_fn.saved_tensors) == 1 + (n_hidden + 1) + n_chunks * per_chunk
    assert_grads_close(_param_and_x_grads(net, x, chunked), _param_and_x_grads(net, x, _explicit))
