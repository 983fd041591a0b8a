"""Look at a trained avatar in a web browser: orbit it, move expression and pose sliders, play a sequence.

    pointavatar-viewer --conf ./confs/demo.conf                   # then open http://127.0.0.1:8080
    pointavatar-viewer --conf ./confs/subject1.conf --checkpoint 60 --json other/flame_params.json \\
        --device cuda --port 0

`python scripts/viewer.py` is the same command; it needs the optional extra: pip install -e ".[viewer]".
Run from the repository root, like `pointavatar`.

The run is found and built as `pointavatar-render` finds it (train.exps_folder of the conf, or
--load_path), baked once (model/baked.py; CUDA graphs on a GPU) and served by viser, whose web client
ships in its wheel: the page needs no network. It shows the avatar from the browser's orbit camera, at
first the sequence's first frame from that frame's camera. The sequence (--json, default: the run's
test frames) gives the frames to play and the camera lens; its first frame's expression and pose are
the sliders' starting values. Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

from pointavatar.cli.trained_run import add_run_arguments, load_trained_run
from pointavatar.data import FlameParams, read_flame_params
from pointavatar.errors import PointAvatarError
from pointavatar.model.baked import BakedAvatar
from pointavatar.viewer.app import AvatarViewer, ViewerUnavailable, require_viser

MISSING_EXTRA = 2  # exit code when the optional extra is not installed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "show")
    p.add_argument(
        "--json",
        default=None,
        help="IMavatar-format flame_params.json to play (default: the run's test frames)",
    )
    p.add_argument("--fps", type=float, default=25.0, help="frame rate of the played sequence (default 25)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)"
    )
    p.add_argument(
        "--port",
        type=int,
        default=8080,
        help="port to serve on (default 8080; 0: a free port; if busy: the next)",
    )
    return p.parse_args(argv)


def run_test_frames(dataset, videos: list[str]) -> FlameParams:
    """The run's test frames (``dataset``: all test ``videos``, as the evaluator reads them) as a sequence."""
    return FlameParams(
        json_path=f"the run's test frames ({', '.join(videos)})",
        img_name=list(dataset.data["img_name"]),
        expression=dataset.data["expressions"],
        flame_pose=dataset.data["flame_pose"],
        cam_pose=dataset.data["world_mats"],
        intrinsics=dataset.intrinsics,
        shape_params=dataset.shape_params,
    )


def check_host(host: str) -> None:
    """Refuse a --host this machine cannot serve on (viser would retry port after port forever)."""
    try:
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as exc:
        raise PointAvatarError(
            f"--host {host}: cannot serve on this address ({exc.strerror or exc}); use 127.0.0.1 (this "
            "machine only) or 0.0.0.0 (every network interface)."
        ) from None


def build_viewer(args: argparse.Namespace) -> AvatarViewer:
    """Load and bake the run, and start serving it; errors propagate to `main`."""
    require_viser()  # before any work: the missing extra is the first thing to say
    if not args.fps > 0:
        raise PointAvatarError(f"--fps {args.fps:g}: the frame rate must be positive.")
    if not 0 <= args.port <= 65535:
        raise PointAvatarError(f"--port {args.port}: a port is 0 (any free port) to 65535.")
    check_host(args.host)
    params = read_flame_params(args.json) if args.json else None
    trained = load_trained_run(args, "pointavatar-viewer")
    conf, exp, device, loaded = trained.conf, trained.exp, trained.device, trained.loaded
    sequence = (
        params if params is not None else run_test_frames(loaded.test_set, list(conf.dataset.test.sub_dir))
    )
    start = time.perf_counter()
    baked = BakedAvatar.from_model(loaded.model.eval(), cuda_graph=device.type == "cuda")
    epoch = loaded.epoch
    del loaded  # the baked avatar holds all it needs
    print(
        f"Baked {exp.load_dir} epoch {epoch}: {baked.n_points} points, {baked.img_res}x{baked.img_res}, "
        f"in {time.perf_counter() - start:.2f} s on {device}; sequence: {sequence.json_path} "
        f"({len(sequence.img_name)} frames)"
    )
    viewer = AvatarViewer(baked, sequence, host=args.host, port=args.port, fps=args.fps)
    # A first render per channel set: CUDA graphs are captured (or the fallback warned about) now.
    for image in ("rgb", "normals"):
        viewer.renderer.render(viewer.start_camera, *viewer.controls.inputs(), image=image)
    viewer.start()
    return viewer


def main(argv=None) -> int:
    """The `pointavatar-viewer` console script; returns the exit code (0 when stopped with Ctrl-C, 1 on an
    error, 2 when the optional extra is not installed)."""
    args = parse_args(argv)
    try:
        viewer = build_viewer(args)
    except ViewerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return MISSING_EXTRA
    except PointAvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    # Ctrl-C and SIGTERM stop the server. The handlers are installed explicitly: a process started in
    # the background of a non-interactive shell inherits SIGINT as ignored, and Python then never
    # raises KeyboardInterrupt.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"Viewer at {viewer.url} (Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(1.0):
            pass
        print("\nstopping the viewer", flush=True)
    finally:
        viewer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
