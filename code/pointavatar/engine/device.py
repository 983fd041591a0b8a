"""Device choice: the --device flag as a torch.device, with a readable error for a wrong name."""

from __future__ import annotations

import torch

from ..errors import PointAvatarError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The --device flag as a torch.device: cpu, cuda or cuda:N (default: cuda when available).

    Raises a PointAvatarError naming the flag and the fix for a name torch does not know or a CUDA
    device this machine does not have.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise PointAvatarError(f"--device {name}: not a device; use cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise PointAvatarError(f"--device {name}: not supported; use cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only PyTorch build" if torch.version.cuda is None else "no visible GPU"
            raise PointAvatarError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}, {build}). Use "
                "--device cpu, or install a CUDA build of PyTorch (https://pytorch.org/get-started)."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PointAvatarError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}."
            )
    return device


def apply_matmul_precision(tf32: bool) -> None:
    """``model.tf32``: allow (or forbid) TF32 tensor-core matmuls and convolutions on CUDA for this
    process. fp32 storage and accumulation either way; no effect on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
