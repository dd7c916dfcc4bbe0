"""``--sync-debug``: find host-device synchronisations inside CUDA training steps.

A sync per step (``.item()``, ``float(tensor)``, a boolean mask index, a CPU copy) stalls the
host until the GPU drains, so the loader's next copy and the next kernels queue late. torch can
warn on each (``torch.cuda.set_sync_debug_mode``); this turns that on while the training loop
runs, pauses it around the deliberate syncs (log steps, checkpoints) and logs what it caught.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from typing import Iterator, List

import torch


class StepSyncCheck:
    """Context manager over one epoch's steps; does nothing unless enabled on a CUDA device."""

    def __init__(self, enabled: bool, device: torch.device, logger: logging.Logger) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.logger = logger
        self._catcher = None
        self._caught: List[warnings.WarningMessage] = []

    def __enter__(self) -> "StepSyncCheck":
        if self.enabled:
            self._catcher = warnings.catch_warnings(record=True)
            self._caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Around the loop's intended syncs."""
        if not self.enabled:
            yield
            return
        torch.cuda.set_sync_debug_mode("default")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(*exc)
        syncs = collections.Counter()
        for w in self._caught:
            if "synchroniz" in str(w.message):
                syncs[f"{w.filename}:{w.lineno}"] += 1
            else:  # not ours: hand back to the normal warning machinery
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if syncs:
            where = ", ".join(f"{loc} ({n}x)" for loc, n in syncs.most_common(5))
            self.logger.warning(f"sync debug: {sum(syncs.values())} host-device syncs inside training steps: {where}")
        else:
            self.logger.info("sync debug: no host-device sync inside training steps")
