"""Imported first by the scripts that run Triton kernels under the interpreter (TRITON_INTERPRET=1).

Triton 3.6's interpreter turns a scalar kernel argument into an index with ``int()`` on a one-element
NumPy array (``range(0, n, BLOCK)`` over an argument ``n``, as the GEMM-style loops of our kernels do),
which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"). This wraps the
interpreter's tensor patching so that the index is read from the array's single element instead. Tests
only: the compiled kernels do not go through the interpreter.
"""

from __future__ import annotations

import triton.runtime.interpreter as _interpreter

_original = _interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):
    _original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


_interpreter._patch_lang_tensor = _patch_lang_tensor
