"""The tiny trained run's baked avatar (``tiny_run``: tests/conftest.py) and a sequence, for the viewer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pointavatar.engine import checkpoints as ckpt
from pointavatar.engine.experiment import Experiment
from pointavatar.model.baked import BakedAvatar


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
