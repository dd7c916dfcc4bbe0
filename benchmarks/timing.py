"""Median time of a callable on CPU or CUDA, shared by the kernel-level benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` after ``warmup`` calls; CUDA calls are timed with events, so
    the host's launch time does not count where the device runs behind."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
