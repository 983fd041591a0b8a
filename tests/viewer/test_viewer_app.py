"""viewer/app.py without a browser: the server's GUI, the state it sets, playback, the initial camera.

Handles are driven through viser's Python API (a value set server-side runs the same callbacks as a
browser's change); the browser test (test_viewer_browser.py) shows the images reach a real page.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from pointavatar.data import read_flame_params
from pointavatar.viewer.camera import view_from_frame
from pointavatar.viewer.controls import VISIBLE_EXPRESSIONS

viser = pytest.importorskip("viser", reason="the viewer's optional extra is not installed")

from pointavatar.cli import viewer as cli  # noqa: E402  (after the skip: it needs the extra)


@pytest.fixture
def viewer(tiny_run, sequence_json):
    _, conf_path = tiny_run
    args = ["--conf", str(conf_path), "--json", str(sequence_json), "--device", "cpu", "--port", "0"]
    viewer = cli.build_viewer(cli.parse_args(args))
    yield viewer
    viewer.stop()


def test_gui_has_the_issues_controls(viewer):
    labels = list(viewer.sliders)
    assert labels[:VISIBLE_EXPRESSIONS] == [f"expr {i}" for i in range(1, 11)]
    assert len([s for s in labels if s.startswith("expr ")]) == 50
    assert {f"{j} {a}" for j in ("jaw", "neck", "left eye", "right eye") for a in "xyz"} <= set(labels)
    assert viewer.view.value == "rgb" and set(viewer.view.options) == {"rgb", "normals", "albedo", "shading"}
    assert viewer.frame.min == 0 and viewer.frame.max == len(viewer.sequence.img_name) - 1
    assert viewer.url.startswith("http://127.0.0.1:") and not viewer.url.endswith(":0")


def test_sliders_frames_and_neutral_set_the_rendered_inputs(viewer, sequence_json):
    params = read_flame_params(sequence_json)
    # The page opens on the sequence's first frame; sliders show its values.
    expression, flame_pose = viewer.controls.inputs()
    np.testing.assert_array_equal(expression[0], params.expression[0].double().numpy())
    np.testing.assert_array_equal(flame_pose[0], params.flame_pose[0].double().numpy())
    assert viewer.sliders["jaw x"].value == pytest.approx(float(params.flame_pose[0, 6]))

    viewer.sliders["jaw x"].value = 0.45  # as a user's drag: the state follows
    viewer.sliders["expr 3"].value = -1.5
    expression, flame_pose = viewer.controls.inputs()
    assert flame_pose[0, 6] == 0.45 and expression[0, 2] == -1.5
    np.testing.assert_array_equal(flame_pose[0, :3], params.flame_pose[0, :3].double().numpy())

    viewer.frame.value = 1  # the frame slider shows frame 1, exactly (not the sliders' rounding)
    expression, flame_pose = viewer.controls.inputs()
    np.testing.assert_array_equal(expression[0], params.expression[1].double().numpy())
    np.testing.assert_array_equal(flame_pose[0], params.flame_pose[1].double().numpy())
    assert viewer.sliders["expr 1"].value == pytest.approx(float(params.expression[1, 0]))

    viewer.reset.value = True  # a click
    expression, flame_pose = viewer.controls.inputs()
    assert not expression.any() and not flame_pose.any()
    assert all(handle.value == 0 for handle in viewer.sliders.values())


def test_play_steps_through_the_frames_and_pause_stops(viewer):
    assert viewer.play.label == "play"
    viewer.set_playing(True)
    assert viewer.play.label == "pause"
    deadline = time.monotonic() + 10
    while viewer.frame.value == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert viewer.frame.value != 0  # 25 fps: the next frame within 40 ms
    viewer.set_playing(False)
    time.sleep(0.1)
    paused_at = viewer.frame.value
    time.sleep(0.2)
    assert viewer.frame.value == paused_at and viewer.play.label == "play"


def test_initial_camera_is_the_first_frames(viewer, sequence_json):
    params = read_flame_params(sequence_json)
    camera = viewer.server.initial_camera
    expected, look_at, up = view_from_frame(params.intrinsics, params.cam_pose[0], viewer.look_at)
    np.testing.assert_allclose(camera.position, expected.position, rtol=0, atol=1e-12)  # float64 copies
    np.testing.assert_allclose(camera.look_at, look_at, rtol=0, atol=1e-12)
    np.testing.assert_allclose(camera.up, up, rtol=0, atol=1e-12)
    assert camera.fov == pytest.approx(expected.fov)
    # The orbit point is the avatar's centre, moved onto the optical axis: in front of the camera,
    # at the avatar's depth (the synthetic head sits at the origin, the camera at z ~ 4).
    assert 3.0 < float(np.linalg.norm(look_at - expected.position)) < 5.0
