"""The interactive viewer: a viser web page showing the baked avatar from the browser's orbit camera.

The page (viser's web client, shipped built in its wheel: nothing is fetched from the network) shows
the rendered image as the scene's background, re-rendered when the browser's camera or a control
changes. Controls are shared by every open page; each page has its own camera, its own render thread
and its own frame-time line.

Threads: viser's event loop only sets flags (camera and GUI callbacks); one render thread per page
waits for a flag, renders the latest camera and controls (renders are serialised, `ViewRenderer`) and
sends the image; one play thread steps the sequence at its frame rate while playing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data import FlameParams
from ..engine import plots
from ..errors import PointAvatarError
from ..model.baked import BakedAvatar
from .camera import ViewCamera, view_from_frame
from .controls import Controls, Slider
from .renderer import VIEWS, ViewImage, ViewRenderer

if TYPE_CHECKING:  # viser is an optional extra, imported by `require_viser` when the viewer starts
    import viser

__all__ = ["AvatarViewer", "SentView", "ViewerUnavailable", "require_viser", "INSTALL_HINT"]

INSTALL_HINT = 'pip install -e ".[viewer]"'
MAX_FPS = 60.0  # images sent per page and second at most: a browser shows no more
JPEG_QUALITY = 90

# Folders of the sliders (controls.py) in display order, and whether each starts open.
FOLDERS = {
    "expression": True,
    "more expressions": False,
    "jaw": True,
    "neck": True,
    "left eye": False,
    "right eye": False,
}


class ViewerUnavailable(PointAvatarError):
    """The optional extra ``viewer`` (viser) is not installed: the console script exits with code 2."""


def require_viser() -> ModuleType:
    """The viser module, or a `ViewerUnavailable` naming the install command."""
    try:
        import viser
    except ImportError as exc:
        raise ViewerUnavailable(
            f"the viewer needs the optional extra viewer (viser), which is not installed ({exc}). "
            f"Install it from the repository root with: {INSTALL_HINT}"
        ) from None
    return viser


@dataclass(frozen=True)
class SentView:
    """The last image sent to one page (for tests and diagnostics)."""

    frames: int
    """Images sent to the page so far."""
    camera: ViewCamera
    """The camera it was rendered for."""
    pixels: np.ndarray
    """[h, w, 3] uint8, as sent."""


class _Page:
    """One connected page: its render thread and what it last showed."""

    def __init__(self, client: viser.ClientHandle):
        self.client = client
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.stats: Any = None  # the page's frame-time markdown handle
        self.sent: SentView | None = None


class AvatarViewer:
    """A viser server showing ``baked`` driven by the controls, with ``sequence`` to play.

    The page opens on the sequence's first frame (its expression and pose) seen by its camera, at a
    square canvas exactly that frame's render (viewer/camera.py); the orbit point is the avatar's
    centre. The server serves from construction on; `start` starts the playback thread, `stop` ends
    the threads and the server; ``url`` is where to open the page.

    Args:
        baked: the avatar.
        sequence: frames to play (expressions, poses; its first camera and its lens are the viewer's).
        host, port: where to serve (port 0: a free port; a busy port: viser takes the next free one).
        fps: frame rate of the sequence when played.
        title: the label of the control panel.
    """

    def __init__(
        self,
        baked: BakedAvatar,
        sequence: FlameParams,
        host: str = "127.0.0.1",
        port: int = 8080,
        fps: float = 25.0,
        title: str = "PointAvatar",
    ):
        if len(sequence.img_name) == 0:
            raise PointAvatarError(f"{sequence.json_path}: no frames to show.")
        if not fps > 0:
            raise PointAvatarError(f"viewer: the frame rate must be positive, got {fps}.")
        self._viser = require_viser()
        self.baked, self.sequence, self.fps = baked, sequence, float(fps)
        self.renderer = ViewRenderer(baked, sequence.intrinsics)
        self.controls = Controls(max(baked.num_exp, baked.n_exp_flame))
        self.controls.set_frame(sequence.expression[0].numpy(), sequence.flame_pose[0].numpy())
        expression, flame_pose = self.controls.inputs()
        self.start_camera, self.look_at, self.up = view_from_frame(
            sequence.intrinsics, sequence.cam_pose[0], self._centre(expression, flame_pose)
        )
        self._pages: dict[int, _Page] = {}
        self._lock = threading.Lock()  # guards _pages and the play state
        self._local = threading.local()  # .syncing: this thread is showing state on the sliders
        self._playing = False
        self._play_origin = (0.0, 0)  # (time, frame) playback counts from
        self._closed = threading.Event()
        self._play_thread: threading.Thread | None = None

        self.server = self._viser.ViserServer(host=host, port=port, label=title, verbose=False)
        self.server.scene.set_up_direction(tuple(float(v) for v in self.up))
        camera = self.server.initial_camera
        camera.position = tuple(float(v) for v in self.start_camera.position)
        camera.look_at = tuple(float(v) for v in self.look_at)
        camera.up = tuple(float(v) for v in self.up)
        camera.fov = self.start_camera.fov
        self._build_gui()
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)

    # ------------------------------------------------------------------------------------ setup

    def _centre(self, expression: np.ndarray, flame_pose: np.ndarray) -> np.ndarray:
        """The centre of the avatar's bounding box at a frame (the origin for an empty cloud)."""
        if self.baked.n_points == 0:
            return np.zeros(3)
        points, _ = self.baked.deform(torch.as_tensor(expression), torch.as_tensor(flame_pose))
        points = points[0].double().cpu()
        return ((points.amin(0) + points.amax(0)) / 2).numpy()

    def _build_gui(self) -> None:
        gui = self.server.gui
        self.view = gui.add_dropdown("view", tuple(VIEWS), initial_value="rgb", order=1.0)
        self.view.on_update(lambda _: self._invalidate())
        self.reset = gui.add_button(
            "neutral face", hint="all expressions and poses to 0 (pauses playback)", order=3.0
        )
        self.reset.on_click(lambda _: self._neutral())

        n_frames = len(self.sequence.img_name)
        with gui.add_folder("sequence", order=4.0):
            gui.add_markdown(f"{n_frames} frames at {self.fps:g} fps")
            self.play = gui.add_button("play", hint="play the sequence's expressions and poses")
            self.play.on_click(lambda _: self.set_playing(not self._playing))
            self.frame = gui.add_slider("frame", 0, max(n_frames - 1, 0), 1, 0)
            self.frame.on_update(lambda _: self._show_frame(int(self.frame.value)))

        self.sliders: dict[str, Any] = {}
        for order, (folder, expand) in enumerate(FOLDERS.items(), start=5):
            members = [s for s in self.controls.sliders if s.folder == folder]
            if not members:
                continue
            with gui.add_folder(folder, order=float(order), expand_by_default=expand):
                for slider in members:
                    handle = gui.add_slider(
                        slider.label, slider.low, slider.high, 0.01, self.controls.slider_value(slider)
                    )
                    handle.on_update(self._slider_callback(slider, handle))
                    self.sliders[slider.label] = handle

    def _slider_callback(self, slider: Slider, handle: Any) -> Callable[[Any], None]:
        def moved(_: Any) -> None:
            if getattr(self._local, "syncing", False):  # our own display update, not the user
                return
            self.controls.set_slider(slider, float(handle.value))
            self._invalidate()

        return moved

    @contextmanager
    def _syncing(self) -> Iterator[None]:
        """Slider values set in this block show the state; their callbacks (run in this thread by
        viser) do not write it back."""
        self._local.syncing = True
        try:
            yield
        finally:
            self._local.syncing = False

    def _show_controls(self) -> None:
        with self._syncing():
            for slider in self.controls.sliders:
                self.sliders[slider.label].value = self.controls.slider_value(slider)

    # ---------------------------------------------------------------------------------- actions

    def _show_frame(self, index: int) -> None:
        """Expression and pose of the sequence's frame ``index`` (the frame slider's callback)."""
        index = min(max(index, 0), len(self.sequence.img_name) - 1)
        self.controls.set_frame(
            self.sequence.expression[index].numpy(), self.sequence.flame_pose[index].numpy()
        )
        self._show_controls()
        self._invalidate()

    def _neutral(self) -> None:
        self.set_playing(False)
        self.controls.neutral()
        self._show_controls()
        self._invalidate()

    def set_playing(self, playing: bool) -> None:
        """Play (from the frame slider's frame) or pause the sequence."""
        with self._lock:
            self._playing = bool(playing)
            self._play_origin = (time.perf_counter(), int(self.frame.value))
        self.play.label = "pause" if playing else "play"

    def _play_loop(self) -> None:
        n_frames = len(self.sequence.img_name)
        while not self._closed.wait(0.25 / self.fps):
            with self._lock:
                if not self._playing:
                    continue
                origin_time, origin_frame = self._play_origin
            index = (origin_frame + int((time.perf_counter() - origin_time) * self.fps)) % n_frames
            self.frame.value = index  # its callback shows the frame

    def _invalidate(self) -> None:
        """Every page renders again (the controls or the view changed)."""
        with self._lock:
            for page in self._pages.values():
                page.wake.set()

    # ------------------------------------------------------------------------------------ pages

    def _connect(self, client: viser.ClientHandle) -> None:
        page = _Page(client)
        page.stats = client.gui.add_markdown("rendering ...", order=2.0)

        @client.camera.on_update
        async def moved(_: Any) -> None:
            page.wake.set()

        page.thread = threading.Thread(target=self._page_loop, args=(page,), daemon=True, name="viewer-page")
        with self._lock:
            self._pages[client.client_id] = page
        page.wake.set()
        page.thread.start()

    def _disconnect(self, client: viser.ClientHandle) -> None:
        with self._lock:
            page = self._pages.pop(client.client_id, None)
        if page is not None:
            page.stop.set()
            page.wake.set()

    @staticmethod
    def client_camera(client: viser.ClientHandle) -> ViewCamera:
        """A page's current camera (world frame of the avatar)."""
        cam = client.camera
        width, height = cam.image_width, cam.image_height
        return ViewCamera(
            position=np.array(cam.position, dtype=np.float64),
            wxyz=np.array(cam.wxyz, dtype=np.float64),
            fov=float(cam.fov),
            aspect=width / height if width > 0 and height > 0 else 1.0,
        )

    def render(self, camera: ViewCamera) -> ViewImage:
        """The current view (controls and view switch) for ``camera``."""
        expression, flame_pose = self.controls.inputs()
        return self.renderer.render(camera, expression, flame_pose, image=str(self.view.value))

    def _page_loop(self, page: _Page) -> None:
        frames = 0
        while not page.stop.is_set() and not self._closed.is_set():
            if not page.wake.wait(0.5):
                continue
            page.wake.clear()
            if page.stop.is_set():
                break
            start = time.perf_counter()
            try:
                camera = self.client_camera(page.client)
                image = self.render(camera)
                pixels = plots.to_uint8(image.image)
                page.client.scene.set_background_image(pixels, format="jpeg", jpeg_quality=JPEG_QUALITY)
                frame_ms = 1e3 * (time.perf_counter() - start)
                page.stats.content = (
                    f"**{frame_ms:.1f} ms** a frame ({1e3 / frame_ms:.0f} fps): render {image.render_ms:.1f} ms, "
                    f"{pixels.shape[1]}x{pixels.shape[0]} px, {self.baked.n_points} points, {self.baked.device}"
                )
            except Exception as exc:  # the page stops updating; the server and other pages go on
                print(
                    f"viewer: rendering for page {page.client.client_id} failed: {type(exc).__name__}: {exc}"
                )
                break
            frames += 1
            page.sent = SentView(frames=frames, camera=camera, pixels=pixels)
            rest = 1.0 / MAX_FPS - (time.perf_counter() - start)
            if rest > 0:
                page.stop.wait(rest)

    # ---------------------------------------------------------------------------------- serving

    @property
    def url(self) -> str:
        """The page's address."""
        return f"http://{self.server.get_host()}:{self.server.get_port()}"

    def sent_views(self) -> dict[int, SentView]:
        """Per connected page (viser client id), the last image sent to it."""
        with self._lock:
            return {cid: page.sent for cid, page in self._pages.items() if page.sent is not None}

    def clients(self) -> dict[int, viser.ClientHandle]:
        """The connected pages' viser clients, by client id."""
        with self._lock:
            return {cid: page.client for cid, page in self._pages.items()}

    def start(self) -> None:
        """Start the play thread (the server already serves since construction)."""
        if self._play_thread is None:
            self._play_thread = threading.Thread(target=self._play_loop, daemon=True, name="viewer-play")
            self._play_thread.start()

    def stop(self) -> None:
        """Stop the threads and the server."""
        self._closed.set()
        with self._lock:
            pages = list(self._pages.values())
            self._pages.clear()
        for page in pages:
            page.stop.set()
            page.wake.set()
        for thread in [self._play_thread] + [p.thread for p in pages]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5.0)
        self.server.stop()
