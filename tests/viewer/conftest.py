"""A tiny trained run (the render tests' recipe) and its baked avatar, shared by the viewer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from run_fixtures import SUBJECT1, tiny

from pointavatar.config import save_conf
from pointavatar.engine import checkpoints as ckpt
from pointavatar.engine.experiment import Experiment
from pointavatar.model.baked import BakedAvatar
from pointavatar.train.trainer import Trainer


@pytest.fixture(scope="session")
def tiny_run(subject, tmp_path_factory):
    """A tiny run trained for one epoch on the 32x32 synthetic subject; its conf written to a file."""
    root = tmp_path_factory.mktemp("viewer_run")
    conf = tiny(SUBJECT1, subject, root / "exps")
    Trainer(conf, nepoch=0, device="cpu").run()
    conf_path = root / "tiny.conf"
    save_conf(conf, conf_path)
    return conf, conf_path


@pytest.fixture(scope="session")
def tiny_baked(tiny_run) -> BakedAvatar:
    conf, _ = tiny_run
    exp = Experiment(conf, generate=False)
    model = exp.load_trained_model(ckpt.Checkpoints(exp.load_dir), "latest", torch.device("cpu")).model
    return BakedAvatar.from_model(model.eval())


@pytest.fixture(scope="session")
def sequence_json(subject) -> Path:
    """The synthetic subject's test sequence (IMavatar JSON)."""
    return Path(subject) / "synthetic" / "synthetic" / "test" / "flame_params.json"
