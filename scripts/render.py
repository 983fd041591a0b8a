#!/usr/bin/env python
"""Render a trained avatar driven by an IMavatar-format JSON (reenactment), on the baked renderer.

    python scripts/render.py --conf ./confs/subject1.conf --json path/to/flame_params.json --out video.mp4

A thin wrapper of the `pointavatar-render` console script (`pointavatar.cli.render`); the package must
be installed (README "Install"). Run from the repository root.
"""

import sys

from pointavatar.cli.render import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
