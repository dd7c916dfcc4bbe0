"""Per-run logger: rank 0 to the console, every rank to ``OUTPUT_DIR/log_rank{r}.txt``."""
from __future__ import annotations

import logging
import os
import sys

_FMT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


def create_logger(output_dir: str, rank: int = 0, name: str = "moat") -> logging.Logger:
    """A logger owned by this run (not module-global state shared between runs).

    Calling it again (e.g. a second run in one process, as tests do) replaces the handlers
    instead of stacking duplicates.
    """
    logger = logging.getLogger(f"{name}.rank{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
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
    return logger
