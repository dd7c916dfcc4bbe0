"""Timing helpers shared by the benchmarks: the median time of a callable on CPU or CUDA, and
one training step of a model as a callable."""

from __future__ import annotations

import statistics
import time
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F


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


def train_step(
    fwd: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Callable[[], ContextManager],
) -> Callable[[], None]:
    """One optimizer step of a classifier on ``(x, y)`` (cross-entropy), as a callable to time."""

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
