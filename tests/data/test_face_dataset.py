"""FaceDataset on a tiny IMavatar-format subject written by the tests themselves (spec §3)."""

import json
import os

import cv2
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import assert_close

from pointavatar.data import FaceDataset, collate_fn
from pointavatar.errors import PointAvatarError

SUBJECT = "subj"
RES = 32
# Per video: number of frames, stored image size, mask channels, JSON intrinsics, camera translation.
VIDEOS = {
    "vid_a": dict(n=3, size=RES, mask_channels=3, intr=[-1.5, 1.4, 0.52, 0.48], t=[0.1, -0.2, -4.0]),
    "vid_b": dict(n=4, size=RES, mask_channels=1, intr=[-2.0, 1.9, 0.51, 0.49], t=[0.3, 0.05, -3.5]),
    "test": dict(n=3, size=40, mask_channels=3, intr=[-1.8, 1.7, 0.5, 0.5], t=[0.0, 0.1, -4.2]),
}


def write_video(video_dir, n, size, mask_channels, intr, t, seed, frames_override=None):
    """One video folder per spec §3.1/§3.3; returns the per-frame arrays written."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(video_dir, "image"))
    os.makedirs(os.path.join(video_dir, "mask"))
    frames, images, masks = [], [], []
    for k in range(1, n + 1):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = rng.integers(0, 256, (size, size), dtype=np.uint8)
        mask[0, 0], mask[0, 1], mask[0, 2] = 128, 127, 255  # straddle the hard_mask threshold 0.5
        iio.imwrite(os.path.join(video_dir, "image", f"{k}.png"), image)
        stored = np.repeat(mask[..., None], 3, axis=2) if mask_channels == 3 else mask
        iio.imwrite(os.path.join(video_dir, "mask", f"{k}.png"), stored)
        images.append(image)
        masks.append(mask)
        world_mat = np.concatenate([np.eye(3), np.array(t)[:, None]], axis=1)
        frames.append(
            {
                "file_path": f"./image/{k}",
                "world_mat": world_mat.tolist(),
                "expression": rng.normal(size=50).tolist(),
                "pose": rng.normal(size=15).tolist(),
                "bbox": [-0.5, -0.5, 0.5, 0.5],
                "flame_keypoints": rng.uniform(-1, 1, (70, 2)).tolist(),
            }
        )
    params = {"intrinsics": intr, "shape_params": [float(seed)] * 100, "frames": frames}
    if frames_override is not None:
        params = frames_override(params)
    with open(os.path.join(video_dir, "flame_params.json"), "w") as f:
        json.dump(params, f, indent=1)
    return {"frames": frames, "images": images, "masks": masks, "params": params}


@pytest.fixture
def subject(tmp_path):
    """Data folder with three videos of one subject; returns (data_folder, written arrays per video)."""
    root = tmp_path / "datasets"
    written = {}
    for seed, (name, spec) in enumerate(VIDEOS.items()):
        written[name] = write_video(str(root / SUBJECT / SUBJECT / name), seed=seed, **spec)
    return str(root), written


def make(data_folder, sub_dir=("vid_a", "vid_b"), **kwargs):
    return FaceDataset(data_folder, SUBJECT, "flame_params.json", list(sub_dir), [RES, RES], **kwargs)


def test_lengths_order_and_last_video_parameters(subject):
    folder, written = subject
    ds = make(folder)
    assert len(ds) == 7
    assert ds.data["sub_dir"] == ["vid_a"] * 3 + ["vid_b"] * 4
    assert ds.data["img_name"] == [1, 2, 3, 1, 2, 3, 4]
    json_exp = [f["expression"] for v in ("vid_a", "vid_b") for f in written[v]["frames"]]
    assert torch.equal(ds.data["expressions"], torch.tensor(json_exp, dtype=torch.float32))
    json_pose = [f["pose"] for v in ("vid_a", "vid_b") for f in written[v]["frames"]]
    assert torch.equal(ds.data["flame_pose"], torch.tensor(json_pose, dtype=torch.float32))
    # shape_params, intrinsics and gt_dir come from the last sub_dir (the seed is the shape value).
    assert ds.shape_params.shape == (1, 100) and torch.all(ds.shape_params == 1.0)
    assert ds.intrinsics[0, 0].item() == pytest.approx(2 * 2.0)
    assert ds.gt_dir.endswith(os.path.join(SUBJECT, SUBJECT, "vid_b"))
    reversed_ds = make(folder, sub_dir=("vid_b", "vid_a"))
    assert torch.all(reversed_ds.shape_params == 0.0)
    assert reversed_ds.intrinsics[0, 0].item() == pytest.approx(2 * 1.5)
    assert reversed_ds.data["sub_dir"] == ["vid_b"] * 4 + ["vid_a"] * 3
    assert make(folder, sub_dir=["test"]).__len__() == 3
    info = ds.frame_info(4)
    assert (info.sub_dir, info.img_name) == ("vid_b", 2)
    assert info.keypoints.shape == (70, 2) and info.bbox.shape == (4,)
    assert info.mask_path == os.path.join(folder, SUBJECT, SUBJECT, "vid_b", "mask", "2.png")
    assert ds.data["keypoints"].shape == (7, 70, 2) and ds.data["bbox"].shape == (7, 4)


@pytest.mark.parametrize(
    ("subsample", "expected"),
    [(1, list(range(7))), (2, [0, 2, 4, 6]), (3, [0, 3, 6]), ([1, 4], [1, 2, 3]), ([0, 3, 5], [0, 3, 5])],
)
def test_subsample(subject, subsample, expected):
    folder, _ = subject
    full = make(folder)
    ds = make(folder, subsample=subsample)
    assert len(ds) == len(expected)
    assert ds.data["img_name"] == [full.data["img_name"][i] for i in expected]
    assert ds.data["sub_dir"] == [full.data["sub_dir"][i] for i in expected]
    assert torch.equal(ds.data["expressions"], full.data["expressions"][expected])
    assert torch.equal(ds.data["world_mats"], full.data["world_mats"][expected])
    assert ds.data["image_paths"] == [full.data["image_paths"][i] for i in expected]
    assert torch.equal(ds.data["keypoints"], full.data["keypoints"][expected])


def test_camera_conversion(subject):
    folder, _ = subject
    ds = make(folder, sub_dir=["vid_a"])
    i0, i1, i2, i3 = VIDEOS["vid_a"]["intr"]
    tx, ty, tz = VIDEOS["vid_a"]["t"]
    K = torch.tensor(
        [[-2 * i0, 0, -(2 * i2 - 1), 0], [0, 2 * i1, -(2 * i3 - 1), 0], [0, 0, 0, 1], [0, 0, 1, 0]],
        dtype=torch.float32,
    )
    assert torch.equal(ds.intrinsics, K)  # the same float64 arithmetic, cast once
    assert ds.intrinsics[0, 0] > 0
    cam = torch.tensor([[-1, 0, 0, -tx], [0, 1, 0, ty], [0, 0, -1, -tz]], dtype=torch.float32)
    for _, sample, _ in ds:
        assert torch.equal(sample["cam_pose"], cam)
        assert torch.equal(sample["intrinsics"], K)

    # The converted camera projects like the closed form of spec §3.5: u = cx + fx (X + tx) / d,
    # v = cy - fy (Y + ty) / d, d = -(Z + tz), and pixel u sits at NDC x = 1 - 2u/W (+x left).
    X = torch.tensor([[0.2, -0.1, 0.3], [-0.4, 0.5, -0.2]])
    view = X @ cam[:, :3] + cam[:, 3]
    x_ndc = K[0, 0] * view[:, 0] / view[:, 2] + K[0, 2]
    y_ndc = K[1, 1] * view[:, 1] / view[:, 2] + K[1, 2]
    W = H = 512.0
    fx, fy, cx, cy = -i0 * W, i1 * H, i2 * W, i3 * H
    d = -(X[:, 2] + tz)
    u = cx + fx * (X[:, 0] + tx) / d
    v = cy - fy * (X[:, 1] + ty) / d
    px = "float32 round-off of a few operations on values of order 1e3 px"
    assert_close(W * (1 - x_ndc) / 2, u, rtol=0, atol=1e-3, reason=px)
    assert_close(H * (1 - y_ndc) / 2, v, rtol=0, atol=1e-3, reason=px)


def test_camera_positive_focal_is_not_flipped(tmp_path):
    root = tmp_path / "d"
    write_video(str(root / SUBJECT / SUBJECT / "v"), 2, 8, 3, [1.5, 1.4, 0.5, 0.5], [0.1, 0.2, -4.0], seed=0)
    ds = FaceDataset(str(root), SUBJECT, "flame_params.json", ["v"], [8, 8])
    assert ds.intrinsics[0, 0].item() == pytest.approx(3.0)
    cam = torch.tensor([[1, 0, 0, 0.1], [0, 1, 0, 0.2], [0, 0, -1, 4.0]], dtype=torch.float32)
    assert torch.equal(ds.data["world_mats"][0], cam)


def expected_gt(image_u8, mask_u8, hard):
    rgb = torch.from_numpy(image_u8.astype(np.float32) / np.float32(255)).reshape(-1, 3)
    mask = torch.from_numpy(mask_u8.astype(np.float32) / np.float32(255)).reshape(-1)
    alpha = (mask > 0.5).float()[:, None] if hard else mask[:, None]
    return rgb, mask, rgb * alpha + (1 - alpha)


@pytest.mark.parametrize("video", ["vid_a", "vid_b"])  # 3-channel and 1-channel masks
def test_ground_truth_soft_hard_and_background(subject, video):
    folder, written = subject
    soft = make(folder, sub_dir=[video])
    hard = make(folder, sub_dir=[video], hard_mask=True)
    raw = make(folder, sub_dir=[video], use_background=True)
    for idx in range(len(soft)):
        image, mask = written[video]["images"][idx], written[video]["masks"][idx]
        rgb, alpha, over_white = expected_gt(image, mask, hard=False)
        _, _, over_white_hard = expected_gt(image, mask, hard=True)
        gt = soft[idx][2]
        assert gt["rgb"].dtype == torch.float32 and gt["object_mask"].dtype == torch.float32
        # Same float32 operations in the same order: exact.
        assert torch.equal(gt["object_mask"], alpha)
        assert torch.equal(gt["rgb"], over_white)
        gt_hard = hard[idx][2]
        assert torch.equal(gt_hard["rgb"], over_white_hard)
        assert torch.equal(gt_hard["object_mask"], alpha)  # stays soft
        assert 0 < gt_hard["object_mask"][1] < 0.5 < gt_hard["object_mask"][0] < 1
        assert torch.all(gt_hard["rgb"][1] == 1) and torch.equal(gt_hard["rgb"][0], rgb[0])
        gt_raw = raw[idx][2]
        assert torch.equal(gt_raw["rgb"], rgb)
        assert torch.equal(gt_raw["object_mask"], alpha)


def test_resize_matches_imageio_cv2(subject):
    folder, written = subject
    ds = make(folder, sub_dir=["test"], use_background=True)
    for idx in range(len(ds)):
        info = ds.frame_info(idx)
        ref = cv2.resize(
            iio.imread(info.image_path) / np.float32(255), (RES, RES), interpolation=cv2.INTER_LINEAR
        )
        ref_mask = cv2.resize(written["test"]["masks"][idx].astype(np.float32), (RES, RES)) / np.float32(255)
        gt = ds[idx][2]
        assert gt["rgb"].shape == (RES * RES, 3)
        # Same OpenCV call on the same float32 input: equal up to float32 rounding.
        assert_close(gt["rgb"], torch.from_numpy(ref).reshape(-1, 3), rtol=0, atol=1e-6)
        assert_close(gt["object_mask"], torch.from_numpy(ref_mask).reshape(-1), rtol=0, atol=1e-6)


def test_mask_grey_is_pil_luminance(tmp_path):
    root = tmp_path / "d"
    video = root / SUBJECT / SUBJECT / "v"
    write_video(str(video), 1, 8, 3, [-1.5, 1.4, 0.5, 0.5], [0, 0, -4.0], seed=0)
    colour = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    iio.imwrite(str(video / "mask" / "1.png"), colour)
    ds = FaceDataset(str(root), SUBJECT, "flame_params.json", ["v"], [8, 8], use_background=True)
    # What imageio.imread(as_gray=True) returned: PIL "F" = (299 R + 587 G + 114 B) / 1000.
    grey = (colour.astype(np.int64) @ np.array([299, 587, 114])) / 1000.0 / 255.0
    # float32 rounding of a value in [0, 1]
    assert_close(ds[0][2]["object_mask"], torch.from_numpy(grey).float().reshape(-1), rtol=0, atol=1e-6)
    pil = np.asarray(Image.open(video / "mask" / "1.png").convert("F")) / np.float32(255)
    assert torch.equal(ds[0][2]["object_mask"], torch.from_numpy(pil).reshape(-1))


def test_pixel_order_is_row_major_from_top(tmp_path):
    root = tmp_path / "d"
    video = root / SUBJECT / SUBJECT / "v"
    write_video(str(video), 1, 8, 1, [-1.5, 1.4, 0.5, 0.5], [0, 0, -4.0], seed=0)
    H, W, r, c = 6, 8, 1, 5  # non-square so rows and columns cannot be confused
    image = np.zeros((H, W, 3), np.uint8)
    image[r, c] = (255, 128, 64)
    iio.imwrite(str(video / "image" / "1.png"), image)
    iio.imwrite(str(video / "mask" / "1.png"), np.full((H, W), 255, np.uint8))
    ds = FaceDataset(str(root), SUBJECT, "flame_params.json", ["v"], [W, H], use_background=True)
    rgb = ds[0][2]["rgb"]
    assert rgb.shape == (H * W, 3)
    bright = torch.nonzero(rgb.sum(1)).flatten().tolist()
    assert bright == [r * W + c]
    assert torch.equal(rgb[r * W + c], torch.tensor([255, 128, 64]) / torch.tensor(255.0))


def test_rgba_image_drops_alpha(tmp_path):
    root = tmp_path / "d"
    video = root / SUBJECT / SUBJECT / "v"
    written = write_video(str(video), 1, 8, 3, [-1.5, 1.4, 0.5, 0.5], [0, 0, -4.0], seed=0)
    rgba = np.concatenate([written["images"][0], np.full((8, 8, 1), 7, np.uint8)], axis=2)
    iio.imwrite(str(video / "image" / "1.png"), rgba)
    ds = FaceDataset(str(root), SUBJECT, "flame_params.json", ["v"], [8, 8], use_background=True)
    expected = torch.from_numpy(written["images"][0] / np.float32(255)).reshape(-1, 3)
    assert torch.equal(ds[0][2]["rgb"], expected)


def test_only_json_needs_no_images(subject):
    folder, _ = subject
    for video in ("vid_a", "vid_b"):
        for sub in ("image", "mask"):
            d = os.path.join(folder, SUBJECT, SUBJECT, video, sub)
            for f in os.listdir(d):
                os.remove(os.path.join(d, f))
            os.rmdir(d)
    ds = make(folder, only_json=True, load_images=True)
    assert len(ds) == 7
    for i in range(len(ds)):
        idx, sample, gt = ds[i]
        assert idx == i and gt == {}
        assert sample["expression"].shape == (50,)
    _, _, gt = collate_fn([ds[0], ds[1]])
    assert gt == {}


def test_preload_equals_lazy(subject):
    folder, _ = subject
    lazy = make(folder, sub_dir=["vid_a", "test"], hard_mask=True)
    eager = make(folder, sub_dir=["vid_a", "test"], hard_mask=True, load_images=True)
    assert "rgb" in eager.data and "rgb" not in lazy.data
    for i in range(len(lazy)):
        assert torch.equal(lazy[i][2]["rgb"], eager[i][2]["rgb"])
        assert torch.equal(lazy[i][2]["object_mask"], eager[i][2]["object_mask"])


def test_mean_and_var_expression(subject):
    folder, _ = subject
    ds = make(folder, use_mean_expression=True, use_var_expression=True)
    exp = ds.data["expressions"]
    assert ds.mean_expression.shape == (1, 50) and ds.var_expression.shape == (1, 50)
    assert torch.equal(ds.mean_expression, torch.mean(exp, 0, keepdim=True))
    assert torch.equal(ds.var_expression, torch.var(exp, 0, keepdim=True))
    unbiased = ((exp - exp.mean(0)) ** 2).sum(0) / (len(ds) - 1)
    assert_close(ds.var_expression[0], unbiased)  # default float32 tolerances
    off = make(folder)
    assert torch.equal(off.mean_expression, torch.zeros(1, 50)) and off.var_expression is None
    sub = make(folder, subsample=2, use_mean_expression=True)
    assert torch.equal(sub.mean_expression, exp[::2].mean(0, keepdim=True))


def test_collate(subject):
    folder, _ = subject
    ds = make(folder)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=ds.collate_fn, shuffle=False)
    indices, sample, gt = next(iter(loader))
    P = RES * RES
    assert indices.dtype == torch.int64 and indices.tolist() == [0, 1, 2]
    shapes = {
        "idx": (3, 1),
        "img_name": (3, 1),
        "intrinsics": (3, 4, 4),
        "expression": (3, 50),
        "flame_pose": (3, 15),
        "cam_pose": (3, 3, 4),
    }
    for key, shape in shapes.items():
        assert sample[key].shape == shape, key
    assert sample["idx"].dtype == torch.int64 and sample["img_name"].dtype == torch.int64
    for key in ("intrinsics", "expression", "flame_pose", "cam_pose"):
        assert sample[key].dtype == torch.float32, key
    assert sample["sub_dir"] == ["vid_a"] * 3
    assert sample["img_name"].flatten().tolist() == [1, 2, 3]
    assert gt["rgb"].shape == (3, P, 3) and gt["object_mask"].shape == (3, P)
    assert gt["rgb"].dtype == torch.float32 and gt["object_mask"].dtype == torch.float32
    assert set(sample) == set(shapes) | {"sub_dir"}


def test_data_path_containing_image(tmp_path):
    # spec §10.9: the original's str.replace("image", "mask") broke on such paths.
    root = tmp_path / "my_images" / "image_data"
    write_video(str(root / SUBJECT / SUBJECT / "v"), 2, 8, 3, [-1.5, 1.4, 0.5, 0.5], [0, 0, -4.0], seed=0)
    ds = FaceDataset(str(root), SUBJECT, "flame_params.json", ["v"], [8, 8])
    assert ds.data["mask_paths"][1] == str(root / SUBJECT / SUBJECT / "v" / "mask" / "2.png")
    assert ds[1][2]["object_mask"].shape == (64,)


# ---------------------------------------------------------------------------------------------------
# Bad data: one PointAvatarError naming the file (and frame / field).


def _edit_json(path, edit):
    with open(path) as f:
        params = json.load(f)
    edit(params)
    with open(path, "w") as f:
        json.dump(params, f)


def _raises(match_all, fn):
    with pytest.raises(PointAvatarError) as info:
        fn()
    message = str(info.value)
    for part in match_all:
        assert part in message, (part, message)
    return message


def test_missing_subject_and_video(subject, tmp_path):
    folder, _ = subject
    message = _raises(
        [os.path.join(str(tmp_path), "nowhere", SUBJECT, SUBJECT), "<subject>/<subject>", "demo"],
        lambda: make(str(tmp_path / "nowhere")),
    )
    assert "synthetic" in message
    _raises(
        [os.path.join(folder, SUBJECT, SUBJECT, "vid_x"), "vid_a"], lambda: make(folder, sub_dir=["vid_x"])
    )


def test_missing_and_malformed_json(subject):
    folder, _ = subject
    path = os.path.join(folder, SUBJECT, SUBJECT, "vid_b", "flame_params.json")
    os.rename(path, path + ".bak")
    _raises([path, "json_name"], lambda: make(folder))
    with open(path, "w") as f:
        f.write('{\n "intrinsics": [1, 2, 3, 4],\n "frames": [,]\n}')
    _raises([path, "line 3"], lambda: make(folder))


@pytest.mark.parametrize(
    ("edit", "parts"),
    [
        (lambda p: p.pop("shape_params"), ["shape_params"]),
        (lambda p: p.update(intrinsics=[1.0, 2.0, 3.0]), ["intrinsics", "3 values"]),
        (lambda p: p["frames"][2].pop("pose"), ["frames[2]", "pose"]),
        (lambda p: p["frames"][3].update(expression=[0.0] * 49), ["frames[3]", "expression", "49 values"]),
        (
            lambda p: p["frames"][1].update(world_mat=[[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
            ["frames[1]", "world_mat"],
        ),
        (lambda p: p["frames"][0].update(file_path="./image/abc"), ["frames[0]", "file_path"]),
        (lambda p: p["frames"][0].update(pose=["a"] * 15), ["frames[0]", "pose"]),
        (lambda p: p.update(frames=[]), ["frames"]),
    ],
)
def test_bad_fields(subject, edit, parts):
    folder, _ = subject
    path = os.path.join(folder, SUBJECT, SUBJECT, "vid_b", "flame_params.json")
    _edit_json(path, edit)
    _raises([path, *parts], lambda: make(folder))


def test_missing_image_or_mask_only_when_loaded(subject):
    folder, _ = subject
    video = os.path.join(folder, SUBJECT, SUBJECT, "vid_a")
    os.remove(os.path.join(video, "image", "2.png"))
    os.remove(os.path.join(video, "mask", "3.png"))
    ds = make(folder, sub_dir=["vid_a"])  # lazy: construction does not touch the files
    ds[0]
    _raises([os.path.join(video, "image", "2.png"), "frame 2", "only_json"], lambda: ds[1])
    _raises([os.path.join(video, "mask", "3.png"), "frame 3"], lambda: ds[2])
    _raises(
        [os.path.join(video, "image", "2.png")], lambda: make(folder, sub_dir=["vid_a"], load_images=True)
    )
    assert len(make(folder, sub_dir=["vid_a"], subsample=[0, 1])) == 1  # skipped frames are never read


def test_grey_image_and_corrupt_file(subject):
    folder, _ = subject
    video = os.path.join(folder, SUBJECT, SUBJECT, "vid_a")
    grey = os.path.join(video, "image", "1.png")
    iio.imwrite(grey, np.zeros((RES, RES), np.uint8))
    ds = make(folder, sub_dir=["vid_a"])
    _raises([grey, "1 channel", "RGB"], lambda: ds[0])
    broken = os.path.join(video, "image", "2.png")
    with open(broken, "wb") as f:
        f.write(b"not a png")
    _raises([broken], lambda: ds[1])


@pytest.mark.parametrize("subsample", [0, [0, 99], [5, 5], "2"])
def test_bad_subsample(subject, subsample):
    folder, _ = subject
    _raises(["subsample"], lambda: make(folder, subsample=subsample))


# ---------------------------------------------------------------------------------------------------
# Implausible values and frames of the wrong aspect ratio: refused at load, naming file, frame, field.


def test_pose_of_1e30_is_refused_at_load(subject):
    folder, _ = subject
    path = os.path.join(folder, SUBJECT, SUBJECT, "vid_b", "flame_params.json")
    _edit_json(path, lambda p: p["frames"][2]["pose"].__setitem__(0, 1e30))  # global rotation, x
    message = _raises([path, "frames[2] (./image/3)", "field pose", "entry 0", "1e+30"], lambda: make(folder))
    assert "[-12.5664, 12.5664]" in message  # 4 pi: MAX_ABS_POSE


@pytest.mark.parametrize(
    ("edit", "parts"),
    [
        (
            lambda p: p["frames"][1]["expression"].__setitem__(7, -1e3),
            ["frames[1] (./image/2)", "field expression", "entry 7", "-1000", "[-100, 100]"],
        ),
        (
            lambda p: p["frames"][3]["world_mat"][2].__setitem__(3, 5e3),
            ["frames[3] (./image/4)", "field world_mat", "camera translation", "|t| <= 1000"],
        ),
        (lambda p: p["shape_params"].__setitem__(4, 1e6), ["field shape_params", "entry 4", "[-100, 100]"]),
        (lambda p: p.update(intrinsics=[-2.0, 0.0, 0.5, 0.5]), ["'intrinsics'", "fy/H > 0"]),
        (lambda p: p.update(intrinsics=[-2.0, -1.9, 0.5, 0.5]), ["'intrinsics'", "fy/H > 0"]),
        (lambda p: p.update(intrinsics=[0.0, 1.9, 0.5, 0.5]), ["'intrinsics'", "fx/W != 0"]),
        (lambda p: p["frames"][0]["pose"].__setitem__(6, float("inf")), ["frames[0]", "pose", "infinite"]),
    ],
)
def test_implausible_values_are_refused_at_load(subject, edit, parts):
    folder, _ = subject
    path = os.path.join(folder, SUBJECT, SUBJECT, "vid_b", "flame_params.json")
    _edit_json(path, edit)
    _raises([path, *parts], lambda: make(folder))


def test_plausible_extremes_are_accepted(subject):
    folder, _ = subject
    path = os.path.join(folder, SUBJECT, SUBJECT, "vid_b", "flame_params.json")

    def edit(p):
        p["frames"][0]["pose"][:3] = [3.5, -3.5, 6.0]  # more than a half turn, e.g. an unwrapped angle
        p["frames"][0]["expression"][0] = 40.0
        p["frames"][0]["world_mat"][2][3] = -50.0

    _edit_json(path, edit)
    assert len(make(folder)) == 7


@pytest.mark.parametrize("load_images", [False, True])
def test_image_with_other_aspect_ratio_is_refused(subject, load_images):
    folder, _ = subject
    video = os.path.join(folder, SUBJECT, SUBJECT, "vid_a")
    wide = os.path.join(video, "image", "2.png")
    iio.imwrite(wide, np.zeros((RES, RES * 4 // 3, 3), np.uint8))  # a 4:3 frame, 42x32
    parts = [wide, "frame 2 of video vid_a", "42x32 (W x H)", f"img_res [{RES}, {RES}]"]
    if load_images:
        _raises(parts, lambda: make(folder, sub_dir=["vid_a"], load_images=True))
    else:
        ds = make(folder, sub_dir=["vid_a"])  # lazy: refused when the frame is read
        ds[0]
        _raises(parts, lambda: ds[1])


def test_mask_with_other_aspect_ratio_is_refused(subject):
    folder, _ = subject
    video = os.path.join(folder, SUBJECT, SUBJECT, "vid_b")
    tall = os.path.join(video, "mask", "4.png")
    iio.imwrite(tall, np.zeros((40, 20), np.uint8))
    ds = make(folder, sub_dir=["vid_b"])
    _raises(
        [tall, "Mask", "frame 4 of video vid_b", "20x40 (W x H)", f"img_res [{RES}, {RES}]"], lambda: ds[3]
    )


def test_aspect_ratio_within_tolerance_is_resized(tmp_path):
    root = tmp_path / "d"
    video = root / SUBJECT / SUBJECT / "v"
    write_video(str(video), 1, 8, 3, [-1.5, 1.4, 0.5, 0.5], [0, 0, -4.0], seed=0)
    # 200x199: W/H differs from the square img_res by 0.5%, below ASPECT_TOLERANCE (1%).
    iio.imwrite(str(video / "image" / "1.png"), np.zeros((199, 200, 3), np.uint8))
    iio.imwrite(str(video / "mask" / "1.png"), np.zeros((199, 200), np.uint8))
    ds = FaceDataset(str(root), SUBJECT, "flame_params.json", ["v"], [8, 8], use_background=True)
    assert ds[0][2]["rgb"].shape == (64, 3)
