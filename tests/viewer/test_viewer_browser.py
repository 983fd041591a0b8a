"""The viewer in a real browser: a tiny trained run served by `pointavatar-viewer`, opened in headless
Chromium (no network but this machine's loopback), checked on its screenshots.

Skipped only where no Chromium is installed (Debian package ``chromium``; `.ci/run` installs it when
apt-get can) or the viewer's extra is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import cv2
import numpy as np
import pytest

from pointavatar.data import read_flame_params
from pointavatar.viewer.camera import view_from_frame, wxyz_to_matrix

pytestmark = [pytest.mark.browser, pytest.mark.slow]
viser = pytest.importorskip("viser", reason="the viewer's optional extra is not installed")

from headless_chromium import HeadlessChromium, find_chromium  # noqa: E402  (needs the extra's websockets)

from pointavatar.cli import viewer as cli  # noqa: E402

WIDTH, HEIGHT = 960, 600  # the page's viewport (CSS pixels = screenshot pixels)
TIMEOUT = 30.0  # seconds for each wait; software WebGL on 2 busy cores is slow to start
WHITE_GAP = 40  # a pixel this far from white (any channel) shows the avatar, not the white background
SHOWN = 6.0  # mean |screenshot - sent image| (levels) of a page showing the image: JPEG and texture filtering
MOVED, STILL = 12, 1  # levels of change of the sent image: where the render changed / did not
# Hide the notification software WebGL raises (a GPU-less machine's, not the viewer's); find where the
# control panel floats over the canvas: the assertions use the canvas left of it.
HIDE_NOTIFICATIONS = (
    "(() => { const s = document.createElement('style');"
    " s.textContent = '.mantine-Notifications-root { display: none !important; }';"
    " document.head.appendChild(s); return true; })()"
)
PANEL_LEFT = (
    "Math.min(...[...document.querySelectorAll('.mantine-Paper-root')]"
    ".map(e => e.getBoundingClientRect()).filter(r => r.width > 250 && r.height > 100 && r.x > 0)"
    ".map(r => r.x), 1e9)"
)


def wait_for(what: str, probe: Callable[[], object], timeout: float = TIMEOUT) -> object:
    """The first ``probe()`` that is not None within ``timeout`` seconds (polled), else a failure naming
    ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := probe()) is not None:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def on_canvas(image: np.ndarray) -> np.ndarray:
    """A sent image as the page shows it: stretched over the whole canvas (texture filtering ~ bilinear)."""
    return cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR).astype(np.int16)


def change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel, the largest change of a channel (levels)."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1)


def test_viewer_shows_the_avatar_and_the_jaw_slider_changes_the_page(tiny_run, sequence_json):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "no Chromium on this machine: apt-get install chromium (.ci/run does where apt-get works)"
        )
    _, conf_path = tiny_run
    params = read_flame_params(sequence_json)
    args = ["--conf", str(conf_path), "--json", str(sequence_json), "--device", "cpu", "--port", "0"]
    viewer = cli.build_viewer(cli.parse_args(args))
    try:
        with HeadlessChromium(chromium, WIDTH, HEIGHT, timeout=TIMEOUT) as browser:
            browser.open(viewer.url)

            # The page's orbit camera starts as the sequence's first camera (through three.js and back).
            start, _, _ = view_from_frame(params.intrinsics, params.cam_pose[0], viewer.look_at)

            def at_start():
                for cid, sent in viewer.sent_views().items():
                    position_error = np.abs(sent.camera.position - start.position).max()
                    rotation_error = np.abs(
                        wxyz_to_matrix(sent.camera.wxyz) - wxyz_to_matrix(start.wxyz)
                    ).max()
                    if position_error < 1e-5 and rotation_error < 1e-5:
                        return cid, sent
                return None

            client_id, first = wait_for("an image for the page's initial camera", at_start)
            assert first.camera.fov == pytest.approx(start.fov, abs=1e-6)
            assert first.camera.aspect == pytest.approx(WIDTH / HEIGHT)
            # A wide canvas: the middle rows of the square 32 x 32 render, at the frame's vertical field of view.
            assert first.pixels.shape == (round(32 * HEIGHT / WIDTH), 32, 3)

            assert browser.evaluate(HIDE_NOTIFICATIONS)
            panel_left = int(
                wait_for(
                    "the control panel", lambda: (x := browser.evaluate(PANEL_LEFT)) < WIDTH and x or None
                )
            )
            assert WIDTH // 2 < panel_left < WIDTH  # the panel floats on the right; the avatar is centred
            visible = np.zeros((HEIGHT, WIDTH), bool)
            visible[:, : panel_left - 4] = True
            visible[HEIGHT - 80 :, :80] = False  # viser's axes gizmo

            def shows(
                pixels: np.ndarray, instead_of: np.ndarray | None = None
            ) -> Callable[[], np.ndarray | None]:
                """A screenshot showing the sent ``pixels`` (and no longer ``instead_of``, where they differ)."""
                expected = on_canvas(pixels)
                differ = (
                    visible
                    if instead_of is None
                    else visible & (change(expected, on_canvas(instead_of)) > MOVED)
                )

                def probe():
                    shot = browser.screenshot()
                    if change(shot, expected)[visible].mean() >= SHOWN:
                        return None
                    if instead_of is not None and not (
                        change(shot, expected)[differ].mean()
                        < change(shot, on_canvas(instead_of))[differ].mean()
                    ):
                        return None
                    return shot

                return probe

            # The avatar is on the page: where the sent image has it, the screenshot is not background.
            shot1 = wait_for("the avatar on the page", shows(first.pixels))
            avatar = (255 - on_canvas(first.pixels)).max(-1) > WHITE_GAP
            seen = (255 - shot1.astype(np.int16)).max(-1) > WHITE_GAP
            assert (avatar & visible).sum() > 0.05 * visible.sum()  # a good part of the view
            assert seen[avatar & visible].mean() > 0.95
            assert seen[~avatar & visible].mean() < 0.05  # white background elsewhere

            # Move the jaw to the end of its slider farthest from the frame's value, through viser's Python
            # API (a value set server-side runs the callbacks a drag in the page runs).
            jaw = viewer.sliders["jaw x"]
            jaw.value = jaw.min if jaw.value - jaw.min > jaw.max - jaw.value else jaw.max
            second = wait_for(
                "an image of the moved jaw",
                lambda: (
                    (s := viewer.sent_views().get(client_id)) is not None
                    and s.frames > first.frames
                    and s
                    or None
                ),
            )
            # The same view (the page's camera did not move): the change is the jaw's.
            assert np.allclose(second.camera.position, first.camera.position, rtol=0, atol=1e-9)
            assert np.allclose(second.camera.wxyz, first.camera.wxyz, rtol=0, atol=1e-9)
            shot2 = wait_for("the moved jaw on the page", shows(second.pixels, instead_of=first.pixels))

            # The mouth region, from the renders' own difference map: the tiny avatar (one training step)
            # still has uniform skinning weights, so its jaw turns the whole point blob a little rather than
            # opening a mouth. The page must change where the render changed, by about as much, and
            # stay the same where the render did.
            render_change = change(on_canvas(second.pixels), on_canvas(first.pixels))
            page_change = change(shot2, shot1)
            moved, still = (render_change > MOVED) & visible, (render_change < STILL) & visible
            report = (
                f"render change: max {render_change.max()}, {moved.sum()} px moved, {still.sum()} px still; "
                f"page change there: {page_change[moved].mean():.1f} / {page_change[still].mean():.2f} levels"
            )
            print(report)
            assert moved.sum() > 1000, report  # enough of the page to judge by
            assert page_change[moved].mean() > 0.5 * render_change[moved].mean(), report
            assert page_change[still].mean() < 2, report

            # Orbit with the mouse: the page's new camera (same distance to the orbit point, the avatar's
            # centre) gets a new image, and the page shows it.
            browser.drag((panel_left / 3, HEIGHT / 2), (panel_left / 3 - 30, HEIGHT / 2))
            third = wait_for(
                "an image for the orbited camera",
                lambda: (
                    (s := viewer.sent_views().get(client_id)) is not None
                    and np.abs(wxyz_to_matrix(s.camera.wxyz) - wxyz_to_matrix(second.camera.wxyz)).max()
                    > 0.05
                    and s
                    or None
                ),
            )
            distance = np.linalg.norm(start.position - viewer.look_at)
            assert np.linalg.norm(third.camera.position - viewer.look_at) == pytest.approx(distance, rel=1e-4)
            wait_for("the orbited view on the page", shows(third.pixels, instead_of=second.pixels))
    finally:
        viewer.stop()
