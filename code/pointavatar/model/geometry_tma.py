"""The fused geometry node's passes (``geometry_fused``) with every product a TMA GEMM whose epilogue does the
elementwise work between the products (``_triton_gemm.tma_linear``): the same values and gradients as
``geometry_fused._forward_pass`` and ``_backward_pass``, without the separate elementwise passes over the
[N, 256] activations that take about 23 ms of the 409,600-point step (benchmarks/RESULTS.md step 9).

What changes against the PyTorch passes:

- Kept for the backward: the activations h_l = softplus(z_{l-1}) instead of the pre-activations (the
  slope and the curvature follow from h: s = 1 - exp(-beta h), ``_triton_gemm``), the sweep vectors g_l
  and the products u_l = g_l * s_l (the weight gradients' operands), and d sdf / d enc(x); with
  ``recompute_sweep`` only the activations (the sweep runs again in the backward).
- A skip layer's input cat([h, enc]) / sqrt 2 is one buffer: the layer below writes h into its first
  columns, enc is copied into the rest once, and the 1 / sqrt 2 is applied to the weight (and to the
  weight's gradient) instead of the buffer.
- Operands whose rows TMA cannot read (the encoding's 39 columns, the output layer's 4) are zero-padded
  to a multiple of 8 columns; the output layer's forward product is a plain torch product.
- Every product's output is rounded to the compute dtype (bf16 with mm_dtype bf16, as autocast does);
  sums are fp32.

``supported`` says whether a network's widths allow it (every hidden width a multiple of 8, a skip
layer's input too, no skip at layer 0); ``geometry_fused`` falls back to its PyTorch passes otherwise.
Runs on CUDA (sm_90) or under TRITON_INTERPRET=1 (float32: the tests).
"""

from __future__ import annotations

import math

import torch

from pointavatar.model.embedder import encode, encode_jvp, encode_vjp, encode_vjp_dx
from pointavatar.model.geometry import total_weight_grad

_ALIGN = 8  # columns: 16 bytes of bf16 (32 of fp32)
_SQRT2 = math.sqrt(2.0)


def supported(weights, skip_in, n_enc: int) -> bool:
    """Whether the TMA passes handle this network (module docstring)."""
    last = len(weights) - 1
    if 0 in skip_in or last < 1:
        return False
    for l in range(last):
        out = weights[l].shape[0]
        width = out + n_enc if (l + 1) in skip_in else out
        if width % _ALIGN:
            return False
    return True


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    """t [R, C] with zero columns appended up to ``width`` (t itself, contiguous, where C == width)."""
    if t.shape[1] == width:
        return t.contiguous()
    return torch.nn.functional.pad(t, (0, width - t.shape[1])).contiguous()


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _empty_aligned(rows: int, cols: int, dtype, device) -> torch.Tensor:
    """An uninitialised [rows, cols] tensor whose rows are 16-byte aligned (a view of a wider one where cols
    is not a multiple of 8): TMA reads and writes it, its bounds clipping the extra columns."""
    return torch.empty(rows, _round_up(cols), dtype=dtype, device=device)[:, :cols]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t [R, C] copied into ``_empty_aligned`` storage (t itself, contiguous, where C is a multiple of 8)."""
    if t.shape[1] % _ALIGN == 0:
        return t.contiguous()
    out = _empty_aligned(*t.shape, t.dtype, t.device)
    out.copy_(t)
    return out


class _Net:
    """The weights as the kernels read them (compute dtype, contiguous; 1 / sqrt 2 applied at skip layers;
    layer 0's columns and the output layer's rows padded) and the layout helpers."""

    def __init__(self, weights, skip_in, n_enc, dtype, biases=None):
        self.weights = weights
        self.last = len(weights) - 1
        self.skip_in = skip_in
        self.n_enc, self.enc_pad = n_enc, _round_up(n_enc)
        self.dtype = dtype
        self.scale = [1 / _SQRT2 if l in skip_in else 1.0 for l in range(self.last + 1)]
        w = [(weights[l] * self.scale[l]).to(dtype) for l in range(self.last + 1)]
        # The forward's operand W_l [out, in] (layer 0: in padded like the encoding).
        self.w = [_pad_cols(w[0], self.enc_pad), *[t.contiguous() for t in w[1:]]]
        # The transposed weights W_l^T [in, out] (the sweep's and the backward's input products), split at
        # a skip layer into the h rows and the encoding's rows (padded to enc_pad rows); the output layer's
        # columns padded to a multiple of 8 (its [N, 4] operand is padded likewise).
        self.wt_h, self.wt_enc = [None] * (self.last + 1), [None] * (self.last + 1)
        for l in range(self.last + 1):
            wt = w[l].T
            if l == self.last:
                wt = _pad_cols(wt, _round_up(wt.shape[1]))
            d_h = self.h_width(l)
            if l == 0:
                self.wt_enc[l] = _aligned(_pad_rows(wt, self.enc_pad))
            else:
                self.wt_h[l] = _aligned(wt[:d_h])
                if l in skip_in:
                    self.wt_enc[l] = _aligned(_pad_rows(wt[d_h:], self.enc_pad))
        self.b = None if biases is None else [b.float() for b in biases]  # the forward's only

    def h_width(self, l: int) -> int:
        """Width of the h part of layer l's input (0 at layer 0, whose input is the encoding)."""
        if l == 0:
            return 0
        return self.weights[l].shape[1] - (self.n_enc if l in self.skip_in else 0)

    def top_sweep(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sweep's top vector, d sdf / d (the last layer's input) = W_last[0] (times its scale): its h
        part expanded to [n, d_h] in the compute dtype, and its encoding part [n, E] in fp32 (None
        unless the last layer is a skip layer)."""
        top = self.weights[self.last][0] * self.scale[self.last]
        d_h = self.h_width(self.last)
        enc_part = top[d_h:].float().expand(n, -1) if self.last in self.skip_in else None
        return top[:d_h].to(self.dtype).expand(n, -1), enc_part

    def skip_buffer(self, n: int, enc: torch.Tensor, d_h: int, device) -> torch.Tensor:
        """A skip layer's input buffer [n, d_h + E]: enc in its last columns (h goes in the first)."""
        buf = torch.empty(n, d_h + self.n_enc, dtype=self.dtype, device=device)
        buf[:, d_h:] = enc
        return buf


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return _pad_cols(t.T, rows).T.contiguous()


def _sweep(tg, net: _Net, hs, n, device):
    """The reverse sweep of channel 0 from the kept activations: (gs, us, g_enc) with gs[l] = d sdf / d h_{l+1}
    [N, out_l] (the top one an expand of W_last[0]), us[l] = gs[l] * s(h_{l+1}), g_enc = d sdf / d enc(x)
    [N, E] in fp32."""
    last = net.last
    gs, us = [None] * last, [None] * last
    gs[last - 1], g_enc = net.top_sweep(n)
    s = _slope(hs[last - 1])
    us[last - 1] = _aligned((gs[last - 1].float() * s).to(net.dtype))
    for l in range(last - 1, -1, -1):
        if l == 0:
            part = tg.tma_linear(us[0], net.wt_enc[0])[:, : net.n_enc].float()
        else:
            # g_in = u_l @ W_l: its h rows give gs[l-1] and us[l-1] (the slope of h_l) in one product.
            d_h = net.h_width(l)
            us[l - 1], gs[l - 1] = tg.tma_linear(
                us[l], net.wt_h[l], epilogue="slope_keep", p=hs[l - 1],
                out=_empty_aligned(n, d_h, net.dtype, device), out2=_empty_aligned(n, d_h, net.dtype, device),
            )  # fmt: skip
            if l not in net.skip_in:
                continue
            part = tg.tma_linear(us[l], net.wt_enc[l])[:, : net.n_enc].float()
        g_enc = part if g_enc is None else g_enc + part
    return gs, us, g_enc


def _slope(h: torch.Tensor, beta: float = 100.0, threshold: float = 20.0) -> torch.Tensor:
    """softplus' from the activation (fp32): 1 - exp(-beta h), 1 where beta h > threshold."""
    bh = h.float() * beta
    return torch.where(bh > threshold, torch.ones_like(bh), -torch.expm1(-bh))


def forward_pass(x, weights, biases, multires, skip_in, beta, threshold, mm_dtype, recompute_sweep):
    """(out [N, C] in x's dtype, grad [N, d], kept, kept_sweep): the forward chain and the sweep; kept =
    the activations h_1..h_last (views into their buffers), kept_sweep = gs[:-1] + us + [g_enc] (empty
    with ``recompute_sweep``)."""
    from pointavatar.model import _triton_gemm as tg

    if (beta, threshold) != (100.0, 20.0):
        raise ValueError("the TMA passes use Softplus(beta=100, threshold=20)")
    dtype = torch.bfloat16 if mm_dtype == torch.bfloat16 else x.dtype
    n = x.shape[0]
    enc = encode(x, multires).to(dtype)  # [N, E]
    net = _Net(weights, skip_in, enc.shape[1], dtype, biases)
    last = net.last
    a = _pad_cols(enc, net.enc_pad)
    hs = []
    for l in range(last):
        out_l = weights[l].shape[0]
        if (l + 1) in skip_in:
            buf = net.skip_buffer(n, enc, out_l, x.device)
            h = tg.tma_linear(a, net.w[l], bias=net.b[l], epilogue="softplus", out=buf[:, :out_l])
            a = buf
        else:
            h = tg.tma_linear(a, net.w[l], bias=net.b[l], epilogue="softplus")
            a = h
        hs.append(h)
    out = (a @ net.w[last].T).to(x.dtype) + biases[last]  # in bf16 rounded as autocast's product
    gs, us, g_enc = _sweep(tg, net, hs, n, x.device)
    grad = encode_vjp(x, g_enc.to(x.dtype), multires)
    kept_sweep = [] if recompute_sweep else [*gs[: last - 1], *us, g_enc]
    return out, grad, hs, kept_sweep


def backward_pass(
    x, weights, hs, kept_sweep, d_out, d_grad, multires, skip_in, mm_dtype, need_x, need_w, need_b
):
    """The backward of ``forward_pass`` (as ``geometry_fused._backward_pass``): (d x or None, d weights,
    d biases) in the weights' dtype."""
    from pointavatar.model import _triton_gemm as tg

    dtype = hs[0].dtype
    n = x.shape[0]
    enc = encode(x, multires).to(dtype)
    net = _Net(weights, skip_in, enc.shape[1], dtype)
    last = net.last
    if kept_sweep:
        gs = [*kept_sweep[: last - 1], net.top_sweep(n)[0]]
        us = list(kept_sweep[last - 1 : 2 * last - 1])
        g_enc = kept_sweep[-1]
    else:
        gs, us, g_enc = _sweep(tg, net, hs, n, x.device)

    # 1. Up the sweep: d_g, the adjoint of layer l's input sweep vector; its product with W_l^T gives, in
    # one epilogue, the next layer's d_g (times the slope) and the sweep's share of dz_l.
    d_g_enc = encode_jvp(x, d_grad, multires).to(dtype)  # [N, E]
    d_w = [None] * (last + 1)
    dz_sweep = [None] * last
    d_g = _pad_cols(d_g_enc, net.enc_pad)  # layer 0's input: the encoding's adjoint
    for l in range(last + 1):
        if l == last:
            d_w_row0 = d_g.float().sum(0) * net.scale[l]
            break
        if need_w[l]:
            d_in = d_g[:, : net.n_enc] if l == 0 else d_g
            d_w[l] = (us[l].float().T @ d_in.float()) * net.scale[l]
        out_l = weights[l].shape[0]
        if (l + 1) in skip_in:
            buf = net.skip_buffer(n, d_g_enc, out_l, x.device)
            _, dz_sweep[l] = tg.tma_linear(
                d_g, net.w[l], epilogue="adjoint", p=hs[l], q=gs[l], out=buf[:, :out_l],
                out2=_empty_aligned(n, out_l, dtype, x.device),
            )  # fmt: skip
            d_g = buf
        else:
            d_g, dz_sweep[l] = tg.tma_linear(d_g, net.w[l], epilogue="adjoint", p=hs[l], q=gs[l])

    # 2. Down the forward chain: dz_l, its weight and bias gradients, and dz_{l-1} = (dz_l @ W_l) * s +
    # dz_sweep[l-1] in one epilogue.
    d_b = [None] * (last + 1)
    d_enc = None
    dz = d_out
    for l in range(last, -1, -1):
        a = enc if l == 0 else _layer_input(hs, l, skip_in)
        if need_w[l]:
            d_w[l] = total_weight_grad((dz.float().T @ a.float()) * net.scale[l], d_w[l], l == last, d_w_row0)
        if need_b[l]:
            d_b[l] = dz.sum(0, dtype=torch.float32)
        # The product's operand: the output layer's d_out padded (supported() makes that layer not layer 0).
        dz_op = _as_operand(dz, dtype) if l == last else dz
        if l == 0:
            if need_x:
                part = tg.tma_linear(dz_op, net.wt_enc[0])[:, : net.n_enc].float()
                d_enc = part if d_enc is None else d_enc + part
            break
        if l in skip_in:
            part = tg.tma_linear(dz_op, net.wt_enc[l])[:, : net.n_enc].float()
            d_enc = part if d_enc is None else d_enc + part
        dz = tg.tma_linear(
            dz_op, net.wt_h[l], epilogue="slope_add", p=hs[l - 1], q=dz_sweep[l - 1],
            out=_empty_aligned(n, net.h_width(l), dtype, x.device),
        )  # fmt: skip
    d_x = None
    if need_x:
        d_x = encode_vjp(x, d_enc.to(x.dtype), multires) + encode_vjp_dx(
            x, g_enc.to(x.dtype), d_grad, multires
        )
    d_w = [None if w is None else w.to(weights[i].dtype) for i, w in enumerate(d_w)]
    d_b = [None if b is None else b.to(weights[i].dtype) for i, b in enumerate(d_b)]
    return d_x, d_w, d_b


def _layer_input(hs, l, skip_in):
    """Layer l's input as the forward wrote it (l >= 1): h_l, or at a skip layer the whole buffer whose first
    columns are h_l (unscaled: the 1 / sqrt 2 is on the weight)."""
    h = hs[l - 1]
    if l not in skip_in:
        return h
    return h.as_strided((h.shape[0], h.stride(0)), (h.stride(0), 1))


def _as_operand(dz: torch.Tensor, dtype) -> torch.Tensor:
    """The output layer's dz (d_out [N, 4]) in the compute dtype with its columns zero-padded to a multiple
    of 8, as that layer's transposed weight's columns are."""
    return _pad_cols(dz.to(dtype), _round_up(dz.shape[1]))
