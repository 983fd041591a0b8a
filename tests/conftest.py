"""Session-wide fixtures."""

from __future__ import annotations

import pytest
import torch
from run_fixtures import SUBJECT1, make_subject, tiny

from pointavatar.config import save_conf
from pointavatar.train.trainer import Trainer


@pytest.fixture(autouse=True)
def _restore_matmul_precision():
    """Trainers, evaluators and the render command set the process-wide TF32 flags (``model.tf32``,
    on by default); restore them after every test, so a later fp32 GPU comparison runs in fp32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def subject(tmp_path_factory):
    """A tiny (32x32, 2 frames per video) synthetic subject, written once per test session."""
    return make_subject(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_run(subject, tmp_path_factory):
    """A tiny run trained for one epoch on ``subject``; its conf written to a file, as a user passes it
    (the render command's and the viewer's tests read it; none writes to it)."""
    root = tmp_path_factory.mktemp("tiny_run")
    conf = tiny(SUBJECT1, subject, root / "exps")
    # The trainer sets the TF32 flags (model.tf32); a session fixture is set up before the per-test
    # restore above saves them, so restore them here, or later fp32 GPU comparisons run in TF32.
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        Trainer(conf, nepoch=0, device="cpu").run()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    conf_path = root / "tiny.conf"
    save_conf(conf, conf_path)
    return conf, conf_path
