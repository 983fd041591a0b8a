"""The geometry MLP's forward and its explicit SDF-gradient sweep as one autograd node (spec §5.3).

``forward_with_gradient_fused`` returns what ``GeometryNetwork.forward_with_gradient_explicit`` returns,
but autograd records a single ``torch.autograd.Function`` whose hand-written backward recomputes the
activations, slopes, curvatures, skip concatenations and the encoding from the saved pre-activations and
x: training keeps 2 activations per hidden layer (z_l and the sweep vector g_l), or only z_l with
``recompute_sweep``, instead of the reference graph's many. The passes run on chunks of rows and, on
CUDA, through torch.compile as plain tensor functions (``_run``).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from pointavatar.model.embedder import encode, encode_jvp, encode_vjp, encode_vjp_dx
from pointavatar.model.geometry import GeometryNetwork, softplus_curvature, softplus_slope

_SQRT2 = math.sqrt(2)
# Rows per pass (forward and backward). The backward's transients (every layer's sweep term, and with
# recompute_sweep every sweep vector) are then at most L x ROW_CHUNK x 256 values, not L x N x 256:
# 6.2 GiB at 409,600 points (819,200 rows) in fp32 without chunks (H200, RESULTS.md step 5).
ROW_CHUNK = 1 << 17


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """a @ b; with ``dtype`` (bf16) the operands are rounded to it (tensor cores, fp32 accumulation) and
    the product comes back in a's dtype, as under torch.autocast."""
    if dtype is None:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


def _forward_pass(
    x, weights, biases, multires, skip_in, beta, threshold, save_dtype, mm_dtype, recompute_sweep
):
    """The forward and the sweep without autograd: (out, grad, the z_l and g_l to keep)."""
    n_lin = len(weights)
    last = n_lin - 1
    enc = encode(x, multires)  # [N, E]
    n_enc = enc.shape[-1]

    h = enc
    zs = []  # hidden pre-activations z_l [N, out_l]
    for l in range(n_lin):
        if l in skip_in:
            h = torch.cat([h, enc], dim=-1) / _SQRT2
        z = _mm(h, weights[l].T, mm_dtype) + biases[l]
        if l < last:
            zs.append(z)
            h = F.softplus(z, beta, threshold)
    out = z

    gs, g_enc = _sweep(zs, weights, skip_in, n_enc, beta, threshold, mm_dtype)
    grad = encode_vjp(x, g_enc, multires)

    def keep(t):
        return t if save_dtype is None else t.to(save_dtype)

    # gs[last - 1] is W_last[0] (its h part over sqrt 2 at a skip): recomputed, not kept; with
    # recompute_sweep none of them is kept.
    kept_gs = [] if recompute_sweep else [keep(t) for t in gs[: last - 1]]
    return out, grad, [keep(z) for z in zs], kept_gs


def _sweep(zs, weights, skip_in, n_enc, beta, threshold, mm_dtype):
    """The reverse sweep of channel 0, as forward_with_gradient_explicit does it: (gs, g_enc) with
    gs[l] = d sdf / d softplus(z_l) [N, out_l] for every hidden layer and g_enc = d sdf / d enc(x)."""
    last = len(weights) - 1
    gs = [None] * last
    g = weights[last][:1].expand(zs[0].shape[0], -1)
    g_enc = None
    for l in range(last, -1, -1):
        if l < last:
            gs[l] = g
            g = _mm(torch.ops.aten.softplus_backward(g, zs[l], beta, threshold), weights[l], mm_dtype)
        if l in skip_in:
            d_h = g.shape[-1] - n_enc
            g_part = g[:, d_h:] / _SQRT2
            g_enc = g_part if g_enc is None else g_enc + g_part
            g = g[:, :d_h] / _SQRT2
    g_enc = g if g_enc is None else g_enc + g
    return gs, g_enc


def _add_enc_part(g_enc, g_in, l, skip_in, d_h):
    """g_enc plus the encoding's part of g_in, the sweep at layer l's input (l == 0 or a skip layer):
    all of it at layer 0, its re-injected columns over sqrt 2 at a skip (both at a skip at layer 0)."""
    part = g_in if l not in skip_in else g_in[:, d_h:] / _SQRT2
    if l == 0 and l in skip_in:
        part = part + g_in[:, :d_h] / _SQRT2
    return part if g_enc is None else g_enc + part


def _split_skip(d_a, d_enc, l, skip_in, d_h):
    """(the gradient of layer l's h input, d_enc plus that of its re-injected encoding) from d_a, the
    gradient of its whole input: a skip layer's input is cat([h, enc]) / sqrt 2."""
    if l not in skip_in:
        return d_a, d_enc
    d_part = d_a[:, d_h:] / _SQRT2
    return d_a[:, :d_h] / _SQRT2, d_part if d_enc is None else d_enc + d_part


def _total_weight_grad(
    chain: torch.Tensor, sweep: torch.Tensor | None, is_last: bool, row0: torch.Tensor | None
) -> torch.Tensor:
    """A layer's weight gradient in the hand-written backward (``_backward_pass``) from the forward
    chain's part ``chain`` and the sweep's: ``sweep`` (a hidden layer's, or None) or, at the last layer,
    ``row0`` added to its row 0 (the sdf's)."""
    if is_last:
        return torch.cat([chain[:1] + row0, chain[1:]], dim=0)
    return chain if sweep is None else chain + sweep


def _backward_pass(
    x, weights, zs, gs, d_out, d_grad, multires, skip_in, beta, threshold, mm, need_x, need_w, need_b
):
    """The hand-written backward (see forward_with_gradient_fused): (d x or None, d weights, d biases)."""
    n_lin = len(weights)
    last = n_lin - 1
    dtype = d_out.dtype
    zs = [z.to(dtype) for z in zs]
    n = x.shape[0]
    enc = encode(x, multires)  # [N, E]
    n_enc = enc.shape[-1]
    if gs:
        gs = [g.to(dtype) for g in gs]
    else:  # recompute_sweep: the sweep vectors again from the kept z
        gs = _sweep(zs, weights, skip_in, n_enc, beta, threshold, mm)[0][: last - 1]

    def h_width(l):
        """Width of the h part of layer l's input (the rest is the re-injected encoding)."""
        return weights[l].shape[1] - (n_enc if l in skip_in else 0)

    if last > 0:
        top = weights[last][:1, : h_width(last)]
        gs.append((top / _SQRT2 if last in skip_in else top).expand(n, -1))
    slopes = [softplus_slope(z, beta, threshold) for z in zs]

    # 1. Up the sweep: the adjoint dG of every sweep vector, seeded by the encoding vjp's adjoint
    # (its input at each layer's input: cat([dG, d_g_enc]) / sqrt 2 at a skip layer).
    d_g_enc = encode_jvp(x, d_grad, multires)  # [N, E]
    d_w = [None] * n_lin
    dz_sweep = [None] * last
    g_enc = None  # d sdf / d enc(x), only for the x gradient
    d_g = d_g_enc
    for l in range(n_lin):
        if l in skip_in:
            d_g = torch.cat([d_g, d_g_enc], dim=-1) / _SQRT2
        if l == last:
            g_in = weights[last][:1]  # [1, in_last]
            d_w_row0 = d_g.sum(0)
        else:
            u = gs[l] * slopes[l]  # [N, out_l]
            g_in = None
            if need_w[l]:
                d_w[l] = _mm(u.T, d_g, mm)
            d_u = _mm(d_g, weights[l].T, mm)  # [N, out_l]
            dz_sweep[l] = d_u * gs[l] * softplus_curvature(zs[l], slopes[l], beta, threshold)
            d_g = d_u * slopes[l]
        if need_x and (l == 0 or l in skip_in):
            if g_in is None:
                g_in = _mm(u, weights[l], mm)  # [N, in_l]
            g_enc = _add_enc_part(g_enc, g_in, l, skip_in, h_width(l))

    # 2. Down the forward chain from d_out, adding the sweep's dz_l at each hidden layer.
    d_b = [None] * n_lin
    d_enc = None
    d_h_next = None  # d loss / d softplus(z_l)
    for l in range(last, -1, -1):
        dz = d_out if l == last else d_h_next * slopes[l] + dz_sweep[l]
        d_h = h_width(l)
        if need_w[l]:
            h = enc if l == 0 else F.softplus(zs[l - 1], beta, threshold)
            a = torch.cat([h, enc], dim=-1) / _SQRT2 if l in skip_in else h
            d_w[l] = _total_weight_grad(_mm(dz.T, a, mm), d_w[l], l == last, d_w_row0)
        if need_b[l]:
            d_b[l] = dz.sum(0)
        if l == 0 and not need_x:
            break
        d_a = _mm(dz, weights[l], mm)  # [N, in_l]
        d_h_next, d_enc = _split_skip(d_a, d_enc, l, skip_in, d_h)
    d_x = None
    if need_x:
        d_enc = d_h_next if d_enc is None else d_enc + d_h_next
        d_x = encode_vjp(x, d_enc, multires) + encode_vjp_dx(x, g_enc, d_grad, multires)
    return d_x, d_w, d_b


_COMPILED: dict[str, object] = {}  # the two passes, torch.compile'd once per process
_COMPILE_FAILED: list[str] = []
# Inductor options for the passes' torch.compile, here and in deform_fused.py (None: its defaults).
# Benchmarks set it (bench_geometry.py's variants MODE:KEY=VALUE); clear _COMPILED after changing it.
COMPILE_OPTIONS: dict | None = None


def constant_floats():
    """The context our torch.compile calls trace in: Python floats that the compiled code reads (the
    Softplus beta, module constants such as ``ALBEDO_SCALE``) become constants of the graph
    (``torch._dynamo.config.specialize_float``). Without it torch 2.11 passes each as a 0-d float64 CPU
    input, which inductor converts with a C++ kernel: a C++ build and the CPU's vector-ISA probe in the
    first step of every process, and a host-side scalar per call (benchmarks/RESULTS.md step 13)."""
    return torch._dynamo.config.patch(specialize_float=True)


def _run(name: str, fn, compiled: bool, *args):
    """fn(*args); with ``compiled``, through torch.compile (dynamic point count), falling back to the eager
    function for good, with one warning, if compiling fails. The passes (here and in deform_fused.py)
    are compiled as plain tensor functions, not the autograd.Function around them (Dynamo's tracing of
    custom Functions failed on torch 2.11 with an AssertionError).

    args[0] has the point count N as its first dimension. Among the tensor arguments (and lists of
    them), the point dimension is marked dynamic: dim 0 of [N, D] tensors, dim 1 of [3, N, D] tangents.
    The layer widths stay static (the weights come as a tuple: not marked)."""
    if not compiled or _COMPILE_FAILED:
        return fn(*args)
    n = args[0].shape[0]
    for a in args:
        for t in a if isinstance(a, list) else [a]:
            if not isinstance(t, torch.Tensor):
                continue
            if t.dim() == 2 and t.shape[0] == n:
                torch._dynamo.mark_dynamic(t, 0)
            elif t.dim() == 3 and t.shape[0] == 3 and t.shape[1] == n:
                torch._dynamo.mark_dynamic(t, 1)
    c = _COMPILED.get(name)
    if c is not None:
        with constant_floats():  # a recompile traces as the first compile did
            return c(*args)
    c = torch.compile(fn, options=COMPILE_OPTIONS)
    try:
        with constant_floats():
            result = c(*args)
    except Exception as exc:  # the eager pass is exact: a compiler problem must not stop training
        _COMPILE_FAILED.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(
            f"torch.compile of the fused pass {name!r} failed ({type(exc).__name__}: {exc}); running the "
            "fused passes eagerly",
            stacklevel=2,
        )
        return fn(*args)
    _COMPILED[name] = c
    return result


class _FusedGeometry(torch.autograd.Function):
    """(out, grad) of the geometry MLP in one node; see ``forward_with_gradient_fused`` for the math.

    Inputs: x [N, d], the encoding's multires, the skip layer indices, Softplus beta and threshold, the
    dtype the activations are saved in (None = the compute dtype), the products' operand dtype, compiled,
    recompute_sweep, the row chunk, then the L weights [out_l, in_l] and the L biases [out_l]. Saved: x,
    the weights and, per chunk of rows, the L - 1 hidden pre-activations z_l and (unless
    recompute_sweep) the L - 2 sweep vectors g_l = d sdf / d softplus(z_l) below the top one (the top
    one is W_last[0], read again from the weight).
    """

    @staticmethod
    def forward(
        ctx,
        x,
        multires,
        skip_in,
        beta,
        threshold,
        save_dtype,
        mm_dtype,
        compiled,
        recompute_sweep,
        row_chunk,
        *params,
    ):
        n_lin = len(params) // 2
        weights, biases = params[:n_lin], params[n_lin:]
        settings = (multires, skip_in, beta, threshold, save_dtype, mm_dtype, recompute_sweep)
        outs, grads, kept = [], [], []
        for x_c in _chunks(x, row_chunk):
            out, grad, zs, gs = _run("forward", _forward_pass, compiled, x_c, weights, biases, *settings)
            outs.append(out)
            grads.append(grad)
            kept += [*zs, *gs]  # per chunk: its z_l, then its g_l
        ctx.save_for_backward(x, *weights, *kept)
        ctx.n_lin, ctx.n_z, ctx.n_kept, ctx.row_chunk = n_lin, len(zs), len(zs) + len(gs), row_chunk
        ctx.multires, ctx.skip_in, ctx.beta, ctx.threshold = multires, skip_in, beta, threshold
        ctx.mm_dtype, ctx.compiled = mm_dtype, compiled
        if len(outs) == 1:
            return outs[0], grads[0]
        return torch.cat(outs), torch.cat(grads)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_grad):
        n_lin, n_z, n_kept = ctx.n_lin, ctx.n_z, ctx.n_kept
        x, *rest = ctx.saved_tensors
        weights = tuple(rest[:n_lin])
        kept = rest[n_lin:]
        first = 10  # x and the nine settings come before the parameters
        need_x = ctx.needs_input_grad[0]
        need_w = tuple(ctx.needs_input_grad[first : first + n_lin])
        need_b = tuple(ctx.needs_input_grad[first + n_lin :])
        settings = (ctx.multires, ctx.skip_in, ctx.beta, ctx.threshold, ctx.mm_dtype, need_x, need_w, need_b)
        d_xs, d_w, d_b = [], [], []
        rows = ctx.row_chunk
        chunks = zip(_chunks(x, rows), _chunks(d_out, rows), _chunks(d_grad, rows), strict=True)
        for c, (x_c, d_out_c, d_grad_c) in enumerate(chunks):
            part = kept[c * n_kept : (c + 1) * n_kept]
            zs, gs = list(part[:n_z]), list(part[n_z:])
            d_x_c, d_w_c, d_b_c = _run(
                "backward", _backward_pass, ctx.compiled, x_c, weights, zs, gs, d_out_c, d_grad_c, *settings
            )
            d_xs.append(d_x_c)
            if c == 0:
                d_w, d_b = list(d_w_c), list(d_b_c)
            else:  # the weight gradients sum over the chunks' rows
                d_w = [None if a is None else s + a for s, a in zip(d_w, d_w_c, strict=True)]
                d_b = [None if a is None else s + a for s, a in zip(d_b, d_b_c, strict=True)]
        d_x = None if not need_x else (d_xs[0] if len(d_xs) == 1 else torch.cat(d_xs))
        return d_x, *[None] * (first - 1), *d_w, *d_b


def _fused_dtypes(
    x: torch.Tensor, save_dtype: torch.dtype | None, mm_dtype: torch.dtype | None, name: str, instead: str
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """A fused function's save_dtype and mm_dtype, None where they are x's own dtype; refused under
    torch.autocast while gradients are recorded (the hand-written backward runs outside the forward's
    autocast and would mix bf16 and fp32 matmul operands)."""
    if torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type):
        raise RuntimeError(
            f"{name} does not support torch.autocast when gradients are recorded; use save_dtype / "
            f"mm_dtype, or {instead} under autocast"
        )
    return (None if save_dtype == x.dtype else save_dtype), (None if mm_dtype == x.dtype else mm_dtype)


def _chunks(t: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """t in chunks of at most ``rows`` rows, as copies (a view would make torch.compile guard on its
    base's size, which changes with the point count); t itself when it fits in one."""
    if t.shape[0] <= rows:
        return [t]
    return [t[start : start + rows].clone() for start in range(0, t.shape[0], rows)]


def forward_with_gradient_fused(
    net: GeometryNetwork,
    x: torch.Tensor,
    save_dtype: torch.dtype | None = None,
    mm_dtype: torch.dtype | None = None,
    compiled: bool = False,
    recompute_sweep: bool = False,
    row_chunk: int = ROW_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x) [N, C], d sdf / dx [N, d_in]): ``net.forward_with_gradient_explicit(x)`` in one autograd node.

    Same values; a loss on (out, grad) trains the weights and biases (through weight norm: the weights
    are read here, so autograd carries their gradient to the parametrisation) and reaches x if it
    requires grad. Kept for the backward: x, the weights, the hidden pre-activations z_l and the sweep
    vectors g_l, in ``save_dtype`` if given (e.g. torch.bfloat16: less memory, gradients rounded through
    the stored z and g; the returned values are not affected). Under ``torch.no_grad`` nothing is kept.
    Not under ``torch.autocast`` while gradients are recorded (a RuntimeError): the hand-written
    backward does not replay the forward's autocast.

    Backward (L linear layers, a_l the input of layer l, s_l = softplus'(z_l), c_l its curvature,
    g_l the saved sweep vector, u_l = g_l s_l, G_l = u_l W_l the sweep at a_l, G_top = W_last[0]):
    grad = J_enc(x)^T g_enc is linear in g_enc, so d grad first gives dg_enc = J_enc(x) d grad
    (the encoding's jvp) and, with g_enc recomputed from u_0 and the skip layers' u_l, d x +=
    d/dx <d grad, J_enc(x)^T g_enc>. Going up the sweep, the adjoint dG_l of G_l (dg_enc at layer 0,
    and cat([dG, dg_enc]) / sqrt 2 at a skip layer) gives dW_l += u_l^T dG_l, du_l = dG_l W_l^T, the
    slope term dz_l += du_l g_l c_l, and dG_{l+1} (h part) = du_l s_l; at the top dW_last[0] += sum_N
    dG_last. Then ordinary backprop from d out: dz_l = dh_{l+1} s_l + (sweep dz_l), dW_l += dz_l^T a_l,
    db_l = sum_N dz_l, da_l = dz_l W_l, split at skip layers, and d x += J_enc(x)^T d enc.

    Args:
        net: the canonical geometry network (its Softplus beta and threshold, skip layers, encoding).
        x: [N, d_in] canonical points, requiring grad or not.
        save_dtype: dtype of the saved z_l and g_l (None = the compute dtype, exact gradients).
        mm_dtype: dtype the matrix products' operands are rounded to, forward and backward (e.g.
            torch.bfloat16: tensor cores with fp32 accumulation, products back in x's dtype, as under
            torch.autocast, which this function does not support); None = x's dtype.
        compiled: run the forward and backward passes through torch.compile (the fast path on CUDA).
        recompute_sweep: keep only the z_l and run the sweep again in the backward (half the kept
            activations for one more sweep: L - 1 more products).
        row_chunk: the passes run on chunks of at most this many rows (the weight gradients summed
            over them), so that their transient memory does not grow with N; the kept memory does.
    """
    save_dtype, mm_dtype = _fused_dtypes(
        x, save_dtype, mm_dtype, "forward_with_gradient_fused", "forward_with_gradient_explicit"
    )
    lins = [getattr(net, f"lin{l}") for l in range(net.num_layers - 1)]
    return _FusedGeometry.apply(
        x,
        net.embed.multires,
        tuple(net.skip_in),
        float(net.softplus.beta),
        float(net.softplus.threshold),
        save_dtype,
        mm_dtype,
        bool(compiled),
        bool(recompute_sweep),
        int(row_chunk),
        *[lin.weight for lin in lins],
        *[lin.bias for lin in lins],
    )
