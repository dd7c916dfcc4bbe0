"""The project's error types: one small hierarchy, each reported to the user as one line.

``main.py`` and the tools catch :class:`MoatError`, print ``error: <message>`` on stderr and
exit with the class's ``exit_code``; anything else is a bug and keeps its traceback.

    MoatError
    +-- UserError            bad input: flag, path, checkpoint, run folder      (exit code 2)
    |   +-- ConfigError      a config key or value                              (exit code 2)
    |   +-- DataError        the data on disk                                   (exit code 2)
    +-- RunStoppedError      the run cannot go on safely                        (exit code 1)
    |   +-- NonFiniteLossError   NaN/Inf loss or gradient
    |   +-- CheckpointWriteError a checkpoint could not be written (disk full)
    +-- PeerFailedError      another process of the job failed and reported why (its exit code;
                             this process prints nothing, so that report stays the last line)
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable


class MoatError(Exception):
    """Base of the errors reported as one line; ``exit_code`` is the process's exit status."""

    exit_code = 2
    # Set by ``utils.distributed.on_every_rank`` when every rank stops on this failure together.
    agreed_by_every_rank = False


class UserError(MoatError, ValueError):
    """Bad input from the user (path, checkpoint, flag, run folder): exit code 2."""


class ConfigError(UserError):
    """A configuration key or value no run could use; the message names the key."""


# torch's DataLoader re-raises a worker's exception as ``type(exc)(msg)`` where ``msg`` is
# "Caught DataError in DataLoader worker process N.\nOriginal Traceback ...\n...DataError: <ours>".
_WORKER_MESSAGE = re.compile(r"^Caught \w+ in DataLoader worker process")
_ORIGINAL_LINE = re.compile(r"(?:^|\n)(?:[\w.]+\.)?DataError: (.*)\s*$")


class DataError(UserError):
    """A problem with the data on disk; its message is one line that names the path.

    When raised inside a DataLoader worker, torch re-raises it in the main process as
    ``DataError(<multi-line worker traceback>)``; the constructor recovers the original one-line
    message from it (kept whole in ``worker_traceback``) so ``str(err)`` still names the file.
    """

    def __init__(self, message: str = "", *args: Any) -> None:
        self.worker_traceback: str | None = None
        if isinstance(message, str) and _WORKER_MESSAGE.match(message):
            found = _ORIGINAL_LINE.search(message)
            if found:
                self.worker_traceback = message
                message = found.group(1).strip()
        super().__init__(message, *args)


class RunStoppedError(MoatError, RuntimeError):
    """The run stopped because going on would lose or corrupt work: exit code 1."""

    exit_code = 1


class NonFiniteLossError(RunStoppedError):
    """Training diverged (NaN/Inf loss or gradient); raised before anything is saved, so the
    last good checkpoint is never overwritten."""


class CheckpointWriteError(RunStoppedError):
    """A checkpoint could not be written (disk full, quota); the previous files are intact."""


class PeerFailedError(MoatError):
    """This process stops because another process of the same job failed; that process prints
    the one-line reason, this one leaves quietly with the same exit code."""

    def __init__(self, message: str = "another process of this job failed", exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_tool(prog: str, action: Callable[[], Any]) -> int:
    """Run a command-line tool's ``action``; a ``MoatError`` becomes ``<prog>: error: <message>``
    on stderr and its exit code, success 0 (what every script in tools/ returns from ``main``)."""
    try:
        action()
    except MoatError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
