"""Trainer utilities: checkpoints, distributed helpers, AMP loss scaling, metrics.

The two exception types below are the trainer's contract with ``main.py``: they are reported to
the user as one line (no traceback) and a non-zero exit code. Anything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """Bad input from the user (path, checkpoint, data, flag): one-line message, exit code 2."""


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN/Inf loss or gradient): one-line message, exit code 1.

    Raised before anything is saved, so the last good checkpoint is never overwritten.
    """


__all__ = ["UserError", "NonFiniteLossError"]
