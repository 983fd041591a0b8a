"""Deformed points and their Jacobian columns with the tangents propagated by hand (spec §5.7-5.8).

A twin of ``PointAvatar.deform_with_jacobian`` (vmapped ``torch.func.jvp``) that writes the forward-mode
derivative of the deformer query and of FLAME's ``forward_pts`` out explicitly. The three tangents
(e_x, e_y, e_z at every point) share a leading axis of size 3, so each layer is one matmul for all of
them. Everything is ordinary differentiable torch ops: first-order autograd through ``x_d`` and
``cols`` gives the gradients w.r.t. the deformer weights, the points and the FLAME inputs.

Dimension letters: B frames, N points, J joints (bones), E expressions, D hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pointavatar.model.deformer import N_POSE_FEATURES, SKINNING_TEMPERATURE, ForwardDeformer
from pointavatar.model.geometry_fused import _mm

# How the inverse skinning inverts the blended canonical transform M_c [N, 4, 4] (model.inverse_skinning):
# "closed_form" (`affine_inverse`: elementwise, fused by torch.compile with its neighbours) or "lu"
# (torch.linalg.inv_ex, a batched LU factorisation per call and two batched [N, 4, 4] products in its
# backward; 1.6 ms of those products alone a step at 409,600 points on an H200, benchmarks/RESULTS.md
# step 7). The closed form's step is 2.5 ms faster there (step 8). The same values up to float32 rounding.
INVERSES = ("closed_form", "lu")


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u x v over the last axis (3), written out: elementwise for torch.compile to fuse."""
    u0, u1, u2 = u.unbind(-1)
    v0, v1, v2 = v.unbind(-1)
    return torch.stack([u1 * v2 - u2 * v1, u2 * v0 - u0 * v2, u0 * v1 - u1 * v0], dim=-1)


def affine_inverse(m: torch.Tensor) -> torch.Tensor:
    """Inverse of [..., 4, 4] matrices [[A, b], [0, s]] (A 3 x 3, bottom row (0, 0, 0, s)), as a blend of
    FLAME's rigid joint transforms is: [[A^-1, -A^-1 b / s], [0, 1 / s]], with A^-1 = adj(A) / det(A),
    whose columns are cross products of A's rows. Exact algebra, no pivoting: for the near-rotations of
    skinning (det near 1) as accurate as LU; the bottom row's zeros are assumed, not read. Elementwise
    only (no batched products of tiny matrices)."""
    r0, r1, r2 = m[..., 0, :3], m[..., 1, :3], m[..., 2, :3]
    c0, c1, c2 = _cross(r1, r2), _cross(r2, r0), _cross(r0, r1)
    det = (r0 * c0).sum(-1)[..., None, None]
    a_inv = torch.stack([c0, c1, c2], dim=-1) / det  # [..., 3, 3]: the cross products as columns
    s = m[..., 3:, 3:]  # [..., 1, 1]
    a_inv_b = (a_inv * m[..., None, :3, 3]).sum(-1, keepdim=True)  # [..., 3, 1] = A^-1 b
    top = torch.cat([a_inv, -a_inv_b / s], dim=-1)  # [..., 3, 4]
    bottom = torch.cat([torch.zeros_like(m[..., 3:, :3]), 1.0 / s], dim=-1)  # [..., 1, 4]
    return torch.cat([top, bottom], dim=-2)


def _first_layer(deformer: ForwardDeformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, 3] -> (pre-activation z [N, D] of lin0, d z / d x_k [3, N, D]) for k = x, y, z.

    d enc / d x_k is zero outside coordinate k of each encoding block (d sin(f x)/dx = f cos(f x),
    d cos(f x)/dx = -f sin(f x)), so the tangent is one batched matmul over the blocks,
    [3, N, blocks] @ [3, blocks, D], instead of a dense [3, N, C] @ [C, D].
    """
    lin = deformer.lin0
    weight = lin.weight  # [D, C], C = 3 * blocks; evaluates the weight-norm parametrisation once
    parts = [x]
    coefs = [torch.ones_like(x)]
    for i in range(deformer.embed.multires):
        freq = float(2.0**i)
        s, c = torch.sin(freq * x), torch.cos(freq * x)
        parts += [s, c]
        coefs += [freq * c, -freq * s]
    z = F.linear(torch.cat(parts, dim=-1), weight, lin.bias)
    coef = torch.stack(coefs, dim=-1).permute(1, 0, 2)  # [3, N, blocks]
    w_blocks = weight.t().reshape(len(coefs), 3, -1).transpose(0, 1)  # [3, blocks, D]
    return z, torch.bmm(coef, w_blocks)


def _linear(
    lin: nn.Linear, h: torch.Tensor, t: torch.Tensor, mm_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal h [N, Din] and tangents t [3, N, Din] through a Linear (the bias has no tangent)."""
    return _products(h, t, lin.weight, lin.bias, mm_dtype)  # evaluates the weight-norm parametrisation once


def _products(
    h: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mm_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h @ weight^T + bias [N, D], t @ weight^T [3, N, D]); with ``mm_dtype`` (bf16) the operands and
    the products rounded to it (tensor cores, fp32 accumulation) and the products back in h's dtype,
    as under torch.autocast (model.deformer_bf16)."""
    if mm_dtype is None:
        return F.linear(h, weight, bias), torch.matmul(t, weight.t())
    z = _mm(h, weight.t(), mm_dtype)
    return (z if bias is None else z + bias), _mm(t, weight.t(), mm_dtype)


def _softplus(act: nn.Softplus, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softplus and its tangent, t * torch's own slope (sigmoid(beta z), 1 where beta z > threshold)."""
    return F.softplus(z, act.beta, act.threshold), torch.ops.aten.softplus_backward(
        t, z, act.beta, act.threshold
    )


def einsum_pointwise(spec: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(spec, a, b)`` for two operands as one broadcast product and a sum over the
    contracted letters, instead of a (batched) matrix product.

    For the small contractions of FLAME's per-point algebra (over 3, 4, J or a few dozen values, with
    N = 10^5..10^6 batch entries) a batched GEMM of tiny matrices, and the permuted copies einsum
    makes to reach it, cost far more than the arithmetic; as products and sums, ``torch.compile``
    fuses them into a few elementwise kernels that read each operand once. Eagerly it materialises the
    full product (fine for tests, not for large N).
    """
    inputs, out = spec.replace(" ", "").split("->")
    sa, sb = inputs.split(",")
    letters = list(out) + [c for c in dict.fromkeys(sa + sb) if c not in out]

    def aligned(t: torch.Tensor, sub: str) -> torch.Tensor:
        t = t.permute([sub.index(c) for c in letters if c in sub])
        for i, c in enumerate(letters):
            if c not in sub:
                t = t.unsqueeze(i)
        return t

    product = aligned(a, sa) * aligned(b, sb)
    contracted = tuple(range(len(out), len(letters)))
    return product.sum(dim=contracted) if contracted else product


def trunk_with_tangents(
    deformer: ForwardDeformer, x: torch.Tensor, mm_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deformer's shared hidden layers at x [N, 3]: (h [N, D], d h / d x_k [3, N, D]); with
    ``mm_dtype`` the hidden layers' products in it (``_products``; the first layer's, over the few
    encoding columns, stay in h's dtype)."""
    z, t = _first_layer(deformer, x)
    h, t = _softplus(deformer.softplus, z, t)
    for l in range(1, deformer.num_layers - 1):
        z, t = _linear(getattr(deformer, f"lin{l}"), h, t, mm_dtype)
        h, t = _softplus(deformer.softplus, z, t)
    return h, t


def skinning_with_tangents(
    deformer: ForwardDeformer, h: torch.Tensor, t: torch.Tensor, mm_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LBS weights from the trunk's (h, t): (weights [N, J], d weights / d x_k [3, N, J]). With
    ``mm_dtype`` the hidden layer's products in it; the logits' stay in h's dtype: the softmax
    multiplies them by SKINNING_TEMPERATURE, which would multiply bf16's rounding too."""
    z, ts = _linear(deformer.skinning_linear, h, t, mm_dtype)
    hs, ts = _softplus(deformer.softplus, z, ts)
    logits, t_logits = _linear(deformer.skinning, hs, ts)
    weights = torch.softmax(SKINNING_TEMPERATURE * logits, dim=-1)
    t_l = SKINNING_TEMPERATURE * t_logits
    return weights, weights * (t_l - (weights * t_l).sum(-1, keepdim=True))  # softmax JVP


def deform_with_jacobian_explicit(
    deformer: ForwardDeformer,
    flame: nn.Module,
    points: torch.Tensor,
    betas: torch.Tensor,
    transformations: torch.Tensor,
    pose_feature: torch.Tensor,
    contractions: str = "einsum",
    inverse: str = "closed_form",
    mm_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same values as ``PointAvatar.deform_with_jacobian``, explicit forward mode.

    Args:
        deformer: the ``ForwardDeformer`` (its ``query_weights`` is what is differentiated).
        flame: the FLAME module whose ``forward_pts`` follows (canonical buffers are read from it).
        points: [N, 3] canonical points x_c.
        betas: [B, E] frame expression (E = the deformer's num_exp).
        transformations: [B, J, 4, 4] frame joint transforms (ghost bone included when ghostbone).
        pose_feature: [B, 36] frame pose feature.
        contractions: how FLAME's per-point contractions are computed: "einsum" (batched matrix
            products) or "pointwise" (``einsum_pointwise``: products and sums, for torch.compile to
            fuse). Same values.
        inverse: how the inverse skinning inverts each point's blended 4 x 4 transform: "closed_form"
            (``affine_inverse``) or "lu" (``torch.linalg.inv_ex``). Same values up to rounding.
        mm_dtype: None, or bf16 for the deformer network's products in it (model.deformer_bf16:
            ``trunk_with_tangents``, ``skinning_with_tangents`` and the blendshape head).

    Returns:
        x_d [B, N, 3] deformed points and cols [3, B, N, 3] with cols[k] = d x_d / d x_k.
    """
    h, t = trunk_with_tangents(deformer, points, mm_dtype)
    weights, t_weights = skinning_with_tangents(deformer, h, t, mm_dtype)  # [N, J], [3, N, J]
    fields = (h, t, weights, t_weights)
    return flame_with_tangents(
        deformer, flame, points, fields, betas, transformations, pose_feature, contractions, inverse, mm_dtype
    )


def flame_with_tangents(
    deformer: ForwardDeformer,
    flame: nn.Module,
    points: torch.Tensor,
    fields: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    betas: torch.Tensor,
    transformations: torch.Tensor,
    pose_feature: torch.Tensor,
    contractions: str = "einsum",
    inverse: str = "closed_form",
    mm_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second half of ``deform_with_jacobian_explicit``: from the deformer's trunk output and
    skinning weights with their tangents, ``fields`` = (h [N, D], t [3, N, D], weights [N, J],
    t_weights [3, N, J]), the blendshape head and FLAME's ``forward_pts`` -> (x_d [B, N, 3], cols
    [3, B, N, 3]). The other arguments as ``deform_with_jacobian_explicit``."""
    n = points.shape[0]
    dtype = points.dtype
    if contractions not in ("einsum", "pointwise"):
        raise ValueError(f"contractions must be 'einsum' or 'pointwise', not {contractions!r}")
    if inverse not in INVERSES:
        raise ValueError(f"inverse must be one of {INVERSES}, not {inverse!r}")
    es = torch.einsum if contractions == "einsum" else einsum_pointwise
    h, t, weights, t_weights = fields
    # The head is applied block by block (rows of its weight) rather than sliced afterwards: the
    # backward of a slice of a [3, N, C] tangent would allocate and fill a full zero tensor per slice.
    n_p, n_s, n_e = deformer.n_posedirs, deformer.n_shapedirs, deformer.num_exp
    head_w, head_b = deformer.blendshapes.weight, deformer.blendshapes.bias

    def head(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _products(h, t, head_w[lo:hi], head_b[lo:hi], mm_dtype)

    posedirs, t_posedirs = head(0, n_p)
    posedirs = posedirs.reshape(n, N_POSE_FEATURES, 3)
    t_posedirs = t_posedirs.reshape(3, n, N_POSE_FEATURES, 3)
    shapedirs, t_shapedirs = head(n_p, n_p + n_s)
    shapedirs = shapedirs.reshape(n, 3, n_e)
    t_shapedirs = t_shapedirs.reshape(3, n, 3, n_e)

    eye = torch.eye(3, dtype=dtype, device=points.device)[:, None, :]  # [3, 1, 3]
    if deformer.deform_c:
        offset, t_offset = head(n_p + n_s, n_p + n_s + 3)
        x_flame = points + offset
        t_x_flame = eye + t_offset  # [3, N, 3]
    else:
        x_flame = points
        t_x_flame = eye.expand(3, n, 3)

    # ---- FLAME forward_pts, as flame.forward_pts (same padding of psi_c) ----
    canonical_exp = flame.canonical_exp.to(betas.dtype)
    if n_e > canonical_exp.shape[1]:
        canonical_exp = F.pad(canonical_exp, [0, n_e - canonical_exp.shape[1]])
    else:
        canonical_exp = canonical_exp[:, :n_e]
    canonical_tf = flame.canonical_transformations.to(dtype)[0]  # [J, 4, 4]
    canonical_pf = flame.canonical_pose_feature.to(dtype)  # [1, 36]

    # Inverse skinning: y = M_c^-1 [x'; 1] with M_c = sum_j W_j A_c_j (the original inverts the full
    # 4 x 4; its bottom row is (0, 0, 0, sum_j W_j), so `affine_inverse`'s closed form gives the same).
    # d(M^-1) = -M^-1 dM M^-1, so dy = M^-1 ([dx'; 0] - dM y), dM y = sum_j dW_j (A_c_j y).
    m_c = es("nj,jxy->nxy", weights, canonical_tf)  # [N, 4, 4]
    # inv_ex: no host check of the result (linalg.inv waits for the device to test for singular
    # matrices, which CUDA-graph capture refuses); a singular blend would give non-finite values,
    # which the trainer's gradient check catches.
    m_inv = affine_inverse(m_c) if inverse == "closed_form" else torch.linalg.inv_ex(m_c).inverse
    x_h = torch.cat([x_flame, torch.ones_like(x_flame[:, :1])], dim=-1)  # [N, 4]
    y = es("nxy,ny->nx", m_inv, x_h)  # [N, 4]
    a_y = es("jxy,ny->njx", canonical_tf, y)  # [N, J, 4]
    t_in = F.pad(t_x_flame, [0, 1]) - es("knj,njx->knx", t_weights, a_y)  # [3, N, 4]
    t_y = es("nxy,kny->knx", m_inv[:, :3, :], t_in)  # [3, N, 3]

    # x_posed = x0 + blend(psi) + corr(p) with x0 = y - blend(psi_c) - corr(p_c).
    x0 = y[:, :3] - es("bl,nkl->bnk", canonical_exp, shapedirs)[0]
    x0 = x0 - es("bi,nik->bnk", canonical_pf, posedirs)[0]
    x_posed = (
        x0 + es("bl,nkl->bnk", betas, shapedirs) + es("bi,nik->bnk", pose_feature, posedirs)
    )  # [B, N, 3]
    d_betas = betas - canonical_exp  # [B, E]
    d_pf = pose_feature - canonical_pf  # [B, 36]
    t_posed = (
        t_y[:, None] + es("bl,knxl->kbnx", d_betas, t_shapedirs) + es("bi,knix->kbnx", d_pf, t_posedirs)
    )  # [3, B, N, 3]

    # Skinning: x_d = R(W) x_posed + T(W), (R, T) = sum_j W_j A_j; the weight tangent enters as
    # sum_j dW_j (A_j [x_posed; 1]).
    mats = es("nj,bjxy->bnxy", weights, transformations[:, :, :3, :])  # [B, N, 3, 4]
    x_d = es("bnxy,bny->bnx", mats[..., :3], x_posed) + mats[..., 3]
    a_x = (
        es("bjxy,bny->bnjx", transformations[:, :, :3, :3], x_posed) + transformations[:, None, :, :3, 3]
    )  # [B, N, J, 3]
    cols = es("bnxy,kbny->kbnx", mats[..., :3], t_posed) + es("knj,bnjx->kbnx", t_weights, a_x)
    return x_d, cols
