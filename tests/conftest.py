"""Session-wide fixtures."""

from __future__ import annotations

import pytest
from run_fixtures import make_subject


@pytest.fixture(scope="session")
def subject(tmp_path_factory):
    """A tiny (32x32, 2 frames per video) synthetic subject, written once per test session."""
    return make_subject(tmp_path_factory.mktemp("data"))
