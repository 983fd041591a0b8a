"""Render a trained avatar driven by an IMavatar-format JSON: reenactment, on the baked renderer.

    pointavatar-render --conf ./confs/subject1.conf --json path/to/flame_params.json --out video.mp4
    pointavatar-render --conf ./confs/subject1.conf --checkpoint 60 --json other/flame_params.json \\
        --out other.mp4 --png_dir other_png --frames 0:200 --device cuda

`python scripts/render.py` is the same command. Run from the repository root, like `pointavatar`.

The run is found as `pointavatar --conf C --is_eval` finds it (train.exps_folder of the conf, or
--load_path) and built the same way (the identity of the conf's test video, the mean training
expression). Each frame of the JSON drives the avatar with its expression, FLAME pose and camera: a
JSON of the subject's own video re-renders it, another subject's (cross-reenactment) makes the avatar
play that video's expressions and head motion through that video's cameras (its identity, shape_params,
is not used). The model is baked once (model/baked.py) and the frames are rendered one at a time; the
MP4 (25 fps by default, H.264) is written to a temporary file beside --out and renamed when complete,
and --png_dir gets <frame number>.png per frame as the evaluator writes them (rgb/<n>.png).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pointavatar.cli import exit_code
from pointavatar.cli.trained_run import add_run_arguments, load_trained_run
from pointavatar.data import FlameParams, read_flame_params
from pointavatar.engine import plots
from pointavatar.errors import PointAvatarError
from pointavatar.evaluate import export
from pointavatar.model.baked import BakedAvatar

IMAGES = ("rgb", "normal", "shading", "albedo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "render")
    p.add_argument(
        "--json", required=True, help="IMavatar-format flame_params.json whose frames drive the avatar"
    )
    p.add_argument("--out", required=True, help="the MP4 to write (its folder must exist)")
    p.add_argument("--png_dir", default=None, help="also write each frame as <frame number>.png here")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (and PNGs of the same names)"
    )
    p.add_argument(
        "--frames",
        default=None,
        help="the JSON frames to render, as a Python slice of their positions: a:b, a:, :b or a:b:step "
        "(default: all)",
    )
    p.add_argument(
        "--image",
        default="rgb",
        choices=IMAGES,
        help="what to render: rgb (default), normal, shading or albedo",
    )
    p.add_argument("--fps", type=int, default=25, help="frames per second of the video (default 25)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the per-frame work (faster on CUDA after a warm-up)",
    )
    return p.parse_args(argv)


def frame_slice(text: str | None, n_frames: int, json_path: str) -> list[int]:
    """The JSON positions selected by ``--frames`` ("a:b", "a:", ":b", "a:b:step"; None = all)."""
    if text is None:
        return list(range(n_frames))
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        values = [int(v) if v.strip() else None for v in parts]
        indices = list(range(n_frames))[slice(*values)]
    except ValueError:
        raise PointAvatarError(
            f"--frames {text}: expected a slice of frame positions such as 0:100, 10:, :50 or 0:100:2."
        ) from None
    if not indices:
        raise PointAvatarError(f"--frames {text} selects none of the {n_frames} frames of {json_path}.")
    return indices


def check_outputs(out: Path, png_dir: Path | None, names: list[int], overwrite: bool) -> None:
    """Refuse, before any work, outputs that cannot be written or would replace files unasked."""
    if out.suffix.lower() != ".mp4":
        raise PointAvatarError(f"--out {out}: the video is written as MP4; give a path ending in .mp4.")
    if not out.parent.is_dir():
        raise PointAvatarError(f"--out {out}: the folder {out.parent} does not exist; create it first.")
    if out.is_dir():
        raise PointAvatarError(f"--out {out} is a folder; give the path of the .mp4 file to write.")
    if out.exists() and not overwrite:
        raise PointAvatarError(f"--out {out} exists; pass --overwrite to replace it.")
    if png_dir is not None:
        if png_dir.exists() and not png_dir.is_dir():
            raise PointAvatarError(f"--png_dir {png_dir} is a file, not a folder.")
        taken = [f"{n}.png" for n in names if (png_dir / f"{n}.png").exists()]
        if taken and not overwrite:
            raise PointAvatarError(
                f"--png_dir {png_dir} already holds {', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''}; "
                "pass --overwrite to replace them, or choose another folder."
            )


class RenderedFrames(Sequence):
    """The video's frames, rendered when the video writer asks for them (memory stays flat); each is
    also written as a PNG when ``png_dir`` is set, and counted on the progress bar."""

    def __init__(
        self,
        baked: BakedAvatar,
        params: FlameParams,
        indices: list[int],
        image: str,
        png_dir: Path | None,
        bar: tqdm,
    ):
        self.baked, self.params, self.indices, self.image = baked, params, indices, image
        self.png_dir, self.bar = png_dir, bar
        self.channels = "rgb" if image == "rgb" else "all"
        self._last: tuple[int, np.ndarray] | None = None  # the writer reads frame 0 twice (its size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        j = self.indices[i]
        p = self.params
        frame = self.baked.render(
            p.expression[j : j + 1],
            p.flame_pose[j : j + 1],
            p.intrinsics[None],
            p.cam_pose[j : j + 1],
            channels=self.channels,
        )
        # Clipped and truncated to 8 bits as the evaluator's PNGs are.
        pixels = plots.to_uint8(getattr(frame, self.image)[0])
        if self.png_dir is not None:
            plots.save_png(self.png_dir / f"{p.img_name[j]}.png", pixels)
        self._last = (i, pixels)
        self.bar.update(1)
        return pixels


def run(args: argparse.Namespace) -> int:
    """Render the JSON's frames; errors propagate to `main`."""
    params = read_flame_params(args.json)
    indices = frame_slice(args.frames, len(params.img_name), args.json)
    out = Path(args.out)
    png_dir = Path(args.png_dir) if args.png_dir else None
    check_outputs(out, png_dir, [params.img_name[j] for j in indices], args.overwrite)

    trained = load_trained_run(args, "pointavatar-render")
    exp, device, loaded = trained.exp, trained.device, trained.loaded
    model, epoch = loaded.model.eval(), loaded.epoch
    start = time.perf_counter()
    baked = BakedAvatar.from_model(model, compile=args.compile)
    del model, loaded  # the baked avatar holds all it needs
    print(
        f"Baked {exp.load_dir} epoch {epoch}: {baked.n_points} points, "
        f"{baked.nbytes() / 2**20:.1f} MiB, in {time.perf_counter() - start:.2f} s on {device}"
    )
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)

    # Written beside --out and renamed when complete: an interrupted run leaves no partial video there.
    partial = out.with_name(f".{out.stem}.partial-{os.getpid()}.mp4")
    start = time.perf_counter()
    try:
        with tqdm(total=len(indices), desc="rendering", unit="frame", dynamic_ncols=True) as bar:
            frames = RenderedFrames(baked, params, indices, args.image, png_dir, bar)
            export.write_video(partial, frames, fps=args.fps)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    elapsed = time.perf_counter() - start
    print(
        f"Wrote {out} ({len(indices)} frames, {baked.img_res}x{baked.img_res}, {args.fps} fps) in {elapsed:.1f} s"
        + (f"; PNGs in {png_dir}" if png_dir is not None else "")
    )
    return 0


def main(argv=None) -> int:
    """The `pointavatar-render` console script; returns the exit code (0, 1 on an error, 130 on Ctrl-C)."""
    args = parse_args(argv)
    return exit_code(run, args, f"{args.out} was not written")


if __name__ == "__main__":
    sys.exit(main())
