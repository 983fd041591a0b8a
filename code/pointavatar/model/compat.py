"""Loading the original PointAvatar checkpoints (spec §10.19, Appendix A).

The original wraps layers with ``nn.utils.weight_norm``, stored as ``<layer>.weight_g`` [out, 1] and
``<layer>.weight_v`` [out, in]. We use ``nn.utils.parametrizations.weight_norm``, stored as
``<layer>.parametrizations.weight.original0`` / ``original1`` with the same shapes and meaning
(g = magnitude per output row, v = direction). Every other key (FLAME buffers twice, heads,
``pc.points``, ``background``) is named identically.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

_ORIGINAL_TO_OURS = {
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}


def _rename(sd: Mapping[str, torch.Tensor], table: Mapping[str, str]) -> OrderedDict[str, torch.Tensor]:
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in sd.items():
        new_key = key
        for old, new in table.items():
            if key.endswith(old):
                new_key = key[: -len(old)] + new
                break
        if new_key in out:
            raise ValueError(f"state dict has both the original and the converted form of '{new_key}'")
        out[new_key] = value
    return out


def convert_original_state_dict(sd: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Original-layout ``model_state_dict`` -> ours (``weight_g/weight_v`` -> parametrization keys).

    Keys already in our layout pass through unchanged, so converting twice is harmless. Order and
    tensors are kept (no copies).
    """
    return _rename(sd, _ORIGINAL_TO_OURS)


def to_original_state_dict(sd: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Our state dict -> the original's key layout (inverse of :func:`convert_original_state_dict`)."""
    return _rename(sd, {v: k for k, v in _ORIGINAL_TO_OURS.items()})


def is_original_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True if any key uses the original ``weight_g`` / ``weight_v`` names."""
    return any(k.endswith(old) for k in sd for old in _ORIGINAL_TO_OURS)
