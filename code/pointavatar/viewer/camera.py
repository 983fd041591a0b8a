"""The browser's orbit camera <-> the avatar's cameras (spec §3.5), and the part of a render on screen.

Two conventions meet here, in one world frame (the avatar's: FLAME's frame scaled by 4, y up, the face
looking along +z):

- The viewer camera (`ViewCamera`, viser's): an OpenCV camera-to-world pose, ``P_world = R p_cam + t``
  with R given as the unit quaternion ``wxyz`` and t as ``position``; camera axes x right, y down,
  z forward. ``fov`` is the canvas's vertical field of view (radians), ``aspect`` its width / height.
- The avatar camera (`BakedAvatar.render`): pytorch3d's row-vector extrinsics ``cam_pose = [R' | T]``,
  ``X_view = X_world @ R' + T`` with view axes x left, y up, z forward, and the NDC intrinsics K
  (4 x 4) of the dataset; NDC x is +1 at the image's left edge, y +1 at its top.

So ``R' = R F`` and ``T = -F R^T t`` with F = diag(-1, -1, 1) (x and y flipped, z shared).

The viewer looks through the sequence's lens: its K (anisotropic focal lengths and principal point
kept), with the focal lengths scaled so that the browser's field of view is seen. The rasterizer draws
square images (img_res S), so the square is made to span the canvas's wider side and the rows (or
columns) outside the canvas are cropped: the crop, stretched to the canvas, shows the scene at the
canvas's own aspect. For a square canvas with the sequence's field of view, ``avatar_camera`` gives back
the frame's K and cam_pose exactly (up to float rounding), so the viewer's first image is the frame's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PointAvatarError

__all__ = [
    "AvatarCamera",
    "ViewCamera",
    "avatar_camera",
    "crop_window",
    "lens_fov",
    "matrix_to_wxyz",
    "view_from_frame",
    "wxyz_to_matrix",
]

# OpenCV camera axes (x right, y down) -> pytorch3d view axes (x left, y up); z forward in both.
FLIP = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class ViewCamera:
    """A viewer (viser) camera: OpenCV camera-to-world pose and canvas shape, world frame of the avatar."""

    position: np.ndarray
    """[3] camera centre t (world units)."""
    wxyz: np.ndarray
    """[4] unit quaternion (w, x, y, z) of the camera-to-world rotation R (columns: the camera's x right,
    y down, z forward axes in world coordinates)."""
    fov: float
    """Vertical field of view of the canvas, radians."""
    aspect: float
    """Canvas width / height."""


@dataclass(frozen=True)
class AvatarCamera:
    """What `BakedAvatar.render` takes for a `ViewCamera`, and the part of its square image to show."""

    intrinsics: torch.Tensor
    """[4, 4] NDC intrinsics (float64), as the dataset's ``intrinsics``."""
    cam_pose: torch.Tensor
    """[3, 4] pytorch3d extrinsics [R' | T] (float64), as the dataset's ``cam_pose``."""
    rows: slice
    """Rows of the square render on the canvas."""
    cols: slice
    """Columns of the square render on the canvas."""


def wxyz_to_matrix(wxyz: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) -> [3, 3] rotation matrix (float64; the quaternion is normalised)."""
    w, x, y, z = np.asarray(wxyz, dtype=np.float64) / np.linalg.norm(wxyz)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_wxyz(rot: np.ndarray) -> np.ndarray:
    """[3, 3] rotation matrix -> unit quaternion (w, x, y, z) with w >= 0 (float64).

    Shepperd's method: the largest of the four squared components is taken by a square root and the
    others from off-diagonal sums, so no branch divides by a small number.
    """
    m = np.asarray(rot, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    squares = [trace, m[0, 0], m[1, 1], m[2, 2]]  # 4 q_i^2 - 1 up to constants, per component
    k = int(np.argmax(squares))
    if k == 0:
        s = 2.0 * math.sqrt(max(1.0 + trace, 0.0))
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif k == 1:
        s = 2.0 * math.sqrt(max(1.0 + m[0, 0] - m[1, 1] - m[2, 2], 0.0))
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif k == 2:
        s = 2.0 * math.sqrt(max(1.0 + m[1, 1] - m[0, 0] - m[2, 2], 0.0))
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(max(1.0 + m[2, 2] - m[0, 0] - m[1, 1], 0.0))
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


def lens_fov(lens: torch.Tensor) -> float:
    """The vertical field of view (radians) of the NDC intrinsics ``lens`` [4, 4] on a square image:
    2 atan(1 / K11)."""
    return 2.0 * math.atan(1.0 / float(lens[1, 1]))


def _check_lens(lens: torch.Tensor) -> None:
    if tuple(lens.shape) != (4, 4) or not float(lens[0, 0]) > 0 or not float(lens[1, 1]) > 0:
        raise PointAvatarError(
            f"viewer: the lens must be the dataset's NDC intrinsics [4, 4] with K00, K11 > 0, got {lens.tolist()}."
        )


def crop_window(aspect: float, size: int) -> tuple[slice, slice]:
    """The rows and columns of a square ``size`` render that a canvas of ``aspect`` (width / height) shows:
    all columns and the middle size / aspect rows for a wide canvas, all rows and the middle
    size * aspect columns for a tall one (at least one pixel, centred)."""
    if not aspect > 0 or not math.isfinite(aspect):
        raise PointAvatarError(f"viewer: the canvas aspect ratio must be positive, got {aspect}.")
    if aspect >= 1.0:
        rows = min(size, max(1, round(size / aspect)))
        top = (size - rows) // 2
        return slice(top, top + rows), slice(0, size)
    cols = min(size, max(1, round(size * aspect)))
    left = (size - cols) // 2
    return slice(0, size), slice(left, left + cols)


def avatar_camera(view: ViewCamera, lens: torch.Tensor, size: int) -> AvatarCamera:
    """The avatar camera (float64) seeing what ``view`` sees, through the sequence's ``lens`` [4, 4].

    The focal lengths of ``lens`` are scaled by tan(fov_lens / 2) / tan(fov / 2) (the browser's field
    of view, ``lens_fov`` for the lens) and by 1 / aspect for a wide canvas (the square spans the
    canvas's width); the principal point of the lens is kept (relative to the crop's centre).
    ``size``: the render's S, for the crop.
    """
    _check_lens(lens)
    if not 0 < view.fov < math.pi:
        raise PointAvatarError(f"viewer: the camera's field of view must be in (0, pi), got {view.fov}.")
    rot = wxyz_to_matrix(view.wxyz)
    position = np.asarray(view.position, dtype=np.float64)
    cam_pose = np.concatenate([rot @ FLIP, (-FLIP @ rot.T @ position)[:, None]], axis=1)  # [3, 4]
    scale = math.tan(lens_fov(lens) / 2.0) / math.tan(view.fov / 2.0) / max(view.aspect, 1.0)
    intrinsics = lens.detach().to(dtype=torch.float64, device="cpu").clone()
    intrinsics[0, 0] *= scale
    intrinsics[1, 1] *= scale
    rows, cols = crop_window(view.aspect, size)
    # An odd margin leaves the crop half a pixel off the square's centre: the principal point moves
    # with it (NDC of the crop's centre), so the crop's centre stays the canvas's.
    intrinsics[0, 2] += (size - cols.start - cols.stop) / size
    intrinsics[1, 2] += (size - rows.start - rows.stop) / size
    return AvatarCamera(intrinsics=intrinsics, cam_pose=torch.from_numpy(cam_pose), rows=rows, cols=cols)


def view_from_frame(
    lens: torch.Tensor, cam_pose: torch.Tensor, target: np.ndarray
) -> tuple[ViewCamera, np.ndarray, np.ndarray]:
    """A dataset frame's camera as a square viewer camera, with an orbit point and an up direction.

    Args:
        lens: [4, 4] the frame's NDC intrinsics; the camera's field of view is ``lens_fov(lens)``.
        cam_pose: [3, 4] the frame's converted extrinsics [R' | T] (R' a rotation).
        target: [3] a point to orbit around (e.g. the avatar's centre): it is moved along the optical
            axis to the point nearest to it, so that looking at it keeps the frame's orientation.

    Returns:
        (camera with aspect 1, look_at [3] on the optical axis, up [3] = the camera's -y axis): the
        three a viser camera is set from (`avatar_camera` of the camera gives back lens and cam_pose).
    """
    _check_lens(lens)
    pose = cam_pose.detach().to(dtype=torch.float64, device="cpu").numpy()
    rot = pose[:, :3] @ FLIP  # camera-to-world R, since FLIP is its own inverse
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-5) or np.linalg.det(rot) < 0:
        raise PointAvatarError("viewer: the frame's camera rotation is not a rotation matrix.")
    position = -rot @ FLIP @ pose[:, 3]
    forward, up = rot[:, 2], -rot[:, 1]
    depth = float((np.asarray(target, dtype=np.float64) - position) @ forward)
    look_at = position + max(depth, 1e-3) * forward
    camera = ViewCamera(position=position, wxyz=matrix_to_wxyz(rot), fov=lens_fov(lens), aspect=1.0)
    return camera, look_at, up
