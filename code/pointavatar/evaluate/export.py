"""Point-cloud PLY files and MP4 videos written by the test runner (spec §2.10, DESIGN "Beyond").

PLY: binary little-endian, vertices with float xyz, float nx/ny/nz (when given) and uchar RGBA colours,
and an empty face element, as trimesh writes it (the original used trimesh too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pointavatar.errors import PointAvatarError

# ColorBrewer "Paired" (12 classes), the public palette behind matplotlib's 'Paired' colormap, as RGB
# in [0, 1]. Hard-coded so that matplotlib is not a dependency.
PAIRED_COLORS = (
    np.array(
        [
            [166, 206, 227],
            [31, 120, 180],
            [178, 223, 138],
            [51, 160, 44],
            [251, 154, 153],
            [227, 26, 28],
            [253, 191, 111],
            [255, 127, 0],
            [202, 178, 214],
            [106, 61, 154],
            [255, 255, 153],
            [177, 89, 40],
        ],
        dtype=np.float64,
    )
    / 255.0
)


def _np(x: np.ndarray | torch.Tensor | None) -> np.ndarray | None:
    if x is None:
        return None
    if torch.is_tensor(x):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def skinning_weight_colors(lbs_weights: np.ndarray | torch.Tensor) -> np.ndarray:
    """Colour each vertex by its skinning weights [V, J] -> RGB [V, 3] in [0, 1] (canonical_verts.ply).

    As the original: the weighted sum of one colour per joint. FLAME joints (root, neck, jaw, left eye,
    right eye) get Paired colours 3 (dark green), 1 (dark blue), then white, white, white; with the
    ghost bone first (J = 6) it gets Paired colour 5 (red) and the FLAME joints follow as above.
    """
    w = _np(lbs_weights)
    white = np.ones(3)
    if w.shape[1] == 5:
        table = np.stack([PAIRED_COLORS[3], PAIRED_COLORS[1], white, white, white])
    elif w.shape[1] == 6:
        table = np.stack([PAIRED_COLORS[5], PAIRED_COLORS[3], PAIRED_COLORS[1], white, white, white])
    else:
        raise ValueError(f"skinning weights must have 5 or 6 columns, got {w.shape[1]}")
    return w @ table


def save_ply(
    path: str | Path,
    points: np.ndarray | torch.Tensor,
    colors: np.ndarray | torch.Tensor | None = None,
    normals: np.ndarray | torch.Tensor | None = None,
) -> Path:
    """Write a point cloud as PLY with trimesh.

    points [N, 3] float; colors [N, 3] (or [N, 4]) in [0, 1], clipped and stored as uint8 RGBA
    (alpha 255); normals [N, 3] stored as nx, ny, nz. Creates the parent folder. Returns the path.
    """
    import trimesh
    from trimesh.exchange.ply import export_ply

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = _np(points).reshape(-1, 3)
    cols = None
    if colors is not None:
        c = _np(colors).reshape(pts.shape[0], -1)[:, :3]
        cols = np.round(np.clip(c, 0.0, 1.0) * 255).astype(np.uint8)
    nrm = None if normals is None else _np(normals).reshape(-1, 3)
    mesh = trimesh.Trimesh(vertices=pts, vertex_normals=nrm, vertex_colors=cols, process=False)
    # trimesh writes normals of a face-less mesh only when asked explicitly.
    path.write_bytes(export_ply(mesh, vertex_normal=nrm is not None))
    return path


def side_by_side(pred: np.ndarray, gt: np.ndarray | None) -> np.ndarray:
    """[H, W, 3] uint8 prediction | GT frame ([H, 2W, 3]); the prediction alone when gt is None."""
    if gt is None:
        return pred
    if gt.shape != pred.shape:
        raise ValueError(f"side_by_side: prediction {pred.shape} and GT {gt.shape} differ in shape")
    return np.concatenate([pred, gt], axis=1)


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int = 25) -> Path:
    """Write uint8 [H, W, 3] frames as an H.264 MP4 (yuv420p) with imageio's ffmpeg backend.

    Odd frame sizes are padded by one white row/column (yuv420p needs even sizes) instead of letting
    ffmpeg rescale them. Raises PointAvatarError when no ffmpeg backend is available.
    """
    import imageio.v2 as imageio

    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise PointAvatarError(
            f"Cannot write {path}: no ffmpeg backend for imageio ({exc}). Install it with "
            "`pip install imageio-ffmpeg` (it ships an ffmpeg binary)."
        ) from exc
    if len(frames) == 0:
        raise ValueError(f"write_video: no frames for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    ph, pw = h % 2, w % 2
    with imageio.get_writer(
        path, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1
    ) as writer:
        for f in frames:
            f = np.asarray(f)
            if f.shape[:2] != (h, w):
                raise ValueError(
                    f"write_video: frame of shape {f.shape} differs from the first {frames[0].shape}"
                )
            if ph or pw:
                f = np.pad(f, ((0, ph), (0, pw), (0, 0)), constant_values=255)
            writer.append_data(f.astype(np.uint8))
    return path
