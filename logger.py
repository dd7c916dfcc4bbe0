"""Per-run logger: rank 0 to the console, every rank to ``OUTPUT_DIR/log_rank{r}.txt``."""

from __future__ import annotations

import logging
import os
import sys

_FMT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"
_DATA_LOGGER = "data"  # the data package's module loggers (data.build, data.zip_dataset, ...)


def create_logger(output_dir: str, rank: int = 0, name: str = "moat") -> logging.Logger:
    """A logger owned by this run (not module-global state shared between runs).

    Warnings that reach the root logger (libraries, the data pipeline's "skipping unreadable
    image ...") are forwarded to this logger, so they land in the run's log files too; so are the
    data pipeline's INFO lines (dataset sizes, RAM-cache progress, shard indexing).
    Calling it again (e.g. a second run in one process, as tests do) replaces the handlers
    instead of stacking duplicates.
    """
    logger = logging.getLogger(f"{name}.rank{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    root = logging.getLogger()
    for owner in (logger, root):
        for handler in list(owner.handlers):
            if owner is logger or isinstance(handler, _ForwardTo):
                owner.removeHandler(handler)
                handler.close()

    formatter = logging.Formatter(_FMT, datefmt=_DATEFMT)
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        console.setFormatter(formatter)
        logger.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, f"log_rank{rank}.txt"), mode="a")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    logging.getLogger(_DATA_LOGGER).setLevel(logging.INFO)
    root.addHandler(_ForwardTo(logger))
    return logger


def close_logger(name: str = "moat") -> None:
    """Undo ``create_logger``: close the run's files and stop forwarding root warnings to it, so a
    later run (or other code) in the same process is not affected by this one."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ForwardTo) and handler.target.name.startswith(f"{name}.rank"):
            root.removeHandler(handler)
            for owned in list(handler.target.handlers):
                handler.target.removeHandler(owned)
                owned.close()


class _ForwardTo(logging.Handler):
    """Root-logger handler that hands WARNING+ records, and the data pipeline's INFO records, to
    the run's logger."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(level=logging.INFO)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.name.split(".")[0] == _DATA_LOGGER:
            self.target.handle(record)
