"""viewer/camera.py and viewer/renderer.py: the browser (viser, OpenCV) camera <-> the avatar's cameras.

The conversion is checked three ways: a dataset frame's camera survives the round trip through the
viewer camera; the viewer's image for that camera is the frame's own render; and for wide and tall
canvases, a world point lands on the canvas where a pinhole camera with the browser's pose and field of
view puts it (an independent OpenCV projection).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tolerances import assert_close

from pointavatar.data import read_flame_params
from pointavatar.engine import checkpoints as ckpt
from pointavatar.engine.experiment import Experiment
from pointavatar.errors import PointAvatarError
from pointavatar.model.baked import BakedAvatar
from pointavatar.render import project_points
from pointavatar.viewer.camera import (
    ViewCamera,
    avatar_camera,
    crop_window,
    lens_fov,
    matrix_to_wxyz,
    view_from_frame,
    wxyz_to_matrix,
)
from pointavatar.viewer.renderer import VIEWS, ViewRenderer

# float64 conversions of float32 camera values: the round trip is exact to float64 rounding (~1e-15);
# 1e-12 leaves room for the quaternion's square roots.
ROUND_TRIP_ATOL = 1e-12
ROUND_TRIP_WHY = "float64 rotations through a quaternion and back"


def random_rotation(g: np.random.Generator) -> np.ndarray:
    q = g.normal(size=4)
    return wxyz_to_matrix(q / np.linalg.norm(q))


def test_quaternion_round_trip_and_conventions():
    g = np.random.default_rng(0)
    for _ in range(50):
        rot = random_rotation(g)
        assert np.abs(rot @ rot.T - np.eye(3)).max() < 1e-12 and np.linalg.det(rot) > 0
        q = matrix_to_wxyz(rot)
        assert q[0] >= 0 and abs(np.linalg.norm(q) - 1) < 1e-12
        assert np.abs(wxyz_to_matrix(q) - rot).max() < 1e-12
    # Near-180-degree rotations take the other branches of Shepperd's method.
    for rot in (np.diag([1.0, -1.0, -1.0]), np.diag([-1.0, 1.0, -1.0]), np.diag([-1.0, -1.0, 1.0])):
        assert np.abs(wxyz_to_matrix(matrix_to_wxyz(rot)) - rot).max() < 1e-12
    # w first: a quarter turn about z maps x to y.
    quarter = np.array([math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)])
    assert np.allclose(wxyz_to_matrix(quarter) @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])


def test_dataset_cameras_survive_the_round_trip_through_the_viewer_camera(sequence_json):
    params = read_flame_params(sequence_json)
    target = np.array([0.0, 0.0, 0.0])
    for j in range(len(params.img_name)):
        camera, look_at, up = view_from_frame(params.intrinsics, params.cam_pose[j], target)
        assert camera.aspect == 1.0 and camera.fov == pytest.approx(lens_fov(params.intrinsics))
        back = avatar_camera(camera, params.intrinsics, 32)
        assert_close(
            back.cam_pose, params.cam_pose[j].double(), rtol=0, atol=ROUND_TRIP_ATOL, reason=ROUND_TRIP_WHY
        )
        assert_close(
            back.intrinsics, params.intrinsics.double(), rtol=0, atol=ROUND_TRIP_ATOL, reason=ROUND_TRIP_WHY
        )
        assert (back.rows, back.cols) == (slice(0, 32), slice(0, 32))
        # The orbit point is on the optical axis (looking at it keeps the orientation), up is the
        # camera's -y axis: what a viser camera is set from.
        rot = wxyz_to_matrix(camera.wxyz)
        direction = (look_at - camera.position) / np.linalg.norm(look_at - camera.position)
        assert np.allclose(direction, rot[:, 2], atol=1e-12) and np.allclose(up, -rot[:, 1], atol=1e-12)
    # The synthetic subject's cameras look at the face from +z (the face looks along +z), y up.
    camera, _, up = view_from_frame(params.intrinsics, params.cam_pose[0], target)
    assert camera.position[2] > 3 and np.allclose(up, [0, 1, 0], atol=1e-6)


@pytest.mark.parametrize("image", list(VIEWS))
def test_the_viewers_image_for_a_frames_camera_is_the_frames_render(tiny_baked, sequence_json, image):
    params = read_flame_params(sequence_json)
    renderer = ViewRenderer(tiny_baked, params.intrinsics)
    for j in range(len(params.img_name)):
        camera, _, _ = view_from_frame(params.intrinsics, params.cam_pose[j], np.zeros(3))
        expression, flame_pose = params.expression[j : j + 1].numpy(), params.flame_pose[j : j + 1].numpy()
        view = renderer.render(camera, expression, flame_pose, image=image)
        frame = tiny_baked.render(
            params.expression[j : j + 1],
            params.flame_pose[j : j + 1],
            params.intrinsics[None],
            params.cam_pose[j : j + 1],
        )
        expected = getattr(frame, VIEWS[image])[0]
        assert view.image.shape == expected.shape == (32, 32, 3)
        # The same cameras up to float64 -> float32 rounding: the 1e-4 image bound holds.
        assert_close(view.image, expected, rtol=0, atol=1e-4, reason="cameras equal to float rounding")
        assert view.render_ms > 0
        # The comparison has teeth: the avatar covers part of the image.
        assert 0.05 < frame.mask.mean() < 0.95


@pytest.mark.parametrize(
    "width, height", [(1600, 1000), (500, 1000), (1000, 1000)], ids=["wide", "tall", "square"]
)
def test_points_land_where_the_browsers_pinhole_camera_sees_them(width, height):
    """The canvas shows the crop stretched to it: a world point's canvas position (from the avatar
    camera, the rasterizer's NDC -> pixel rule and the crop) equals its OpenCV projection with the
    browser's pose, vertical field of view and canvas size."""
    g = np.random.default_rng(1)
    size = 1000  # crops of 625 rows (an odd margin: the principal point follows) and 500 columns
    lens_focal = 3.0  # a centred, isotropic lens: the browser's own camera model
    lens = torch.zeros(4, 4, dtype=torch.float64)
    lens[0, 0] = lens[1, 1] = lens_focal
    lens[2, 3] = lens[3, 2] = 1.0
    rot = random_rotation(g)
    position = g.normal(size=3)
    fov = 0.7  # not the lens's: the focal lengths follow the browser's field of view
    camera = ViewCamera(position=position, wxyz=matrix_to_wxyz(rot), fov=fov, aspect=width / height)

    # Points in front of the camera, spread over its view.
    p_cam = np.stack([g.uniform(-0.3, 0.3, 64), g.uniform(-0.3, 0.3, 64), g.uniform(2.0, 5.0, 64)], axis=1)
    world = p_cam @ rot.T + position
    focal = (height / 2) / math.tan(fov / 2)
    expected = np.stack(
        [focal * p_cam[:, 0] / p_cam[:, 2] + width / 2, focal * p_cam[:, 1] / p_cam[:, 2] + height / 2],
        axis=1,
    )

    view = avatar_camera(camera, lens, size)
    ndc = project_points(torch.from_numpy(world)[None], view.intrinsics[None], view.cam_pose[None])[0].numpy()
    u = (1.0 - ndc[:, 0]) * size / 2  # pytorch3d's NDC: +1 at the left and top edges of the image
    v = (1.0 - ndc[:, 1]) * size / 2
    rows, cols = view.rows, view.cols
    on_canvas = np.stack(
        [
            (u - cols.start) * width / (cols.stop - cols.start),
            (v - rows.start) * height / (rows.stop - rows.start),
        ],
        axis=1,
    )
    assert np.abs(on_canvas - expected).max() < 1e-9
    assert ndc[:, 2].min() > 0  # in front of the camera


def test_crop_window_and_errors():
    assert crop_window(1.0, 128) == (slice(0, 128), slice(0, 128))
    assert crop_window(2.0, 128) == (slice(32, 96), slice(0, 128))
    assert crop_window(0.5, 128) == (slice(0, 128), slice(32, 96))
    assert crop_window(1e6, 128) == (slice(63, 64), slice(0, 128))  # at least one row
    with pytest.raises(PointAvatarError, match="aspect"):
        crop_window(0.0, 128)
    lens = torch.eye(4)
    camera = ViewCamera(position=np.zeros(3), wxyz=np.array([1.0, 0, 0, 0]), fov=math.pi, aspect=1.0)
    with pytest.raises(PointAvatarError, match="field of view"):
        avatar_camera(camera, lens, 32)
    with pytest.raises(PointAvatarError, match="lens"):
        avatar_camera(camera, torch.zeros(4, 4), 32)
    with pytest.raises(PointAvatarError, match="unknown view"):
        ViewRenderer.render(
            ViewRenderer.__new__(ViewRenderer), camera, np.zeros((1, 50)), np.zeros((1, 15)), "depth"
        )


def test_the_trained_run_fixture_leaves_matmuls_in_fp32(tiny_run):
    """The session's tiny run is trained with model.tf32 on; the CUDA comparisons below, set up after
    it, must still run in strict fp32 (they failed by 3e-3 when the fixture left TF32 on, and in the
    whole suite another session- or module-scoped fixture can set it too)."""
    assert torch.backends.cuda.matmul.allow_tf32 is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("image", list(VIEWS))
def test_the_viewers_cuda_image_is_the_cpu_image(tiny_run, sequence_json, image):
    """The viewer's path on a GPU (avatar baked there with CUDA graphs, as the command does) draws
    what the CPU draws for the same browser camera."""
    conf, _ = tiny_run
    exp = Experiment(conf, generate=False)
    store = ckpt.Checkpoints(exp.load_dir)
    images = []
    for device, graphs in ((torch.device("cpu"), False), (torch.device("cuda"), True)):
        model = exp.load_trained_model(store, "latest", device).model.eval()
        params = read_flame_params(sequence_json)
        renderer = ViewRenderer(BakedAvatar.from_model(model, cuda_graph=graphs), params.intrinsics)
        camera, _, _ = view_from_frame(params.intrinsics, params.cam_pose[0], np.zeros(3))
        shots = [
            renderer.render(
                camera, params.expression[j : j + 1].numpy(), params.flame_pose[j : j + 1].numpy(), image
            )
            for j in range(2)
        ]
        images.append(torch.stack([s.image for s in shots]))
    assert images[1].device.type == "cpu"  # the viewer sends CPU images
    why = "fp32 on two devices: the products sum in different orders (~1e-6)"
    assert_close(images[1], images[0], rtol=0, atol=1e-4, reason=why)
    assert (images[0] < 0.99).any()  # the avatar is in the image
