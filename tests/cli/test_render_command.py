"""`pointavatar-render` (cli/render.py): a tiny trained run driven by IMavatar JSONs, end to end on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from run_fixtures import RES

from pointavatar.cli import render
from pointavatar.config import save_conf
from pointavatar.data import FaceDataset, read_flame_params
from pointavatar.engine import checkpoints as ckpt
from pointavatar.engine import plots
from pointavatar.engine.experiment import Experiment

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def video_json(subject: Path, video: str) -> Path:
    return Path(subject) / "synthetic" / "synthetic" / video / "flame_params.json"


def read_video(path: Path) -> list[np.ndarray]:
    with imageio.get_reader(path, format="FFMPEG") as reader:
        return [frame for frame in reader]  # not list(reader): it trusts the reader's __len__, which is inf


def eval_forward_u8(conf, json_path: Path, image: str) -> dict[int, np.ndarray]:
    """The eval forward's image of every frame of ``json_path``, as the evaluator writes it (uint8)."""
    exp = Experiment(conf, generate=False)
    model = exp.load_trained_model(ckpt.Checkpoints(exp.load_dir), "latest", torch.device("cpu")).model.eval()
    params = read_flame_params(json_path)
    out = {}
    for j, name in enumerate(params.img_name):
        inp = {
            "expression": params.expression[j : j + 1],
            "flame_pose": params.flame_pose[j : j + 1],
            "intrinsics": params.intrinsics[None],
            "cam_pose": params.cam_pose[j : j + 1],
        }
        with torch.no_grad():
            o = model(inp)
        img = o.rgb_image if image == "rgb" else getattr(o.eval, f"{image}_image")
        out[name] = plots.to_uint8(plots.lin2img(img, RES)[0].permute(1, 2, 0))
    return out


@pytest.mark.parametrize("image", ["rgb", "normal"])
def test_render_writes_the_eval_forwards_frames(tiny_run, subject, tmp_path, image, capsys):
    conf, conf_path = tiny_run
    driving = video_json(subject, "test")
    out, pngs = tmp_path / "video.mp4", tmp_path / "png"
    args = ["--conf", str(conf_path), "--json", str(driving), "--out", str(out), "--png_dir", str(pngs)]
    assert render.main(args + ["--device", "cpu", "--image", image]) == 0
    assert "Wrote" in capsys.readouterr().out
    names = read_flame_params(driving).img_name
    assert sorted(p.name for p in pngs.glob("*.png")) == sorted(f"{n}.png" for n in names)
    frames = read_video(out)
    assert len(frames) == len(names) and frames[0].shape == (RES, RES, 3)
    assert not list(tmp_path.glob(".*partial*"))  # the temporary video was renamed

    expected = eval_forward_u8(conf, driving, image)
    for name in names:
        png = imageio.imread(pngs / f"{name}.png")
        assert png.shape == (RES, RES, 3)
        # Baked and eval forward differ by ~1e-6 before the 8-bit truncation: at most one level.
        diff = np.abs(png.astype(int) - expected[name].astype(int))
        assert diff.max() <= 1, name
        assert (png < 200).any()  # the avatar is in the frame
        # The lossy video frame stays near the PNG.
        assert np.abs(frames[names.index(name)].astype(int) - png.astype(int)).mean() < 12


def test_cross_reenactment_with_another_videos_json_and_a_frame_slice(tiny_run, subject, tmp_path):
    _, conf_path = tiny_run
    driving = video_json(subject, "train0")
    params = read_flame_params(driving)
    out, pngs = tmp_path / "cross.mp4", tmp_path / "png"
    args = ["--conf", str(conf_path), "--json", str(driving), "--out", str(out), "--png_dir", str(pngs)]
    assert render.main(args + ["--frames", "1:", "--device", "cpu"]) == 0
    assert [p.name for p in pngs.glob("*.png")] == [f"{params.img_name[1]}.png"]
    assert len(read_video(out)) == 1
    # --overwrite replaces the video; without it nothing is touched.
    before = out.stat().st_mtime_ns
    assert render.main(args + ["--frames", "1:", "--device", "cpu"]) == 1
    assert out.stat().st_mtime_ns == before
    assert render.main(args + ["--device", "cpu", "--overwrite"]) == 0
    assert len(read_video(out)) == len(params.img_name)


def test_render_errors_are_one_line_and_write_nothing(tiny_run, subject, tmp_path, capsys):
    conf, conf_path = tiny_run
    good = str(video_json(subject, "test"))

    def fails(args, match):
        assert render.main(["--conf", str(conf_path), "--device", "cpu"] + args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err

    fails(["--json", str(tmp_path / "missing.json"), "--out", str(tmp_path / "a.mp4")], "no such file")
    fails(["--json", good, "--out", str(tmp_path / "nowhere" / "a.mp4")], "does not exist")
    fails(["--json", good, "--out", str(tmp_path / "a.avi")], "ending in .mp4")
    fails(["--json", good, "--out", str(tmp_path / "a.mp4"), "--frames", "7:9"], "selects none")
    fails(["--json", good, "--out", str(tmp_path / "a.mp4"), "--frames", "x"], "slice")
    params = json.loads(Path(good).read_text())
    del params["frames"][1]["pose"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(params))
    fails(
        ["--json", str(bad), "--out", str(tmp_path / "a.mp4")],
        "frames[1] (./image/2) lacks the field(s) ['pose']",
    )
    existing = tmp_path / "existing.mp4"
    existing.write_bytes(b"keep")
    fails(["--json", good, "--out", str(existing)], "pass --overwrite")
    assert existing.read_bytes() == b"keep"
    pngs = tmp_path / "png"
    pngs.mkdir()
    (pngs / "1.png").write_bytes(b"keep")
    fails(["--json", good, "--out", str(tmp_path / "a.mp4"), "--png_dir", str(pngs)], "already holds 1.png")

    # A run without checkpoints: the checkpoint message of the evaluator, naming this command.
    empty = tmp_path / "empty.conf"
    save_conf(conf.override({"train.exps_folder": str(tmp_path / "no_runs")}), empty)
    assert render.main(["--conf", str(empty), "--json", good, "--out", str(tmp_path / "a.mp4")]) == 1
    assert "pointavatar-render: no checkpoint" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4")) or [p.name for p in tmp_path.glob("*.mp4")] == ["existing.mp4"]


def test_read_flame_params_equals_the_dataset(subject):
    dataset = FaceDataset(
        str(subject), "synthetic", "flame_params.json", ["test"], [RES, RES], only_json=True
    )
    params = read_flame_params(video_json(subject, "test"))
    assert params.img_name == dataset.data["img_name"]
    assert torch.equal(params.expression, dataset.data["expressions"])
    assert torch.equal(params.flame_pose, dataset.data["flame_pose"])
    assert torch.equal(params.cam_pose, dataset.data["world_mats"])
    assert torch.equal(params.intrinsics, dataset.intrinsics)
    assert torch.equal(params.shape_params, dataset.shape_params)


@pytest.mark.parametrize(
    "command",
    [[str(BIN / "pointavatar-render")], [sys.executable, str(ROOT / "scripts" / "render.py")]],
    ids=["console_script", "wrapper"],
)
def test_render_command_reports_errors_without_traceback(command, tmp_path):
    if not Path(command[0]).exists():
        pytest.skip("console script not installed (pip install -e .)")
    conf = tmp_path / "c.conf"
    conf.write_text("train { exps_folder = ./nothing }\n")
    proc = subprocess.run(
        command + ["--conf", str(conf), "--json", str(tmp_path / "x.json"), "--out", str(tmp_path / "x.mp4")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "x.json: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
