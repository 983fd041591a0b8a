"""Generate the synthetic FLAME-format subject (IMavatar layout) used by the demo, tests and benchmarks.

    python scripts/make_synthetic_subject.py --data_folder ./data/datasets --subject synthetic --res 512

`pointavatar-synthetic` (installed with the package) is the same command.

Writes <data_folder>/<subject>/flame/{generic_model.pkl, landmark_embedding.npy} and the videos
<data_folder>/<subject>/<subject>/{train0, train1, test}/. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import sys
import time

from pointavatar.errors import PointAvatarError


def main(argv=None) -> int:
    """The `pointavatar-synthetic` console script; returns the exit code (0, or 1 on an error)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_folder", default="./data/datasets", help="dataset root (default ./data/datasets)")
    p.add_argument("--subject", default="synthetic", help="subject folder name (default synthetic)")
    p.add_argument(
        "--res", type=int, default=512, help="image resolution in pixels (default 512, as the real data)"
    )
    p.add_argument(
        "--train_frames", type=int, default=100, help="frames of each training video (default 100)"
    )
    p.add_argument("--test_frames", type=int, default=40, help="frames of the test video (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    from pointavatar.synthetic import make_synthetic_subject

    start = time.perf_counter()
    try:
        root = make_synthetic_subject(
            args.data_folder, args.subject, args.res, args.train_frames, args.test_frames, args.seed
        )
    except PointAvatarError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {root} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
