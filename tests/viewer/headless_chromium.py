"""A headless Chromium driven through the Chrome DevTools protocol (CDP): open a page, take screenshots.

The system's Chromium (Debian package ``chromium``), nothing downloaded: CDP is JSON over one
websocket (the ``websockets`` package viser depends on). The browser may reach this machine only:
every host name but 127.0.0.1 resolves to nothing, so a page that needed the network would fail here.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
from websockets.sync.client import connect  # a dependency of viser (the viewer's extra)

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable on the PATH, or None."""
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


class HeadlessChromium:
    """One headless browser with one page, as a context manager.

    Software WebGL (SwiftShader) stands in for a GPU, as on a machine without one.
    """

    def __init__(self, executable: str, width: int, height: int, timeout: float = 30.0):
        self.executable, self.width, self.height, self.timeout = executable, width, height, timeout
        self._ids = itertools.count(1)
        # Chromium's helper processes can still write to the profile for a moment after the browser
        # exits; what they leave behind is removed on a best-effort basis (below).
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True)
        self._proc: subprocess.Popen | None = None
        self._ws = None

    def __enter__(self) -> HeadlessChromium:
        profile = Path(self._profile.name)
        self._proc = subprocess.Popen(
            [
                self.executable,
                "--headless=new",
                "--no-sandbox",  # root in CI containers
                "--disable-gpu",
                "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader",  # software WebGL, for three.js
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--window-size={self.width},{self.height}",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: __exit__ stops the helpers too
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"{self.executable} did not start its DevTools endpoint")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as response:
            targets = json.loads(response.read())
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=self.timeout)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    def __exit__(self, *exc) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._proc is not None:
            self._signal_group(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._proc.wait()
            self._signal_group(signal.SIGKILL)  # helpers that outlived the browser
        for _ in range(20):  # a helper may still be writing while it dies
            shutil.rmtree(self._profile.name, ignore_errors=True)
            if not Path(self._profile.name).exists():
                break
            time.sleep(0.1)
        self._profile.cleanup()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def call(self, method: str, **params) -> dict:
        """Send one CDP command and return its result (events in between are dropped)."""
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 10) -> None:
        """A left-button mouse drag from ``start`` to ``end`` (page pixels), as a user orbits the camera."""
        (x0, y0), (x1, y1) = start, end
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x0, y=y0)
        self.call(
            "Input.dispatchMouseEvent",
            type="mousePressed",
            x=x0,
            y=y0,
            button="left",
            buttons=1,
            clickCount=1,
        )
        for i in range(1, steps + 1):
            x, y = x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps
            self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
            time.sleep(0.02)
        self.call(
            "Input.dispatchMouseEvent",
            type="mouseReleased",
            x=x1,
            y=y1,
            button="left",
            buttons=0,
            clickCount=1,
        )

    def screenshot(self) -> np.ndarray:
        """The page as an RGB uint8 image [height, width, 3]."""
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        return bgr[..., ::-1].copy()


def main(argv=None) -> int:
    """Screenshot a page: ``python tests/viewer/headless_chromium.py URL OUT.png [--size WxH] [--wait S]``
    (e.g. a running `pointavatar-viewer`, for README's picture; the software-WebGL notice is hidden)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--size", default="1200x750", help="viewport WxH (default 1200x750)")
    p.add_argument("--wait", type=float, default=8.0, help="seconds to let the page load and render")
    p.add_argument("--drag", default=None, help="DX,DY: drag the mouse from the page's centre (orbit) first")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    executable = find_chromium()
    if executable is None:
        print("error: no Chromium found (apt-get install chromium)")
        return 1
    with HeadlessChromium(executable, width, height) as browser:
        browser.open(args.url)
        time.sleep(args.wait / 2)
        browser.evaluate(
            "(() => { const s = document.createElement('style');"
            " s.textContent = '.mantine-Notifications-root { display: none !important; }';"
            " document.head.appendChild(s); return true; })()"
        )
        if args.drag:
            dx, dy = (float(v) for v in args.drag.split(","))
            browser.drag((width / 3, height / 2), (width / 3 + dx, height / 2 + dy))
        time.sleep(args.wait / 2)
        cv2.imwrite(args.out, browser.screenshot()[..., ::-1])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
