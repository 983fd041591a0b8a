"""Where a training run's epoch time goes, from its log's epoch lines.

Each epoch line of the trainer reads, with train.cuda_graph on CUDA,

    epoch 12/82 done in 1.3 s (1986 points, radius 0.05339, batch 16; data wait 0.41 s); CUDA graph:
    1 captured (0.21 s), 1 eager steps (0.35 s)

This sums, over all epochs and over groups of epochs in the same point-count band, the epoch time,
the seconds spent waiting for the DataLoader, in captures and in eager steps, and the rest (replayed
steps, logging). Older logs without these seconds give the epoch times only ("n/a").

    python benchmarks/epoch_summary.py run.log [more.log ...]
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

EPOCH = re.compile(
    r"^epoch (?P<epoch>\d+)/\d+ done in (?P<seconds>[\d.]+) s \((?P<points>\d+) points, radius [\d.]+, "
    r"batch (?P<batch>\d+)[^)]*?(?:; data wait (?P<data_s>[\d.]+) s)?\)(?:.*?CUDA graph: (?P<captures>\d+) captured(?: \((?P<capture_s>[\d.]+) s\))?, "
    r"(?P<eager>\d+) eager steps(?: \((?P<eager_s>[\d.]+) s\))?)?"
)


def parse(text: str) -> list[dict]:
    """The epoch lines of a log as dicts (epoch, seconds, points, batch; data_s, capture_s, eager_s or None)."""
    rows = []
    for line in text.splitlines():
        m = EPOCH.match(line.strip())
        if not m:
            continue
        row = {k: int(m[k]) for k in ("epoch", "points", "batch")}
        row["seconds"] = float(m["seconds"])
        for k in ("data_s", "capture_s", "eager_s"):
            row[k] = float(m[k]) if m[k] is not None else None
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[tuple]:
    """(label, epochs, seconds, data-wait, capture and eager seconds or None) per point band (powers
    of 4) and for all epochs."""
    bands: dict[int, list[dict]] = {}
    for r in rows:
        bands.setdefault(int(math.log(max(r["points"], 1), 4)), []).append(r)
    out = []
    for key in sorted(bands):
        group = bands[key]
        lo, hi = min(r["points"] for r in group), max(r["points"] for r in group)
        out.append((f"{lo:,} to {hi:,} points", *_totals(group)))
    out.append(("all epochs", *_totals(rows)))
    return out


def _totals(group: list[dict]) -> tuple:
    def total(key):
        values = [r[key] for r in group]
        return None if any(v is None for v in values) else sum(values)

    return len(group), sum(r["seconds"] for r in group), total("data_s"), total("capture_s"), total("eager_s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.logs:
        rows = parse(path.read_text(encoding="utf-8", errors="replace"))
        if not rows:
            raise SystemExit(f"{path}: no epoch lines")
        print(f"{path}: {len(rows)} epochs")
        print("| epochs | count | epoch time | data wait | captures | eager steps | the rest |")
        print("|---|---|---|---|---|---|---|")
        for label, n, seconds, *parts in summarize(rows):
            cells = ["n/a" if p is None else f"{p:.1f} s" for p in parts]
            known = sum(p for p in parts if p is not None)
            rest = f"{seconds - known:.1f} s" if any(p is not None for p in parts) else "n/a"
            print(f"| {label} | {n} | {seconds:.1f} s | {' | '.join(cells)} | {rest} |")


if __name__ == "__main__":
    main()
