"""Output files: checked before long work, written whole or not at all, failures in one line naming the file."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

from featurecache.errors import FeaturecacheError

__all__ = ["REPORT_FORMATS", "Report", "check_not_inputs", "check_output", "check_outputs", "csv_text", "json_text",
           "os_reason", "printable", "report_format", "same_file", "write_bytes", "write_report", "write_text"]


#: A cell that starts with one of these is a formula to spreadsheet programs (OWASP's CSV
#: injection rule): such text cells are written with a leading apostrophe.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

#: Control characters (C0, DEL, C1): shown escaped in anything printed, so that a file or class
#: name cannot forge lines or move the terminal's cursor.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def csv_text(rows: Iterable[Sequence]) -> str:
    """Rows as CSV text, every text cell that a spreadsheet would run as a formula made inert (a
    leading ``'``; numbers, even negative ones, are left as they are). Every CSV featurecache writes
    goes through here."""
    buf = io.StringIO()
    w = csv.writer(buf)
    for row in rows:
        w.writerow([_inert(v) for v in row])
    return buf.getvalue()


def _inert(value):
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
        return value  # a number such as -0.25
    except ValueError:
        return "'" + value


def json_text(obj, *, indent: Optional[int] = 1) -> str:
    """JSON of reports and records: NaN and infinities (an AP without positives, a missing rate) written as
    ``null``, numpy numbers as numbers, so that every file is valid JSON. Every JSON report goes through here."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def _finite(obj):
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalars and arrays
        return _finite(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def printable(text) -> str:
    """``text`` with control characters shown as escapes (``\\n``, ``\\x1b``): for names in printed
    tables and messages."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


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
    if not folder:
        check_replaceable(path, param=param)
    target = path if folder and path.is_dir() else path.parent if str(path.parent) else Path(".")
    existing = target
    while folder and not existing.exists() and existing != existing.parent:
        existing = existing.parent  # a folder is created with its parents
    if not existing.is_dir():
        raise FeaturecacheError(f"{path}: the folder {existing} does not exist", param=param)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FeaturecacheError(f"{path}: the folder {existing} is not writable", param=param)
    return path


#: Folders of special files: a name there (``/dev/stdout``, ``/proc/self/fd/1``) is never replaced by a file.
_SPECIAL_FOLDERS = ("/dev", "/proc")


def check_replaceable(path: Union[str, Path], *, param: Optional[str] = None) -> None:
    """Refuse to write a file where a device, FIFO or socket is, or a name in ``/dev`` or ``/proc``
    (``/dev/stdout`` is a link to the process's output): outputs are written beside and renamed
    into place, which would replace the node or link itself, for every process of the machine."""
    names = {os.path.abspath(path), os.path.realpath(path)}
    special = any(n == d or n.startswith(d + os.sep) for n in names for d in _SPECIAL_FOLDERS)
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        mode = stat.S_IFREG  # nothing there (or a dangling link, replaced as a file would be)
    if special or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise FeaturecacheError(f"{path}: is not a regular file (a device, FIFO, socket or a name in /dev or /proc); "
                                "featurecache writes its outputs as files: give a file name", param=param)


def _identity(path: Union[str, Path]) -> tuple:
    """What names one file: its device and inode when it exists (links and hard links included),
    else its resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return ("path", os.path.realpath(path))


def same_file(a: Union[str, Path], b: Union[str, Path]) -> bool:
    """Whether two paths name one file (by inode when it exists, links included; else by resolved path)."""
    return _identity(a) == _identity(b)


def check_not_inputs(outputs: Mapping[str, Union[str, Path, None]],
                     inputs: Mapping[str, Union[str, Path, Iterable, None]], *, folders: Iterable[str] = ()) -> None:
    """The one rule that keeps a command from destroying what it reads: refuse an output that is one
    of its input files (or another of its outputs), however spelled, before anything is written.

    Parameters
    ----------
    outputs : mapping
        Parameter (the error's ``param``: the command line shows its flag) to the path the
        command will write; ``None`` for outputs not asked for.
    inputs : mapping
        What each input is, in words or as its argument (``"CACHE"``, ``"the head file"``), to
        a path or an iterable of paths the command reads (``None`` skipped).
    folders : names of outputs that are folders
        Such an output is refused when it is, or lies inside, a folder among the inputs (its
        files would be written among the files read, and read back by the next run).

    Raises
    ------
    FeaturecacheError
        Naming the output (``param``), the input it would overwrite, and where it came from.
    """
    folders = set(folders)
    seen: dict = {}
    for name, value in inputs.items():
        if value is None:
            continue
        paths = [value] if isinstance(value, (str, bytes, os.PathLike)) else list(value)
        for path in paths:
            seen.setdefault(_identity(path), (name, path))
    written: dict = {}
    for name, path in outputs.items():
        if path is None:
            continue
        key = _identity(path)
        if key in seen:
            source, original = seen[key]
            raise FeaturecacheError(f"{path}: would overwrite {source} ({original}), which this command reads; "
                                    "write it elsewhere", param=name)
        if key in written:
            raise FeaturecacheError(f"{path}: the same file as {written[key]}; give them different names",
                                    param=name)
        written[key] = name
        if name in folders:
            _check_folder_outside_inputs(name, Path(path), seen)


def check_outputs(outputs: Mapping[str, Union[str, Path, None]], inputs: Mapping, *, folders: tuple = ()) -> None:
    """Refuse outputs that cannot be written, or that are files a command reads, before the work that fills them.

    Parameters
    ----------
    outputs : mapping
        Name shown (a flag) to path, or None where not asked for.
    inputs : mapping
        Name shown to the path or paths the command reads.
    folders : tuple
        The names in ``outputs`` that are folders.
    """
    for name, path in outputs.items():
        if path:
            check_output(path, param=name, folder=name in folders)
    check_not_inputs(outputs, inputs, folders=folders)


def _check_folder_outside_inputs(name: str, folder: Path, inputs: dict) -> None:
    here = Path(os.path.realpath(folder))
    for source, original in inputs.values():
        p = Path(os.path.realpath(original))
        if os.path.isdir(p) and (here == p or p in here.parents):
            raise FeaturecacheError(f"{folder}: is inside {source} ({original}), which this command reads: what it "
                                    "writes there would be read as input next time; write it elsewhere", param=name)


def write_text(path: Union[str, Path], text: str) -> Path:
    """Write a text file whole: a temporary file beside it, renamed into place; removed if the write fails."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Union[str, Path], data: bytes) -> Path:
    """Write a file whole (a model, a picture): a temporary file beside it, renamed into place; removed if
    the write fails."""
    path = Path(path)
    check_replaceable(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a link planted at the temporary name is removed, not followed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FeaturecacheError(f"{path}: cannot write ({os_reason(e)})") from None
    return path


#: The formats a report is written in: JSON for a ``.json`` name, an HTML page for ``.html`` or ``.htm`` (the
#: reports that have one: ``ablate``'s and ``predict``'s), else CSV.
REPORT_FORMATS = ("csv", "json", "html")


@runtime_checkable
class Report(Protocol):
    """What a command's report is: ``eval``'s, ``localize --evaluate``'s, ``ablate``'s and ``predict``'s."""

    def to_csv(self) -> str: ...

    def to_json(self) -> str: ...

    def to_text(self) -> str: ...


def report_format(path: Union[str, Path], fmt: Optional[str] = None) -> str:
    """``fmt`` when given (:data:`REPORT_FORMATS`), else the one rule: JSON for a ``.json`` name, HTML for
    ``.html`` and ``.htm``, else CSV."""
    if fmt is not None and fmt not in REPORT_FORMATS:
        raise FeaturecacheError(f"must be one of {', '.join(REPORT_FORMATS)}, got {fmt!r}", param="fmt")
    suffix = Path(path).suffix.lower()
    return fmt or ("json" if suffix == ".json" else "html" if suffix in (".html", ".htm") else "csv")


def write_report(report: Report, path: Union[str, Path], *, fmt: Optional[str] = None) -> Path:
    """The one writer of reports: ``report`` as JSON, CSV or an HTML page (:func:`report_format`), written whole.

    Parameters
    ----------
    report : Report
        Anything with ``to_json()`` and ``to_csv()``; ``to_html()`` for a page (refused without it).
    path : path
    fmt : {"csv", "json", "html"}, optional
        Overrides the file name's suffix (the command line's ``--json``, ``--csv`` and ``--report``).
    """
    writer = {"json": report.to_json, "csv": report.to_csv,
              "html": getattr(report, "to_html", None)}[report_format(path, fmt)]
    if writer is None:
        raise FeaturecacheError(f"{path}: this report has no HTML page (ablate's and predict's have; a head's "
                                "evaluation is `featurecache report`); give a .csv or .json name")
    return write_text(path, writer())
