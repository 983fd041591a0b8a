#!/usr/bin/env python
"""Look at a trained avatar in a web browser (expression and pose sliders, sequence playback).

    python scripts/viewer.py --conf ./confs/demo.conf        # then open http://127.0.0.1:8080

A thin wrapper of the `pointavatar-viewer` console script (`pointavatar.cli.viewer`); the package and
its optional extra must be installed: pip install -e ".[viewer]" (README "Viewer"). Run from the
repository root.
"""

import sys

from pointavatar.cli.viewer import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
