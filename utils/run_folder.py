"""The run folder (``OUTPUT/MODEL.NAME/TAG``): checked before any work, owned by one run at a time,
cleared of what interrupted saves left behind.

* :func:`prepare_run_folder` creates the folder and proves it writable, and refuses names the run
  must write that are taken by folders, so a bad ``--output`` is one line before the first step
  rather than a traceback at the end of the first epoch.
* :class:`RunFolderLock`: two runs writing one folder interleave their ``summary.csv`` rows and
  overwrite each other's checkpoints; a requeued job whose predecessor still runs does exactly
  that. The lock is a POSIX record lock (``fcntl.lockf``) on ``<folder>/.lock``: the kernel drops
  it when the process dies however it dies, and, unlike ``flock``, forked children (the loader
  workers, which can outlive a killed trainer by seconds) do not share it, so a killed run never
  blocks its own immediate restart. The file records the holder's pid and host for the message.
* :func:`remove_interrupted_saves` deletes the temporary files of saves that a kill interrupted
  (checkpoint-sized, so worth counting); called by the lock holder only.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import os
import socket
import tempfile
from typing import Iterable, Iterator, List, Optional, Tuple

from .distributed import DistInfo, on_every_rank
from .errors import UserError

LOCK_NAME = ".lock"
# Temporary names of the project's atomic writes: checkpoint saves and links
# (``.<name>.<random>.tmp``) and the run config (``config.yaml.tmp``).
_TEMP_PATTERNS = (".*.pth.*.tmp", "config.yaml.tmp")


class RunFolderLock:
    """``with RunFolderLock(folder):`` holds the folder's lock, or raises ``UserError`` naming
    the folder and the holder (pid, host, start time)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"cannot use run folder {self.folder}: {self.path}: {e.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN / EACCES: another process holds it
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "an unknown process"
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
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def prepare_run_folder(folder: str, files: Iterable[str] = ()) -> None:
    """Create ``folder`` and check that a run can write there: a file in the way, a read-only
    file system, missing permissions, or one of ``files`` (names the run writes) taken by a
    folder is a ``UserError`` naming the path, before any work is done."""
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        raise UserError(f"cannot create run folder {folder}: a file is in the way (--output / --tag)") from None
    except OSError as e:
        where = f" ({e.filename})" if e.filename and os.path.abspath(e.filename) != os.path.abspath(folder) else ""
        raise UserError(f"cannot create run folder {folder}{where}: {e.strerror} (--output / --tag)") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write in run folder {folder}: {e.strerror} (--output / --tag)") from None
    for name in files:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder, but the run writes a file of that name there: move it away")


def remove_interrupted_saves(folder: str) -> Tuple[int, int]:
    """Delete the temporary files of saves a kill interrupted; returns (count, bytes)."""
    found: List[str] = []
    for pattern in _TEMP_PATTERNS:
        found += [p for p in glob.glob(os.path.join(folder, pattern)) if os.path.isfile(p)]
    removed = size = 0
    for path in found:
        try:
            n = os.path.getsize(path)
            os.unlink(path)
        except OSError:  # gone already, or not ours to remove: leave it
            continue
        removed, size = removed + 1, size + n
    return removed, size


@contextlib.contextmanager
def lock_run_folder(folder: str, info: DistInfo) -> Iterator[None]:
    """Hold ``folder``'s lock for a training run: rank 0 takes it, and every rank stops (one line,
    from rank 0) when another run holds it."""
    lock = RunFolderLock(folder)
    on_every_rank(lambda: lock.acquire() if info.is_primary else None, info)
    try:
        yield
    finally:
        lock.release()
