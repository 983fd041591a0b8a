"""The fused Softplus chain with tangents (deform_fused) vs the deform_explicit steps it replaces."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_deform_explicit import build_variant
from test_model import perturb_
from tolerances import assert_close
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pointavatar.config import DeformerNetworkConf
from pointavatar.engine.memory import kept_bytes
from pointavatar.model import deform_explicit, geometry_fused
from pointavatar.model.deform_fused import (
    _FusedSoftplusChain,
    skinning_with_tangents_fused,
    softplus_chain_with_tangents,
    trunk_with_tangents_fused,
)
from pointavatar.model.deformer import ForwardDeformer

N, D = 32, 16  # points, width
BETA, THRESHOLD = 100.0, 20.0  # the deformer's Softplus

# float64: the same products summed in another order (stacked GEMMs, the backward's sums over N and the
# tangents); rounding stays ~1e-15 relative, 1e-12 leaves room for gradients of ~1e2 (beta = 100).
TOL64 = dict(rtol=1e-12, atol=1e-12)


def make_chain(
    m: int, d: int = D, dtype=torch.float64, seed: int = 0, norm: bool = True, std=0.5, bias=(-0.1, 0.3)
) -> nn.ModuleList:
    """m weight-normed Linear(d, d), weights of ``std``, biases spread over ``bias``: by default, with
    beta = 100, some pre-activations lie above the Softplus threshold (z > 0.2), many in its sigmoid
    region."""
    torch.manual_seed(seed)
    lins = []
    for _ in range(m):
        lin = nn.Linear(d, d).to(dtype)
        with torch.no_grad():
            lin.weight.normal_(0.0, std)
            lin.bias.uniform_(*bias)
        lins.append(weight_norm(lin, name="weight", dim=0) if norm else lin)
    return nn.ModuleList(lins)


def make_inputs(n: int = N, d: int = D, dtype=torch.float64, seed: int = 1, lo=-0.1, hi=0.3):
    """z0 [n, d] in [lo, hi] (by default both Softplus branches) and tangents tz0 [3, n, d], requiring
    grad."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.rand(n, d, generator=g, dtype=torch.float64) * (hi - lo) + lo
    tz0 = torch.randn(3, n, d, generator=g, dtype=torch.float64)
    return z0.to(dtype).requires_grad_(True), tz0.to(dtype).requires_grad_(True)


def reference_chain(z0, tz0, lins, final_activation=True):
    """The chain with deform_explicit's ordinary autograd steps; also the pre-activations of its Softplus
    layers."""
    act = nn.Softplus(BETA, THRESHOLD)
    zs = [z0]
    h, t = deform_explicit._softplus(act, z0, tz0)
    for i, lin in enumerate(lins):
        z, t = deform_explicit._linear(lin, h, t)
        if i == len(lins) - 1 and not final_activation:
            return z, t, zs
        zs.append(z)
        h, t = deform_explicit._softplus(act, z, t)
    return h, t, zs


def fused_chain(z0, tz0, lins, final_activation=True, **kwargs):
    return softplus_chain_with_tangents(z0, tz0, lins, BETA, THRESHOLD, final_activation, **kwargs)


def _loss(a: torch.Tensor, ta: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """Random linear terms on a and ta plus a square (so the Softplus curvature enters)."""
    g = torch.Generator().manual_seed(seed)
    wa = torch.randn(a.shape, generator=g, dtype=torch.float64).to(a.dtype)
    wt = torch.randn(ta.shape, generator=g, dtype=torch.float64).to(ta.dtype)
    return (wa * a).sum() + (wt * ta).sum() + (ta**2).sum()


def _grads(fn, lins, z0, tz0) -> dict:
    a, ta = fn(z0, tz0, lins)
    named = {**dict(lins.named_parameters()), "z0": z0, "tz0": tz0}
    grads = torch.autograd.grad(_loss(a, ta), list(named.values()))
    return dict(zip(named, grads, strict=True))


def assert_grads_close(got: dict, ref: dict, **tol) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        assert_close(got[name], ref[name], **(tol or TOL64), msg=lambda m, n=name: f"{n}: {m}")


def _packed_bytes(fn, exclude) -> int:
    """Bytes autograd keeps during fn(), those of ``exclude`` (parameters) not counted."""
    return kept_bytes(fn, exclude=exclude)[0]


def test_data_straddle_softplus_threshold():
    """Both Softplus branches (slope 1, and sigmoid with curvature) occur at every layer of the chain."""
    lins = make_chain(3)
    z0, tz0 = make_inputs()
    with torch.no_grad():
        _, _, zs = reference_chain(z0, tz0, lins)
    assert len(zs) == 4
    for z in zs:
        bz = BETA * z
        assert (bz > THRESHOLD).any() and ((bz < THRESHOLD) & (bz > -5.0)).any()


@pytest.mark.parametrize("final_activation", [True, False], ids=["act", "linear_top"])
@pytest.mark.parametrize("m", [0, 1, 3])
def test_values_match_reference(m, final_activation):
    lins = make_chain(m)
    z0, tz0 = make_inputs()
    a, ta = fused_chain(z0, tz0, lins, final_activation)
    # No linears: the activation of (z0, tz0) whatever final_activation says.
    ref_a, ref_ta, _ = reference_chain(z0, tz0, lins, final_activation or m == 0)
    assert a.shape == ref_a.shape == (N, D) and ta.shape == ref_ta.shape == (3, N, D)
    assert a.grad_fn is ta.grad_fn is not None
    assert_close(a, ref_a, **TOL64)
    assert_close(ta, ref_ta, **TOL64)


@pytest.mark.parametrize("final_activation", [True, False], ids=["act", "linear_top"])
@pytest.mark.parametrize("m", [0, 1, 3])
def test_gradients_match_reference(m, final_activation):
    lins = make_chain(m)
    z0, tz0 = make_inputs()

    def ref(z0, tz0, lins):
        return reference_chain(z0, tz0, lins, final_activation)[:2]

    def fused(z0, tz0, lins):
        return fused_chain(z0, tz0, lins, final_activation)

    got, want = _grads(fused, lins, z0, tz0), _grads(ref, lins, z0, tz0)
    if m:
        originals = {f"0.parametrizations.weight.original{i}" for i in (0, 1)}
        assert originals | {"0.bias"} <= set(got)
    assert_grads_close(got, want)


def test_gradients_of_parameters_only():
    """z0 and tz0 not requiring grad (their input gradients are skipped): the parameters still train."""
    lins = make_chain(2)
    z0, tz0 = (t.detach() for t in make_inputs())
    params = list(lins.parameters())
    got = torch.autograd.grad(_loss(*fused_chain(z0, tz0, lins)), params)
    want = torch.autograd.grad(_loss(*reference_chain(z0, tz0, lins)[:2]), params)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, **TOL64)


@pytest.mark.parametrize("final_activation", [True, False], ids=["act", "linear_top"])
def test_gradcheck(final_activation):
    lins = make_chain(2, d=4, norm=False)
    weights = [lin.weight.detach().clone().requires_grad_(True) for lin in lins]
    biases = [lin.bias.detach().clone().requires_grad_(True) for lin in lins]
    z0, tz0 = make_inputs(n=3, d=4)

    def fn(z0, tz0, *params):
        return _FusedSoftplusChain.apply(
            z0, tz0, BETA, THRESHOLD, final_activation, None, None, False, *params
        )

    # gradcheck's default tolerances (atol 1e-5, rtol 1e-3), float64, both outputs.
    assert torch.autograd.gradcheck(fn, (z0, tz0, *weights, *biases))


@pytest.mark.parametrize("final_activation", [True, False], ids=["act", "linear_top"])
def test_saved_tensors(final_activation):
    """Saved: the Softplus inputs z_i, then tz_i, then the weights; autograd keeps nothing else."""
    m = 3
    lins = make_chain(m, norm=False)  # plain Linear: the weights are parameters, not counted in bytes
    z0, tz0 = make_inputs()
    a, _ = fused_chain(z0, tz0, lins, final_activation)
    k = m + 1 if final_activation else m  # pre-activations that go through a Softplus
    expected = [(N, D)] * k + [(3, N, D)] * k + [(D, D)] * m
    saved = a.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == expected
    assert saved[0].data_ptr() == z0.data_ptr() and saved[k].data_ptr() == tz0.data_ptr()

    params = list(lins.parameters())
    elt = z0.element_size()
    fused = _packed_bytes(lambda: fused_chain(z0, tz0, lins, final_activation), params)
    ref = _packed_bytes(lambda: reference_chain(z0, tz0, lins, final_activation), params)
    assert fused == elt * 4 * N * D * k < ref
    bf16 = _packed_bytes(
        lambda: fused_chain(z0, tz0, lins, final_activation, save_dtype=torch.bfloat16), params
    )
    assert bf16 == 2 * 4 * N * D * k


def test_no_grad_keeps_nothing():
    lins = make_chain(2)
    z0, tz0 = make_inputs()
    ref_a, ref_ta, _ = reference_chain(z0, tz0, lins)
    with torch.no_grad():
        assert _packed_bytes(lambda: fused_chain(z0, tz0, lins), list(lins.parameters())) == 0
        a, ta = fused_chain(z0, tz0, lins)
    assert a.grad_fn is None and ta.grad_fn is None
    assert_close(a, ref_a, **TOL64)
    assert_close(ta, ref_ta, **TOL64)


def test_autocast_refused_with_grad():
    lins = make_chain(1, dtype=torch.float32)
    z0, tz0 = make_inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="autocast"):
            fused_chain(z0, tz0, lins)
        with torch.no_grad():
            fused_chain(z0, tz0, lins)


def test_bf16_saved_and_matmuls():
    """save_dtype and mm_dtype bfloat16 with float32 inputs: near the float32 values and gradients.

    Moderate pre-activations (|beta z| < ~10): bf16 rounds z by 2^-9 relative, which moves the slope
    sigmoid(beta z) by up to beta |z| 2^-11; with the default data (beta z up to 30 and more) that alone
    reaches ~1.5 % per layer, and the gradients of a float32 chain whose products' operands are rounded
    to bf16 by ordinary autograd differ from the float32 ones by ~30 % there too.
    """
    lins = make_chain(3, dtype=torch.float32, std=0.2, bias=(-0.025, 0.025))
    z0, tz0 = make_inputs(dtype=torch.float32, lo=-0.05, hi=0.05)
    ref_a, ref_ta = fused_chain(z0, tz0, lins)

    # save_dtype alone leaves the values bit-identical.
    a, ta = fused_chain(z0, tz0, lins, save_dtype=torch.bfloat16)
    assert torch.equal(a, ref_a) and torch.equal(ta, ref_ta)

    def saved_bf16(z0, tz0, lins):
        return fused_chain(z0, tz0, lins, save_dtype=torch.bfloat16)

    def all_bf16(z0, tz0, lins):
        return fused_chain(z0, tz0, lins, save_dtype=torch.bfloat16, mm_dtype=torch.bfloat16)

    with torch.no_grad():
        a, ta = all_bf16(z0, tz0, lins)
    assert a.dtype == ta.dtype == torch.float32 and not torch.equal(a, ref_a)
    mm_why = "matmul operands rounded to bfloat16 (2^-9 relative), errors growing through the layers"
    # Observed below 1 % of the largest entry.
    assert_close(a, ref_a, rtol=0.0, atol=2e-2 * float(ref_a.detach().abs().max()), reason=mm_why)
    assert_close(ta, ref_ta, rtol=0.0, atol=2e-2 * float(ref_ta.detach().abs().max()), reason=mm_why)

    save_why = "z and tz saved in bfloat16 (2^-9 relative), slopes and curvatures recomputed from them"
    ref = _grads(fused_chain, lins, z0, tz0)
    for fn, why in [(saved_bf16, save_why), (all_bf16, f"{mm_why}; {save_why}")]:
        got = _grads(fn, lins, z0, tz0)
        for name in ref:
            # Relative to each gradient's largest entry; observed below 0.3 % (saved) and 1 % (all).
            atol = 3e-2 * float(ref[name].abs().max())
            msg = lambda m, n=name: f"{n}: {m}"  # noqa: E731
            assert_close(got[name], ref[name], rtol=0.0, atol=atol, reason=why, msg=msg)


@pytest.mark.slow
def test_compiled_passes_match_eager(monkeypatch, eager_kernel_compile):
    """compiled=True: the forward and backward passes run through torch.compile (dynamic point count;
    inductor's kernels replaced by eager ones here, see ``eager_kernel_compile``, checked on the GPU);
    same values and gradients as eager, and a second point count reuses the compiled passes."""
    torch._dynamo.reset()
    monkeypatch.setattr(geometry_fused, "_COMPILED", {})
    monkeypatch.setattr(geometry_fused, "_COMPILE_FAILED", [])
    lins = make_chain(2)

    def compiled(z0, tz0, lins):
        return fused_chain(z0, tz0, lins, compiled=True)

    for n in (N, N + 7):  # two sizes: one dynamic graph
        z0, tz0 = make_inputs(n=n)
        ref_a, ref_ta = fused_chain(z0, tz0, lins)
        a, ta = compiled(z0, tz0, lins)
        assert_close(a, ref_a, **TOL64)
        assert_close(ta, ref_ta, **TOL64)
        assert_grads_close(_grads(compiled, lins, z0, tz0), _grads(fused_chain, lins, z0, tz0))
    assert not geometry_fused._COMPILE_FAILED
    assert set(geometry_fused._COMPILED) == {"deform_forward", "deform_backward"}


# ---- the deformer's trunk and skinning branch on top of the fused chain ----


def _small_deformer() -> ForwardDeformer:
    """A float64 deformer with a positional encoding (the model conf's has none), every weight perturbed."""
    conf = dataclasses.replace(DeformerNetworkConf(), dims=[16] * 3, multires=2, num_exp=4)
    torch.manual_seed(0)
    deformer = ForwardDeformer(conf, None).double()
    perturb_(deformer, 0.05)
    return deformer


def _deformer_and_points(flame_files, variant: str):
    if variant == "model":
        model = build_variant(flame_files, ghostbone=True, deform_c=True)
        return model.deformer_network, model.pc.points.detach().clone()
    g = torch.Generator().manual_seed(5)
    return _small_deformer(), torch.rand(40, 3, generator=g, dtype=torch.float64) * 2.0 - 1.0


def _deformer_outputs(deformer, x, trunk, skinning):
    h, t = trunk(deformer, x)
    w, tw = skinning(deformer, h, t)
    return h, t, w, tw


@pytest.mark.parametrize("variant", ["model", "multires"])
def test_trunk_and_skinning_match_explicit(flame_files, variant):
    deformer, points = _deformer_and_points(flame_files, variant)
    x = points.requires_grad_(True)
    ref = _deformer_outputs(
        deformer, x, deform_explicit.trunk_with_tangents, deform_explicit.skinning_with_tangents
    )
    got = _deformer_outputs(deformer, x, trunk_with_tangents_fused, skinning_with_tangents_fused)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape
        assert_close(a, b, **TOL64)
    # The weights are not uniform and their tangents not zero: the skinning head is exercised.
    assert ref[2].std() > 1e-3 and ref[3].abs().max() > 1e-3

    named = {n: p for n, p in deformer.named_parameters() if p.requires_grad}
    named["x"] = x
    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in ref]

    def grads(outs):
        # Linear terms on every output plus squares of the tangents (as the normals' nonlinearity).
        loss = sum((w * o).sum() for w, o in zip(ws, outs, strict=True))
        loss = loss + (outs[1] ** 2).sum() + (outs[3] ** 2).sum()
        grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        return dict(zip(named, grads, strict=True))

    got_g, ref_g = grads(got), grads(ref)
    for name in ref_g:
        a, b = got_g[name], ref_g[name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, **TOL64, msg=lambda m, n=name: f"{n}: {m}")

    # The trunk keeps less for the backward (parameters and the points not counted).
    params = [*deformer.parameters(), x]
    fused = _packed_bytes(lambda: trunk_with_tangents_fused(deformer, x), params)
    explicit = _packed_bytes(lambda: deform_explicit.trunk_with_tangents(deformer, x), params)
    assert fused < explicit
