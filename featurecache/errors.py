"""The exceptions of featurecache: one class per module family, all one-line messages naming the file."""

from __future__ import annotations

import numbers
import re
from typing import Optional

__all__ = ["AblationError", "BackboneError", "CacheError", "DatasetError", "EvalError", "ExportError", "ExtractError",
           "FeaturecacheError", "HeadError", "PredictError", "ReportError", "integer_at_least", "is_out_of_memory",
           "one_line"]


class FeaturecacheError(ValueError):
    """Bad input or state; ``str(error)`` is one line that names the file and the problem.

    The command line prints it as ``Error: <message>`` and exits with status 1, without a
    traceback. Library users can catch it to tell bad input from bugs.

    Parameters
    ----------
    message : str
    param : str, optional
        The library parameter at fault (``background``, ``overwrite``, ...). ``str(error)``
        then reads ``"background: <message>"``; the command line names the flag instead
        (:meth:`for_option`).
    """

    def __init__(self, message: str, *, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message

    def for_option(self, name: str) -> str:
        """The message with ``name`` (e.g. ``--background``) in place of the parameter."""
        return f"{name}: {self.message}"


class DatasetError(FeaturecacheError):
    """A data set cannot be read: missing folders, malformed annotations, unknown classes."""


class BackboneError(FeaturecacheError):
    """A backbone cannot be built: unknown name, missing or mismatched weights."""


class CacheError(FeaturecacheError):
    """A cache cannot be read, written, resumed, or used with a given head."""


class ExtractError(FeaturecacheError):
    """Extraction stopped on bad input (with ``strict=True``) or bad settings."""


class HeadError(FeaturecacheError):
    """A head cannot be built, trained, saved, loaded or used on a cache (objectives included)."""


class EvalError(FeaturecacheError):
    """Evaluation cannot run (bad options, a head that does not fit the cache)."""


class PredictError(FeaturecacheError):
    """Prediction cannot run: a head that cannot be used on new images, bad inputs or options."""


class ReportError(FeaturecacheError):
    """A report page cannot be made or written: bad settings, an output that is one of its inputs."""


class ExportError(FeaturecacheError):
    """A head cannot be exported (``featurecache export``): no recorded extraction, a backbone or head ONNX
    cannot express, an input size the grid cannot use, or an exported model that disagrees with ``predict``."""


class AblationError(FeaturecacheError):
    """An ablation grid or setup is invalid, or a step after the sweep failed (``result``: the sweep's
    table, kept so that the caller can still show it)."""

    def __init__(self, message: str, *, param: Optional[str] = None, result=None) -> None:
        super().__init__(message, param=param)
        self.result = result


def integer_at_least(value, minimum: int) -> bool:
    """True for an integer (not a bool) of at least ``minimum``: the check every count-like parameter makes."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


_NOT_FINITE = re.compile(r"Input \w* ?contains (NaN|infinity)")

_MEMORY_WORDS = re.compile(r"can't allocate memory|out of memory|not enough memory|Unable to allocate|bad_alloc|"
                           r"cannot allocate memory|failed to allocate", re.I)

#: What to change when a command runs out of memory.
_MEMORY_HINTS = {
    "fit": "lower --memory-limit (training features above it are streamed from the file)",
    "ablate": "lower --memory-limit (above it each configuration streams its images from the file)",
    "eval": "evaluate one split at a time (--split)",
    "extract": "lower --batch-size or --max-pixels",
    "predict": "lower --batch-size, or predict fewer or smaller images at a time",
    "localize": "use a larger --stride",
    "report": "report on one split at a time (--split)",
}


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out (numpy's MemoryError, torch's and the runtimes' words for it)."""
    return isinstance(error, MemoryError) or bool(_MEMORY_WORDS.search(str(error)))


def one_line(error: BaseException, command: str) -> Optional[str]:
    """The one line a command prints for an error that is bad input or the machine's state, not a bug.

    Parameters
    ----------
    error : BaseException
        Not a :class:`FeaturecacheError` (the command line names its flags itself).
    command : str
        The command that failed (what to change when memory ran out depends on it).

    Returns
    -------
    str or None
        None for an error that is a bug (the command line lets its traceback through).
    """
    text = str(error)
    first = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, OSError):  # permission denied, disk full, a folder that vanished: name the file
        return f"{error.filename or 'featurecache'}: {error.strerror or error}"
    if isinstance(error, ValueError) and _NOT_FINITE.search(text):
        # scikit-learn's input check on features read from a file: a damaged or forged cache.
        return f"the features hold NaN or infinity ({first[:120]}): the cache is damaged; extract it again"
    if isinstance(error, (MemoryError, RuntimeError)) and is_out_of_memory(error):
        # numpy's MemoryError, torch's "can't allocate memory": with the setting to change.
        return f"out of memory ({first[:160]}); {_MEMORY_HINTS.get(command, 'work on fewer images at a time')}"
    return None
