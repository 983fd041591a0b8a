"""One viewer image: the baked avatar drawn from a browser camera, cropped to the canvas."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PointAvatarError
from ..model.baked import BakedAvatar
from .camera import ViewCamera, avatar_camera

__all__ = ["VIEWS", "ViewImage", "ViewRenderer"]

VIEWS = {"rgb": "rgb", "normals": "normal", "albedo": "albedo", "shading": "shading"}
"""The view switch: label -> `BakedFrame` field (rgb renders the rgb channels only, the others all)."""


@dataclass(frozen=True)
class ViewImage:
    """A rendered view."""

    image: torch.Tensor
    """[h, w, 3] float in [0, 1] on the CPU, rows from the top: the canvas's part of the square render."""
    render_ms: float
    """Wall time of the baked render, including the copy to the CPU (which waits for a GPU)."""


class ViewRenderer:
    """Draws `BakedAvatar` images for viewer cameras through the sequence's lens (viewer/camera.py).

    Renders are serialised by a lock: the avatar's CUDA graphs and compiled code are not re-entrant,
    and on the CPU concurrent renders would only share the cores.
    """

    def __init__(self, baked: BakedAvatar, lens: torch.Tensor):
        self.baked = baked
        self.lens = lens.detach().to(dtype=torch.float64, device="cpu")
        self._lock = threading.Lock()

    def render(
        self, view: ViewCamera, expression: np.ndarray, flame_pose: np.ndarray, image: str = "rgb"
    ) -> ViewImage:
        """The ``image`` view ("rgb", "normals", "albedo" or "shading") of one frame (expression [1, E],
        flame_pose [1, 15]) seen by ``view``."""
        if image not in VIEWS:
            raise PointAvatarError(f"viewer: unknown view {image!r}; one of {', '.join(VIEWS)}.")
        camera = avatar_camera(view, self.lens, self.baked.img_res)
        with self._lock:
            start = time.perf_counter()
            frame = self.baked.render(
                torch.as_tensor(expression),
                torch.as_tensor(flame_pose),
                camera.intrinsics[None],
                camera.cam_pose[None],
                channels="rgb" if image == "rgb" else "all",
            )
            pixels = getattr(frame, VIEWS[image])[0, camera.rows, camera.cols].float().cpu()
            elapsed = time.perf_counter() - start
        return ViewImage(image=pixels, render_ms=1e3 * elapsed)
