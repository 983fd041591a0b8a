"""Session-wide fixtures."""

from __future__ import annotations

import pytest
import torch
from run_fixtures import SUBJECT1, make_subject, tiny

from pointavatar.config import save_conf
from pointavatar.train.trainer import Trainer

# The process's TF32 flags before any test ran (torch's defaults unless the environment changed them).
_INITIAL_TF32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


@pytest.fixture(autouse=True)
def _restore_matmul_precision():
    """Trainers, evaluators and the render command set the process-wide TF32 flags (``model.tf32``,
    on by default). Every test starts and ends with the process's initial flags, so an fp32 GPU
    comparison runs in fp32 whatever ran before it: module- and session-scoped fixtures that train
    are set up before this fixture, so restoring what it found would keep what they set."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _INITIAL_TF32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _INITIAL_TF32


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
    Trainer(conf, nepoch=0, device="cpu").run()  # sets the TF32 flags: see _restore_matmul_precision
    conf_path = root / "tiny.conf"
    save_conf(conf, conf_path)
    return conf, conf_path
