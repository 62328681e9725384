"""Output files: checked before long work, written whole or not at all, failures in one line naming the file."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Optional, Union

from featurecache.errors import FeaturecacheError

__all__ = ["check_output", "os_reason", "write_text"]


def os_reason(error: BaseException) -> str:
    """The operating system's words for a failed write: an OSError's, or those inside an HDF5 or torch error."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    found = re.search(r"error message = '([^']+)'", text) or re.search(r"(No space left on device|File too large|"
                                                                        r"Permission denied|Read-only file system)",
                                                                        text)
    return found.group(1) if found else (text.splitlines()[0][:160] if text else type(error).__name__)


def check_output(path: Union[str, Path], *, param: Optional[str] = None, folder: bool = False) -> Path:
    """Refuse an output that cannot be written, before the work that produces it.

    Parameters
    ----------
    path : path
        A file to write, or with ``folder=True`` a folder to create or fill.
    param : str, optional
        The parameter (command-line option) it came from, named in the error.
    folder : bool

    Raises
    ------
    FeaturecacheError
        Its folder is missing or not writable; it is a folder where a file is wanted, or
        the other way round.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise FeaturecacheError(f"{path}: exists and is not a folder", param=param)
    if not folder and path.is_dir():
        raise FeaturecacheError(f"{path}: is a folder, not a file", param=param)
    target = path if folder and path.is_dir() else path.parent if str(path.parent) else Path(".")
    existing = target
    while folder and not existing.exists() and existing != existing.parent:
        existing = existing.parent  # a folder is created with its parents
    if not existing.is_dir():
        raise FeaturecacheError(f"{path}: the folder {existing} does not exist", param=param)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FeaturecacheError(f"{path}: the folder {existing} is not writable", param=param)
    return path


def write_text(path: Union[str, Path], text: str) -> Path:
    """Write a text file whole: a temporary file beside it, renamed into place; removed if the write fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a link planted at the temporary name is removed, not followed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FeaturecacheError(f"{path}: cannot write ({os_reason(e)})") from None
    return path
