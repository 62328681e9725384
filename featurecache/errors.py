"""The exceptions of featurecache: one class per module family, all one-line messages naming the file."""

from __future__ import annotations

import numbers
from typing import Optional

__all__ = ["AblationError", "BackboneError", "CacheError", "DatasetError", "EvalError", "ExportError", "ExtractError",
           "FeaturecacheError", "HeadError", "PredictError", "ReportError", "integer_at_least"]


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
