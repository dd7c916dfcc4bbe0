"""Graceful preemption: SIGTERM/SIGINT ask the trainer to stop at the next optimizer update
(after which it writes a resumable checkpoint and exits 0) instead of dying mid-step."""

from __future__ import annotations

import signal
from typing import Dict


class PreemptionFlag:
    """Set by SIGTERM or SIGINT; a second SIGINT (Ctrl-C twice) interrupts immediately."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: Dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
