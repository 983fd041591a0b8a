"""Tiny training runs on the synthetic subject, shared by the training and reliability tests.

The `subject` fixture (tests/conftest.py) writes a 32x32 synthetic subject once per session; `tiny`
shrinks any conf to it (100 points, 2 frames per video) so a run of a few epochs takes seconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pointavatar.config import load_conf
from pointavatar.engine import checkpoints as ckpt

ROOT = Path(__file__).resolve().parents[1]
SUBJECT1 = ROOT / "confs" / "subject1.conf"
RES = 32


def make_subject(folder: Path) -> Path:
    from pointavatar.synthetic import make_synthetic_subject

    make_synthetic_subject(folder, "synthetic", res=RES, train_frames=2, test_frames=2, seed=0)
    return folder


def tiny(conf_path, subject, out, **extra):
    """The conf with the synthetic subject and tiny sizes; everything else as shipped."""
    conf = load_conf(conf_path)
    flame_dir = Path(subject) / "synthetic" / "flame"
    updates = {
        "train.exps_folder": str(out),
        "train.num_workers": 0,
        "train.plot_freq": 1,
        "train.max_points_training": 800,
        "train.upsample_freq": 1,
        "loss.vgg_feature_weight": 0.0,
        "dataset.data_folder": str(subject),
        "dataset.subject_name": "synthetic",
        "dataset.synthetic.generate": False,
        "dataset.train.sub_dir": ["train0", "train1"],
        "dataset.train.img_res": [RES, RES],
        "dataset.test.sub_dir": ["test"],
        "dataset.test.img_res": [RES, RES],
        "dataset.test.subsample": 1,
        "model.flame_model_path": str(flame_dir / "generic_model.pkl"),
        "model.flame_landmark_path": str(flame_dir / "landmark_embedding.npy"),
        "model.point_cloud.n_init_points": 100,
        "model.point_cloud.max_points": 400,
        "model.render_backend": "torch",
    }
    updates.update(extra)
    return conf.override(updates)


def load_model_ckpt(train_dir, name="latest"):
    return torch.load(Path(train_dir) / "checkpoints" / ckpt.MODEL / f"{name}.pth", map_location="cpu")
