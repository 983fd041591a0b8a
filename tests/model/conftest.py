"""Fixtures of the model tests."""

from __future__ import annotations

import pytest
import torch
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


@pytest.fixture
def eager_kernel_compile(monkeypatch):
    """torch.compile with the backend "aot_eager_decomp_partition" in place of inductor: Dynamo's tracing
    and guards (dynamic point counts, recompiles), inductor's decompositions and its partitioner (min-cut,
    compiler "inductor": what a compiled piece keeps for its backward, activation_memory_budget), then
    eager kernels instead of inductor's generated C++, whose compiling took 20 to 55 s a test on a cold CI
    machine. Inductor options (geometry_fused.COMPILE_OPTIONS, for benchmarks) are dropped. Inductor's
    own kernels are checked on the GPU (test_fast_path_equals_reference_on_gpu_in_float32)."""
    compile_ = torch.compile

    def compile_with_eager_kernels(fn, **kwargs):
        kwargs.pop("options", None)
        return compile_(fn, **{**kwargs, "backend": "aot_eager_decomp_partition"})

    monkeypatch.setattr(torch, "compile", compile_with_eager_kernels)
