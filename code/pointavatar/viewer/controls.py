"""The viewer's sliders and the frame inputs they set: FLAME expression [E] and flame_pose [15].

flame_pose is axis-angle (radians) per joint: root (global) 0:3, neck 3:6, jaw 6:9, left eye 9:12,
right eye 12:15 (FLAME's joints 0-4, flame/flame.py). Every slider sets one entry of one vector; the
root rotation has no slider (the orbit camera turns the view) and keeps the sequence frame's value.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Controls", "Slider", "slider_layout", "VISIBLE_EXPRESSIONS", "POSE_JOINTS"]

VISIBLE_EXPRESSIONS = 10
"""Expression sliders in view; the others are in a collapsed folder."""

EXPRESSION_RANGE = 3.0
"""Expression sliders span [-3, 3]: FLAME's coefficients are in units of standard deviations."""

# (folder, flame_pose offset, per-axis slider ranges (radians) for rotations about x, y, z).
POSE_JOINTS: tuple[tuple[str, int, tuple[tuple[float, float], ...]], ...] = (
    ("jaw", 6, ((-0.2, 0.6), (-0.3, 0.3), (-0.3, 0.3))),  # x opens the mouth
    ("neck", 3, ((-0.8, 0.8), (-0.8, 0.8), (-0.8, 0.8))),
    ("left eye", 9, ((-0.6, 0.6), (-0.6, 0.6), (-0.3, 0.3))),
    ("right eye", 12, ((-0.6, 0.6), (-0.6, 0.6), (-0.3, 0.3))),
)


@dataclass(frozen=True)
class Slider:
    """One slider: the entry ``index`` of ``target`` over [low, high]."""

    label: str
    folder: str
    target: Literal["expression", "flame_pose"]
    index: int
    low: float
    high: float


def slider_layout(n_exp: int) -> list[Slider]:
    """The viewer's sliders, in display order: expressions 1..n_exp (folder "expression" for the first
    `VISIBLE_EXPRESSIONS`, "more expressions" for the rest), then jaw, neck, left eye, right eye (x, y, z)."""
    sliders = [
        Slider(
            label=f"expr {i + 1}",
            folder="expression" if i < VISIBLE_EXPRESSIONS else "more expressions",
            target="expression",
            index=i,
            low=-EXPRESSION_RANGE,
            high=EXPRESSION_RANGE,
        )
        for i in range(n_exp)
    ]
    for folder, offset, ranges in POSE_JOINTS:
        for axis, (low, high) in zip("xyz", ranges, strict=True):
            sliders.append(
                Slider(f"{folder} {axis}", folder, "flame_pose", offset + "xyz".index(axis), low, high)
            )
    return sliders


class Controls:
    """The frame inputs the viewer renders, shared by its threads (a lock guards every access).

    ``expression`` [n_exp] and ``flame_pose`` [15] are kept exactly as set (a sequence frame's values
    may lie outside a slider's range; `slider_value` clamps only what the slider shows).
    """

    def __init__(self, n_exp: int):
        self.n_exp = int(n_exp)
        self.sliders = slider_layout(self.n_exp)
        self._expression = np.zeros(self.n_exp)
        self._flame_pose = np.zeros(15)
        self._lock = threading.Lock()

    def set_frame(self, expression: np.ndarray, flame_pose: np.ndarray) -> None:
        """Set both vectors (a sequence frame): expression [>= 0] (cut or zero-padded to n_exp), pose [15]."""
        expression = np.asarray(expression, dtype=np.float64).reshape(-1)[: self.n_exp]
        with self._lock:
            self._expression[:] = 0.0
            self._expression[: expression.shape[0]] = expression
            self._flame_pose[:] = np.asarray(flame_pose, dtype=np.float64).reshape(15)

    def neutral(self) -> None:
        """All expressions and poses zero (FLAME's mean face, mouth closed, looking ahead)."""
        self.set_frame(np.zeros(self.n_exp), np.zeros(15))

    def set_slider(self, slider: Slider, value: float) -> None:
        """The slider's entry = value."""
        with self._lock:
            vector = self._expression if slider.target == "expression" else self._flame_pose
            vector[slider.index] = float(value)

    def slider_value(self, slider: Slider) -> float:
        """The slider's entry, clamped to its range (what the slider shows)."""
        with self._lock:
            vector = self._expression if slider.target == "expression" else self._flame_pose
            return float(np.clip(vector[slider.index], slider.low, slider.high))

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (expression [1, n_exp], flame_pose [1, 15]): one frame of `BakedAvatar.render`."""
        with self._lock:
            return self._expression[None].copy(), self._flame_pose[None].copy()
