"""Networks, point cloud, 1-NN, checkpoint compatibility and the PointAvatar module (spec §5, App. A)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from flame_fixtures import flame_state_shapes
from tolerances import assert_close

import pointavatar.render as render
from pointavatar.config import (
    DeformerNetworkConf,
    GeometryNetworkConf,
    ModelConf,
    PointCloudConf,
    RenderingNetworkConf,
)
from pointavatar.model.compat import convert_original_state_dict, to_original_state_dict
from pointavatar.model.deformer import ForwardDeformer
from pointavatar.model.embedder import PositionalEncoding
from pointavatar.model.geometry import GeometryNetwork
from pointavatar.model.knn import nearest_neighbor
from pointavatar.model.outputs import PointAvatarOutputs
from pointavatar.model.point_avatar import POINTS_PER_PIXEL, PointAvatar, deformed_normals
from pointavatar.model.point_cloud import PointCloud
from pointavatar.model.shading import RenderingNetwork

V = 120  # vertices of the tiny FLAME-format model
N_FACES = 200
N_POINTS = 200
IMG_RES = 32

HAS_RENDER = all(hasattr(render, f) for f in ("project_points", "rasterize_points", "alpha_composite"))
needs_render = pytest.mark.skipif(not HAS_RENDER, reason="pointavatar.render not available yet")


# ----------------------------------------------------------------------------------------- fixtures


def make_flame_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """A random FLAME-format model: a ~0.1-unit blob (0.4 after FLAME's x4), 5 joints, ~FLAME scales."""
    rng = np.random.default_rng(seed)
    v_template = rng.normal(scale=0.04, size=(V, 3))
    weights = rng.uniform(size=(V, 5)) ** 4
    weights /= weights.sum(1, keepdims=True)
    regressor = rng.uniform(size=(5, V))
    regressor /= regressor.sum(1, keepdims=True)
    return {
        "v_template": v_template,
        "f": rng.integers(0, V, size=(N_FACES, 3)),
        "shapedirs": rng.normal(scale=0.002, size=(V, 3, 400)),
        "posedirs": rng.normal(scale=0.002, size=(V, 3, 36)),
        "J_regressor": regressor,
        "weights": weights,
        "kintree_table": np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
    }


def model_conf(flame_files, landmarks: bool = True, **point_cloud) -> ModelConf:
    conf = ModelConf()
    conf.flame_model_path = flame_files[0]
    conf.flame_landmark_path = flame_files[1] if landmarks else None
    conf.render_backend = "torch"
    conf.point_cloud.n_init_points = point_cloud.get("n_init_points", N_POINTS)
    return conf


def build(flame_files, seed: int = 0, use_background: bool = False, landmarks: bool = True) -> PointAvatar:
    torch.manual_seed(seed)
    return PointAvatar(
        model_conf(flame_files, landmarks),
        shape_params=torch.randn(1, 100) * 0.3,
        canonical_expression=torch.randn(1, 50) * 0.3,
        canonical_pose=0.4,
        img_res=IMG_RES,
        use_background=use_background,
    )


def perturb_(module: torch.nn.Module, scale: float, seed: int = 1) -> None:
    """Move every trainable parameter off its (partly zero) init so all code paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def make_input(b: int = 2, seed: int = 3, dtype=torch.float32) -> dict:
    """Frames looking at the origin from +z at distance 4 (converted cameras, spec §3.5)."""
    g = torch.Generator().manual_seed(seed)
    intr = torch.zeros(b, 4, 4, dtype=dtype)
    intr[:, 0, 0] = intr[:, 1, 1] = 3.0
    intr[:, 2, 3] = intr[:, 3, 2] = 1.0
    cam = torch.zeros(b, 3, 4, dtype=dtype)
    cam[:, :, :3] = torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=dtype))
    cam[:, 2, 3] = 4.0
    pose = 0.1 * torch.randn(b, 15, generator=g, dtype=dtype)
    return {
        "idx": torch.arange(b).unsqueeze(1),
        "img_name": torch.arange(1, b + 1).unsqueeze(1),
        "intrinsics": intr,
        "cam_pose": cam,
        "expression": 0.5 * torch.randn(b, 50, generator=g, dtype=dtype),
        "flame_pose": pose,
    }


# ------------------------------------------------------------------------------------- networks


def test_embedder_layout():
    x = torch.randn(5, 3)
    enc = PositionalEncoding(2)
    y = enc(x)
    assert enc.out_dim == 15 and y.shape == (5, 15)
    expected = torch.cat([x, torch.sin(x), torch.cos(x), torch.sin(2 * x), torch.cos(2 * x)], dim=-1)
    assert torch.equal(y, expected)
    assert PositionalEncoding(6).out_dim == 39
    assert PositionalEncoding(0)(x) is x


def test_geometric_init_is_sphere_sdf():
    torch.manual_seed(0)
    # The conf's defaults: 3 albedo channels, [256] * 9, sphere init of radius 0.6, skip at 4, multires 6.
    net = GeometryNetwork(GeometryNetworkConf())
    assert net.lin0.parametrizations.weight.original1.shape == (256, 39)
    assert net.lin3.parametrizations.weight.original1.shape == (217, 256)
    # Shell means: the IDR/SAL init is ||x|| - 0.6 in expectation for ReLU; with Softplus(beta=100)
    # every unit adds ~log(2)/100, which lifts the output near the origin by ~0.3 (the original's
    # network does the same). Away from the origin the mean follows ||x|| - 0.6 with unit slope.
    means = {}
    for r in [0.0, 0.5, 1.0, 1.5]:
        x = torch.nn.functional.normalize(torch.randn(500, 3), dim=1) * r
        out = net(x)
        assert out.shape == (500, 4)
        # All four outputs start equal: last-layer weights share one mean (std 1e-4 around it).
        assert (out - out[:, :1]).abs().max() < 1e-3
        means[r] = out[:, 0].mean().item()
    assert -0.6 < means[0.0] < 0.0
    for r in [0.5, 1.0, 1.5]:
        assert abs(means[r] - (r - 0.6)) < 0.25, (r, means[r])  # finite-width spread (8 seeds: < 0.24)
    assert 0.7 < means[1.5] - means[0.5] < 1.3  # slope ~1 (8 seeds: 0.81-1.10)
    x = torch.randn(300, 3)
    grad = net.gradient(x.clone())
    assert grad.shape == (300, 3) and grad.requires_grad  # create_graph for the eikonal loss


def test_deformer_init_is_identity():
    torch.manual_seed(0)
    d = ForwardDeformer(DeformerNetworkConf(), None)  # [128] * 4, num_exp 50, deform_c, ghostbone
    x = torch.randn(20, 3)
    E, P, W, xc = d.query_weights(x)
    assert E.shape == (20, 3, 50) and P.shape == (20, 36, 3) and W.shape == (20, 6)
    assert torch.equal(E, torch.zeros_like(E)) and torch.equal(P, torch.zeros_like(P))
    assert torch.equal(xc, x)
    assert_close(W, torch.full_like(W, 1 / 6), atol=1e-8)  # softmax of equal logits (observed: exact)
    d5 = ForwardDeformer(
        dataclasses.replace(DeformerNetworkConf(), dims=[64] * 2, deform_c=False, ghostbone=False), None
    )
    assert d5.query_weights(x)[2].shape == (20, 5)


def test_deformer_slices_and_stable_softmax():
    torch.manual_seed(0)
    d = ForwardDeformer(dataclasses.replace(DeformerNetworkConf(), dims=[32] * 2), None)
    with torch.no_grad():
        d.blendshapes.bias.copy_(torch.arange(261, dtype=torch.float32))
        d.skinning.bias.copy_(torch.tensor([100.0, 0, 0, 0, 0, 0]))  # exp(2000) would overflow
    x = torch.zeros(1, 3)
    E, P, W, xc = d.query_weights(x)
    assert torch.equal(P.reshape(-1), torch.arange(108.0))
    assert torch.equal(E.reshape(-1), torch.arange(108.0, 258.0))
    assert torch.equal(xc[0], torch.tensor([258.0, 259.0, 260.0]))
    assert torch.isfinite(W).all() and W[0, 0] == 1.0


def test_rendering_network_range():
    torch.manual_seed(0)
    net = RenderingNetwork(RenderingNetworkConf())  # normal in, RGB out, [64, 64], weight norm
    s = net(torch.nn.functional.normalize(torch.randn(10, 3), dim=1))
    assert s.shape == (10, 3) and ((s > 0) & (s < 1)).all()
    assert [k for k in net.state_dict()][:3] == [
        "lin0.bias",
        "lin0.parametrizations.weight.original0",
        "lin0.parametrizations.weight.original1",
    ]


def test_point_cloud_init_prune_upsample():
    torch.manual_seed(0)
    pc = PointCloud(dataclasses.replace(PointCloudConf(), n_init_points=400, max_points=1000))
    assert pc.points.shape == (400, 3)
    assert_close(pc.points.norm(dim=1), torch.full((400,), 0.5), atol=1e-8)  # float32 rounding: ~1 ulp
    assert math.isclose(pc.initial_radius(), 0.16875, rel_tol=1e-12)
    assert pc.radius == pc.initial_radius()  # a plain float, outside the state dict
    mask = torch.arange(400) % 3 == 0
    kept = pc.points.detach()[mask].clone()
    pc.prune(mask)
    assert torch.equal(pc.points.detach(), kept) and isinstance(pc.points, torch.nn.Parameter)
    pc.upsample_points(kept + 1.0)
    assert pc.points.shape == (2 * kept.shape[0], 3) and pc.points.is_leaf
    pc.init(7)
    assert pc.points.shape == (7, 3)
    assert [k for k in pc.state_dict()] == ["points"]
    assert pc.radius == pc.initial_radius(
        400
    )  # resizing changes the points only (the point schedule owns the radius)


def test_knn_exact_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1000, 3, generator=g)
    r = torch.randn(300, 3, generator=g)
    d = ((q[:, None] - r[None]) ** 2).sum(-1)
    idx, sq = nearest_neighbor(q, r, block_elements=3 * 300 * 7)  # several blocks, a ragged last one
    assert torch.equal(idx, d.argmin(dim=1))
    assert_close(sq, d.min(dim=1).values, rtol=1e-6, atol=1e-7)  # float32 rounding
    q.requires_grad_(True)
    assert not nearest_neighbor(q, r)[1].requires_grad


def test_knn_ties_pick_lowest_index():
    # A lattice with duplicated reference points: many exact ties in distance.
    g = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(*[torch.arange(6.0)] * 3, indexing="ij"), -1).reshape(-1, 3) * 0.1
    r = torch.cat([grid, grid[torch.randperm(grid.shape[0], generator=g)]])  # every point twice
    q = grid + 0.05  # equidistant from 8 lattice points (16 with duplicates)
    d = ((q[:, None] - r[None]) ** 2).sum(-1)
    best = d.min(dim=1, keepdim=True).values
    expected = torch.where(d == best, torch.arange(r.shape[0]), r.shape[0]).min(dim=1).values
    idx, _ = nearest_neighbor(q, r, candidates=32)
    assert torch.equal(idx, expected)


# ------------------------------------------------------------------------------ model structure


def expected_state_dict_shapes(model: PointAvatar) -> dict[str, tuple[int, ...]]:
    """Spec Appendix A with parametrization names, for the default conf and our tiny FLAME."""
    n = model.pc.points.shape[0]
    flame = flame_state_shapes(V, N_FACES)
    shapes: dict[str, tuple[int, ...]] = {}

    def wn(prefix: str, out: int, inp: int) -> None:
        shapes[f"{prefix}.bias"] = (out,)
        shapes[f"{prefix}.parametrizations.weight.original0"] = (out, 1)
        shapes[f"{prefix}.parametrizations.weight.original1"] = (out, inp)

    for k, s in flame.items():
        shapes[f"FLAMEServer.{k}"] = s
    geo = [(256, 39), (256, 256), (256, 256), (217, 256)] + [(256, 256)] * 5 + [(4, 256)]
    for i, (o, inp) in enumerate(geo):
        wn(f"geometry_network.lin{i}", o, inp)
    for k, s in flame.items():
        shapes[f"deformer_network.FLAMEServer.{k}"] = s
    for i, (o, inp) in enumerate([(128, 3), (128, 128), (128, 128), (128, 128)]):
        wn(f"deformer_network.lin{i}", o, inp)
    shapes["deformer_network.blendshapes.weight"] = (261, 128)
    shapes["deformer_network.blendshapes.bias"] = (261,)
    wn("deformer_network.skinning_linear", 128, 128)
    shapes["deformer_network.skinning.weight"] = (6, 128)
    shapes["deformer_network.skinning.bias"] = (6,)
    for i, (o, inp) in enumerate([(64, 3), (64, 64), (3, 64)]):
        wn(f"rendering_network.lin{i}", o, inp)
    shapes["pc.points"] = (n, 3)
    return shapes


def test_state_dict_follows_appendix_a(flame_files):
    model = build(flame_files)
    sd = model.state_dict()
    expected = expected_state_dict_shapes(model)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # Registration order of the top-level modules (Appendix A).
    tops = list(dict.fromkeys(k.split(".")[0] for k in sd))
    assert tops == ["FLAMEServer", "geometry_network", "deformer_network", "rendering_network", "pc"]
    assert model.deformer_network.FLAMEServer is model.FLAMEServer
    assert "visible_points" not in " ".join(sd)
    bg = build(flame_files, use_background=True)
    # A module's own parameters precede its submodules' in a state dict, so "background" comes first.
    assert list(bg.state_dict())[0] == "background"
    assert list(bg.state_dict())[1:] == list(sd)
    assert bg.state_dict()["background"].shape == (IMG_RES * IMG_RES, 3)
    assert math.isclose(model.pc.radius, 0.3 * 0.75 ** math.log2(N_POINTS / 100))
    assert isinstance(model.pc.radius, float)


# ------------------------------------------------------------------------------- Jacobian, normals


def test_jacobian_matches_autograd_float64(flame_files):
    model = build(flame_files).double()
    perturb_(model.deformer_network, 0.05)
    inp = make_input(2, dtype=torch.float64)
    verts, pose_feature, transforms = model.FLAMEServer(inp["expression"], inp["flame_pose"])
    betas = inp["expression"]
    x = model.pc.points.detach()[:6].clone()
    x_d, cols = model.deform_with_jacobian(x, betas, transforms, pose_feature)
    deform = model._deform_fn(betas, transforms, pose_feature)
    ref = torch.autograd.functional.jacobian(deform, x)  # [B, N, 3, N, 3]
    assert_close(x_d, deform(x), rtol=0, atol=1e-12)  # same float64 computation
    for n in range(x.shape[0]):
        jac = torch.stack(list(cols[:, :, n]), dim=-1)  # [B, 3, 3], column k = d x_d / d x_k
        assert_close(jac, ref[:, n, :, n, :], rtol=1e-9, atol=1e-12)  # float64 rounding
    # Points are independent: off-diagonal blocks vanish, which the per-point formulation assumes.
    assert ref[:, 0, :, 1, :].abs().max() == 0


def test_deformed_normals_formula():
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64)  # [B, N, 3, 3]
    n = torch.nn.functional.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=-1)
    cols = jac.permute(3, 0, 1, 2)  # [3, B, N, 3]
    got = deformed_normals(cols, n)
    ref = torch.nn.functional.normalize(torch.einsum("ni,bnij->bnj", n, torch.linalg.inv(jac)), dim=-1)
    assert_close(got, ref, rtol=0, atol=1e-12)  # float64, same quantity


def test_normal_gradients_reach_deformer_and_points(flame_files):
    model = build(flame_files)
    perturb_(model.deformer_network, 0.05)
    inp = make_input(2)
    _, pose_feature, transforms = model.FLAMEServer(inp["expression"], inp["flame_pose"])
    points = model.pc.points
    normals_c, _, _, _ = model.canonical_geometry(points)
    _, cols = model.deform_with_jacobian(points, inp["expression"], transforms, pose_feature)
    n_d = deformed_normals(cols, normals_c)
    (n_d * torch.randn_like(n_d)).sum().backward()
    for name in ["lin0.parametrizations.weight.original1", "blendshapes.weight", "skinning.weight"]:
        grad = dict(model.deformer_network.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert points.grad is not None and points.grad.abs().sum() > 0
    assert model.geometry_network.lin0.parametrizations.weight.original1.grad.abs().sum() > 0


def test_canonical_geometry_detaches_points(flame_files):
    model = build(flame_files)
    normals, sdf, albedo, grads = model.canonical_geometry(model.pc.points)
    assert normals.shape == (N_POINTS, 3) and sdf.shape == (N_POINTS,) and grads.shape == (2 * N_POINTS, 3)
    assert ((albedo > 0) & (albedo < 1)).all()
    (normals.sum() + sdf.sum() + albedo.sum() + grads.sum()).backward()
    assert model.pc.points.grad is None
    assert torch.isfinite(sdf).all()
    assert_close(normals.norm(dim=1), torch.ones(N_POINTS), atol=1e-8)  # float32 normalize: ~1 ulp
    with torch.no_grad():
        n2, _, _, _ = model.canonical_geometry(model.pc.points)
    assert not n2.requires_grad
    assert_close(n2, normals, atol=1e-8)  # same points, same pass (observed: exact)
    model.eval()  # no second-order graph in eval, even with grad enabled (test-time tracking)
    assert not any(t.requires_grad for t in model.canonical_geometry(model.pc.points))


# ---------------------------------------------------------------------------------- forward pass


def visibility(out: PointAvatarOutputs, n: int, thresh: float = 0.5) -> torch.Tensor:
    """[N] bool: front-most point of a pixel, or compositing weight > thresh somewhere (spec §5.12)."""
    idx, weights = out.fragment_idx, out.fragment_weights
    front = idx[..., 0]
    heavy = idx[(weights > thresh) & (idx >= 0)]
    vis = torch.zeros(n, dtype=torch.bool, device=idx.device)
    vis[torch.remainder(torch.cat([front[front >= 0], heavy]), n)] = True
    return vis


@needs_render
def test_forward_train_outputs_and_visibility(flame_files):
    model = build(flame_files)
    model.train()
    b, p, n = 2, IMG_RES * IMG_RES, N_POINTS
    out = model(make_input(b))
    assert isinstance(out, PointAvatarOutputs)
    shapes = {
        "rgb_image": (b, p, 3),
        "predicted_mask": (b, p),
        "canonical_points": (n, 3),
        "index_batch": (n,),
        "posedirs": (n, 36, 3),
        "shapedirs": (n, 3, 50),
        "lbs_weights": (n, 6),
        "sdf_values": (n,),
        "grad_thetas": (2 * n, 3),
        "fragment_idx": (b, IMG_RES, IMG_RES, POINTS_PER_PIXEL),
        "fragment_weights": (b, IMG_RES, IMG_RES, POINTS_PER_PIXEL),
    }
    assert {k: tuple(getattr(out, k).shape) for k in shapes} == shapes
    # The FLAME pseudo ground truth of the loss comes from the FLAME module, not from the outputs.
    flame = model.FLAMEServer
    flame_shapes = {"posedirs": (36, 3 * V), "shapedirs": (V, 3, 150), "lbs_weights": (V, 5)}
    assert {k: tuple(getattr(flame, k).shape) for k in flame_shapes} == flame_shapes
    assert out.img_res == IMG_RES and out.batch_size == b
    assert out.eval is None
    assert out.predicted_mask.max() > 0.5  # the head is in view
    # 1e-6 slack: colour sum_k w_k c_k plus the white background's (1 - mask) rounds a few ulp past 1.
    assert ((out.rgb_image >= 0) & (out.rgb_image <= 1 + 1e-6)).all()
    assert out.fragment_idx.dtype == torch.int64
    assert not out.fragment_idx.requires_grad and not out.fragment_weights.requires_grad
    vis = visibility(out, n)
    assert vis.dtype == torch.bool and vis.shape == (n,) and 0 < vis.sum() < n
    # Only the deformer's second query feeds the prior: x' of detached points, no grad to points.
    assert out.canonical_points.requires_grad
    out.rgb_image.mean().backward()
    assert model.pc.points.grad.abs().sum() > 0
    # At init the zero heads block the trunk's gradient; the heads themselves get one.
    assert model.deformer_network.blendshapes.weight.grad.abs().sum() > 0
    assert model.deformer_network.skinning.weight.grad.abs().sum() > 0


@needs_render
def test_forward_renders_with_the_point_cloud_radius(flame_files):
    model = build(flame_files).train()
    with torch.no_grad():
        torch.manual_seed(5)
        a = model(make_input(1))
        model.pc.radius *= 0.5
        torch.manual_seed(5)
        b = model(make_input(1))
    assert a.predicted_mask.sum() > b.predicted_mask.sum() > 0  # smaller discs cover less


@needs_render
def test_forward_eval_outputs_and_no_visibility(flame_files):
    model = build(flame_files)
    model.eval()
    b, p, n = 2, IMG_RES * IMG_RES, N_POINTS
    with torch.no_grad():  # the model re-enables grad where it needs it (normals)
        out = model(make_input(b))
    shapes = {
        "normal_image": (b, p, 3),
        "shading_image": (b, p, 3),
        "albedo_image": (b, p, 3),
        "pnts_color_deformed": (b, n, 3),
        "pnts_normal_deformed": (b, n, 3),
        "deformed_points": (b, n, 3),
        "canonical_verts": (V, 3),
        "deformed_verts": (b, V, 3),
        "unconstrained_canonical_points": (n, 3),
        "pnts_albedo": (n, 3),
        "rendered_landmarks": (b, p, 3),
        "rendered_landmarks_alpha": (b, p),
    }
    ev = out.eval
    assert tuple(out.rgb_image.shape) == (b, p, 3)
    assert {k: tuple(getattr(ev, k).shape) for k in shapes} == shapes
    assert out.fragment_idx is None and out.fragment_weights is None and out.index_batch is None
    lmk, lmk_alpha = ev.rendered_landmarks, ev.rendered_landmarks_alpha
    assert torch.equal(lmk[..., 0], lmk_alpha) and torch.equal(lmk[..., 2], lmk_alpha)
    assert lmk_alpha.max() > 0 and lmk_alpha.min() >= 0 and lmk_alpha.max() <= 1  # dots in view
    assert_close(ev.pnts_normal_deformed.norm(dim=-1), torch.ones(b, n))  # float32 normalize
    # Background pixels (mask 0) are white in every image.
    empty = out.predicted_mask == 0
    assert empty.any()
    images = {
        "rgb_image": out.rgb_image,
        "normal_image": ev.normal_image,
        "shading_image": ev.shading_image,
        "albedo_image": ev.albedo_image,
    }
    for key, image in images.items():
        assert torch.equal(image[empty], torch.ones_like(image[empty])), key
    # Training and eval render the same colours (eval only adds channels).
    model.train()
    with torch.no_grad():
        torch.manual_seed(5)
        rgb_train = model(make_input(b)).rgb_image
    assert_close(rgb_train, out.rgb_image)  # float32 summation order only
    no_lmk = build(flame_files, landmarks=False).eval()
    no_lmk_eval = no_lmk(make_input(1)).eval
    assert no_lmk_eval.rendered_landmarks is None and no_lmk_eval.rendered_landmarks_alpha is None


@needs_render
def test_select_keeps_per_frame_fields_of_the_chosen_frames(flame_files):
    model = build(flame_files)
    b, n = 3, N_POINTS
    inp = make_input(b)
    with torch.no_grad():
        out = model.eval()(inp)
        train_out = model.train()(inp)
    sub = out.select([2, 0])
    assert sub.batch_size == 2 and sub.img_res == out.img_res
    assert torch.equal(sub.rgb_image, out.rgb_image[[2, 0]])
    assert torch.equal(sub.predicted_mask, out.predicted_mask[[2, 0]])
    for name in ("normal_image", "deformed_points", "deformed_verts", "rendered_landmarks_alpha"):
        assert torch.equal(getattr(sub.eval, name), getattr(out.eval, name)[[2, 0]]), name
    # Per-point fields are shared, not indexed.
    for name in ("canonical_points", "sdf_values", "grad_thetas", "lbs_weights"):
        assert getattr(sub, name) is getattr(out, name), name
    for name in ("pnts_albedo", "canonical_verts", "unconstrained_canonical_points"):
        assert getattr(sub.eval, name) is getattr(out.eval, name), name
    # Fragments are re-packed to the new frame order: frame j holds j * N + p.
    tsub = train_out.select([2, 0])
    assert tsub.eval is None
    for j, r in enumerate([2, 0]):
        old, new = train_out.fragment_idx[r], tsub.fragment_idx[j]
        assert torch.equal(new >= 0, old >= 0)
        assert torch.equal(new[new >= 0], old[old >= 0] - (r - j) * n)
        assert torch.equal(tsub.fragment_weights[j], train_out.fragment_weights[r])
    with pytest.raises(IndexError):
        out.select([3])


@needs_render
def test_learned_background(flame_files):
    model = build(flame_files, use_background=True)
    with torch.no_grad():
        model.background.fill_(-0.01)  # sigmoid(100 * -0.01) = sigmoid(-1)
    out = model(make_input(1))
    empty = out.predicted_mask == 0
    assert empty.any()
    bg = torch.sigmoid(torch.tensor(-1.0))
    assert_close(out.rgb_image[empty], bg.expand(int(empty.sum()), 3), atol=1e-8)  # the same sigmoid
    out.rgb_image.sum().backward()
    assert model.background.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- checkpoint layout


def test_convert_original_state_dict_round_trip(flame_files):
    model = build(flame_files, seed=0)
    perturb_(model, 0.01)
    original = to_original_state_dict(model.state_dict())
    assert "geometry_network.lin0.weight_g" in original and "geometry_network.lin0.weight_v" in original
    assert not any("parametrizations" in k for k in original)
    assert original["deformer_network.skinning_linear.weight_g"].shape == (128, 1)

    # Same constructor inputs (the canonical FLAME state is derived from them, not stored), different
    # weights and points.
    other = build(flame_files, seed=0)
    perturb_(other, 0.01, seed=2)
    other.pc.init(N_POINTS)
    assert not torch.equal(other.pc.points, model.pc.points)
    result = other.load_state_dict(convert_original_state_dict(original), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (ka, a), (kb, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b), ka
    x = torch.randn(10, 3)
    assert torch.equal(model.geometry_network(x), other.geometry_network(x))
    for a, b in zip(
        model.deformer_network.query_weights(x), other.deformer_network.query_weights(x), strict=True
    ):
        assert torch.equal(a, b)
    if HAS_RENDER:
        inp = make_input(1)
        torch.manual_seed(11)
        ra = model(inp).rgb_image
        torch.manual_seed(11)
        rb = other(copy.deepcopy(inp)).rgb_image
        assert torch.equal(ra, rb)
    # Converting an already-converted dict is a no-op.
    assert list(convert_original_state_dict(model.state_dict())) == list(model.state_dict())


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_render
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(flame_files):
    model = build(flame_files)
    perturb_(model, 0.01)
    inp = make_input(2)
    out_cpu = model(inp)
    out_cpu.rgb_image.mean().backward()
    grad_cpu = model.pc.points.grad.clone()
    model.zero_grad(set_to_none=True)
    model = model.cuda()
    model.render_backend = "auto"  # the fast path where it is available
    # The defaults round the training geometry's and deformer's products to bf16 on the GPU only.
    model.geometry_bf16 = model.deformer_bf16 = False
    out = model({k: v.cuda() for k, v in inp.items()})
    out.rgb_image.mean().backward()
    # float32 on two devices (different reduction orders, TF32 off by default): 1e-4 absolute.
    two_devices = "float32 on CPU and CUDA: different reduction orders through the whole network"
    for key in ["rgb_image", "predicted_mask", "sdf_values", "canonical_points"]:
        assert_close(
            getattr(out, key).cpu(), getattr(out_cpu, key), rtol=1e-5, atol=1e-4, reason=two_devices, msg=key
        )
    assert torch.equal(out.index_batch.cpu(), out_cpu.index_batch)
    # Point gradients are sums over pixels and fragments, accumulated in another order on the GPU.
    assert_close(model.pc.points.grad.cpu(), grad_cpu, rtol=1e-3, atol=1e-5, reason=two_devices)
    assert out.fragment_idx.is_cuda and visibility(out, N_POINTS).any()
