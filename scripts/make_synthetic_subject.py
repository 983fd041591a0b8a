#!/usr/bin/env python
"""Generate the synthetic FLAME-format subject (IMavatar layout) used by the demo, tests and benchmarks.

    python scripts/make_synthetic_subject.py --data_folder ./data/datasets --subject synthetic --res 512

A thin wrapper of the `pointavatar-synthetic` console script (`pointavatar.cli.make_synthetic_subject`);
the package must be installed (README "Install").
"""

import sys

from pointavatar.cli.make_synthetic_subject import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
