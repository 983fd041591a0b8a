"""NeRF-style positional encoding (spec §5.2)."""

from __future__ import annotations

import torch
from torch import nn


class PositionalEncoding(nn.Module):
    """[x, sin(2^0 x), cos(2^0 x), ..., sin(2^(L-1) x), cos(2^(L-1) x)] along the last axis.

    Each block has the width of x (sin of all coordinates, then cos of all coordinates); there is no
    pi factor, as in the original. With ``multires = 0`` the encoding is the identity.
    The module has no parameters or buffers, so it adds nothing to a state dict.
    """

    def __init__(self, multires: int, d_in: int = 3):
        super().__init__()
        if multires < 0:
            raise ValueError(f"multires must be >= 0, got {multires}")
        self.multires = int(multires)
        self.d_in = int(d_in)
        self.out_dim = self.d_in * (1 + 2 * self.multires)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> [..., d_in * (1 + 2 L)]."""
        return encode(x, self.multires)

    def vjp(self, x: torch.Tensor, grad_enc: torch.Tensor) -> torch.Tensor:
        """Vector-Jacobian product: grad_enc [..., out_dim] (d s / d enc(x)) -> d s / dx [..., d_in].

        Built from ordinary differentiable ops (d sin(a x)/dx = a cos(a x), d cos(a x)/dx =
        -a sin(a x)), so the result can itself be differentiated with first-order autograd.
        """
        return encode_vjp(x, grad_enc, self.multires)


def encode(x: torch.Tensor, multires: int) -> torch.Tensor:
    """The encoding of x [..., d] with ``multires`` frequencies (``PositionalEncoding.forward``)."""
    if multires == 0:
        return x
    parts = [x]
    for i in range(multires):
        freq = float(2.0**i)
        parts.append(torch.sin(freq * x))
        parts.append(torch.cos(freq * x))
    return torch.cat(parts, dim=-1)


def encode_vjp(x: torch.Tensor, grad_enc: torch.Tensor, multires: int) -> torch.Tensor:
    """``PositionalEncoding.vjp``: grad_enc [..., d (1 + 2 multires)] -> [..., d]."""
    d = x.shape[-1]
    grad_x = grad_enc[..., :d]
    for i in range(multires):
        freq = float(2.0**i)
        g_sin = grad_enc[..., d * (1 + 2 * i) : d * (2 + 2 * i)]
        g_cos = grad_enc[..., d * (2 + 2 * i) : d * (3 + 2 * i)]
        fx = freq * x
        grad_x = grad_x + freq * (g_sin * torch.cos(fx) - g_cos * torch.sin(fx))
    return grad_x


def encode_jvp(x: torch.Tensor, t: torch.Tensor, multires: int) -> torch.Tensor:
    """d enc(x) [t]: t [N, d] -> [N, d (1 + 2 multires)]; the adjoint of g_enc -> encode_vjp(x, g_enc)."""
    parts = [t]
    for i in range(multires):
        freq = float(2.0**i)
        fx = freq * x
        parts.append(freq * torch.cos(fx) * t)
        parts.append(-freq * torch.sin(fx) * t)
    return torch.cat(parts, dim=-1)


def encode_vjp_dx(x: torch.Tensor, g_enc: torch.Tensor, t: torch.Tensor, multires: int) -> torch.Tensor:
    """d <t, encode_vjp(x, g_enc)> / dx with g_enc held fixed: [N, d] (the vjp's own x dependence)."""
    d = x.shape[-1]
    out = torch.zeros_like(x)
    for i in range(multires):
        freq = float(2.0**i)
        g_sin = g_enc[..., d * (1 + 2 * i) : d * (2 + 2 * i)]
        g_cos = g_enc[..., d * (2 + 2 * i) : d * (3 + 2 * i)]
        fx = freq * x
        out = out - (freq * freq) * (g_sin * torch.sin(fx) + g_cos * torch.cos(fx))
    return out * t


def get_embedder(multires: int, d_in: int = 3) -> tuple[PositionalEncoding, int]:
    """(encoder, output width); the original's helper name."""
    enc = PositionalEncoding(multires, d_in)
    return enc, enc.out_dim
