"""Graceful preemption: SIGTERM/SIGINT ask the trainer to stop at the next optimizer update
(after which it writes a resumable checkpoint and exits 0) instead of dying mid-step.

The signal is the trainer's to handle, not its loader workers'. ``torchrun`` forwards a SIGTERM
to each worker's whole process group, and SLURM signals every process of a job step, so loader
workers receive it too; torch's worker handler then exits, and the trainer's next batch raises
"DataLoader worker ... is killed by signal: Terminated" before it can save. Loaders therefore
start their workers with :func:`stop_signals_blocked` around the fork and give them
:func:`leave_stop_signals_to_trainer` as ``worker_init_fn``: a worker ignores SIGINT and a
SIGTERM from anyone but the trainer, and still stops when the trainer itself terminates it (as
torch's DataLoader and multiprocessing do at exit), so the trainer decides when workers stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Dict, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionFlag:
    """Set by SIGTERM or SIGINT; a second SIGINT (Ctrl-C twice) interrupts immediately."""

    SIGNALS = STOP_SIGNALS

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


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back in the calling thread (they stay pending and are handled on
    exit). Around the start of loader workers: a child inherits the mask, so a signal that
    arrives before the worker ignores it waits instead of killing the worker."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def leave_stop_signals_to_trainer(worker_id: int, trainer_pid: int) -> None:
    """``worker_init_fn`` of the trainer's loaders (bind ``trainer_pid`` with ``functools.partial``).

    SIGINT is ignored. SIGTERM stays blocked and a daemon thread takes each one with
    ``sigwaitinfo``, which tells who sent it: from the trainer (or this worker's parent) the worker
    exits at once, as torch's own worker handler does; from anyone else it is ignored. Hand-written
    because Python's signal handlers do not see the sender, and ignoring SIGTERM outright would
    leave workers the trainer can no longer terminate (multiprocessing joins them at exit).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    owners = {trainer_pid, os.getppid()}

    def take_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid in owners:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="moat-sigterm", daemon=True).start()
