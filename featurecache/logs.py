"""The command line's log output: featurecache's records on standard error, one line each."""

from __future__ import annotations

import logging
import sys

from featurecache.outputs import printable

__all__ = ["OneLine", "log_to_stderr"]

logger = logging.getLogger("featurecache")


class OneLine(logging.Formatter):
    """Every log record one line: control characters in it (a file name's newline) shown escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def log_to_stderr(level: int) -> None:
    """Show featurecache's records of ``level`` and above on the current ``sys.stderr``, one line each.

    One handler is added the first time; later calls change the level and point the handler at
    the current ``sys.stderr`` (a test runner may swap it between commands).
    """
    if not any(getattr(h, "_featurecache", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLine("featurecache: %(levelname)s: %(message)s"))
        handler._featurecache = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    for h in logger.handlers:
        if getattr(h, "_featurecache", False):
            h.setStream(sys.stderr)
