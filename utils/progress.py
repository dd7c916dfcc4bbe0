"""Progress bars (tqdm) for people at a terminal; log files and pipes keep their plain lines.

A bar is drawn only when stderr is an interactive terminal (``sys.stderr.isatty()``), so CI logs,
``nohup`` output and ``log_rank{r}.txt`` never fill with carriage-return frames.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterable, Iterator, Optional

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def on_terminal() -> bool:
    """True when stderr, where bars are drawn, is an interactive terminal."""
    return sys.stderr.isatty()


def progress_bar(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[int] = None,
    desc: Optional[str] = None,
    unit: str = "it",
    enabled: bool = True,
) -> tqdm:
    """A tqdm bar on stderr, disabled (a plain pass-through) unless ``enabled`` and on a terminal.

    ``enabled`` lets a caller switch bars off for a reason of its own (e.g. non-primary ranks).
    """
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not (enabled and on_terminal()),
        dynamic_ncols=True,
        leave=False,
    )


@contextlib.contextmanager
def logs_above(bar: tqdm, logger: logging.Logger) -> Iterator[None]:
    """While ``bar`` is drawn, print ``logger``'s console lines above it instead of through it
    (file handlers are untouched)."""
    if bar.disable:
        yield
        return
    with logging_redirect_tqdm(loggers=[logger]):
        yield
