"""Plots (grid, per-frame PNGs, opening) and exports (PLY, MP4) of spec §2.2 / §2.10."""

from __future__ import annotations

import dataclasses

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh
from tolerances import assert_close

from pointavatar.engine.plots import (
    erode_dilate,
    lin2img,
    make_grid,
    plot_grid,
    to_uint8,
    write_frame_outputs,
)
from pointavatar.evaluate.export import (
    PAIRED_COLORS,
    save_ply,
    side_by_side,
    skinning_weight_colors,
    write_video,
)
from pointavatar.evaluate.tracking import tracking_loss
from pointavatar.model import EvalOutputs, PointAvatarOutputs


def test_erode_dilate_is_an_opening():
    # A lone white pixel on black is removed: opening deletes bright details smaller than 3x3.
    img = np.zeros((7, 7, 3), np.uint8)
    img[3, 3] = 255
    assert (erode_dilate(img) == 0).all()
    # A 3x3 white square survives unchanged.
    img = np.zeros((7, 7, 3), np.uint8)
    img[2:5, 2:5] = 255
    np.testing.assert_array_equal(erode_dilate(img), img)
    # White background, a grey "head" with a one-pixel white hole between splats: the hole is filled
    # with the surrounding grey, the head and background are unchanged.
    img = np.full((9, 9, 3), 255, np.uint8)
    img[2:7, 2:7] = 100
    img[4, 4] = (255, 250, 240)
    expected = img.copy()
    expected[4, 4] = 100
    np.testing.assert_array_equal(erode_dilate(img), expected)
    # A lone dark pixel (dark details are kept by an opening).
    img = np.full((7, 7, 3), 255, np.uint8)
    img[3, 3] = 0
    np.testing.assert_array_equal(erode_dilate(img), img)


def test_make_grid_layout():
    imgs = torch.stack([torch.full((3, 2, 3), float(k + 1)) for k in range(5)])  # [5, 3, H=2, W=3]
    grid = make_grid(imgs, nrow=2, padding=1)
    # torchvision layout: 2 columns, ceil(5/2) = 3 rows, cells of (H+pad, W+pad), plus a border pad.
    assert grid.shape == (3, 3 * 3 + 1, 2 * 4 + 1)
    for k in range(5):
        r, c = divmod(k, 2)
        y, x = 1 + r * 3, 1 + c * 4
        assert (grid[:, y : y + 2, x : x + 3] == k + 1).all()
    assert grid[:, 0].eq(0).all() and grid[:, :, 0].eq(0).all() and grid[:, 3].eq(0).all()
    assert grid[:, 7:9, 5:8].eq(0).all()  # the empty sixth cell keeps the pad value
    one = make_grid(torch.rand(2, 1, 4, 4), nrow=2)
    assert one.shape == (3, 8, 14)


def test_lin2img_row_major():
    img = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # B=2, P=H*W=2*3
    out = lin2img(img, (2, 3))
    assert out.shape == (2, 3, 2, 3)
    assert out[1, 2, 1, 0] == img[1, 3, 2]  # pixel (row 1, col 0) = index 1*3 + 0


def make_outputs(b=2, res=4, n=5, v=6):
    """Eval-mode outputs with random images; the per-point fields only have the right shapes."""
    g = torch.Generator().manual_seed(0)
    p = res * res
    lmk = torch.zeros(b, p, 1)
    lmk[:, 0] = 1.0  # a landmark covering the top-left pixel
    rgb = torch.rand(b, p, 3, generator=g)
    normal = torch.rand(b, p, 3, generator=g)
    shading = torch.rand(b, p, 3, generator=g)
    albedo = torch.rand(b, p, 3, generator=g)
    outputs = PointAvatarOutputs(
        img_res=res,
        rgb_image=rgb,
        predicted_mask=torch.ones(b, p),
        canonical_points=torch.zeros(n, 3),
        posedirs=torch.zeros(n, 36, 3),
        shapedirs=torch.zeros(n, 3, 50),
        lbs_weights=torch.zeros(n, 6),
        sdf_values=torch.zeros(n),
        grad_thetas=torch.zeros(2 * n, 3),
        eval=EvalOutputs(
            normal_image=normal,
            shading_image=shading,
            albedo_image=albedo,
            pnts_color_deformed=torch.zeros(b, n, 3),
            pnts_normal_deformed=torch.zeros(b, n, 3),
            deformed_points=torch.zeros(b, n, 3),
            deformed_verts=torch.zeros(b, v, 3),
            canonical_verts=torch.zeros(v, 3),
            unconstrained_canonical_points=torch.zeros(n, 3),
            pnts_albedo=torch.zeros(n, 3),
            rendered_landmarks=lmk,
            rendered_landmarks_alpha=lmk[..., 0],
        ),
    )
    return outputs, {"rgb": torch.rand(b, p, 3, generator=g)}


def test_plot_grid_rows_and_path(tmp_path):
    outputs, gt = make_outputs()
    path = plot_grid(outputs, gt, tmp_path / "eval" / "MVI_1812", epoch=7, first_img_name=12)
    assert path == tmp_path / "eval" / "MVI_1812" / "rendering" / "epoch_0007_12.png"
    grid = iio.imread(path)
    # 5 rows (pred, gt, normal, shading, albedo) x 2 columns of 4x4 tiles with 2-pixel padding.
    assert grid.shape == (5 * 6 + 2, 2 * 6 + 2, 3)

    def tile(row, col):
        y, x = 2 + row * 6, 2 + col * 6
        return grid[y : y + 4, x : x + 4]

    np.testing.assert_array_equal(tile(0, 0)[0, 0], [255, 0, 0])  # red landmark on the prediction
    np.testing.assert_array_equal(tile(1, 1)[0, 0], [255, 0, 0])  # and on the GT
    pred1 = to_uint8(lin2img(outputs.rgb_image, 4)[1].permute(1, 2, 0))
    np.testing.assert_array_equal(tile(0, 1)[1:], pred1[1:])
    albedo0 = to_uint8(lin2img(outputs.eval.albedo_image, 4)[0].permute(1, 2, 0))
    np.testing.assert_array_equal(tile(4, 0), albedo0)
    # Without GT the grid has 4 rows.
    path = plot_grid(outputs, None, tmp_path / "e", epoch=0, first_img_name=1)
    assert iio.imread(path).shape == (4 * 6 + 2, 14, 3)
    # Training outputs (no eval images): prediction and GT rows only.
    train_outputs = dataclasses.replace(outputs, eval=None)
    path = plot_grid(train_outputs, gt, tmp_path / "t", epoch=0, first_img_name=1)
    assert iio.imread(path).shape == (2 * 6 + 2, 14, 3)


def test_write_frame_outputs_layout(tmp_path):
    outputs, _ = make_outputs(res=8)
    epoch_dir = write_frame_outputs(outputs, torch.tensor([[12], [13]]), tmp_path / "MVI_1812", epoch=63)
    assert epoch_dir == tmp_path / "MVI_1812" / "epoch_63"
    for name in (12, 13):
        for sub in ("rgb", "rgb_erode_dilate", "normal"):
            assert (epoch_dir / sub / f"{name}.png").is_file()
    rgb = iio.imread(epoch_dir / "rgb" / "13.png")
    np.testing.assert_array_equal(rgb, to_uint8(lin2img(outputs.rgb_image, 8)[1].permute(1, 2, 0)))
    np.testing.assert_array_equal(iio.imread(epoch_dir / "rgb_erode_dilate" / "13.png"), erode_dilate(rgb))
    # One frame of the two, as the runner writes a batch that spans two videos.
    one = write_frame_outputs(outputs.select([1]), [21], tmp_path / "other", epoch=63)
    np.testing.assert_array_equal(iio.imread(one / "rgb" / "21.png"), rgb)
    normal1 = to_uint8(lin2img(outputs.eval.normal_image, 8)[1].permute(1, 2, 0))
    np.testing.assert_array_equal(iio.imread(one / "normal" / "21.png"), normal1)


def test_tracking_loss_is_rgb_l1():
    outputs, gt = make_outputs()
    outputs = dataclasses.replace(outputs, rgb_image=outputs.rgb_image.double().requires_grad_(True))
    gt = {"rgb": gt["rgb"].double()}
    r = tracking_loss(outputs, gt)
    # float64, the same quantity: equal up to summation order.
    assert_close(r, (outputs.rgb_image - gt["rgb"]).abs().mean(), rtol=1e-12, atol=1e-12)
    r.backward()
    assert outputs.rgb_image.grad is not None


def test_ply_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((20, 3)).astype(np.float32)
    nrm = rng.standard_normal((20, 3))
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    cols = rng.random((20, 3))
    path = save_ply(tmp_path / "sub" / "0063_deformed_color_1.ply", torch.from_numpy(pts), cols, nrm)
    loaded = trimesh.load(path, process=False)
    np.testing.assert_array_equal(np.asarray(loaded.vertices, np.float32), pts)  # float32 in the file
    np.testing.assert_array_equal(loaded.visual.vertex_colors[:, :3], np.round(cols * 255).astype(np.uint8))
    raw = loaded.metadata["_ply_raw"]["vertex"]["data"]
    got = np.stack([raw["nx"], raw["ny"], raw["nz"]], axis=1)
    np.testing.assert_allclose(got, nrm, rtol=0, atol=1e-6)  # stored as float32
    # Without normals or colours.
    loaded = trimesh.load(save_ply(tmp_path / "plain.ply", pts), process=False)
    assert loaded.vertices.shape == (20, 3)


def test_skinning_colors_and_palette():
    assert PAIRED_COLORS.shape == (12, 3)
    np.testing.assert_allclose(PAIRED_COLORS[5], np.array([227, 26, 28]) / 255)
    w = np.eye(5)
    c = skinning_weight_colors(w)
    np.testing.assert_allclose(c[0], PAIRED_COLORS[3])
    np.testing.assert_allclose(c[1], PAIRED_COLORS[1])
    np.testing.assert_allclose(c[2:], 1.0)
    c6 = skinning_weight_colors(torch.tensor([[0.5, 0.5, 0, 0, 0, 0]]))
    np.testing.assert_allclose(c6[0], 0.5 * PAIRED_COLORS[5] + 0.5 * PAIRED_COLORS[3])


def test_mp4_written_and_read_back(tmp_path):
    frames = [np.full((33, 24, 3), 20 * k, np.uint8) for k in range(6)]  # odd height: padded
    pred_gt = [side_by_side(f, 255 - f) for f in frames]
    assert pred_gt[0].shape == (33, 48, 3)
    path = write_video(tmp_path / "video" / "test.mp4", pred_gt, fps=25)
    read = list(iio.imiter(path, plugin="pyav") if _has_pyav() else _read_ffmpeg(path))
    assert len(read) == 6
    assert read[0].shape[:2] == (34, 48)
    # Lossy codec: a flat region stays within a few grey levels.
    assert abs(float(read[3][:30, :20].mean()) - 60) < 4  # away from the white padding row
    with pytest.raises(ValueError):
        side_by_side(frames[0], frames[0][:-1])


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _read_ffmpeg(path):
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as r:
        yield from r
