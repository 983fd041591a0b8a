"""Time of the training data path: stacking one batch of ground truth, and a DataLoader's batches.

With train.ground_truth_on_device "off" every training step receives its frames' images and masks
through the DataLoader: the items are stacked (collate_fn) in a worker, pinned and copied. This times
that per batch on this machine, for the train set of a conf, so that a data-bound training loop can be
told apart from a GPU-bound one.

    python benchmarks/bench_data.py --conf benchmarks/synthetic512.conf --data-folder ./data/datasets \\
        --batch 16 --workers 0 2 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from torch.utils.data import DataLoader  # noqa: E402

from pointavatar.config import load_conf  # noqa: E402
from pointavatar.engine.experiment import Experiment  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conf", default="benchmarks/synthetic512.conf")
    parser.add_argument("--data-folder", default=None, help="dataset.data_folder (default: the conf's)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--batches", type=int, default=8, help="timed batches per loader")
    args = parser.parse_args(argv)
    overrides = {"dataset.synthetic.generate": False}
    if args.data_folder:
        overrides["dataset.data_folder"] = args.data_folder
    conf = load_conf(args.conf).override(overrides)
    dataset = Experiment(conf).train_dataset()
    n = min(args.batch, len(dataset))
    times = []
    for _ in range(3):
        items = [dataset[i] for i in range(n)]
        start = time.perf_counter()
        batch = dataset.collate_fn(items)
        times.append((time.perf_counter() - start) * 1000)
    size = sum(v.numel() * v.element_size() for v in batch[2].values()) / 2**20
    print(f"{len(dataset)} frames; one batch of {n}: {size:.0f} MB of ground truth, stacked in "
          f"{statistics.median(times):.1f} ms (median of 3)")  # fmt: skip
    for workers in args.workers:
        loader = DataLoader(dataset, batch_size=n, shuffle=True, collate_fn=dataset.collate_fn,
                            num_workers=workers, persistent_workers=workers > 0)  # fmt: skip
        count = min(args.batches, len(loader) - 1)
        if count < 1:
            raise SystemExit(f"{len(dataset)} frames make fewer than 2 batches of {n}: nothing to time")
        iterator = iter(loader)
        next(iterator)  # the workers' start
        start = time.perf_counter()
        for _ in range(count):
            next(iterator)
        per_batch = (time.perf_counter() - start) * 1000 / count
        print(f"DataLoader, {workers} workers: {per_batch:.1f} ms a batch")


if __name__ == "__main__":
    main()
