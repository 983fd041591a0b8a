"""The figures of benchmarks/multigpu_512.sh as JSON: for the run on K ranks and the run on one, the
epoch time at the final point count (from the runs' logs) and the test metrics (from the evaluator's
results), and the ratios the issue asks for.

    python benchmarks/multigpu_summary.py --work WORK --ranks K --out SUMMARY.json

WORK holds k<K>/ and k1/ (each the train.exps_folder of one run, with its log-*.txt files) and
k<K>.conf, k1.conf. A run that has not finished yet is reported with what its logs hold so far.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np

from pointavatar.config import load_conf
from pointavatar.engine.experiment import Experiment

# The trainer's line at the end of every epoch (train/trainer.py, Trainer.train_epoch).
EPOCH_LINE = re.compile(
    r"epoch (\d+)/(\d+) done in ([\d.]+) s \((\d+) points, radius ([\d.]+), batch (\d+)"
    r"(?: per rank x (\d+) ranks)?\)"
)
TARGET_SPEEDUP = 1.8  # issue 12, item 7: 2 GPUs against 1
TARGET_PSNR_DB = 0.3


def epochs_from_logs(logs: list[Path]) -> dict[int, dict]:
    """Epoch -> {seconds, points, batch, ranks}; logs in the order written (a resumed run repeats the
    interrupted epoch: the later line wins)."""
    epochs: dict[int, dict] = {}
    for log in logs:
        text = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
        for m in EPOCH_LINE.finditer(text):
            epochs[int(m.group(1))] = {
                "seconds": float(m.group(3)),
                "points": int(m.group(4)),
                "batch_per_rank": int(m.group(6)),
                "ranks": int(m.group(7) or 1),
                "nepoch": int(m.group(2)),
            }
    return epochs


def training_frames(conf) -> int:
    """Frames of the training split: the videos' JSON frames, subsampled as FaceDataset does."""
    ds = conf.dataset
    total = 0
    for sub in ds.train.sub_dir:
        path = Path(ds.data_folder) / ds.subject_name / ds.subject_name / str(sub) / ds.json_name
        total += len(json.loads(path.read_text(encoding="utf-8"))["frames"])
    subsample = ds.train.subsample
    if isinstance(subsample, int):
        return math.ceil(total / subsample)
    if len(subsample) == 2:  # [first, end]
        return subsample[1] - subsample[0]
    return len(subsample)


def test_metrics(conf) -> dict | None:
    """Mean PSNR / SSIM / L1 (MAE) over the test frames of the newest evaluated epoch, or None."""
    exp = Experiment(conf)
    found = sorted(
        exp.eval_dir.glob("*/epoch_*/results_rgb_erode_dilate.npz"),
        key=lambda p: int(p.parent.name.split("_")[1]),
    )
    if not found:
        return None
    results = np.load(found[-1])
    return {
        "epoch": int(found[-1].parent.name.split("_")[1]),
        "psnr": float(np.mean(results["psnr_l"])),
        "ssim": float(np.mean(results["ssim_l"])),
        "l1": float(np.mean(results["mae_l"])),
        "frames": len(results["psnr_l"]),
        "file": str(found[-1]),
    }


def run_summary(work: Path, k: int) -> dict:
    conf_path = work / f"k{k}.conf"
    if not conf_path.is_file():
        return {"ranks": k, "status": "not started"}
    conf = load_conf(conf_path)
    logs = sorted((work / f"k{k}").glob("log-*.txt"))
    epochs = epochs_from_logs(logs)
    metrics = test_metrics(conf)
    nepoch = conf.train.nepoch
    out: dict = {"ranks": k, "conf": str(conf_path), "logs": [str(p) for p in logs]}
    out["status"] = "complete" if metrics and (work / f"k{k}.finished").is_file() else "incomplete"
    out["epochs_logged"] = len(epochs)
    out["nepoch"] = nepoch
    if epochs:
        frames = training_frames(conf)
        last = epochs[max(epochs)]
        final = [e for e in epochs.values() if e["points"] == last["points"]]
        seconds = statistics.median(e["seconds"] for e in final)
        out["final_points"] = last["points"]
        out["batch_per_rank_at_final_points"] = last["batch_per_rank"]
        out["epochs_at_final_points"] = sorted(i for i, e in epochs.items() if e["points"] == last["points"])
        out["epoch_seconds_at_final_points_median"] = seconds
        out["epochs_per_hour_at_final_points"] = 3600.0 / seconds
        out["training_frames"] = frames
        out["frames_per_second_at_final_points"] = frames / seconds
        out["point_frames_per_second_at_final_points"] = frames * last["points"] / seconds
        out["training_seconds_logged"] = sum(e["seconds"] for e in epochs.values())
    out["test"] = metrics
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    many, one = run_summary(args.work, args.ranks), run_summary(args.work, 1)
    summary: dict = {"runs": {f"k{args.ranks}": many, "k1": one}}
    key = "point_frames_per_second_at_final_points"
    if key in many and key in one:
        summary["speedup_point_frames_per_second"] = many[key] / one[key]
        summary["speedup_epoch_time"] = (
            one["epoch_seconds_at_final_points_median"] / many["epoch_seconds_at_final_points_median"]
        )
        summary["speedup_target"] = TARGET_SPEEDUP if args.ranks == 2 else None
    if many.get("test") and one.get("test"):
        summary["psnr_difference_db"] = many["test"]["psnr"] - one["test"]["psnr"]
        summary["psnr_target_db"] = TARGET_PSNR_DB
    summary["complete"] = many.get("status") == one.get("status") == "complete"
    if summary["complete"] and "speedup_point_frames_per_second" in summary and args.ranks == 2:
        summary["speedup_met"] = summary["speedup_point_frames_per_second"] >= TARGET_SPEEDUP
        summary["psnr_met"] = abs(summary["psnr_difference_db"]) <= TARGET_PSNR_DB
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
