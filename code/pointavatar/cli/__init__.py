"""Console scripts (the top layer: may import every other package).

- `pointavatar` (`cli.exp_runner`): train and evaluate, the original's `scripts/exp_runner.py`.
- `pointavatar-synthetic` (`cli.make_synthetic_subject`): write the synthetic subject.
- `pointavatar-render` (`cli.render`): render a trained avatar driven by an IMavatar-format JSON
  (reenactment) on the baked renderer, to an MP4 and optionally PNGs.
- `pointavatar-viewer` (`cli.viewer`): the interactive browser viewer (the optional extra `viewer`).

Each `main(argv)` returns the exit code and turns a `PointAvatarError` into one `error: ...` line on
stderr, so the console script and the wrapper in `scripts/` behave the same.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pointavatar.errors import PointAvatarError


def exit_code(run: Callable[..., int], args, interrupted: str) -> int:
    """``run(args)``'s exit code; a PointAvatarError is one ``error: ...`` line on stderr and exit 1,
    Ctrl-C the line ``interrupted: <interrupted>`` and exit 130 (no traceback for either)."""
    try:
        return run(args)
    except PointAvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        return 130
