"""Running a test script under Triton's interpreter (the Triton kernels' CPU tests), and the check those
scripts make."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_under_interpreter(script: str, timeout: int = 600) -> None:
    """Run ``script`` in a new Python with TRITON_INTERPRET=1 (read when Triton is imported, hence the
    subprocess) and code/, tests/ and tests/model/ on the path; it passes by printing INTERPRETER-OK.
    Skipped without Triton (a CPU build of torch has none; README "Tests")."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    paths = [str(ROOT / "code"), str(ROOT / "tests"), str(ROOT / "tests" / "model")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0 and "INTERPRETER-OK" in proc.stdout, proc.stdout + proc.stderr


def close(got, ref, rtol: float, what: str) -> None:
    """The scripts' check: got's largest error within ``rtol`` of ref's largest magnitude (plus 1e-7)."""
    err = (got - ref).abs().max().item()
    bound = rtol * ref.abs().max().item() + 1e-7
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"
