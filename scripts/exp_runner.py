#!/usr/bin/env python
"""Train a PointAvatar and evaluate it (the original PointAvatar's command line).

    python scripts/exp_runner.py --conf ./confs/subject1.conf [--is_continue]
    python scripts/exp_runner.py --conf ./confs/subject1.conf --is_eval [--checkpoint 60] [--load_path DIR]

A thin wrapper of the `pointavatar` console script (`pointavatar.cli.exp_runner`); the package must be
installed (README "Install"). Run from the repository root.
"""

import sys

from pointavatar.cli.exp_runner import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
