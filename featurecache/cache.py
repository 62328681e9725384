"""The HDF5 feature cache: its schema, a crash-safe resumable writer, and the reader.

The format is specified in ``docs/cache-format.md``. In short, one HDF5 file holds, per
patch, ``features`` (N×D), ``label``, ``image_index``, ``box`` and ``scale``; per image, the
``images/`` table; the images that could not be read in ``skipped/``; and, as JSON file
attributes, everything needed to interpret and reproduce it, including a *feature
fingerprint* that later stages compare before using a head on a cache.

Crash safety. An HDF5 file whose writer dies is often left unreadable, so the final file is
never written in place. While a run is in progress its work lives in ``OUT.parts/``: every
part (a fixed group of consecutive images) is written to a temporary file, closed, synced
and only then renamed to ``part-NNNNNN.h5``. A rename is atomic, so a part file either
exists complete or not at all. When every part exists the parts are copied into
``OUT.tmp``, which is synced and renamed onto ``OUT``; then the parts are deleted. A run
killed at any moment (SIGKILL included) loses at most the part it was computing, and
running the same command again continues from the parts on disk. ``OUT.lock`` (a
``lockf``, a POSIX record lock that forked workers do not inherit; on Windows a byte locked
with ``msvcrt.locking``) refuses a second writer.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from featurecache.errors import CacheError
from featurecache.outputs import os_reason
from featurecache.patches import LabelRule, PatchGrid
from featurecache.prefetch import ahead
from featurecache.resources import ASSEMBLE_MODES

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CacheError",
    "CacheWriter",
    "FeatureCache",
    "ImageTable",
    "MemoryCache",
    "PatchChunk",
    "PatchDataset",
    "data_folders",
    "describe_fingerprint_difference",
    "feature_fingerprint",
    "open_cache",
    "read_rows",
]

FORMAT_NAME = "featurecache"
FORMAT_VERSION = 1
PART_PATTERN = re.compile(r"^part-(\d{6})\.h5$")
_STR = h5py.string_dtype("utf-8")



def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def feature_fingerprint(feature_settings: dict) -> str:
    """SHA-256 of the settings that determine the features (canonical JSON)."""
    return hashlib.sha256(_json(feature_settings).encode()).hexdigest()


def describe_fingerprint_difference(ours: dict, theirs: dict, *, ours_name: str = "cache",
                                    theirs_name: str = "head") -> str:
    """Name the feature settings that differ, e.g. ``backbone: alexnet (cache) vs vgg16 (head)``."""
    diffs = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if a != b:
            diffs.append(f"{key}: {_short(a)} ({ours_name}) vs {_short(b)} ({theirs_name})")
    return "; ".join(diffs) or "no difference"


def _short(v) -> str:
    s = v if isinstance(v, str) else _json(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _fault(point: str) -> None:
    """Fault injection for the crash-safety tests: ``FEATURECACHE_KILL_AT=point[:n]``.

    Kills this process with SIGKILL the n-th time (default first) it reaches ``point``.
    """
    spec = os.environ.get("FEATURECACHE_KILL_AT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    hits = _fault.hits.get(point, 0) + 1  # type: ignore[attr-defined]
    _fault.hits[point] = hits  # type: ignore[attr-defined]
    if hits >= int(count or 1):
        import signal

        if _IN_WRITER_CHILD:  # the whole program dies at this point, as in a real crash
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


_fault.hits = {}  # type: ignore[attr-defined]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform; rename is still atomic
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh(path: Path) -> Path:
    """Create ``path`` anew as this process's own regular file, never through a link planted there.

    The name is unlinked first (a symlink is removed, not followed), then created with
    ``O_EXCL | O_NOFOLLOW``; h5py then opens the file this process made.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    os.close(fd)
    return path


#: True in the child process that :func:`_write_isolated` forks.
_IN_WRITER_CHILD = False


def _write_isolated(path: Path, kept: str, write) -> None:
    """Run ``write()`` (which writes ``path`` with HDF5) in a forked child; a failure becomes one CacheError.

    HDF5 leaves its library in a broken state after a failed write (disk full: the process
    then crashes at exit with a segmentation fault). The child takes that risk: it exits at
    once (``os._exit``, no HDF5 shutdown) and reports the reason through a pipe; this
    process stays clean, removes the partial file and says which file and why.
    """
    if not hasattr(os, "fork"):  # pragma: no cover - Windows: in this process
        with _writing(path, kept):
            write()
        return
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(read_end)
        os.close(write_end)
        raise CacheError(f"{path}: cannot start the writing process ({os_reason(e)}); {kept}") from None
    if pid == 0:  # the child: whatever happens, it ends here, never returning into the parent's code
        code = 1
        try:
            global _IN_WRITER_CHILD
            _IN_WRITER_CHILD = True
            import signal

            signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it at once; the parent reports
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # so does a scheduler's SIGTERM
            os.close(read_end)
            # After a failed write HDF5 and h5py's object finalisers print tracebacks of their own
            # ("Exception ignored in ... _dealloc") whenever garbage collection reaches them; the
            # reason goes through the pipe, so the child's stderr is silenced to keep one line.
            quiet = os.open(os.devnull, os.O_WRONLY)
            os.dup2(quiet, 2)
            os.close(quiet)
            try:
                write()
                code = 0
            except BaseException as e:  # everything is reported to the parent
                os.write(write_end, os_reason(e).encode("utf-8", "replace")[:1000])
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as f:
            message = f.read().decode("utf-8", "replace")
        _, status = os.waitpid(pid, 0)
    except BaseException:  # interrupted while waiting: end the child, leave no partial file
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    if status:
        with contextlib.suppress(OSError):
            os.unlink(path)
        if not message:
            message = (f"the writing process died of signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                       else "the writing process failed")
        raise CacheError(f"{path}: cannot write ({message}); {kept}")


@contextlib.contextmanager
def _writing(path: Path, kept: str):
    """Turn a failed write of ``path`` (disk full, file too large, I/O error) into one line; remove the partial file."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise CacheError(f"{path}: cannot write ({os_reason(e)}); {kept}") from None


def data_folders(path: Union[str, Path]) -> list:
    """The folders a virtual cache at ``path`` reads its features from (none for a copy, a missing or an
    unreadable file)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            ds = f.get("features")
            if not isinstance(ds, h5py.Dataset) or not ds.is_virtual:
                return []
            names = {_unescape(src.file_name) for src in ds.virtual_sources() if src.file_name != "."}
    except (OSError, ValueError):
        return []
    return sorted({(path.parent / n).parent for n in names})


def _unescape(name: str) -> str:
    """A virtual source's file name as written (HDF5 reads ``%`` in them as printf-style; they are doubled)."""
    return name.replace("%%", "%")


def _run_id(settings: dict) -> str:
    """A short id of one assembly: its settings, the time, the process (a new run never reuses a name)."""
    return hashlib.sha256(f"{_json(settings)}{now_iso()}{os.getpid()}{time.time_ns()}".encode()).hexdigest()[:8]


def _chunk_rows(dim: int, itemsize: int, n: int) -> int:
    """Rows per chunk so that a chunk of features is about 1 MiB."""
    return max(1, min(max(n, 1), (1 << 20) // max(dim * itemsize, 1)))


# --------------------------------------------------------------------------- writer


#: What a failed write keeps, as its message says: the committed parts, or every part (a failed
#: assembly). A caller whose cache is temporary (``predict``) says what happens instead.
KEPT_PARTS = "the parts committed before it are kept; the same command resumes"
KEPT_ALL = "every part is kept; the same command assembles them again"

#: Lock files this process holds: POSIX record locks do not exclude their own process.
_HELD: set = set()

#: Windows locks one byte here, past the holder's PID (its locks are mandatory: a locked byte
#: could not be read by the process that the refusal names the holder to).
_WINDOWS_LOCK_OFFSET = 1 << 20


def _lock_primitives():
    """``(try_lock(fd), unlock(fd))`` of this platform: POSIX ``lockf``, or Windows ``msvcrt.locking``.

    Raises
    ------
    CacheError
        Where neither exists: a writer without a lock could corrupt another's work, so none runs.
    """
    try:
        import fcntl

        return (lambda fd: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)), (lambda fd: None)
    except ImportError:
        pass
    try:
        import msvcrt
    except ImportError:
        raise CacheError("this platform has neither POSIX (fcntl) nor Windows (msvcrt) file locks, and "
                         "featurecache does not write a cache without a lock that refuses a second writer") from None

    def at_lock_byte(fd: int, mode: int) -> None:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, mode, 1)

    return (lambda fd: at_lock_byte(fd, msvcrt.LK_NBLCK)), (lambda fd: at_lock_byte(fd, msvcrt.LK_UNLCK))


class _Lock:
    """An exclusive, non-blocking lock on a file beside the output: a POSIX record lock
    (``lockf``), or on Windows a locked byte (``msvcrt.locking``).

    A record lock belongs to the process that took it: forked children (DataLoader workers)
    do not inherit it, so the lock dies with the writer, and a run started right after a
    killed one is not refused. The holder writes its PID into the file, which a refusal
    names. The file is opened with ``O_NOFOLLOW``: a link planted at its name is refused,
    never written through. A platform with neither lock refuses to write (one line).
    """

    def __init__(self, path: Path, target: Path) -> None:
        self.path, self.target, self.fd = path, target, None
        self.key = str(path.parent.resolve() / path.name)  # one key for every spelling of the path
        self._unlock = None

    def acquire(self) -> None:
        try_lock, unlock = _lock_primitives()
        if self.key in _HELD:
            raise CacheError(f"{self.target}: this process is already writing it")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                             | getattr(os, "O_BINARY", 0), 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise CacheError(f"{self.path}: is a symbolic link; featurecache never writes through one "
                                     "(remove it)") from None
                raise
            try:
                try_lock(fd)
            except OSError:
                pid = _read_pid(fd)
                os.close(fd)
                raise CacheError(f"{self.target}: another featurecache process{f' (PID {pid})' if pid else ''} "
                                 f"is writing it (lock held on {self.path})") from None
            # The holder before us may have deleted the file after we opened it: lock the live one.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    self.fd, self._unlock = fd, unlock
                    _HELD.add(self.key)
                    return
            except FileNotFoundError:
                pass
            except OSError as e:  # disk full while writing our PID
                os.close(fd)
                raise CacheError(f"{self.path}: cannot write the lock file ({os_reason(e)})") from None
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (the file is only a lock: nothing in it is kept)."""
        if self.fd is None:
            return
        if os.name == "nt":  # Windows removes no open file: unlock and close it first
            with contextlib.suppress(OSError):
                self._unlock(self.fd)
            os.close(self.fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        else:  # unlink while locked: a waiting writer then finds the file gone and locks a new one
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
        self.fd = None
        _HELD.discard(self.key)


def _read_pid(fd: int) -> Optional[int]:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip() or 0) or None
    return None


@dataclass
class PartData:
    """What one part holds: patches of consecutive images and the images skipped among them."""

    features: np.ndarray
    label: np.ndarray
    image: np.ndarray  # index of the patch's image in the data set listing
    box: np.ndarray
    scale: np.ndarray
    skipped_index: np.ndarray
    skipped_reason: list


class CacheWriter:
    """Writes a cache in atomically committed parts and assembles it at the end.

    Use as a context manager (it holds ``OUT.lock``)::

        with CacheWriter(out, settings, overwrite=False) as w:
            if not w.complete:
                for part in range(n_parts):
                    if part not in w.done_parts:
                        w.write_part(part, data)
                w.assemble(...)

    Parameters
    ----------
    path : path-like
        The output file.
    settings : dict
        JSON-ready description of everything that determines the file's content. Resuming
        with different settings is refused, naming the difference.
    resume : dict, optional
        What a resume must match besides ``settings`` (the part plan, the runtime), not
        compared with a complete file.
    overwrite : bool
        Discard an existing output or unfinished run with other settings.
    lead : bool
        False for the other processes of a job whose leader (``lead=True``) locks the output,
        prepares ``OUT.parts/`` and assembles: they only write parts (:meth:`follow` tells
        them which are done).
    """

    def __init__(self, path: Union[str, Path], settings: dict, *, overwrite: bool = False,
                 resume: Optional[dict] = None, lead: bool = True) -> None:
        self.path = Path(path)
        self.settings = json.loads(_json(settings))  # normalised: tuples become lists
        # What a resume must also match but a complete file need not (how parts were cut, which
        # runtime computed them): kept in the parts' settings only.
        self.run_settings = {**self.settings, **json.loads(_json(resume or {}))}
        self.overwrite = overwrite
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._lock = _Lock(self.path.with_name(self.path.name + ".lock"), self.path)
        self.lead = lead
        self.complete = False
        self.done_parts: set = set()

    def __enter__(self) -> "CacheWriter":
        if not self.lead:  # the leader holds the lock and prepared the parts folder
            return self
        if not self.path.parent.is_dir():
            raise CacheError(f"{self.path}: the folder {self.path.parent} does not exist")
        if self.parts_dir.is_symlink():
            raise CacheError(f"{self.parts_dir}: is a symbolic link; featurecache never writes through one "
                             "(remove it)")
        self._lock.acquire()
        try:
            self._prepare()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def follow(self, done_parts) -> None:
        """A follower's view of the parts already committed (what the leader found)."""
        self.done_parts = set(done_parts)

    def refresh(self) -> None:
        """Find the parts committed so far, by any process of the job (a part file exists only complete)."""
        self.done_parts = {int(m.group(1)) for f in self.parts_dir.iterdir() if (m := PART_PATTERN.match(f.name))}

    def _recover(self) -> None:
        """Killed between the renames of a virtual assembly: its parts, whole, are in a data folder that the
        file at ``path`` (if any) does not read. Only a folder this run made (its settings) is taken back."""
        if self.parts_dir.exists():
            return
        in_use = set(data_folders(self.path)) if self.path.exists() else set()
        for d in sorted(self.path.parent.glob(glob.escape(self.path.name) + ".*.data")):
            if d.is_symlink() or not d.is_dir() or d in in_use:
                continue
            with contextlib.suppress(OSError, ValueError):
                if json.loads((d / "settings.json").read_text()) == self.run_settings:
                    os.replace(d, self.parts_dir)
                    logger.info("%s: recovered the parts of an interrupted assembly from %s", self.path, d)
                    return

    def _prepare(self) -> None:
        self._recover()
        if self.path.exists() and not self.overwrite:
            theirs = _read_settings(self.path)
            diff = _settings_difference(theirs, self.settings)
            if diff:
                raise CacheError(f"{self.path}: exists, made with other settings ({diff}); "
                                 f"pass --overwrite to replace it")
            self.complete = True
            if self.parts_dir.exists():  # left by a run killed after its final rename
                shutil.rmtree(self.parts_dir, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.tmp_path.unlink()
        settings_file = self.parts_dir / "settings.json"
        if self.parts_dir.exists():
            theirs = None
            with contextlib.suppress(OSError, ValueError):
                theirs = json.loads(settings_file.read_text())
            diff = _settings_difference(theirs, self.run_settings) if theirs is not None else "unreadable settings"
            if diff and not self.overwrite:
                raise CacheError(f"{self.path}: an unfinished run with other settings is in {self.parts_dir} "
                                 f"({diff}); resume it with the options that started it (and the same featurecache), "
                                 "or pass --overwrite to discard it")
            if diff:
                shutil.rmtree(self.parts_dir)
        if not self.parts_dir.exists():
            self.parts_dir.mkdir()
            tmp = _fresh(self.parts_dir / "settings.json.tmp")
            with _writing(tmp, "nothing was computed yet"):
                tmp.write_text(json.dumps(self.run_settings, indent=1, sort_keys=True))
            _fsync_file(tmp)
            os.replace(tmp, settings_file)
            _fsync_dir(self.parts_dir)
        for f in self.parts_dir.iterdir():
            m = PART_PATTERN.match(f.name)
            if m:
                if _part_readable(f):
                    self.done_parts.add(int(m.group(1)))
                else:  # a damaged part (e.g. disk full after the rename): compute it again
                    logger.warning("%s: unreadable part, it will be computed again", f)
                    f.unlink()
            elif f.name.endswith(".tmp"):
                f.unlink()
        if self.done_parts:
            logger.info("%s: resuming, %d part(s) already done", self.path, len(self.done_parts))

    def write_part(self, part: int, data: PartData) -> None:
        """Commit one part: write a temporary file, sync it, rename it into place."""
        final = self.parts_dir / f"part-{part:06d}.h5"
        tmp = final.with_name(final.name + ".tmp")
        def write() -> None:
            with h5py.File(_fresh(tmp), "w") as f:
                for name in ("features", "label", "image", "box", "scale", "skipped_index"):
                    f.create_dataset(name, data=getattr(data, name))
                f.create_dataset("skipped_reason", data=np.array(data.skipped_reason, dtype=object), dtype=_STR)
                f.attrs["part"] = part
            _fsync_file(tmp)

        _write_isolated(tmp, KEPT_PARTS, write)
        _fault("part-written")
        os.replace(tmp, final)
        _fsync_dir(self.parts_dir)
        self.done_parts.add(part)
        _fault("part-committed")

    def assemble(self, *, num_parts: int, feature_dim: int, dtype: str, compression: Optional[str],
                 images: Sequence, classes: Sequence[str], attrs: dict, layout: str = "copy") -> None:
        """Copy every part into the final file, then remove the parts (``layout="copy"``); or map the
        final file's features onto the parts, kept in ``OUT.<run>.data/`` beside it (``"virtual"``).

        Parameters
        ----------
        num_parts : int
        feature_dim : int
        dtype : {"float16", "float32"}
        compression : {None, "lzf", "gzip"}
        images : sequence of ImageRecord
            The data set listing, in the order the parts index it.
        classes : sequence of str
        attrs : dict
            File attributes (each stored as JSON). ``format``, ``format_version`` and
            ``settings`` are written by this method.
        layout : {"copy", "virtual"}
            ``virtual``: ``features`` is an HDF5 virtual dataset over the part files (no copy
            of the features; the other arrays are copied); the folder ``OUT.<run>.data`` moves
            with ``OUT``.
        """
        if layout not in ASSEMBLE_MODES:
            raise CacheError(f"must be one of {', '.join(ASSEMBLE_MODES)}, got {layout!r}", param="layout")
        missing = [p for p in range(num_parts) if p not in self.done_parts]
        if missing:
            raise CacheError(f"{self.path}: cannot assemble, part {missing[0]} is missing")
        part_files = [self.parts_dir / f"part-{p:06d}.h5" for p in range(num_parts)]
        counts, skipped_idx, skipped_reason, image_rows = [], [], [], []
        for pf in part_files:
            with h5py.File(pf, "r") as f:
                counts.append(len(f["label"]))
                image_rows.append(f["image"][:])
                skipped_idx.extend(int(i) for i in f["skipped_index"][:])
                skipped_reason.extend(s.decode() if isinstance(s, bytes) else s for s in f["skipped_reason"][:])
        n = int(sum(counts))
        image_of_patch = np.concatenate(image_rows) if image_rows else np.zeros(0, np.int64)
        kept = np.unique(image_of_patch)  # data set indices of the extracted images, sorted
        row_of = np.full(len(images), -1, np.int64)
        row_of[kept] = np.arange(len(kept))
        np_dtype = np.dtype(dtype)
        comp = None if compression in (None, "none") else compression
        virtual = layout == "virtual"
        # A virtual cache's folder has a name of its own run: an old file never reads a new run's parts.
        data_dir = self.path.with_name(f"{self.path.name}.{_run_id(self.run_settings)}.data") if virtual else None
        replaced = data_folders(self.path) if self.path.exists() else []  # the old cache's own folders
        _write_isolated(self.tmp_path, KEPT_ALL,
                        lambda: self._write_final(part_files, counts, n, feature_dim, np_dtype, comp, images, kept,
                                                  row_of, skipped_idx, skipped_reason, classes,
                                                  {**attrs, "layout": layout}, data_dir))
        if virtual:
            os.replace(self.parts_dir, data_dir)
            _fsync_dir(self.path.parent)
            _fault("virtual-parts-moved")
        os.replace(self.tmp_path, self.path)
        _fsync_dir(self.path.parent)
        _fault("assembled")
        for d in replaced:  # only folders the replaced cache read: featurecache made them
            if d != data_dir and d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
        if not virtual:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.complete = True

    def _write_final(self, part_files, counts, n, feature_dim, np_dtype, comp, images, kept, row_of, skipped_idx,
                     skipped_reason, classes, attrs, data_dir: Optional[Path] = None) -> None:
        """Copy the parts into ``OUT.tmp`` (with ``data_dir``: all but the features, mapped onto the parts as
        they will be named there) and sync it (the caller renames it into place)."""
        num_parts = len(part_files)
        virtual = data_dir is not None
        rows = _chunk_rows(feature_dim, np_dtype.itemsize, n)
        with h5py.File(_fresh(self.tmp_path), "w") as out:
            if virtual and n:
                layout = h5py.VirtualLayout(shape=(n, feature_dim), dtype=np_dtype)
                start = 0
                for pf, m in zip(part_files, counts):
                    if m:  # relative to OUT's folder, where HDF5 looks first: the pair can move together
                        name = f"{data_dir.name}/{pf.name}".replace("%", "%%")  # HDF5 reads % as printf-style
                        layout[start:start + m] = h5py.VirtualSource(name, "features", shape=(m, feature_dim))
                    start += m
                feats = out.create_virtual_dataset("features", layout)
            else:
                feats = out.create_dataset("features", shape=(n, feature_dim), dtype=np_dtype,
                                           chunks=(rows, feature_dim) if n else None, compression=comp)
            label = out.create_dataset("label", shape=(n,), dtype=np.int16)
            img = out.create_dataset("image_index", shape=(n,), dtype=np.int32)
            box = out.create_dataset("box", shape=(n, 4), dtype=np.float32)
            scale = out.create_dataset("scale", shape=(n,), dtype=np.float32)
            start = 0
            for k, pf in enumerate(part_files):
                with h5py.File(pf, "r") as f:
                    m = counts[k]
                    if m:
                        if not virtual:
                            feats[start:start + m] = f["features"][:]
                        label[start:start + m] = f["label"][:]
                        img[start:start + m] = row_of[f["image"][:]]
                        box[start:start + m] = f["box"][:]
                        scale[start:start + m] = f["scale"][:]
                    start += m
                if k == num_parts // 2:
                    _fault("assembling")
            _write_image_table(out, [images[i] for i in kept], kept, img[:] if n else np.zeros(0, np.int32), classes)
            sk = out.create_group("skipped")
            order = np.argsort(skipped_idx, kind="stable")
            sk.create_dataset("path", data=np.array([images[skipped_idx[i]].relpath for i in order], dtype=object),
                              dtype=_STR)
            sk.create_dataset("reason", data=np.array([skipped_reason[i] for i in order], dtype=object), dtype=_STR)
            for key, value in attrs.items():
                out.attrs[key] = value if isinstance(value, str) else _json(value)
            # The schema's own attributes are this module's to write, whatever the caller passed.
            out.attrs["format"] = FORMAT_NAME
            out.attrs["format_version"] = FORMAT_VERSION
            out.attrs["settings"] = _json(self.settings)
        _fsync_file(self.tmp_path)


def _write_image_table(out: h5py.File, records: list, dataset_index: np.ndarray, image_index: np.ndarray,
                       classes: Sequence[str]) -> None:
    col = {c: i for i, c in enumerate(classes)}
    m, c = len(records), len(classes)
    labels = np.zeros((m, c), bool)
    difficult = np.zeros((m, c), bool)
    for r, rec in enumerate(records):
        for name in rec.labels:
            labels[r, col[name]] = True
        for name in rec.difficult_labels:
            difficult[r, col[name]] = True
    count = np.bincount(image_index, minlength=m).astype(np.int64) if m else np.zeros(0, np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64) if m else count
    g = out.create_group("images")
    g.create_dataset("path", data=np.array([r.relpath for r in records], dtype=object), dtype=_STR)
    g.create_dataset("width", data=np.array([r.width for r in records], dtype=np.int32))
    g.create_dataset("height", data=np.array([r.height for r in records], dtype=np.int32))
    g.create_dataset("labels", data=labels)
    g.create_dataset("difficult", data=difficult)
    g.create_dataset("split", data=np.array([",".join(r.splits) for r in records], dtype=object), dtype=_STR)
    g.create_dataset("dataset_index", data=dataset_index.astype(np.int32))
    g.create_dataset("patch_start", data=start)
    g.create_dataset("patch_count", data=count)


def _part_readable(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            n = len(f["label"])
            return all(len(f[k]) == n for k in ("features", "image", "box", "scale"))
    except Exception:
        return False


def _read_settings(path: Path) -> dict:
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT_NAME:
                raise CacheError(f"{path}: exists and is not a featurecache cache; pass --overwrite to replace it")
            return json.loads(f.attrs["settings"])
    except CacheError:
        raise
    except Exception as e:
        raise CacheError(f"{path}: exists and cannot be read as HDF5 ({type(e).__name__}); "
                         f"pass --overwrite to replace it") from None


def _settings_difference(old: Optional[dict], new: dict) -> str:
    """'' when equal, else the first few differing keys, as 'key: old -> new'."""
    if old is None:
        return "no settings recorded"
    diffs = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix[:-1]}: {_short(a)} before, {_short(b)} now")

    walk(old, new, "")
    return "; ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")


# --------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class PatchChunk:
    """A block of patches read from a cache: rows ``indices`` of the file."""

    indices: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray


@dataclass(frozen=True)
class ImageTable:
    """The per-image arrays of a cache (for the selected images)."""

    row: np.ndarray  # row in the file's image table (what ``image_index`` refers to)
    path: tuple
    width: np.ndarray
    height: np.ndarray
    labels: np.ndarray  # (M, C) bool: a non-difficult object of the class
    difficult: np.ndarray  # (M, C) bool: only difficult objects of the class
    split: tuple
    patch_start: np.ndarray
    patch_count: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def take(self, positions: np.ndarray) -> "ImageTable":
        """The table of the images at ``positions`` (rows of this table, sorted)."""
        p = np.asarray(positions, dtype=np.int64)
        return ImageTable(row=self.row[p], path=tuple(self.path[i] for i in p), width=self.width[p],
                          height=self.height[p], labels=self.labels[p], difficult=self.difficult[p],
                          split=tuple(self.split[i] for i in p), patch_start=self.patch_start[p],
                          patch_count=self.patch_count[p])

    def in_split(self, split: str) -> np.ndarray:
        """Positions of the images whose split membership includes ``split``."""
        return np.flatnonzero([split in s.split(",") for s in self.split])


class FeatureCache:
    """Read a feature cache, optionally restricted to a split or a subset of images.

    Features stay on disk until asked for; labels and the image table are small and read
    on first use.

    Parameters
    ----------
    path : path-like
    split : str, optional
        Keep the images whose split membership (``images/split``) includes this name.
    images : sequence of int, optional
        Keep these rows of the image table.

    Examples
    --------
    >>> with FeatureCache("train.h5", split="val") as cache:      # doctest: +SKIP
    ...     for chunk in cache.iter_chunks(8192):
    ...         model.partial_fit(chunk.features, chunk.labels)
    """

    def __init__(self, path: Union[str, Path], *, split: Optional[str] = None,
                 images: Optional[Sequence[int]] = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"{self.path}: no such cache file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise CacheError(f"{self.path}: not a readable HDF5 file ({str(e).splitlines()[0][:120]})") from None
        a = self._file.attrs
        if a.get("format") != FORMAT_NAME:
            self._file.close()
            raise CacheError(f"{self.path}: not a featurecache cache (no format attribute)")
        if int(a.get("format_version", 0)) > FORMAT_VERSION:
            self._file.close()
            raise CacheError(f"{self.path}: cache format {a['format_version']} is newer than this featurecache "
                             f"reads ({FORMAT_VERSION}); upgrade featurecache")
        self.attrs = {k: _parse_attr(v) for k, v in a.items()}
        problem = _damage(self._file, self.attrs)
        if problem:
            self._file.close()
            raise CacheError(f"{self.path}: damaged featurecache cache: {problem}")
        self.classes: tuple = tuple(self.attrs["classes"])
        self.feature_settings: dict = self.attrs["feature_settings"]
        self.fingerprint: str = self.attrs["fingerprint"]
        n_images = len(self._file["images/path"])
        rows = np.arange(n_images)
        if split is not None:
            splits = [s.decode() if isinstance(s, bytes) else s for s in self._file["images/split"][:]]
            rows = rows[[split in s.split(",") for s in splits]]
            if len(rows) == 0:
                known = sorted({p for s in splits for p in s.split(",") if p})
                raise CacheError(f"{self.path}: no image in split {split!r} (splits: {', '.join(known) or 'none'})")
        if images is not None:
            wanted = np.asarray(images, dtype=np.int64)
            if len(wanted) and (wanted.min() < 0 or wanted.max() >= n_images):
                raise CacheError(f"{self.path}: image rows must be in [0, {n_images})")
            rows = np.intersect1d(rows, wanted)
        self._rows = rows
        self._all = split is None and images is None
        if not self._all and len(rows) < n_images:
            _no_read_ahead(self._file)
        self._images: Optional[ImageTable] = None
        self._indices: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None
        self._features: Optional[h5py.Dataset] = None
        self._memo: dict = {}
        self._root_rows = rows

    # -- context manager
    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        if self._file.id.valid:
            self._file.close()

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.path)!r}: {self.num_images} images, {self.num_patches} patches, "
                f"{self.feature_dim}-d {self.attrs['backbone']['name']})")

    # -- metadata
    @property
    def feature_dim(self) -> int:
        return int(self._file["features"].shape[1])

    @property
    def backbone(self) -> dict:
        return self.attrs["backbone"]

    @property
    def grid(self):
        return PatchGrid.from_dict(self.attrs["grid"])

    @property
    def images(self) -> ImageTable:
        """The selected images' table."""
        if self._images is None:
            g = self._file["images"]
            r = self._rows

            def strings(name):
                return tuple(s.decode() if isinstance(s, bytes) else s for s in g[name][:][r])

            self._images = ImageTable(
                row=r, path=strings("path"), width=g["width"][:][r], height=g["height"][:][r],
                labels=g["labels"][:][r], difficult=g["difficult"][:][r], split=strings("split"),
                patch_start=g["patch_start"][:][r], patch_count=g["patch_count"][:][r])
        return self._images

    @property
    def skipped(self) -> list:
        """``(path, reason)`` of every image that could not be read at extraction."""
        g = self._file["skipped"]
        dec = lambda s: s.decode() if isinstance(s, bytes) else s  # noqa: E731
        return [(dec(p), dec(r)) for p, r in zip(g["path"][:], g["reason"][:])]

    @property
    def num_images(self) -> int:
        return len(self._rows)

    @property
    def indices(self) -> np.ndarray:
        """File rows of the selected patches, sorted."""
        if self._indices is None:
            if self._all:
                self._indices = np.arange(len(self._file["label"]))
            else:
                t = self.images
                self._indices = (np.concatenate([np.arange(s, s + c) for s, c in zip(t.patch_start, t.patch_count)])
                                 if len(t) else np.zeros(0, np.int64))
        return self._indices

    @property
    def num_patches(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        return self.num_patches

    def _read(self, name: str, idx: np.ndarray) -> np.ndarray:
        ds = self.features if name == "features" else self._file[name]
        if self._all and len(idx) == ds.shape[0]:
            return ds[:]
        # Per-patch columns are small: read through gaps; features: about the rows used.
        return read_rows(ds, idx) if name == "features" else read_rows(ds, idx, max_gap=16384)

    @property
    def labels(self) -> np.ndarray:
        """Patch labels (encoding of :mod:`featurecache.patches`) of the selected patches."""
        if self._labels is None:
            self._labels = self._read("label", self.indices).astype(np.int64)
        return self._labels

    @property
    def image_index(self) -> np.ndarray:
        """Image-table row of each selected patch."""
        return self._read("image_index", self.indices).astype(np.int64)

    @property
    def boxes(self) -> np.ndarray:
        return self._read("box", self.indices)

    @property
    def scales(self) -> np.ndarray:
        return self._read("scale", self.indices)

    @property
    def features(self) -> h5py.Dataset:
        """The on-disk features dataset (all patches; index it with :attr:`indices`).

        Uncompressed features are opened without HDF5's chunk cache: a read then moves just
        the rows asked for, where the cache would read every touched storage chunk whole
        (measured: 1.8x the bytes, a third of the speed, for images of every other split).
        """
        if self._features is None:
            ds = self._file["features"]
            direct = ds.compression is None and ds.chunks is not None
            if direct:
                # HDF5 shares an open dataset between opens, with the first open's access
                # settings: close this one before opening with the cache off.
                ds.id.close()
                access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
                access.set_chunk_cache(0, 0, 1.0)
                ds = h5py.Dataset(h5py.h5d.open(self._file.id, b"features", access))
            self._features = ds
        return self._features

    def read_features(self, indices: Optional[np.ndarray] = None, *, dtype=np.float32) -> np.ndarray:
        """Read features of the selected patches (or of the given file rows) into memory."""
        idx = self.indices if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
        return self._read("features", idx).astype(dtype, copy=False)

    def iter_chunks(self, chunk_size: int = 65536, *, dtype=np.float32, prefetch: int = 1) -> Iterator[PatchChunk]:
        """Yield the selected patches in file order, ``chunk_size`` at a time (bounded memory).

        Parameters
        ----------
        chunk_size : int
            Patches per chunk.
        dtype : numpy dtype or None
            Of the features; None: as stored (float16 caches stay half the size until a
            consumer converts them, e.g. on its device).
        prefetch : int
            Chunks read ahead in a background thread (0: none); at most ``prefetch + 2``
            chunks are in memory at once.
        """
        idx, img, labels, feats = self.indices, self.image_index, self.labels, self.features

        def read() -> Iterator[PatchChunk]:
            for s in range(0, len(idx), chunk_size):
                sel = idx[s:s + chunk_size]
                x = read_rows(feats, sel)
                yield PatchChunk(sel, x if dtype is None else x.astype(dtype, copy=False), labels[s:s + chunk_size],
                                 img[s:s + chunk_size])

        return ahead(read(), prefetch)

    def select(self, images: Sequence[int]) -> "FeatureCache":
        """A new reader of the images at positions ``images`` of this selection (close it after use).

        It shares this reader's ``memo`` (results computed once over the first reader's images).
        """
        pos = np.asarray(images, dtype=np.int64)
        if len(pos) and (pos.min() < 0 or pos.max() >= self.num_images):
            raise CacheError(f"{self.path}: image positions must be in [0, {self.num_images})")
        child = FeatureCache(self.path, images=self._rows[pos])
        child._memo, child._root_rows = self._memo, self._root_rows
        return child

    def root(self) -> "FeatureCache":
        """A new reader of the images this one was selected from (close it after use)."""
        n = len(self._file["images/path"])
        whole = FeatureCache(self.path, images=None if len(self._root_rows) == n else self._root_rows)
        whole._memo, whole._root_rows = self._memo, self._root_rows
        return whole

    @property
    def memo(self) -> tuple:
        """``(dictionary shared with the readers selected from the same first reader, positions of this
        reader's images in that reader's table)`` (as :attr:`MemoryCache.memo`)."""
        return self._memo, np.searchsorted(self._root_rows, self._rows)

    def to_memory(self) -> "MemoryCache":
        """The selected patches' features, labels and image table, read into memory once."""
        return MemoryCache(self)

    def torch_dataset(self) -> "PatchDataset":
        """A ``torch.utils.data.Dataset`` of ``(features, label, image_index)`` over the selection."""
        return PatchDataset(self.path, self.indices)


class MemoryCache:
    """A cache's selected patches held in memory, read like a :class:`FeatureCache`.

    :meth:`select` and :meth:`split` give views of image subsets that share the arrays (no
    copy of the features), so that cross-validation reads a cache once and trains and scores
    every fold through the same code as a cache on disk. ``memo`` is a dictionary shared by
    a cache and all its views, for results computed once over all images (pooled features).

    Parameters
    ----------
    source : FeatureCache
        Its selected patches are read (features as float32).
    """

    def __init__(self, source: FeatureCache) -> None:
        self.path, self.classes, self.attrs = source.path, source.classes, source.attrs
        self.feature_settings, self.fingerprint = source.feature_settings, source.fingerprint
        self._X = np.empty((source.num_patches, source.feature_dim), np.float32)
        s = 0
        for ch in source.iter_chunks(65536, dtype=None, prefetch=0):  # peak: the float32 copy and one chunk
            self._X[s:s + len(ch.indices)] = ch.features
            s += len(ch.indices)
        self._labels, self._image_index = source.labels, source.image_index
        self._scales, self._boxes = source.scales, source.boxes
        self._table = source.images
        self._local = np.searchsorted(self._table.row, self._image_index)  # image position of each patch
        self._img_pos = np.arange(len(self._table))
        self._patch_pos = np.arange(len(self._X))
        self._memo: dict = {}
        self._root = self

    def _view(self, image_positions: np.ndarray) -> "MemoryCache":
        view = object.__new__(MemoryCache)
        view.__dict__.update(self.__dict__)
        view._img_pos = self._img_pos[np.asarray(image_positions, dtype=np.int64)]
        view._patch_pos = np.flatnonzero(np.isin(self._root._local, view._img_pos))
        return view

    def select(self, images: Sequence[int]) -> "MemoryCache":
        """A view of the images at positions ``images`` of this view's table (sorted)."""
        pos = np.unique(np.asarray(images, dtype=np.int64))
        if len(pos) and (pos[0] < 0 or pos[-1] >= self.num_images):
            raise CacheError(f"{self.path}: image positions must be in [0, {self.num_images})")
        return self._view(pos)

    def split(self, split: str) -> "MemoryCache":
        """A view of the images of a split (as ``FeatureCache(path, split=...)``)."""
        pos = self.images.in_split(split)
        if len(pos) == 0:
            raise CacheError(f"{self.path}: no image in split {split!r}")
        return self._view(pos)

    def root(self) -> "MemoryCache":
        """The cache of all images this view was selected from."""
        return self._root

    def to_memory(self) -> "MemoryCache":
        """Itself: already in memory (as :meth:`FeatureCache.to_memory` for a cache on disk)."""
        return self

    @property
    def memo(self) -> tuple:
        """``(shared dictionary, positions of this view's images in the root's table)``."""
        return self._memo, self._img_pos

    def __enter__(self) -> "MemoryCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release; for symmetry with :class:`FeatureCache`."""

    def __repr__(self) -> str:
        return f"MemoryCache({str(self.path)!r}: {self.num_images} images, {self.num_patches} patches)"

    @property
    def feature_dim(self) -> int:
        return int(self._X.shape[1])

    @property
    def images(self) -> ImageTable:
        return self._table.take(self._img_pos)

    @property
    def num_images(self) -> int:
        return len(self._img_pos)

    @property
    def indices(self) -> np.ndarray:
        """Rows of :attr:`features` of the selected patches, sorted."""
        return self._patch_pos

    @property
    def num_patches(self) -> int:
        return len(self._patch_pos)

    def __len__(self) -> int:
        return self.num_patches

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self._patch_pos]

    @property
    def image_index(self) -> np.ndarray:
        return self._image_index[self._patch_pos]

    @property
    def scales(self) -> np.ndarray:
        return self._scales[self._patch_pos]

    @property
    def boxes(self) -> np.ndarray:
        return self._boxes[self._patch_pos]

    @property
    def features(self) -> np.ndarray:
        """All patches' features in memory (index it with :attr:`indices`)."""
        return self._X

    def read_features(self, indices: Optional[np.ndarray] = None, *, dtype=np.float32) -> np.ndarray:
        idx = self._patch_pos if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
        return self._X[idx].astype(dtype, copy=False)

    def iter_chunks(self, chunk_size: int = 65536, *, dtype=np.float32, prefetch: int = 0) -> Iterator[PatchChunk]:
        """As :meth:`FeatureCache.iter_chunks` (``prefetch`` is not needed in memory)."""
        idx, labels, img = self._patch_pos, self.labels, self.image_index
        for s in range(0, len(idx), chunk_size):
            sel = idx[s:s + chunk_size]
            yield PatchChunk(sel, self._X[sel] if dtype is None else self._X[sel].astype(dtype, copy=False),
                             labels[s:s + chunk_size], img[s:s + chunk_size])


AnyCache = Union[FeatureCache, MemoryCache]


@contextlib.contextmanager
def open_cache(cache: Union[str, Path, FeatureCache, MemoryCache], split: Optional[str] = None) -> Iterator[AnyCache]:
    """A cache to read: a path is opened (and closed on exit), an open cache is used as it is.

    With ``split``, the images of that split: a new reader of the same file for a
    :class:`FeatureCache` (closed on exit; the caller's stays open), a view for a
    :class:`MemoryCache`.
    """
    if isinstance(cache, MemoryCache):
        yield cache if split is None else cache.split(split)
        return
    if isinstance(cache, FeatureCache) and split is None:
        yield cache
        return
    c = FeatureCache(cache.path if isinstance(cache, FeatureCache) else cache, split=split)
    try:
        yield c
    finally:
        c.close()


def _no_read_ahead(f: h5py.File) -> None:
    """Tell the kernel that reads of this file jump (``POSIX_FADV_RANDOM``): a selection's reads skip the
    other images' rows, which read-ahead would fetch anyway (measured: 2.0x the bytes used from the disk
    for every other image, 1.02x with the advice; docs/performance.md). HDF5 shares one descriptor
    among the opens of a file in a process, so the advice holds for them all while the file is open;
    reads of whole windows and chunks (megabytes each) lose little without read-ahead. Best effort:
    not every driver has a descriptor."""
    try:
        os.posix_fadvise(f.id.get_vfd_handle(), 0, 0, os.POSIX_FADV_RANDOM)
    except (AttributeError, OSError, TypeError, ValueError):
        pass


def read_rows(ds, rows: np.ndarray, *, max_gap: int = 64, max_span: int = 16384,
              out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of an HDF5 dataset, in its storage dtype, reading about what is used.

    Runs of consecutive rows are read straight into the result, one read each; runs apart by
    at most ``max_gap`` rows are read as one slice of at most ``max_span`` rows and picked from
    (a read costs about as much as 64 rows of features: scattered rows are read in slices,
    whole images exactly). Memory: the result plus one slice.

    Parameters
    ----------
    ds : h5py.Dataset or ndarray
    rows : ndarray of int
    max_gap, max_span : int
    out : ndarray, optional
        Where to write (``len(rows)`` rows, the dataset's dtype, C-contiguous).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if out is None:
        out = np.empty((len(rows),) + tuple(ds.shape[1:]), ds.dtype)
    if isinstance(ds, np.ndarray):
        out[:] = ds[rows]
        return out
    cuts = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1  # positions where a gap too wide to read through starts
    i, n = 0, len(rows)
    while i < n:
        lo = int(rows[i])
        k = int(np.searchsorted(cuts, i, side="right"))
        j = int(cuts[k]) if k < len(cuts) else n  # end of this group of nearby rows
        if int(rows[j - 1]) + 1 - lo == j - i and out.flags.c_contiguous:  # consecutive rows: read in place
            ds.read_direct(out, np.s_[lo:lo + j - i], np.s_[i:j])
        else:
            j = min(j, int(np.searchsorted(rows, lo + max_span, side="left")))
            out[i:j] = ds[lo:int(rows[j - 1]) + 1][rows[i:j] - lo]
        i = j
    return out


_PATCH_ARRAYS = (("features", 2), ("label", 1), ("image_index", 1), ("box", 2), ("scale", 1))
_IMAGE_ARRAYS = (("path", 1), ("width", 1), ("height", 1), ("labels", 2), ("difficult", 2), ("split", 1),
                 ("patch_start", 1), ("patch_count", 1))


def record_problem(record: dict) -> str:
    """What is wrong in an extraction record ('' when nothing): a cache's attributes, or the copy of
    them a head file keeps. Each part that later stages read must be there as the type they read."""
    for key in ("backbone", "grid", "label_rule", "dataset", "extraction", "feature_settings"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"the {key} attribute is not a JSON object"
    if isinstance(record.get("backbone"), dict) and not isinstance(record["backbone"].get("name", ""), str):
        return "the backbone attribute has no name"
    for key, make in (("grid", PatchGrid.from_dict), ("label_rule", LabelRule.from_dict)):
        if record.get(key) is not None:
            try:
                make(record[key])
            except Exception as e:  # a forged record: unknown fields, wrong types, values out of range
                return f"the {key} attribute does not describe a {key.replace('_', ' ')} ({type(e).__name__})"
    mode = (record.get("feature_settings") or {}).get("mode", "crop")
    if mode not in ("crop", "dense"):
        return f"the feature settings' mode is {mode!r} (crop or dense)"
    return ""


def _damage(f: h5py.File, attrs: dict) -> str:
    """What is missing or inconsistent in an open cache file ('' when nothing): metadata only, no feature read."""
    classes = attrs.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "the classes attribute is not a list of names"
    if not isinstance(attrs.get("feature_settings"), dict):
        return "the feature_settings attribute is not a JSON object"
    if not isinstance(attrs.get("fingerprint"), str):
        return "no fingerprint attribute"
    if not isinstance(attrs.get("backbone"), dict) or not isinstance(attrs["backbone"].get("name"), str):
        return "the backbone attribute names no backbone"
    problem = record_problem(attrs)
    if problem:
        return problem
    for group, arrays in (("", _PATCH_ARRAYS), ("images/", _IMAGE_ARRAYS), ("skipped/", (("path", 1), ("reason", 1)))):
        for name, ndim in arrays:
            d = f.get(group + name)
            if not isinstance(d, h5py.Dataset) or d.ndim != ndim:
                return f"no {ndim}-d dataset {group + name}"
    n, m = f["features"].shape[0], f["images/path"].shape[0]
    for name, _ in _PATCH_ARRAYS[1:]:
        if f[name].shape[0] != n:
            return f"{name} has {f[name].shape[0]} rows, features {n}"
    if f["box"].shape[1] != 4:
        return "box is not (patches, 4)"
    for name, _ in _IMAGE_ARRAYS[1:]:
        if f["images/" + name].shape[0] != m:
            return f"images/{name} has {f['images/' + name].shape[0]} rows, images/path {m}"
    for name in ("labels", "difficult"):
        if f["images/" + name].shape[1] != len(classes):
            return f"images/{name} has {f['images/' + name].shape[1]} columns for {len(classes)} classes"
    return _missing_sources(f)


def _missing_sources(f: h5py.File) -> str:
    """A virtual cache whose part files are not where its features point ('' when all are there): HDF5
    would read the missing rows as zeros without a word."""
    ds = f["features"]
    if not ds.is_virtual:
        return ""
    here = Path(f.filename).parent
    for src in ds.virtual_sources():
        if src.file_name == ".":
            continue
        part = here / _unescape(src.file_name)
        if not part.is_file():
            return (f"its features live in {part.parent} (a virtual cache) and {part.name} is not there; move the "
                    "cache and that folder together")
        try:
            with open(part, "rb") as fh:
                if fh.read(8) != b"\x89HDF\r\n\x1a\n":
                    return f"{part}: a part file of this virtual cache is damaged (not HDF5)"
        except OSError as e:
            return f"{part}: a part file of this virtual cache cannot be read ({os_reason(e)})"
    return ""


def _parse_attr(v):
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    if isinstance(v, str):
        try:
            return json.loads(v)
        except (ValueError, RecursionError):  # not JSON, or forged thousands deep: the checks name it
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


class PatchDataset(Dataset):
    """A torch ``Dataset`` over cached patches: items are ``(features float32, label, image_index)``.

    The file is opened lazily in each process, so it works with DataLoader workers.
    """

    def __init__(self, path: Union[str, Path], indices: Optional[np.ndarray] = None) -> None:
        self.path = str(path)
        if indices is None:
            with h5py.File(self.path, "r") as f:
                indices = np.arange(len(f["label"]))
        self.indices = np.asarray(indices, dtype=np.int64)
        self._file = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        row = int(self.indices[i])
        f = self._file
        return (torch.from_numpy(f["features"][row].astype(np.float32)),
                int(f["label"][row]), int(f["image_index"][row]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
