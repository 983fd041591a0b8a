"""Training time of a real-size run, computed from measured step times (issue 10).

The schedule of a real subject with the original's settings: about 3,000 training frames, epochs
0..62, 400 points doubled every 5 epochs (upsample at epochs 5, 10, ..., 50) to 409,600 at epoch 50,
B = min(819200 // N, 8) frames a step, ceil(frames / B) steps an epoch. Pruning is ignored, so the
point counts are upper bounds. Step times come from `bench_train.py` JSON files: a count between two
measured ones is interpolated log-linearly in N, one below the smallest takes the smallest's time
(small steps are bound by kernel launches), one above the largest is not allowed. Plots, checkpoints
and evaluation are not counted.

    python benchmarks/schedule_estimate.py benchmarks/results/2026-11-30_h200_bench_train_reference.json
    python benchmarks/schedule_estimate.py FAST.json --fallback REFERENCE_OR_OTHER.json
    python benchmarks/schedule_estimate.py SMALL_SIZES.json LARGE_SIZES.json   # one measurement in two files
"""

from __future__ import annotations

import argparse
import json
import math


def step_times(path: str) -> dict[int, float]:
    with open(path, encoding="utf-8") as f:
        return {int(r["points"]): float(r["train_step_ms"]) for r in json.load(f)["rows"]}


def interpolate(times: dict[int, float], n: int) -> float:
    sizes = sorted(times)
    if n <= sizes[0]:
        return times[sizes[0]]
    if n > sizes[-1]:
        raise ValueError(f"{n} points is above the largest measured size {sizes[-1]}")
    for lo, hi in zip(sizes, sizes[1:], strict=False):
        if lo <= n <= hi:
            w = math.log(n / lo) / math.log(hi / lo)
            return math.exp((1 - w) * math.log(times[lo]) + w * math.log(times[hi]))
    return times[n]


def schedule(frames: int, last_epoch: int, n0: int, max_points: int, every: int, budget: int, max_batch: int):
    """(epoch, points, batch, steps) of each epoch."""
    n = n0
    for epoch in range(last_epoch + 1):
        if epoch and epoch % every == 0 and n <= max_points // 2:
            n *= 2
        batch = max(1, min(budget // n, max_batch))
        yield epoch, n, batch, math.ceil(frames / batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "bench_json",
        nargs="+",
        help="bench_train.py --out files with the step times (merged; a later file wins)",
    )
    p.add_argument("--fallback", help="another bench JSON for sizes the first does not cover below its range")
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--last_epoch", type=int, default=62)
    args = p.parse_args()
    times = {}
    for path in args.bench_json:
        times.update(step_times(path))
    fallback = step_times(args.fallback) if args.fallback else {}
    total = 0.0
    for epoch, n, batch, steps in schedule(args.frames, args.last_epoch, 400, 409600, 5, 819200, 8):
        table = times if n >= min(times) or not fallback else fallback
        ms = interpolate(table, n)
        total += steps * ms / 1000
        print(
            f"epoch {epoch:>2}: N {n:>7} B {batch} {steps:>5} steps x {ms:6.1f} ms = {steps * ms / 1000:7.1f} s"
        )
    print(f"total {total:.0f} s = {total / 60:.1f} min = {total / 3600:.2f} h")


if __name__ == "__main__":
    main()
