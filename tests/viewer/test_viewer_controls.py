"""viewer/controls.py: each slider sets one entry of the expression or the FLAME pose, at its place."""

from __future__ import annotations

import numpy as np
import pytest

from pointavatar.viewer.controls import VISIBLE_EXPRESSIONS, Controls, slider_layout

# flame_pose = [root 0:3, neck 3:6, jaw 6:9, left eye 9:12, right eye 12:15] (FLAME's joints 0-4).
POSE_ENTRY = {
    "neck x": 3,
    "neck y": 4,
    "neck z": 5,
    "jaw x": 6,
    "jaw y": 7,
    "jaw z": 8,
    "left eye x": 9,
    "left eye y": 10,
    "left eye z": 11,
    "right eye x": 12,
    "right eye y": 13,
    "right eye z": 14,
}


def test_layout_first_ten_expressions_in_view_the_rest_in_a_folder_then_jaw_neck_eyes():
    sliders = slider_layout(50)
    expressions = [s for s in sliders if s.target == "expression"]
    assert [s.index for s in expressions] == list(range(50))
    assert [s.label for s in expressions[:3]] == ["expr 1", "expr 2", "expr 3"]
    assert {s.folder for s in expressions[:VISIBLE_EXPRESSIONS]} == {
        "expression"
    } and VISIBLE_EXPRESSIONS == 10
    assert {s.folder for s in expressions[VISIBLE_EXPRESSIONS:]} == {"more expressions"}
    poses = {s.label: s.index for s in sliders if s.target == "flame_pose"}
    assert poses == POSE_ENTRY  # no slider for the root rotation (the orbit camera turns the view)
    assert [s.folder for s in sliders if s.target == "flame_pose"][::3] == [
        "jaw",
        "neck",
        "left eye",
        "right eye",
    ]
    for s in sliders:
        assert s.low < 0 < s.high, s.label  # 0 (the neutral face) is on every slider


def test_each_slider_sets_its_entry_and_nothing_else():
    controls = Controls(50)
    g = np.random.default_rng(0)
    frame_expression, frame_pose = g.normal(size=50), 0.1 * g.normal(size=15)
    for slider in controls.sliders:
        controls.set_frame(frame_expression, frame_pose)
        controls.set_slider(slider, 0.25)
        expression, flame_pose = controls.inputs()
        assert expression.shape == (1, 50) and flame_pose.shape == (1, 15)
        want_expression, want_pose = frame_expression.copy(), frame_pose.copy()
        (want_expression if slider.target == "expression" else want_pose)[slider.index] = 0.25
        np.testing.assert_array_equal(expression[0], want_expression)  # exact: copies, no arithmetic
        np.testing.assert_array_equal(flame_pose[0], want_pose)
    # The root rotation stays the sequence frame's.
    np.testing.assert_array_equal(controls.inputs()[1][0, :3], frame_pose[:3])


def test_frames_neutral_and_clamped_display():
    controls = Controls(50)
    jaw = next(s for s in controls.sliders if s.label == "jaw x")
    expr1 = next(s for s in controls.sliders if s.label == "expr 1")
    pose = np.zeros(15)
    pose[6] = 2.0  # beyond the jaw slider's range
    controls.set_frame(np.full(30, -7.0), pose)  # a narrower expression is zero-padded
    expression, flame_pose = controls.inputs()
    np.testing.assert_array_equal(expression[0], np.r_[np.full(30, -7.0), np.zeros(20)])
    assert flame_pose[0, 6] == 2.0  # the state keeps the frame's value ...
    assert (
        controls.slider_value(jaw) == jaw.high and controls.slider_value(expr1) == expr1.low
    )  # ... shown clamped
    controls.set_frame(np.ones(60), pose)  # a wider one is cut to the avatar's width
    assert controls.inputs()[0].shape == (1, 50)
    controls.neutral()
    expression, flame_pose = controls.inputs()
    assert not expression.any() and not flame_pose.any()
    # inputs() are copies: rendering threads never see a half-written vector.
    expression[0, 0] = 5.0
    assert controls.inputs()[0][0, 0] == 0.0
    with pytest.raises(ValueError):
        controls.set_frame(np.zeros(50), np.zeros(14))
