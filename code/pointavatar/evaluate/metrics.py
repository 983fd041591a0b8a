"""Image metrics of the paper's evaluation protocol (spec §8).

`compute_metrics` scores one predicted frame against its GT; `evaluate_folder` runs the protocol over a
test run's `epoch_<E>` folder and writes `results_[no_cloth_]<pred_file_name>.{npz,csv}`.

Faithful to the original: SSIM uses an 11x11 Gaussian window (sigma 1.5) WITHOUT padding ("valid"), the
data range is inferred from the prediction, PSNR = 20 log10(max/(rmse + 1e-8)), and in the masked
(no_cloth) variant errors are multiplied by the mask but divided by the FULL pixel count H*W*3.

Departure (named in the docs): the original's per-frame `l1_l` was in fact the MSE (it asked for an
error type 'l1' that its code did not handle). Our `l1_l` is the true L1, i.e. the MAE, which is the
paper's "L1" column; `mse_l` still holds the MSE.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import cv2
import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pointavatar.errors import PointAvatarError
from pointavatar.evaluate.lpips import load_lpips_alex, missing_lpips_message

RESULT_KEYS = (
    "subfolders",
    "filenames",
    "mse_l",
    "rmse_l",
    "mae_l",
    "perceptual_l",
    "ssim_l",
    "psnr_l",
    "l1_l",
)
CLOTH_LABELS = (15, 16)  # face-parsing labels of neck/cloth removed in the no_cloth variant (spec §3.8)


# -- per-frame metrics -------------------------------------------------------------------------------


def _data_range_max(img: torch.Tensor) -> float:
    # The original infers the image scale from the prediction: 255 if any value exceeds 128, else 1.
    return 255.0 if float(img.max()) > 128 else 1.0


def gaussian_window(
    window_size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None
) -> torch.Tensor:
    """Normalised 2-D Gaussian [window_size, window_size], centred on index window_size // 2."""
    x = torch.arange(window_size, dtype=torch.float64) - window_size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype=dtype, device=device)


def ssim(pred: torch.Tensor, gt: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image, [B] from pred, gt [B, C, H, W].

    Gaussian window, per channel, "valid" convolution (no padding, so the map is (H-10)x(W-10) for the
    11x11 window); C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = max - min inferred from `pred` (1 for [0, 1]
    images, 255 if pred > 128 somewhere, 2 if pred < -0.5 somewhere).
    """
    max_val = _data_range_max(pred)
    min_val = -1.0 if float(pred.min()) < -0.5 else 0.0
    data_range = max_val - min_val
    c = pred.shape[1]
    window = gaussian_window(window_size, sigma, pred.dtype, pred.device).expand(
        c, 1, window_size, window_size
    )

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, padding=0, groups=c)

    mu1, mu2 = filt(pred), filt(gt)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = filt(pred * pred) - mu1_sq
    sigma2_sq = filt(gt * gt) - mu2_sq
    sigma12 = filt(pred * gt) - mu1_mu2
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2)
    )
    return ssim_map.flatten(1).mean(dim=1)


def compute_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    mask: torch.Tensor | None = None,
    lpips: nn.Module | None = None,
) -> dict[str, float]:
    """Metrics of one frame (spec §8 step 4-5).

    pred, gt: [1, 3, H, W] in [0, 1] (gt already composited over white).
    mask: None for the plain variant; otherwise [1, 1, H, W] (or [1, C, H, W], channel 0 is used, or
        [H, W]) soft mask in [0, 1] for the masked variant: squared/absolute errors are multiplied by
        the mask and divided by the full count H*W*3; SSIM uses copies with the pixels where mask == 0
        set to 0; LPIPS compares pred*mask with gt*mask (black outside); PSNR uses the masked RMSE.
    lpips: an LPIPS module `(x, y, normalize=True) -> [B, 1, 1, 1]`, or None (lpips = NaN).
    Returns python floats: mse, rmse, mae, psnr, ssim, lpips.
    """
    if pred.dim() != 4 or pred.shape != gt.shape:
        raise ValueError(
            f"pred and gt must both be [1, 3, H, W]; got {tuple(pred.shape)} and {tuple(gt.shape)}"
        )
    diff = pred - gt
    if mask is not None:
        m = mask.to(pred)
        if m.dim() == 2:
            m = m[None, None]
        m = m[:, :1]  # [1, 1, H, W]
        count = diff[0].numel()  # H*W*3: the original normalises by the full image, not the mask area
        mse = float((m * diff * diff).sum() / count)
        mae = float((m * diff.abs()).sum() / count)
        keep = m.bool().expand_as(pred)
        pred_s = torch.where(keep, pred, torch.zeros_like(pred))
        gt_s = torch.where(keep, gt, torch.zeros_like(gt))
        pred_p, gt_p = pred * m, gt * m
    else:
        mse = float((diff * diff).mean())
        mae = float(diff.abs().mean())
        pred_s, gt_s, pred_p, gt_p = pred, gt, pred, gt
    rmse = math.sqrt(mse)
    psnr = 20 * math.log10(_data_range_max(pred_s) / (rmse + 1e-8))
    ssim_value = float(ssim(pred_s, gt_s)[0])
    lpips_value = float("nan")
    if lpips is not None:
        with torch.no_grad():
            dev = next(iter(lpips.parameters()), pred).device
            lpips_value = float(
                lpips(pred_p.float().to(dev), gt_p.float().to(dev), normalize=True).reshape(-1)[0]
            )
    return {"mse": mse, "rmse": rmse, "mae": mae, "psnr": psnr, "ssim": ssim_value, "lpips": lpips_value}


# -- folder evaluation ---------------------------------------------------------------------------------


def _read_image(path: Path, res: int, what: str) -> np.ndarray:
    """Image as float32 [res, res, C] in [0, 1] (resized bilinearly if needed, at most 3 channels)."""
    if not path.is_file():
        raise PointAvatarError(f"Metrics: {what} file {path} does not exist")
    img = np.asarray(iio.imread(path)).astype(np.float32)
    if img.shape[:2] != (res, res):
        img = cv2.resize(img, (res, res))  # INTER_LINEAR, as the original
    img = img / 255.0
    if img.ndim == 3:
        img = img[:, :, :3]
    return img


def _read_semantic(path: Path, res: int) -> np.ndarray:
    """Label map [res, res] (float labels). Single-channel or grey-replicated RGB PNG."""
    if not path.is_file():
        raise PointAvatarError(
            f"Metrics (no_cloth): semantic map {path} does not exist; the no_cloth metrics need "
            "<gt_dir>/semantic/<frame>.png"
        )
    sem = np.asarray(iio.imread(path)).astype(np.float32)
    if sem.ndim == 3:
        sem = sem[:, :, 0]
    if sem.shape != (res, res):
        # Nearest neighbour keeps labels intact (the original used bilinear, a no-op at its 512x512).
        sem = cv2.resize(sem, (res, res), interpolation=cv2.INTER_NEAREST)
    return sem


def _frame_numbers(pred_dir: Path) -> list[int]:
    if not pred_dir.is_dir():
        raise PointAvatarError(f"Metrics: prediction folder {pred_dir} does not exist (run the test first)")
    numbers = []
    for f in sorted(os.listdir(pred_dir)):
        if not f.endswith(".png"):
            continue
        try:
            numbers.append(int(f[:-4]))
        except ValueError as exc:
            raise PointAvatarError(
                f"Metrics: prediction file {pred_dir / f} is not named <frame number>.png"
            ) from exc
    if not numbers:
        raise PointAvatarError(f"Metrics: no <n>.png prediction images in {pred_dir}")
    return sorted(numbers)


def _json_frame_names(gt_dir: Path) -> set[str]:
    path = gt_dir / "flame_params.json"
    if not path.is_file():
        raise PointAvatarError(
            f"Metrics: {path} does not exist; gt_dir must be a test sub_dir of the dataset"
        )
    with open(path) as f:
        frames = json.load(f).get("frames", [])
    return {os.path.basename(str(fr.get("file_path", ""))) for fr in frames}


def _write_csv(path: Path, result: dict) -> None:
    # Same layout as the original's pandas `DataFrame.to_csv`: an unnamed index column, then the keys.
    n = len(result["filenames"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", *RESULT_KEYS])
        for i in range(n):
            row = [i]
            for k in RESULT_KEYS:
                v = result[k][i]
                row.append(repr(float(v)) if isinstance(v, float | np.floating) else v)
            w.writerow(row)


def evaluate_folder(
    output_dir: str | Path,
    gt_dir: str | Path,
    pred_file_name: str = "rgb_erode_dilate",
    no_cloth: bool = False,
    lpips: nn.Module | bool | None = None,
    res: int = 512,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Run the metrics of spec §8 over one test run folder.

    output_dir: the `eval/<sub_dir>/epoch_<E>` folder holding `<pred_file_name>/<n>.png`.
    gt_dir: the dataset's test sub_dir, holding image/<m>.png, mask/<m>.png (1- or 3-channel; the
        original required 3), semantic/<m>.png (no_cloth only) and flame_params.json. Frame names are
        remapped m = n - min(n) + 1 and must appear among the JSON frames.
    lpips: None loads LPIPS(alex) from the weight files (missing files: one warning, LPIPS = NaN);
        False skips LPIPS (NaN, no warning); True requires it (PointAvatarError when the files are
        missing); a module is used as given.
    Writes results_[no_cloth_]<pred_file_name>.{npz,csv} in output_dir with the per-frame arrays
    subfolders, filenames, mse_l, rmse_l, mae_l, perceptual_l, ssim_l, psnr_l, l1_l, where l1_l is the
    true L1 = MAE (the original's l1_l held the MSE). Prints one summary line and returns the means
    (mse, rmse, mae, psnr, ssim, lpips) plus num_frames.
    """
    output_dir, gt_dir = Path(output_dir), Path(gt_dir)
    pred_dir = output_dir / pred_file_name
    numbers = _frame_numbers(pred_dir)
    start = numbers[0]
    known = _json_frame_names(gt_dir)
    remapped = [str(n - start + 1) for n in numbers]
    unknown = [m for m in remapped if m not in known]
    if unknown:
        raise PointAvatarError(
            f"Metrics: frames {unknown[:10]} (prediction numbers remapped as n - {start} + 1) are not in "
            f"{gt_dir / 'flame_params.json'}; output_dir and gt_dir must belong to the same test sequence"
        )

    if lpips is None:
        lpips_net = load_lpips_alex(device)
    elif lpips is False or lpips is True:
        lpips_net = None if lpips is False else _load_or_raise(device)
    else:
        lpips_net = lpips

    def to_tensor(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].to(device)

    per_frame: dict[str, list] = {k: [] for k in RESULT_KEYS}
    for n, m in zip(numbers, remapped, strict=True):
        name = f"{m}.png"
        pred = _read_image(pred_dir / f"{n}.png", res, "prediction")
        if pred.ndim == 2:
            pred = np.repeat(pred[:, :, None], 3, axis=2)
        gt = _read_image(gt_dir / "image" / name, res, "GT image")
        mask = _read_image(gt_dir / "mask" / name, res, "GT mask")
        if mask.ndim == 2:  # friendliness fix: the original needed a 3-channel mask PNG
            mask = np.repeat(mask[:, :, None], 3, axis=2)
        # Predictions are rendered over white: composite the GT over white with the soft mask.
        gt = gt * mask + (1.0 - mask)
        mask_t = None
        if no_cloth:
            sem = _read_semantic(gt_dir / "semantic" / name, res)
            mask = mask.copy()
            mask[np.isin(sem, CLOTH_LABELS)] = 0.0
            mask_t = to_tensor(mask)[:, :1]
        r = compute_metrics(to_tensor(pred), to_tensor(gt), mask=mask_t, lpips=lpips_net)
        per_frame["subfolders"].append(gt_dir.name)  # the test video
        per_frame["filenames"].append(name)
        per_frame["mse_l"].append(r["mse"])
        per_frame["rmse_l"].append(r["rmse"])
        per_frame["mae_l"].append(r["mae"])
        per_frame["perceptual_l"].append(r["lpips"])
        per_frame["ssim_l"].append(r["ssim"])
        per_frame["psnr_l"].append(r["psnr"])
        per_frame["l1_l"].append(r["mae"])  # true L1 (= MAE); the original stored the MSE here

    result = {
        k: (v if k in ("subfolders", "filenames") else np.asarray(v, dtype=np.float64))
        for k, v in per_frame.items()
    }
    base = "results_no_cloth" if no_cloth else "results"
    np.savez(output_dir / f"{base}_{pred_file_name}.npz", **result)
    _write_csv(output_dir / f"{base}_{pred_file_name}.csv", result)

    means = {
        "mse": float(np.mean(result["mse_l"])),
        "rmse": float(np.mean(result["rmse_l"])),
        "mae": float(np.mean(result["mae_l"])),
        "psnr": float(np.mean(result["psnr_l"])),
        "ssim": float(np.mean(result["ssim_l"])),
        "lpips": float(np.mean(result["perceptual_l"])),
        "num_frames": len(numbers),
    }
    lp = "n/a" if math.isnan(means["lpips"]) else f"{means['lpips']:.4f}"
    tag = f"{pred_file_name}{' no_cloth' if no_cloth else ''}"
    print(
        f"Metrics {tag} ({len(numbers)} frames, {output_dir}): L1 (MAE) {means['mae']:.4f}  "
        f"PSNR {means['psnr']:.2f}  SSIM {means['ssim']:.4f}  LPIPS {lp}",
        flush=True,
    )
    return means


def _load_or_raise(device: torch.device | str) -> nn.Module:
    net = load_lpips_alex(device, warn=False)
    if net is None:
        raise PointAvatarError(str(missing_lpips_message()))
    return net
