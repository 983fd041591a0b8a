"""model.implementation = "fast" against the reference forward: outputs, normals, losses, gradients.

On the CPU the fast path differs from the reference only in how it computes the SDF normals (an
explicit first-order sweep instead of double backward); the 1-NN falls back to the reference there.
Compared in float64, with the same random draws (eikonal samples) for both.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._functorch.config as functorch_config
from test_model import IMG_RES, build, make_input, perturb_
from tolerances import assert_close

from pointavatar.config import LossConf
from pointavatar.engine.memory import kept_bytes
from pointavatar.model import geometry_fused, point_avatar
from pointavatar.train import trainer as trainer_module
from pointavatar.train.losses import Loss


def set_backwards(model, backward: str) -> None:
    """A case name such as "fused_recompute+deformer" onto the model: model.geometry_backward, then
    "+deformer" for model.deformer_backward = "fused" and "+bf16" for model.geometry_bf16 and
    model.deformer_bf16 (else both off: float32 stays float32)."""
    model.geometry_backward = backward.split("+")[0]
    model.deformer_backward = "fused" if "+deformer" in backward else "autograd"
    model.geometry_bf16 = model.deformer_bf16 = "+bf16" in backward


def forward_and_grads(model, seed: int, dtype=torch.float64):
    """Training forward, the full training loss (VGG off) and the gradients of every parameter."""
    model.train()
    torch.manual_seed(seed)
    inp = make_input(2, dtype=dtype)
    out = model(inp)
    g = torch.Generator().manual_seed(seed + 1)
    p = IMG_RES * IMG_RES
    gt = {
        "rgb": torch.rand(2, p, 3, generator=g, dtype=dtype),
        "object_mask": (torch.rand(2, p, generator=g) > 0.5).to(dtype),
    }
    loss_fn = Loss(LossConf(vgg_feature_weight=0.0), var_expression=None)
    losses = loss_fn(out, gt, flame=model.FLAMEServer, lbs_weight=10.0)
    model.zero_grad(set_to_none=True)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, losses, grads


OUTPUTS = ("rgb_image", "predicted_mask", "sdf_values", "grad_thetas", "canonical_points")


def assert_same_results(got, expected, tol: dict, outputs=OUTPUTS, losses=None) -> None:
    """Two ``forward_and_grads`` results equal within ``tol``: the named outputs, the losses (all of
    ``expected``'s, or the named ones) and every parameter's gradient (the same parameters in both)."""
    (out_g, loss_g, grad_g), (out_e, loss_e, grad_e) = got, expected
    for name in outputs:
        assert_close(getattr(out_g, name), getattr(out_e, name), **tol, msg=name)
    for key in loss_e if losses is None else losses:
        assert_close(loss_g[key], loss_e[key], **tol, msg=key)
    assert set(grad_g) == set(grad_e)
    for name, value in grad_e.items():
        assert_close(grad_g[name], value, **tol, msg=name)


@pytest.mark.parametrize(
    ("seed", "chunk", "contractions", "backward"),
    [
        (0, 0, "einsum", "autograd"),
        (1, 0, "einsum", "autograd"),
        (0, 37, "einsum", "autograd"),
        (0, 37, "pointwise", "autograd"),
        (1, 0, "einsum", "fused"),
        (0, 37, "pointwise", "fused"),
        (0, 37, "pointwise", "fused_recompute"),
        (1, 0, "einsum", "fused+deformer"),
        (0, 37, "pointwise", "fused_recompute+deformer"),
    ],
)
def test_fast_path_equals_reference_in_float64(flame_files, monkeypatch, seed, chunk, contractions, backward):
    """``backward``: model.geometry_backward, and "+deformer" model.deformer_backward = "fused" too. The
    FLAME prior's deformer query runs with the per-point chunks: with chunk 37 it is recomputed in chunks
    of 37 points (several, the last shorter), with 0 in one pass that keeps its activations."""
    reference = build(flame_files).double()
    perturb_(reference, 0.05)
    fast = copy.deepcopy(reference)
    reference.implementation, fast.implementation = "reference", "fast"
    fast.recompute_chunk = chunk  # 37: several chunks of points, the last one shorter
    fast.prior_query_chunk = chunk
    fast.deform_contractions = contractions
    # "fused": the geometry's hand-written backward (geometry_fused.py); "+deformer": the deformer's too.
    set_backwards(fast, backward)
    if chunk:
        assert fast.pc.n_points > 2 * chunk and fast.pc.n_points % chunk
    assert fast.uses_fast_path(torch.device("cpu")) and not reference.uses_fast_path(torch.device("cpu"))

    ref = forward_and_grads(reference, seed)
    got = forward_and_grads(fast, seed)
    # float64 throughout and tighter than its defaults: the two paths only sum the same products in a
    # different order (~1e-13 apart).
    assert_same_results(got, ref, {"rtol": 1e-9, "atol": 1e-11})
    assert torch.equal(got[0].index_batch, ref[0].index_batch)
    assert torch.equal(got[0].fragment_idx, ref[0].fragment_idx)


@pytest.mark.parametrize("scope", ["per_point", "none"])
def test_geometry_recompute_chunks_equal_one_pass_in_float64(flame_files, monkeypatch, scope):
    """model.geometry_recompute_chunk: the autograd geometry by checkpointed chunks of 37 points
    (several, the last shorter) gives the one pass's outputs, losses and gradients. Same products in
    the same order per row, so equal to rounding."""
    model = build(flame_files).double()
    perturb_(model, 0.05)
    model.implementation, model.compile_scope = "fast", scope  # "none": the chunks without torch.compile
    set_backwards(model, "autograd")
    one_pass = forward_and_grads(model, 0)
    assert model.geometry_chunk(torch.device("cpu")) == 0  # "auto" off CUDA
    model.geometry_recompute_chunk = 37
    assert model.pc.n_points > 2 * 37 and model.pc.n_points % 37
    calls = []
    piece = model._geometry_piece
    monkeypatch.setattr(model, "_geometry_piece", lambda p, j: calls.append(p.shape[0]) or piece(p, j))
    chunked = forward_and_grads(model, 0)
    chunks = -(-model.pc.n_points // 37)
    assert len(calls) == 2 * chunks and sum(calls) == 2 * model.pc.n_points  # forward, then recomputed
    assert_same_results(chunked, one_pass, {"rtol": 1e-12, "atol": 1e-14})


@pytest.mark.parametrize(("budget", "applied"), [(1.0, 1.0), (0.3, 0.3), ("auto", 1.0)])
def test_compiled_pieces_run_under_the_activation_memory_budget(flame_files, monkeypatch, budget, applied):
    """model.activation_memory_budget reaches torch.compile's partitioner: every call of a compiled
    piece (where torch.compile traces and partitions, at the first call and at any recompile) runs with
    torch._functorch.config.activation_memory_budget set to it ("auto" is 1.0 off a GPU below 44 GiB),
    and the setting is restored after. Checked on the CPU with a recording stand-in for torch.compile (its effect on what is kept:
    benchmarks/kept_memory.py --memory-budget)."""
    model = build(flame_files)
    model.implementation, model.compile_scope, model.activation_memory_budget = "fast", "all", budget
    model.train()
    seen = []

    def fake_compile(fn, dynamic=None, mode=None, options=None):
        def run(*args):
            seen.append((fn.__name__, functorch_config.activation_memory_budget))
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(model, "_compiles", lambda device: True)
    before = functorch_config.activation_memory_budget
    for _ in range(2):  # the first calls compile, the second reuse
        out = model(make_input(2))
        out.rgb_image.sum().backward()
    names = {name for name, _ in seen}
    assert {"_geometry_piece", "_deform_piece", "_colour_piece", "query_weights"} <= names, names
    assert len(seen) >= 8 and all(b == applied for _, b in seen), seen
    assert functorch_config.activation_memory_budget == before


@pytest.mark.slow
def test_activation_memory_budget_keeps_less_and_computes_the_same_in_float64(
    flame_files, eager_kernel_compile
):
    """model.activation_memory_budget through the real torch.compile (float64, the geometry piece compiled
    as on CUDA: compile_scope "geometry"): at 0.2 the partitioner keeps less for the backward than at 1.0,
    and the training outputs, losses and gradients stay the same (recomputed, not approximated: 3e-16
    relative measured). Inductor's partitioner, where the budget acts, with eager kernels
    (``eager_kernel_compile``): about 15 s."""
    model = build(flame_files).double()
    perturb_(model, 0.05)
    model.implementation, model.compile_scope = "fast", "geometry"
    set_backwards(model, "autograd")
    model._compiles = lambda device: True
    points = model.pc.points
    jittered = points.detach() + 0.01
    params = list(model.parameters())
    kept, results = {}, {}
    for budget in (1.0, 0.2):
        torch._dynamo.reset()
        model._compiled, model.activation_memory_budget = {}, budget
        kept[budget], _ = kept_bytes(model._geometry_fast, points, jittered, exclude=params)
        results[budget] = forward_and_grads(model, 0)
        assert not model._compile_failed
    torch._dynamo.reset()
    assert kept[0.2] < 0.5 * kept[1.0], kept
    outputs, losses = ("rgb_image", "sdf_values", "grad_thetas"), ("loss",)
    assert_same_results(results[0.2], results[1.0], {"rtol": 1e-12, "atol": 1e-14}, outputs, losses)


def traced_on_cpu(model, monkeypatch, backend, step):
    """``step()`` with the model's compiled pieces traced by real Dynamo on the CPU into ``backend``
    (torch.compile's other options dropped), from an empty Dynamo cache, which is emptied again after."""
    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, dynamic=None, **_: compile_(fn, dynamic=dynamic, backend=backend)
    )
    monkeypatch.setattr(model, "_compiles", lambda device: True)
    torch._dynamo.reset()
    try:
        return step()
    finally:
        torch._dynamo.reset()


def test_compiled_pieces_get_no_parameters_or_views(flame_files, monkeypatch):
    """What reaches a compiled piece owns its storage and is not a Parameter: torch.compile keeps a
    Parameter's shape static and guards on a view's base size, so either would recompile at every
    prune (seen on the H200: a 70-s epoch at the first cloud over one recomputation chunk; and on CPU
    inductor, a recompile per point count without chunks). Checked on the CPU by letting
    ``_compiled_call`` "compile" there with a recording stand-in for torch.compile."""
    model = build(flame_files)
    model.implementation, model.compile_scope = "fast", "all"
    model.train()
    seen = []

    def fake_compile(fn, dynamic=None, mode=None, options=None):
        # The pieces compile with a dynamic point count; the fused chains' passes mark their point
        # dimension dynamic themselves. No inductor options unless a benchmark sets them.
        assert mode is None and options is None
        assert dynamic or fn.__name__ in ("_forward_pass", "_backward_pass")

        def run(*args):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            seen.append((fn.__name__, args[0].shape[0], all(t._base is None for t in tensors),
                         not any(isinstance(t, torch.nn.Parameter) for t in tensors)))  # fmt: skip
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(model, "_compiles", lambda device: True)
    # The fused deformer's chains compile their own passes: with the stand-in, as plain functions.
    monkeypatch.setattr(geometry_fused, "_COMPILED", {})
    monkeypatch.setattr(geometry_fused, "_COMPILE_FAILED", [])
    n = model.pc.n_points
    model.compile_prior_query = False  # the default is True: first the pieces alone
    for deformer in ("autograd", "fused"):
        model.deformer_backward = deformer
        deform_piece = "_deform_piece" if deformer == "autograd" else "_flame_piece"
        for chunk in (0, n, n + 5, 37):  # no chunks, one chunk of the whole cloud, a larger one, several
            seen.clear()
            model.recompute_chunk = chunk
            out = model(make_input(2))
            out.rgb_image.sum().backward()  # with chunks, the recomputation calls the pieces again
            names = {name for name, *_ in seen}
            assert {"_geometry_piece", deform_piece, "_colour_piece"} <= names, names
            pieces = [s for s in seen if s[0] in ("_geometry_piece", deform_piece, "_colour_piece")]
            assert all(own and not_param for _, _, own, not_param in pieces), (chunk, seen)
            geometry = [c for name, c, *_ in seen if name == "_geometry_piece"]
            assert sum(geometry) == (n if chunk == 0 else 2 * n)  # the points, then their recomputation
            assert "query_weights" not in names  # the FLAME prior's query: eager when asked
    # model.compile_prior_query: the prior's query compiled too, per chunk (views of the points cloned),
    # each chunk again in the backward's recomputation; with prior_query_chunk 0, once over all points.
    model.compile_prior_query = True
    for prior_chunk in (37, 0):
        seen.clear()
        model.prior_query_chunk = prior_chunk
        out = model(make_input(2))
        out.lbs_weights.sum().backward()
        query = [s for s in seen if s[0] == "query_weights"]
        assert all(own and not_param for _, _, own, not_param in query), query
        assert sum(c for _, c, *_ in query) == (2 * n if prior_chunk else n)
        assert len(query) == (2 * -(-n // prior_chunk) if prior_chunk else 1)
    assert not geometry_fused._COMPILE_FAILED


def angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos))


@pytest.mark.parametrize("backward", ["autograd", "fused", "fused_recompute"])
def test_geometry_bf16_is_close_to_fp32(flame_files, backward):
    """model.geometry_bf16 (experimental): the geometry piece with bf16 matmuls against fp32, same
    draws. bf16 keeps 8 significant bits, so the normals move by about 0.7 degrees on average here
    (TF32: 0.07 on the GPU); the loss gradients of the weights stay aligned."""
    model = build(flame_files)
    perturb_(model, 0.02)
    model.implementation, model.geometry_backward = "fast", backward
    model.train()
    points = model.pc.points
    torch.manual_seed(0)
    jittered = points.detach() + (torch.rand_like(points) - 0.5) * 0.5
    results = {}
    for bf16 in (False, True):
        model.geometry_bf16 = bf16
        normals, albedo, sdf, grad = model._geometry_piece(points, jittered)
        assert normals.dtype == albedo.dtype == sdf.dtype == grad.dtype == torch.float32
        loss = sdf.abs().mean() + (grad.norm(dim=-1) - 1).square().mean() + albedo.mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        weights = torch.cat([p.grad.reshape(-1) for p in model.geometry_network.parameters()])
        results[bf16] = (normals.detach(), sdf.detach(), weights)
    err = angles_deg(results[True][0], results[False][0])
    assert 0 < err.mean() < 2.0, err.mean()  # bf16 does change them (the key acts); 0.66 measured
    assert torch.quantile(err.float(), 0.9) < 3.0
    assert (results[True][1] - results[False][1]).abs().max() < 1e-2  # sdf: 3.7e-3 measured
    cos = torch.nn.functional.cosine_similarity(results[True][2], results[False][2], dim=0)
    assert cos > 0.999, cos  # 0.99996 measured


def test_geometry_bf16_trains_in_chunks_and_leaves_eval_in_fp32(flame_files):
    model = build(flame_files)
    perturb_(model, 0.02)
    model.implementation, model.geometry_bf16, model.recompute_chunk = "fast", True, 37
    model.train()
    out = model(make_input(2))
    out.rgb_image.sum().backward()
    assert torch.isfinite(model.geometry_network.lin0.parametrizations.weight.original0.grad).all()
    model.eval()  # eval (and tracking) keep the full-precision path
    with torch.no_grad():
        n_bf16 = model.canonical_geometry(model.pc.points)[0]
        model.geometry_bf16 = False
        n_fp32 = model.canonical_geometry(model.pc.points)[0]
    assert torch.equal(n_bf16, n_fp32)


def test_deformer_bf16_saved_keeps_the_values_and_rounds_the_gradients(flame_files):
    """model.deformer_backward = "fused_bf16": the deformer chains' kept pre-activations in bf16. The
    forward is the fp32 one (same values); the gradients come from the rounded pre-activations."""
    results = {}
    for mode in ("fused", "fused_bf16"):
        model = build(flame_files)
        perturb_(model, 0.05)
        model.implementation, model.deformer_backward, model.geometry_bf16 = "fast", mode, False
        out, _, grads = forward_and_grads(model.float(), seed=0, dtype=torch.float32)
        results[mode] = (out, grads)
    (out_f, grad_f), (out_b, grad_b) = results["fused"], results["fused_bf16"]
    assert torch.equal(out_b.rgb_image, out_f.rgb_image)
    deformer = [n for n in grad_f if n.startswith("deformer_network.")]
    changed = 0
    for name in deformer:
        scale = grad_f[name].abs().max().item()
        why = "deformer pre-activations kept in bfloat16 (2^-9 relative) for the backward"
        assert_close(grad_b[name], grad_f[name], rtol=0.0, atol=3e-2 * scale + 1e-12, reason=why, msg=name)
        changed += not torch.equal(grad_b[name], grad_f[name])
    assert changed  # the key acts


def test_prior_query_is_recomputed_not_kept(flame_files, monkeypatch):
    """The FLAME prior's deformer query on the fast path keeps nothing for the backward (it is recomputed
    by chunks, model.prior_query_chunk); the reference path, and the fast one with prior_query_chunk = 0,
    keep its activations. Same values either way (and the same gradients: the float64 equivalence test
    above runs with chunks of 37 and with 0)."""
    model = build(flame_files)
    model.prior_query_chunk = 37
    perturb_(model, 0.05)
    model.train()
    points = model.pc.points.detach()
    params = list(model.parameters())
    kept_fast, fast = kept_bytes(model._prior_query, points, True, exclude=params)
    kept_ref, ref = kept_bytes(model._prior_query, points, False, exclude=params)
    assert kept_fast == 0 < kept_ref
    for a, b in zip(fast, ref, strict=True):
        assert torch.equal(a, b)
    model.prior_query_chunk = 0
    kept_whole, whole = kept_bytes(model._prior_query, points, True, exclude=params)
    assert kept_whole == kept_ref
    assert all(torch.equal(a, b) for a, b in zip(whole, ref, strict=True))


def test_geometry_bf16_only_on_gpus_with_bf16_tensor_cores(flame_files, monkeypatch):
    model = build(flame_files)
    assert model.geometry_bf16  # the default
    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert model._geometry_in_bf16(torch.device("cuda", 0)) is expected, capability
    assert model._geometry_in_bf16(torch.device("cpu"))  # the CPU (tests)
    model.geometry_bf16 = False
    assert not model._geometry_in_bf16(torch.device("cpu"))


def test_auto_backwards_and_memory_tiers_by_gpu_memory(flame_files, monkeypatch):
    """model.geometry_backward / deformer_backward "auto" (the defaults): both autograd on large GPUs and,
    below LEAN_BELOW_GIB, where the deformer's products run in bf16, there with the compiled pieces under
    an activation memory budget of 0.3 (model.activation_memory_budget "auto") and, below
    GEOMETRY_CHUNK_BELOW_GIB, the geometry recomputed by chunks too (model.geometry_recompute_chunk
    "auto"); else the lean pair; autograd off CUDA; an explicit value is kept. The prior query's chunks
    ("auto") follow: recomputed chunks with a lean backward, one pass without. The trainer's line says
    the choice and why."""
    model = build(flame_files)
    assert (model.geometry_backward, model.deformer_backward) == ("auto", "auto")
    assert model.prior_query_chunk == model.activation_memory_budget == "auto"
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert model.backwards(cpu) == ("autograd", "autograd")
    assert (model.prior_chunk(cpu), model.geometry_chunk(cpu), model.memory_budget(cpu)) == (0, 0, 1.0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(trainer_module, "gpu_memory_gib", lambda device: 0.0)  # the line reads the model's
    lean, fastest = ("fused_recompute", "fused_bf16"), ("autograd",) * 2
    # model.compile_size_hint ("auto": half of max_points) ends the line on CUDA; 0 (none) for the rest.
    monkeypatch.setattr(point_avatar, "gpu_memory_gib", lambda device: 139.8)
    compiled_for = f"; compiled for {model.pc.max_points // 2} points"
    if not point_avatar.HINT_OVERRIDE:
        compiled_for += " (not on this torch: the first step's)"
    line = trainer_module.backwards_line(model, cuda)
    assert line.endswith(" (auto: a 139.8 GiB GPU, at least 44 GiB)" + compiled_for), line
    model.compile_size_hint = 0
    assert "compiled for" not in trainer_module.backwards_line(model, cuda)
    for gib, geometry_chunk, budget, why in (
        (11.6, 131072, 0.3, "a 11.6 GiB GPU, below 44 GiB"),
        (21.9, 131072, 0.3, "a 21.9 GiB GPU, below 44 GiB"),
        (22.0, 0, 0.3, "a 22.0 GiB GPU, below 44 GiB"),
        (23.6, 0, 0.3, "a 23.6 GiB GPU, below 44 GiB"),
        (39.4, 0, 0.3, "a 39.4 GiB GPU, below 44 GiB"),
        (44.0, 0, 1.0, "a 44.0 GiB GPU, at least 44 GiB"),
        (139.8, 0, 1.0, "a 139.8 GiB GPU, at least 44 GiB"),
    ):
        monkeypatch.setattr(point_avatar, "gpu_memory_gib", lambda device, g=gib: g)
        assert model.backwards(cuda) == fastest, gib
        assert model.prior_chunk(cuda) == 0, gib
        assert model.geometry_chunk(cuda) == geometry_chunk, gib
        assert model.memory_budget(cuda) == budget, gib
        assert trainer_module.backwards_line(model, cuda).endswith(f" (auto: {why})"), gib
    monkeypatch.setattr(point_avatar, "gpu_memory_gib", lambda device: 15.6)
    assert trainer_module.backwards_line(model, cuda) == (
        "Fast path: geometry backward autograd, deformer backward autograd, prior query in one pass, geometry"
        " recomputed by chunks of 131072 points, activation memory budget 0.3, deformer products in bf16"
        " (auto: a 15.6 GiB GPU, below 44 GiB)"
    )
    model.geometry_recompute_chunk, model.activation_memory_budget = 0, 0.5  # explicit: kept
    assert (model.geometry_chunk(cuda), model.memory_budget(cuda)) == (0, 0.5)
    model.geometry_recompute_chunk, model.activation_memory_budget = "auto", "auto"
    monkeypatch.setattr(point_avatar, "gpu_memory_gib", lambda device: 23.6)
    # Without the deformer's bf16 products (the key off, or a GPU without bf16 tensor cores) GPUs below
    # 44 GiB take the lean pair, with the prior's chunks and neither the budget nor the geometry chunks.
    model.deformer_bf16 = False
    assert model.auto_backwards(cuda) == (lean, "a 23.6 GiB GPU, below 44 GiB, deformer products in fp32")
    assert (model.prior_chunk(cuda), model.geometry_chunk(cuda), model.memory_budget(cuda)) == (65536, 0, 1.0)
    model.deformer_bf16 = True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert model.backwards(cuda) == lean
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    model.deformer_backward = "fused"  # explicit: kept; the geometry's "auto" still resolves
    assert model.backwards(cuda) == ("autograd", "fused")
    assert trainer_module.backwards_line(model, cuda) == (
        "Fast path: geometry backward autograd, deformer backward fused, prior query by chunks of 65536"
        " points, deformer products in fp32 (model.deformer_bf16 applies to deformer backward autograd only)"
        " (auto: a 23.6 GiB GPU, below 44 GiB)"
    )
    monkeypatch.setattr(point_avatar, "gpu_memory_gib", lambda device: 139.8)
    assert model.backwards(cuda) == ("autograd", "fused")
    assert model.prior_chunk(cuda) == 65536  # one lean backward is enough for the chunks
    model.prior_query_chunk = 0  # explicit: kept
    assert model.prior_chunk(cuda) == 0
    model.geometry_backward = "autograd"
    model.deformer_backward = "fused_bf16"
    assert trainer_module.backwards_line(model, cuda) == (
        "Fast path: geometry backward autograd, deformer backward fused_bf16, prior query in one pass"
    )
    # model.deformer_bf16 (on by default): said where it applies (deformer backward autograd), not at all
    # with it off.
    model.deformer_backward = "autograd"
    assert trainer_module.backwards_line(model, cuda) == (
        "Fast path: geometry backward autograd, deformer backward autograd, prior query in one pass,"
        " deformer products in bf16"
    )
    model.deformer_bf16 = False
    assert trainer_module.backwards_line(model, cuda) == (
        "Fast path: geometry backward autograd, deformer backward autograd, prior query in one pass"
    )


def test_deformer_bf16_applies_to_float32_training_only(flame_files, monkeypatch):
    """model.deformer_bf16: the fast training forward's deformer piece gets bf16 products for float32
    points, none for float64 (tests stay exact) or with the key off; eval stays in full precision."""
    from pointavatar.model import point_avatar as pa

    model = build(flame_files)
    assert model.deformer_bf16  # the default (benchmarks/RESULTS.md step 10)
    seen = []
    original = pa.deform_with_jacobian_explicit

    def spy(*args, mm_dtype=None, **kwargs):
        seen.append(mm_dtype)
        return original(*args, mm_dtype=mm_dtype, **kwargs)

    monkeypatch.setattr(pa, "deform_with_jacobian_explicit", spy)
    perturb_(model, 0.02)
    model.implementation = "fast"
    for flag, dtype, expected in ((False, torch.float32, None), (True, torch.float32, torch.bfloat16),
                                  (True, torch.float64, None)):  # fmt: skip
        model.to(dtype).train()
        model.deformer_bf16 = flag
        seen.clear()
        out = model(make_input(2, dtype=dtype))
        out.rgb_image.sum().backward()
        assert seen == [expected], (flag, dtype)
        grads = [p.grad for p in model.deformer_network.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
        model.zero_grad()
    model.eval()  # eval keeps the full-precision path
    seen.clear()
    with torch.no_grad():
        model(make_input(2, dtype=torch.float64))
    assert seen == [None]


def test_compile_fell_back_reports_the_pieces_and_the_fused_passes(flame_files, monkeypatch):
    """What train.cuda_graph reads to stay eager after a failed torch.compile (GraphedStep)."""
    monkeypatch.setattr(geometry_fused, "_COMPILE_FAILED", [])
    model = build(flame_files)
    assert not model.compile_fell_back
    model._compile_failed = True  # a piece's compile failed (PointAvatar._compiled_call)
    assert model.compile_fell_back
    model._compile_failed = False
    monkeypatch.setattr(geometry_fused, "_COMPILE_FAILED", ["RuntimeError: test"])  # a fused pass's
    assert model.compile_fell_back


def test_default_is_fast_on_cuda_only(flame_files):
    model = build(flame_files)
    assert model.implementation == "auto"  # since the synthetic512 pair (benchmarks/RESULTS.md)
    assert not model.uses_fast_path(torch.device("cpu"))
    assert model.uses_fast_path(torch.device("cuda"))
    model.implementation = "reference"
    assert not model.uses_fast_path(torch.device("cuda"))
    model.implementation = "fast"
    assert model.uses_fast_path(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("scope", "chunk", "contractions", "backward"),
    [
        ("per_point", 0, "einsum", "autograd"),
        ("per_point", 37, "einsum", "autograd"),
        ("per_point", 37, "pointwise", "autograd"),
        ("all", 0, "pointwise", "autograd"),
        ("all", 0, "pointwise", "fused"),
        ("all", 37, "pointwise", "fused"),
        ("all", 0, "pointwise", "fused_recompute"),
        ("all", 37, "pointwise", "fused_recompute+deformer"),
        ("geometry", 37, "einsum", "autograd"),
        ("none", 0, "einsum", "autograd"),
        ("none", 0, "einsum", "fused"),
        ("per_point", 0, "pointwise", "autograd+gchunk"),
        ("all", 0, "pointwise", "autograd+gchunk"),
        ("all", 0, "pointwise", "autograd+budget"),
    ],
)
def test_fast_path_equals_reference_on_gpu_in_float32(flame_files, scope, chunk, contractions, backward):
    """The fast path in fp32 against the reference on the GPU. "+gchunk": the compiled geometry by
    recomputed chunks of 37 points (model.geometry_recompute_chunk); "+budget": the compiled pieces
    partitioned under model.activation_memory_budget 0.2, which recomputes."""
    reference = build(flame_files).cuda()
    perturb_(reference, 0.05)
    fast = copy.deepcopy(reference)
    reference.implementation, fast.implementation = "reference", "fast"
    fast.compile_scope, fast.recompute_chunk, fast.deform_contractions = scope, chunk, contractions
    set_backwards(fast, backward)  # geometry_bf16 off: here the fp32 fast path against the reference
    fast.geometry_recompute_chunk = 37 if "+gchunk" in backward else 0
    fast.activation_memory_budget = 0.2 if "+budget" in backward else 1.0
    if "+gchunk" in backward:
        assert fast.geometry_chunk(torch.device("cuda")) == 37 and fast.pc.n_points > 2 * 37

    def run(model):
        model.train()
        torch.manual_seed(0)
        inp = {k: v.cuda() for k, v in make_input(2).items()}
        out = model(inp)
        loss = (
            out.rgb_image.square().mean() + out.grad_thetas.norm(dim=-1).mean() + out.sdf_values.abs().mean()
        )
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    out_r, grad_r = run(reference)
    out_f, grad_f = run(fast)
    assert not fast._compile_failed
    assert torch.equal(out_f.index_batch, out_r.index_batch)  # the Triton 1-NN is exact
    why = "fp32 on the GPU: the explicit sweep and double backward sum in different orders (~1e-6)"
    for name in ("rgb_image", "predicted_mask", "sdf_values", "grad_thetas"):
        assert_close(getattr(out_f, name), getattr(out_r, name), rtol=1e-4, atol=1e-5, reason=why)
    for name, value in grad_r.items():
        scale = value.abs().max().item()
        assert_close(grad_f[name], value, rtol=1e-4, atol=1e-4 * scale + 1e-8, reason=why)


def test_compiled_pieces_get_the_size_hint_and_no_float_inputs(flame_files, monkeypatch):
    """Real Dynamo and AOT-autograd tracing of the compiled pieces on the CPU (aot_eager: the traced
    graphs run as traced); the compiled step computes what the eager one does, and:
    - model.compile_size_hint: each piece's point dimension carries the hint as its size hint (inductor
      tunes the kernels for that size instead of the first step's cloud: 39.7 against 34.3 ms of GPU
      time at 129k points on the H200, RESULTS step 14), every symbol of the point count gets it (a
      point argument left out traces two symbols for one size, and the compile fails);
    - the pieces read Python floats (the Softplus beta, ALBEDO_SCALE, ...) as constants: no graph
      input is a 0-d float tensor. Dynamo passes such a float as a 0-d float64 CPU tensor unless floats
      are specialized (geometry_fused.constant_floats), and on the GPU inductor then builds a C++ kernel
      for it: a C++ build and the CPU's vector-ISA probe in each process's first step (RESULTS step 13)."""
    from torch._guards import TracingContext

    model = build(flame_files)
    model.implementation, model.compile_scope, model.compile_prior_query = "fast", "all", True
    model.compile_size_hint = hint = 4096
    model.geometry_bf16 = model.deformer_bf16 = False  # bf16 would round differently traced and eager
    model.train()
    inp = make_input(2)

    def step():
        torch.manual_seed(0)  # the eikonal samples
        model.zero_grad(set_to_none=True)
        out = model(inp)
        (out.rgb_image.square().sum() + out.sdf_values.sum()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return out.rgb_image.detach(), grads

    eager_image, eager_grads = step()
    hints = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    scalars = []

    def recording_backend(gm, example_inputs):
        shape_env = TracingContext.get().fake_mode.shape_env
        hints.append(sorted(set(shape_env.var_to_hint_override.values())))
        scalars.extend(
            a
            for a in example_inputs
            if isinstance(a, torch.Tensor) and a.dim() == 0 and a.is_floating_point()
        )
        return aot_eager(gm, example_inputs)

    image, grads = traced_on_cpu(model, monkeypatch, recording_backend, step)
    assert len(hints) >= 4  # the geometry, deformer, colour and prior pieces
    assert hints == [[hint]] * len(hints)
    assert not scalars, [t.dtype for t in scalars]
    why = "the traced graphs sum the same float32 products in other orders"
    assert_close(image, eager_image, rtol=1e-5, atol=1e-6, reason=why)
    assert grads.keys() == eager_grads.keys()
    for k in grads:
        scale = float(eager_grads[k].abs().max())  # float32 sums of terms up to this size
        assert_close(grads[k], eager_grads[k], rtol=1e-4, atol=1e-5 * scale, reason=why)
