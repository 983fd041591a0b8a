"""Session-wide fixtures."""

from __future__ import annotations

import pytest
import torch
from run_fixtures import make_subject


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
