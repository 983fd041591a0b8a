"""``--profile_epoch``: torch.profiler over a few training steps of one epoch of a real run.

The benchmarks time one step of a synthetic cloud; this profiles the trainer's own loop (data,
visibility, the finiteness check, the optimizer and the CUDA graph's replays) on the run's own
points, so the time a run spends outside the step's kernels shows. The steps profiled start after
the epoch's first ``SKIP_STEPS`` (its eager steps and CUDA-graph capture) where the epoch has enough.

The report, ``<run>/train/profile_epoch<E>.txt``: the wall time per step, the GPU's kernel time per
step (and so how busy the GPU was), then torch.profiler's table of operators and kernels by self
device time (CUDA) or self CPU time (CPU).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

SKIP_STEPS = 3  # an epoch's eager steps and CUDA-graph capture come first: not what a step costs
TABLE_ROWS = 40


def first_profiled_step(steps_in_epoch: int, steps: int) -> int:
    """The index of the first profiled step: after ``SKIP_STEPS`` when the epoch has room for them
    and ``steps`` more, else as late as still fits (0 for epochs shorter than ``steps``)."""
    return max(0, min(SKIP_STEPS, steps_in_epoch - steps))


class StepProfiler:
    """Profiles steps [first, first + steps) of one epoch: ``start`` before the first, ``step_done``
    after every step (counted once started; it stops after the last), ``stop`` at the epoch's end (an
    epoch with fewer steps than asked)."""

    def __init__(self, epoch: int, steps: int, device: torch.device, path: Path):
        self.epoch = epoch
        self.steps = steps
        self.device = device
        self.path = Path(path)
        self._prof: profile | None = None
        self._t0 = 0.0
        self.profiled = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._sync()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def step_done(self) -> None:
        """Counts a profiled step (none before ``start`` or after the last); stops after the last."""
        if self._prof is None:
            return
        self.profiled += 1
        if self.profiled >= self.steps:
            self.stop()

    def stop(self) -> None:
        if self._prof is None:
            return
        self._sync()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.path.write_text(report(prof, self.epoch, self.profiled, wall, self.device))
        tqdm.write(f"Profile of {self.profiled} steps of epoch {self.epoch}: {self.path}")


def report(prof: profile, epoch: int, steps: int, wall_s: float, device: torch.device) -> str:
    """The profile's text report (module docstring)."""
    averages = prof.key_averages()
    n = max(steps, 1)
    lines = [
        f"epoch {epoch}, training steps profiled: {steps} (torch.profiler, {device})",
        f"wall time per step: {wall_s / n * 1e3:.2f} ms (profiler on)",
    ]
    if device.type == "cuda":
        busy = sum(e.self_device_time_total for e in averages) / 1e3 / n  # ms per step
        lines.append(
            f"GPU kernel time per step: {busy:.2f} ms ({busy / (wall_s / n * 1e3):.0%} of the wall time)"
        )
        sort_by = "self_cuda_time_total"
    else:
        sort_by = "self_cpu_time_total"
    lines.append(
        f"CPU time per step in operators: {sum(e.self_cpu_time_total for e in averages) / 1e3 / n:.2f} ms"
    )
    lines += ["", averages.table(sort_by=sort_by, row_limit=TABLE_ROWS), ""]
    return "\n".join(lines)
