"""Checkpoint families, names and contents of the original (spec §2.3), written atomically.

Layout under ``<train_dir>/checkpoints/``::

    ModelParameters/      {"epoch", "radius", "model_state_dict"}        latest.pth, 5.pth, 10.pth, ...
    OptimizerParameters/  {"epoch", "optimizer_state_dict"}
    SchedulerParameters/  {"epoch", "scheduler_state_dict"}
    OptimizerInputs/      {"epoch", "optimizer_cam_state_dict"}          (input optimisation only)
    InputParameters/      {"epoch", "expression_state_dict", "flame_pose_state_dict",
                           "camera_pose_state_dict"}                    (input optimisation only)
    TestInputParameters/  same layout as InputParameters, written by the test runner

Every file is written to a temporary name in the same folder and renamed over the target, so a run
killed while saving never leaves a truncated ``latest.pth`` behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import PointAvatarError

MODEL = "ModelParameters"
OPTIMIZER = "OptimizerParameters"
SCHEDULER = "SchedulerParameters"
OPTIMIZER_INPUTS = "OptimizerInputs"
INPUTS = "InputParameters"
TEST_INPUTS = "TestInputParameters"
FAMILIES = (MODEL, OPTIMIZER, SCHEDULER, OPTIMIZER_INPUTS, INPUTS, TEST_INPUTS)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_file(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict on the CPU, with a readable error for a missing or broken file."""
    path = Path(path)
    if not path.is_file():
        raise PointAvatarError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise PointAvatarError(
            f"cannot read checkpoint {path}: {exc}. Delete it or pick another --checkpoint."
        ) from exc


def inputs_state(expression, flame_pose, camera_pose) -> dict:
    """The state-dict layout of (Test)InputParameters for three embeddings (any may be None)."""

    def sd(emb):
        return None if emb is None else {"weight": emb.weight.detach().cpu().clone()}

    return {
        "expression_state_dict": sd(expression),
        "flame_pose_state_dict": sd(flame_pose),
        "camera_pose_state_dict": sd(camera_pose),
    }


class Checkpoints:
    """Reads and writes the checkpoint families of one ``train`` directory."""

    def __init__(self, train_dir: str | os.PathLike):
        self.root = Path(train_dir) / "checkpoints"

    def path(self, family: str, name: str | int) -> Path:
        return self.root / family / f"{name}.pth"

    def exists(self, family: str, name: str | int) -> bool:
        return self.path(family, name).is_file()

    def save(self, family: str, payload: dict, epoch: int, numbered: bool) -> None:
        """Write ``latest.pth`` and, when ``numbered``, ``<epoch>.pth`` of one family."""
        payload = {"epoch": epoch, **payload}
        if numbered:
            atomic_save(payload, self.path(family, epoch))
        atomic_save(payload, self.path(family, "latest"))

    def load(self, family: str, name: str | int) -> dict:
        return load_file(self.path(family, name))

    def available(self) -> list[str]:
        """Names of the model checkpoints present, for error messages."""
        folder = self.root / MODEL
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.pth"))
