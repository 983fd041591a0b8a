"""The tolerance helper: defaults by dtype, a looser tolerance needs a reason, a mismatch fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import DEFAULT_TOLERANCES, assert_close, default_tolerances


def test_defaults_by_dtype():
    assert default_tolerances(torch.zeros(1, dtype=torch.float64)) == (1e-7, 1e-7)
    assert default_tolerances(torch.zeros(1)) == (1.3e-6, 1e-5)
    assert default_tolerances(torch.zeros(1, dtype=torch.float16)) == (1e-3, 1e-5)
    assert default_tolerances(torch.zeros(1, dtype=torch.bfloat16)) == (1.6e-2, 1e-5)
    assert default_tolerances(torch.zeros(1, dtype=torch.int64), True) == (0.0, 0.0)  # integers: exact
    # Mixed inputs take the loosest; arrays, Python floats and mappings of tensors count by their dtype.
    assert default_tolerances(torch.zeros(1), np.zeros(1)) == DEFAULT_TOLERANCES[torch.float32]
    assert default_tolerances(1.0, {"a": [torch.zeros(1, dtype=torch.float16)]}) == (1e-3, 1e-5)


def test_default_tolerance_accepts_rounding_and_rejects_more():
    x = torch.ones(4)
    assert_close(x + 1e-6, x)  # within float32's rtol 1.3e-6 + atol 1e-5
    with pytest.raises(AssertionError):
        assert_close(x + 1e-4, x)
    with pytest.raises(AssertionError):
        assert_close(torch.ones(4, dtype=torch.float64) + 1e-6, torch.ones(4, dtype=torch.float64))
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1, 2]), torch.tensor([1, 3]))  # integers compare exactly


def test_looser_tolerance_needs_a_reason():
    x = torch.ones(4)
    with pytest.raises(TypeError, match="reason"):
        assert_close(x + 1e-4, x, atol=1e-3)
    with pytest.raises(TypeError, match="reason"):
        assert_close(x, x, rtol=1e-5, reason=" ")
    assert_close(x + 1e-4, x, atol=1e-3, reason="a test of the helper")
    assert_close(x, x, rtol=0, atol=0)  # tighter needs no reason
    with pytest.raises(AssertionError):
        assert_close(x + 1e-2, x, atol=1e-3, reason="still fails beyond the looser tolerance")
