"""The synthetic FLAME-format subject (model files and IMavatar-format videos) and its mesh renderer.

A stand-in for the licensed FLAME model and the captured videos, used by the demo, the tests and the
benchmarks. No runtime package imports it: only `Experiment.ensure_data` does, when a conf sets
`dataset.synthetic.generate`. It builds on `flame/` and `errors` only.
"""

from pointavatar.synthetic.generator import (
    CAPTURE_INTRINSICS,
    ensure_synthetic_subject,
    make_synthetic_flame,
    make_synthetic_subject,
    synthetic_template,
)

__all__ = [
    "CAPTURE_INTRINSICS",
    "ensure_synthetic_subject",
    "make_synthetic_flame",
    "make_synthetic_subject",
    "synthetic_template",
]
