"""The benchmarks' timing loop: CUDA-event times on a GPU, wall-clock times on the CPU."""

from __future__ import annotations

import time

import torch


def timed(fn, device: torch.device, warmup: int, repeat: int, setup=None) -> list[float]:
    """fn() run ``warmup`` times untimed, then ``repeat`` times: each run's time in ms (on CUDA between
    two events around it, synchronised after each run). ``setup()``, if given, runs before each timed
    run, outside the timed region (clearing gradients, say)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return times
