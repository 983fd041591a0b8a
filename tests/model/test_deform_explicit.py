"""Explicit forward-mode deformation Jacobian vs the vmapped torch.func.jvp reference (spec §5.7-5.8)."""

from __future__ import annotations

import pytest
import torch
from test_model import IMG_RES, make_input, model_conf, perturb_
from tolerances import assert_close

from pointavatar.model.deform_explicit import affine_inverse, deform_with_jacobian_explicit, einsum_pointwise
from pointavatar.model.point_avatar import PointAvatar


def build_variant(flame_files, ghostbone: bool, deform_c: bool, seed: int = 0) -> PointAvatar:
    """The tiny float64 PointAvatar of test_model.py, with all weights moved off their init."""
    conf = model_conf(flame_files)
    conf.deformer_network.ghostbone = ghostbone
    conf.deformer_network.deform_c = deform_c
    torch.manual_seed(seed)
    model = PointAvatar(
        conf,
        shape_params=torch.randn(1, 100) * 0.3,
        canonical_expression=torch.randn(1, 50) * 0.3,
        canonical_pose=0.4,
        img_res=IMG_RES,
        use_background=False,
    ).double()
    # The zero-initialised heads need a push to exercise E, P, o and non-uniform W.
    perturb_(model.deformer_network, 0.05)
    return model


def frame_inputs(model: PointAvatar, b: int = 2):
    """betas, transformations, pose_feature as PointAvatar.forward computes them."""
    inp = make_input(b, dtype=torch.float64)
    expression = inp["expression"].requires_grad_(True)
    flame_pose = inp["flame_pose"].requires_grad_(True)
    betas = expression[:, : model.deformer_network.num_exp]
    _, pose_feature, transformations = model.FLAMEServer(expression, flame_pose)
    return (expression, flame_pose), betas, transformations, pose_feature


VARIANTS = [(True, True), (False, True), (True, False), (False, False)]


@pytest.mark.parametrize(
    ("contractions", "inverse"), [("einsum", "closed_form"), ("pointwise", "closed_form"), ("einsum", "lu")]
)
@pytest.mark.parametrize(("ghostbone", "deform_c"), VARIANTS)
def test_values_and_gradients_match_reference(flame_files, ghostbone, deform_c, contractions, inverse):
    """inverse: model.inverse_skinning, the inverse skinning's closed form (default) or LU."""
    model = build_variant(flame_files, ghostbone, deform_c)
    points = model.pc.points.detach().clone().requires_grad_(True)
    leaves, betas, tfs, pf = frame_inputs(model)
    x_ref, cols_ref = model.deform_with_jacobian(points, betas, tfs, pf)
    x_d, cols = deform_with_jacobian_explicit(
        model.deformer_network, model.FLAMEServer, points, betas, tfs, pf, contractions, inverse
    )
    assert x_d.shape == x_ref.shape and cols.shape == cols_ref.shape
    # Same float64 arithmetic in a different order (inverse, einsum grouping): round-off only.
    assert_close(x_d, x_ref, rtol=1e-12, atol=1e-12)
    assert_close(cols, cols_ref, rtol=1e-12, atol=1e-12)
    # The Jacobian is not trivially the identity (the perturbed deformer is exercised).
    assert (cols_ref - torch.eye(3, dtype=cols.dtype)[:, None, None, :]).abs().max() > 1e-3

    g = torch.Generator().manual_seed(7)
    w_x = torch.randn(x_d.shape, generator=g, dtype=x_d.dtype)
    w_c = torch.randn(cols.shape, generator=g, dtype=cols.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = [points, *leaves, *params]

    def grads(x, c):
        # Nonlinear in cols as the normals are; squares make the loss depend on the values too.
        loss = (w_x * x).sum() + (w_c * c).sum() + (c**2).sum()
        return torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)

    g_ref = grads(x_ref, cols_ref)
    g_new = grads(x_d, cols)
    for i, (a, b) in enumerate(zip(g_new, g_ref, strict=True)):
        assert (a is None) == (b is None), i
        if a is not None:
            # Round-off of the reordered float64 sums, accumulated over N points in the weight grads.
            assert_close(a, b, rtol=1e-12, atol=1e-12, reason="float64 reordered sums over all points")
    assert g_new[0].abs().max() > 0  # points receive gradients


def test_no_grad_values(flame_files):
    model = build_variant(flame_files, True, True)
    points = model.pc.points.detach()
    with torch.no_grad():
        _, betas, tfs, pf = frame_inputs(model)
        x_ref, cols_ref = model.deform_with_jacobian(points, betas, tfs, pf)
        x_d, cols = deform_with_jacobian_explicit(
            model.deformer_network, model.FLAMEServer, points, betas, tfs, pf
        )
    assert not x_d.requires_grad and not cols.requires_grad
    # Same float64 arithmetic in a different order: round-off only.
    assert_close(x_d, x_ref, rtol=1e-12, atol=1e-12)
    assert_close(cols, cols_ref, rtol=1e-12, atol=1e-12)


def test_softplus_threshold_branch(flame_files):
    """Large pre-activations (beta z > 20 where softplus is the identity) keep the same derivative."""
    model = build_variant(flame_files, True, True)
    points = (model.pc.points.detach() * 20.0).requires_grad_(True)
    _, betas, tfs, pf = frame_inputs(model)
    x_ref, cols_ref = model.deform_with_jacobian(points, betas, tfs, pf)
    x_d, cols = deform_with_jacobian_explicit(
        model.deformer_network, model.FLAMEServer, points, betas, tfs, pf
    )
    # Same float64 arithmetic in a different order: round-off only (values grow with the scale).
    assert_close(x_d, x_ref, rtol=1e-11, atol=1e-11, reason="float64 round-off at 20x larger coordinates")
    assert_close(cols, cols_ref, rtol=1e-11, atol=1e-11, reason="float64 round-off at 20x larger coordinates")


@pytest.mark.parametrize(
    "spec",
    ["nj,jxy->nxy", "nxy,ny->nx", "knj,njx->knx", "bl,knxl->kbnx", "bi,knix->kbnx", "ab,cd->abcd", "ij,ij->"],
)
def test_einsum_pointwise_is_einsum(spec):
    sizes = {"n": 5, "j": 3, "x": 4, "y": 4, "k": 3, "b": 2, "l": 6, "i": 7, "a": 2, "c": 3, "d": 2}
    g = torch.Generator().manual_seed(0)
    subs = spec.split("->")[0].split(",")
    a, b = (torch.randn([sizes[c] for c in sub], generator=g, dtype=torch.float64) for sub in subs)
    assert_close(einsum_pointwise(spec, a, b), torch.einsum(spec, a, b), rtol=1e-14, atol=1e-14)


def test_unknown_contractions_or_inverse_are_refused(flame_files):
    model = build_variant(flame_files, True, True)
    _, betas, tfs, pf = frame_inputs(model)
    with pytest.raises(ValueError, match="contractions"):
        deform_with_jacobian_explicit(
            model.deformer_network, model.FLAMEServer, model.pc.points, betas, tfs, pf, contractions="x"
        )
    with pytest.raises(ValueError, match="inverse must be one of"):
        deform_with_jacobian_explicit(
            model.deformer_network, model.FLAMEServer, model.pc.points, betas, tfs, pf, inverse="qr"
        )


def blended_rigid(n: int, joints: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """[n, 4, 4] blends sum_j w_j A_j of rigid transforms A_j with softmax weights w (as M_c in skinning)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(joints, 3, 3, generator=g, dtype=dtype)).Q
    q = q * torch.linalg.det(q)[:, None, None]  # proper rotations
    a = torch.zeros(joints, 4, 4, dtype=dtype)
    a[:, :3, :3], a[:, :3, 3], a[:, 3, 3] = q, 0.1 * torch.randn(joints, 3, generator=g, dtype=dtype), 1.0
    w = torch.softmax(2.0 * torch.randn(n, joints, generator=g, dtype=dtype), dim=-1)
    return torch.einsum("nj,jxy->nxy", w, a)


def test_affine_inverse_is_the_inverse():
    """The closed form against LU: skinning blends (bottom row (0, 0, 0, 1)) and general [[A, b], [0, s]]
    (s != 1, A far from a rotation), in float64 to round-off; in float32 as close to the float64 inverse
    as LU is (both round the same few operations)."""
    m = blended_rigid(500, 6, 0)
    assert_close(affine_inverse(m), torch.linalg.inv(m), rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    general = torch.zeros(200, 4, 4, dtype=torch.float64)
    general[:, :3, :] = torch.randn(200, 3, 4, generator=g, dtype=torch.float64)
    general[:, 3, 3] = 0.5 + torch.rand(200, generator=g, dtype=torch.float64)
    exact = torch.linalg.inv(general)
    assert_close(
        affine_inverse(general), exact, rtol=1e-9, atol=1e-9, reason="random A: condition up to ~1e3"
    )
    err_closed = (affine_inverse(m.float()).double() - torch.linalg.inv(m)).abs().max()
    err_lu = (torch.linalg.inv(m.float()).double() - torch.linalg.inv(m)).abs().max()
    assert err_closed < 4 * err_lu + 1e-7


def test_affine_inverse_gradients():
    """gradcheck of the closed form, and its gradient through a skinning blend (whose bottom-left zeros
    do not vary) equal to LU's."""
    m = blended_rigid(4, 3, 2).requires_grad_(True)
    keep = torch.ones(4, 4, dtype=torch.float64)
    keep[3, :3] = 0.0  # the structural zeros stay zero

    def closed(x):
        return affine_inverse(x * keep)

    assert torch.autograd.gradcheck(closed, (m,))
    g = torch.Generator().manual_seed(3)
    weights = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    joints = blended_rigid(
        3, 2, 4
    ).detach()  # three rigid transforms (blends of two each: still [[A, b], [0, 1]])
    cot = torch.randn(5, 4, 4, generator=g, dtype=torch.float64)
    grads = []
    for invert in (affine_inverse, torch.linalg.inv):
        blend = torch.einsum("nj,jxy->nxy", weights, joints)
        grads.append(torch.autograd.grad((invert(blend) * cot).sum(), weights)[0])
    assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_deformer_bf16_products(flame_files):
    """model.deformer_bf16 (mm_dtype bf16): the deformer network's products rounded to bf16 in a float32
    run move x_d and the Jacobian columns by about bf16's rounding, not more, and the gradients stay
    close; without it the float32 path is unchanged."""
    model = build_variant(flame_files, True, True).float()
    inp = make_input(2, dtype=torch.float32)
    betas = inp["expression"][:, : model.deformer_network.num_exp]
    _, pf, tfs = model.FLAMEServer(inp["expression"], inp["flame_pose"])
    params = [p for p in model.deformer_network.parameters() if p.requires_grad]
    runs = {}
    for dtype in (None, torch.bfloat16):
        points = model.pc.points.detach().float().clone().requires_grad_(True)
        x_d, cols = deform_with_jacobian_explicit(
            model.deformer_network, model.FLAMEServer, points, betas, tfs, pf, mm_dtype=dtype
        )
        loss = (x_d * torch.linspace(-1, 1, x_d.numel()).view_as(x_d)).sum() + (cols**2).sum()
        grads = torch.autograd.grad(loss, [points, *params], allow_unused=True)
        runs[dtype] = (points, x_d.detach(), cols.detach(), grads)
    points, x32, c32, g32 = runs[None]
    _, x16, c16, g16 = runs[torch.bfloat16]
    moved = (x32 - points.detach()).abs().max()  # the deformation itself, against which x_d's error counts
    err_x = (x16 - x32).abs().max() / moved
    err_c = (c16 - c32).abs().max() / c32.abs().max()
    # Observed: 8.4e-3 and 3.5e-3 (bf16 keeps 8 bits: 3.9e-3 relative a rounding).
    assert 0 < err_x < 2e-2 and 0 < err_c < 2e-2, (err_x, err_c)
    for i, (a, b) in enumerate(zip(g16, g32, strict=True)):
        assert (a is None) == (b is None), i
        if a is not None and b.abs().max() > 0:  # observed: at most 1.8e-2 (the points' gradient)
            err = (a - b).abs().max() / b.abs().max()
            assert err < 5e-2, (i, float(err))
