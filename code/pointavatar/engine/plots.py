"""Grid images and per-frame PNGs written during train-time plots and test (spec §2.2, §2.10).

Images from the model are [B, P, 3] in [0, 1] with P = H*W pixels in row-major order from the top row
(see the dataset contract); `lin2img` turns them into [B, 3, H, W].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import imageio.v3 as iio
import numpy as np
import torch
from torch.utils.data import DataLoader

from ..model import PointAvatarOutputs
from .batching import move_to

LANDMARK_COLOR = (1.0, 0.0, 0.0)  # red (spec §2.10)


def lin2img(images: torch.Tensor, img_res: int | Sequence[int]) -> torch.Tensor:
    """[B, P, C] pixel lists -> [B, C, H, W] images (img_res: int for square, or (H, W))."""
    h, w = (img_res, img_res) if isinstance(img_res, int) else (int(img_res[0]), int(img_res[1]))
    b, p, c = images.shape
    if p != h * w:
        raise ValueError(f"lin2img: {p} pixels per image do not make a {h}x{w} image")
    return images.permute(0, 2, 1).reshape(b, c, h, w)


def to_uint8(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float image in [0, 1] -> uint8, clipped, truncating like the original (`(x * 255).astype(uint8)`)."""
    if torch.is_tensor(img):
        img = img.detach().cpu().float().numpy()
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def save_png(path: str | Path, img: np.ndarray | torch.Tensor) -> Path:
    """Write an image as PNG, creating folders. img: uint8 [H, W, 3] / [H, W], or float [H, W, 3] in [0, 1]
    (converted with `to_uint8`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = img if isinstance(img, np.ndarray) and img.dtype == np.uint8 else to_uint8(img)
    iio.imwrite(path, arr)
    return path


def erode_dilate(img: np.ndarray) -> np.ndarray:
    """Grey-level morphological opening: 3x3 erosion then 3x3 dilation, one iteration each, per channel.

    img: uint8 [H, W, 3]. Opening removes bright structures smaller than 3x3 (e.g. one white pixel on
    black) and keeps dark ones; on a white background this fills the thin white gaps (which are
    "bright") seen through the splats inside the head, while the head's dark regions survive (spec
    §2.10). Border pixels use OpenCV's default border handling for morphology (neutral value).
    """
    kernel = np.ones((3, 3), np.uint8)
    out = cv2.erode(img, kernel, iterations=1)
    return cv2.dilate(out, kernel, iterations=1)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """Tile [M, C, H, W] images into one [C, H', W'] image, like torchvision.utils.make_grid.

    `nrow` images per row (so min(nrow, M) columns and ceil(M / ncol) rows), `padding` pixels of
    `pad_value` between the tiles and around the border. A single-channel batch is repeated to 3
    channels, as torchvision does.
    """
    if images.dim() == 3:
        images = images[None]
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    m, c, h, w = images.shape
    ncol = min(nrow, m)
    nrows = math.ceil(m / ncol)
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((c, cell_h * nrows + padding, cell_w * ncol + padding), pad_value)
    for k in range(m):
        r, col = divmod(k, ncol)
        y, x = r * cell_h + padding, col * cell_w + padding
        grid[:, y : y + h, x : x + w] = images[k]
    return grid


def _with_landmarks(rgb: torch.Tensor, landmarks: torch.Tensor | None) -> torch.Tensor:
    """Blend red over rgb [B, P, 3] with the rendered landmark alpha [B, P, 1 or 3] (spec §2.10)."""
    if landmarks is None:
        return rgb
    alpha = landmarks.reshape(rgb.shape[0], rgb.shape[1], -1).to(rgb)
    red = rgb.new_tensor(LANDMARK_COLOR)
    return rgb * (1 - alpha) + alpha * red


def grid_rows(outputs: PointAvatarOutputs, ground_truth: dict | None) -> torch.Tensor:
    """The images of the grid, row-major: [R*B, 3, H, W] with rows (spec §2.10)
    1. predicted RGB with the red landmarks, 2. GT RGB with the landmarks (if ground_truth has 'rgb'),
    3. normal image, 4. shading image, 5. albedo image (rows 3-5 from an eval-mode forward only).

    Reads rgb_image [B, P, 3] and, from ``outputs.eval``, rendered_landmarks (landmark alpha) and the
    normal / shading / albedo images [B, P, 3], already in [0, 1] (the model encodes normals as
    (n + 1) / 2 over white).
    """
    b = outputs.batch_size
    rgb = outputs.rgb_image.reshape(b, -1, 3)
    ev = outputs.eval
    lmk = ev.rendered_landmarks if ev is not None else None
    rows = [_with_landmarks(rgb, lmk)]
    if ground_truth is not None and "rgb" in ground_truth:
        rows.append(_with_landmarks(ground_truth["rgb"].reshape(b, -1, 3).to(rgb), lmk))
    if ev is not None:
        for image in (ev.normal_image, ev.shading_image, ev.albedo_image):
            rows.append(image.reshape(b, -1, 3).to(rgb))
    return lin2img(torch.cat(rows, dim=0).detach(), outputs.img_res)


def plot_grid(
    outputs: PointAvatarOutputs,
    ground_truth: dict | None,
    eval_subdir: str | Path,
    epoch: int,
    first_img_name: int | str,
) -> Path:
    """Write the grid image eval/<sub_dir>/rendering/epoch_{E:04d}_{firstImgName}.png (spec §2.10).

    One row per image type (see `grid_rows`), one column per frame of the batch, 2-pixel black padding.
    eval_subdir is the `eval/<sub_dir>` folder. Values are clipped to [0, 1] before the uint8
    conversion (the original did not clip, so out-of-range values wrapped around). Returns the path.
    """
    images = grid_rows(outputs, ground_truth)
    grid = make_grid(images, nrow=outputs.batch_size).permute(1, 2, 0)
    path = Path(eval_subdir) / "rendering" / f"epoch_{int(epoch):04d}_{first_img_name}.png"
    return save_png(path, to_uint8(grid))


def write_frame_outputs(
    outputs: PointAvatarOutputs,
    img_names: Sequence[int | str] | torch.Tensor,
    eval_subdir: str | Path,
    epoch: int,
) -> Path:
    """Per-frame test outputs in eval/<sub_dir>/epoch_<E>/ (spec §2.2, §2.10):
    rgb/<img>.png (prediction clipped to [0, 1]), rgb_erode_dilate/<img>.png (its opening, on which the
    metrics are computed) and normal/<img>.png (no opening; eval-mode outputs only).

    outputs: B frames (rgb_image and eval.normal_image [B, P, 3] in [0, 1]); img_names: their B frame
    numbers (ints, or a [B] / [B, 1] tensor), written unpadded. Returns the epoch folder (the metrics'
    output_dir).
    """
    epoch_dir = Path(eval_subdir) / f"epoch_{int(epoch)}"
    if torch.is_tensor(img_names):
        img_names = [int(v) for v in img_names.reshape(-1).tolist()]
    res = outputs.img_res
    rgb = lin2img(outputs.rgb_image.reshape(len(img_names), -1, 3).detach(), res)
    normal = None
    if outputs.eval is not None:
        normal = lin2img(outputs.eval.normal_image.reshape(len(img_names), -1, 3).detach(), res)
    for i, name in enumerate(img_names):
        rgb_u8 = to_uint8(rgb[i].permute(1, 2, 0))
        save_png(epoch_dir / "rgb" / f"{name}.png", rgb_u8)
        save_png(epoch_dir / "rgb_erode_dilate" / f"{name}.png", erode_dilate(rgb_u8))
        if normal is not None:
            save_png(epoch_dir / "normal" / f"{name}.png", to_uint8(normal[i].permute(1, 2, 0)))
    return epoch_dir


def render_grids(model, dataset, eval_dir: Path, epoch: int, batch_size: int, device) -> int:
    """Render ``dataset`` and write one grid image per batch (spec §2.10). Returns the number of frames.

    The normal, shading and albedo rows appear when ``model`` is in eval mode (the caller's choice).
    """
    loader = DataLoader(
        dataset, batch_size=min(2 * batch_size, 10), shuffle=False, collate_fn=dataset.collate_fn
    )
    count = 0
    for _, model_input, ground_truth in loader:
        outputs = model(move_to(model_input, device))
        first = int(model_input["img_name"][0, 0])
        plot_grid(outputs, ground_truth, Path(eval_dir) / model_input["sub_dir"][0], epoch, first)
        count += model_input["idx"].shape[0]
    return count
