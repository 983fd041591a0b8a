"""Default comparison tolerances by dtype, in one place, and the `assert_close` the tests use.

The defaults are torch.testing's. A test that needs a looser tolerance than its dtype's default passes
`reason=`, one line saying why (the float32 summation order, a quantising round trip, ...); the helper
refuses a looser tolerance without one. Fix the data before loosening a tolerance (STYLE.md, "Tests").

Tensors and arrays compare through `assert_close`. Other tolerances say why on the line (or the line
above): `np.testing.assert_allclose` where an array is compared against a broadcast scalar,
`pytest.approx` for Python scalars (its defaults, rel 1e-6 or abs 1e-12, suit a scalar of any scale,
where float64's atol 1e-7 would not suit a learning rate of 1e-4), and `x < bound + slack` checks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

# (rtol, atol) per dtype: torch.testing.assert_close's defaults. Integer and bool dtypes compare exactly.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}

# Python numbers compare as torch.testing compares them: a float as float64, an int exactly.
_SCALAR_DTYPES = {bool: torch.bool, int: torch.int64, float: torch.float64}


def _dtypes(value: Any) -> Iterator[torch.dtype]:
    """The dtypes of a tensor, array or number, or of those inside a mapping or sequence of them."""
    if isinstance(value, torch.Tensor):
        yield value.dtype
    elif isinstance(value, np.ndarray | np.generic):
        yield torch.from_numpy(np.asarray(value)).dtype
    elif type(value) in _SCALAR_DTYPES:
        yield _SCALAR_DTYPES[type(value)]
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _dtypes(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _dtypes(item)
    else:
        raise TypeError(f"assert_close compares tensors, arrays and numbers, got {type(value).__name__}")


def default_tolerances(*values: Any) -> tuple[float, float]:
    """The loosest default (rtol, atol) over the values' dtypes; (0, 0) where all are integer or bool."""
    pairs = [DEFAULT_TOLERANCES.get(d, (0.0, 0.0)) for v in values for d in _dtypes(v)]
    return max((r for r, _ in pairs), default=0.0), max((a for _, a in pairs), default=0.0)


def assert_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    reason: str | None = None,
    **kwargs: Any,
) -> None:
    """torch.testing.assert_close with the dtype's default tolerances.

    `rtol` and `atol` may each be given alone (the other keeps its default). Either one looser than the
    default needs `reason`, a one-line note of why the comparison cannot be tighter; a TypeError otherwise.
    Other keyword arguments (`msg`, `check_dtype`, `equal_nan`, ...) go to torch.testing.assert_close.
    """
    default_rtol, default_atol = default_tolerances(actual, expected)
    rtol = default_rtol if rtol is None else float(rtol)
    atol = default_atol if atol is None else float(atol)
    looser = [f"{name} {value:g} > default {default:g}"
              for name, value, default in (("rtol", rtol, default_rtol), ("atol", atol, default_atol))
              if value > default]  # fmt: skip
    if looser and not (isinstance(reason, str) and reason.strip()):
        raise TypeError(f"a tolerance looser than the dtype's default needs reason=: {', '.join(looser)}")
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kwargs)
