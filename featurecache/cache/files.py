"""Crash-safe files of a cache run: parts committed atomically, HDF5 writes isolated in a child process,
the lock that refuses a second writer, the data folders of virtual caches, fault injection for tests.

An HDF5 file whose writer dies is often left unreadable, so no cache file is written in
place: each is written to a temporary name, synced and renamed (a rename is atomic). HDF5
writes run in a forked child (:func:`write_isolated`), so that the library's broken state
after a failed write (a full disk) stays there. ``OUT.lock`` (``lockf``, a POSIX record lock
that forked workers do not inherit; on Windows a byte locked with ``msvcrt.locking``)
refuses a second writer.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Callable, NoReturn, Optional, Union

import h5py

from featurecache.errors import CacheError
from featurecache.outputs import os_reason

__all__ = ["KEPT_ALL", "KEPT_PARTS", "Lock", "data_folders", "fault", "fresh", "fsync_dir", "fsync_file",
           "write_isolated", "writing"]


def fault(point: str) -> None:
    """Fault injection for the crash-safety tests: ``FEATURECACHE_KILL_AT=point[:n]``.

    Kills this process with SIGKILL the n-th time (default first) it reaches ``point``.
    """
    spec = os.environ.get("FEATURECACHE_KILL_AT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    hits = fault.hits.get(point, 0) + 1  # type: ignore[attr-defined]
    fault.hits[point] = hits  # type: ignore[attr-defined]
    if hits >= int(count or 1):
        import signal

        if _IN_WRITER_CHILD:  # the whole program dies at this point, as in a real crash
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


fault.hits = {}  # type: ignore[attr-defined]


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform; rename is still atomic
        fsync_file(path)


def fresh(path: Path) -> Path:
    """Create ``path`` anew as this process's own regular file, never through a link planted there.

    The name is unlinked first (a symlink is removed, not followed), then created with
    ``O_EXCL | O_NOFOLLOW``; h5py then opens the file this process made.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    os.close(fd)
    return path


#: True in the child process that :func:`write_isolated` forks.
_IN_WRITER_CHILD = False


def _run_child(read_end: int, write_end: int, write: Callable[[], None]) -> NoReturn:
    """The forked child of :func:`write_isolated`: run ``write()``, send a failure's reason, exit at once."""
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


def write_isolated(path: Path, kept: str, write) -> None:
    """Run ``write()`` (which writes ``path`` with HDF5) in a forked child; a failure becomes one CacheError.

    HDF5 leaves its library in a broken state after a failed write (disk full: the process
    then crashes at exit with a segmentation fault). The child takes that risk: it exits at
    once (``os._exit``, no HDF5 shutdown) and reports the reason through a pipe; this
    process stays clean, removes the partial file and says which file and why.
    """
    if not hasattr(os, "fork"):  # pragma: no cover - Windows: in this process
        with writing(path, kept):
            write()
        return
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(read_end)
        os.close(write_end)
        raise CacheError(f"{path}: cannot start the writing process ({os_reason(e)}); {kept}") from None
    if pid == 0:  # the child: whatever happens, it ends there, never returning into the parent's code
        _run_child(read_end, write_end, write)
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
def writing(path: Path, kept: str):
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
            names = {unescape(src.file_name) for src in ds.virtual_sources() if src.file_name != "."}
    except (OSError, ValueError):
        return []
    return sorted({(path.parent / n).parent for n in names})


def unescape(name: str) -> str:
    """A virtual source's file name as written (HDF5 reads ``%`` in them as printf-style; they are doubled)."""
    return name.replace("%%", "%")


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


class Lock:
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

