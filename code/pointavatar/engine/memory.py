"""What autograd keeps for the backward: a measurement that runs on any device (tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def kept_bytes(fn: Callable[..., Any], *args: Any, exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """(bytes of the distinct storages autograd packs for the backward while ``fn(*args)`` runs, its
    result). Storages of ``exclude`` (e.g. the parameters, kept anyway) are not counted; a storage
    packed twice counts once. On the CPU with torch.compile this matches what the same pieces keep on
    a GPU (benchmarks/kept_memory.py)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args)
    return sum(storages.values()), result
