"""One run per output folder: an exclusive lock on ``<run folder>/.lock`` held while training.

Two runs writing one folder interleave their ``summary.csv`` rows and overwrite each other's
checkpoints; a requeued job whose predecessor still runs does exactly that. The lock is a
``fcntl.flock`` on an open file, which the kernel releases when the process dies however it
dies (SIGKILL included), so a killed run never blocks its own resume. The file records the
holder's pid and host for the error message; its content is informational only.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from typing import Optional

from .errors import UserError

LOCK_NAME = ".lock"


class RunFolderLock:
    """``with RunFolderLock(folder):`` holds the folder's lock, or raises ``UserError`` naming
    the folder and the holder (pid, host, start time)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: another process holds it
            holder = os.read(fd, 512).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise UserError(
                f"{self.folder} is in use by another run ({holder}); wait for it to "
                "end, or use another --tag / --output"
            ) from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
