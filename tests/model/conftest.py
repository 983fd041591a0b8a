"""Fixtures of the model tests."""

from __future__ import annotations

import pytest
from flame_fixtures import make_landmarks
from test_model import N_FACES, make_flame_arrays

from pointavatar.flame import write_flame_pickle, write_landmark_embedding


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    """The tiny FLAME-format model (and landmark embedding) of test_model.py, written once per module."""
    root = tmp_path_factory.mktemp("flame")
    write_flame_pickle(root / "generic_model.pkl", make_flame_arrays())
    write_landmark_embedding(root / "landmark_embedding.npy", make_landmarks(N_FACES))
    return str(root / "generic_model.pkl"), str(root / "landmark_embedding.npy")
