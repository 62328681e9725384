"""The writer of a cache: parts committed atomically while a run goes, assembled into one file at the end.

While a run is in progress its work lives in ``OUT.parts/``: every part (a fixed group of
consecutive images) is written to a temporary file, closed, synced and only then renamed to
``part-NNNNNN.h5``, so a part file either exists complete or not at all. When every part
exists they are assembled (:mod:`featurecache.cache.assemble`) into ``OUT.tmp``, which is
synced and renamed onto ``OUT``; then the parts are deleted. A run killed at any moment
(SIGKILL included) loses at most the part it was computing; the same command resumes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np

from featurecache.cache.assemble import plan_assembly, write_final
from featurecache.cache.files import (
    KEPT_ALL,
    KEPT_PARTS,
    Lock,
    data_folders,
    fault,
    fresh,
    fsync_dir,
    fsync_file,
    write_isolated,
    writing,
)
from featurecache.cache.format import (
    FORMAT_NAME,
    PART_ARRAYS,
    PART_PATTERN,
    STR,
    Provenance,
    canonical_json,
    now_iso,
    short,
)
from featurecache.errors import CacheError
from featurecache.resources import ASSEMBLE_MODES

logger = logging.getLogger("featurecache.cache")

__all__ = ["CacheWriter", "PartData"]


def _run_id(settings: dict) -> str:
    """A short id of one assembly: its settings, the time, the process (a new run never reuses a name)."""
    text = f"{canonical_json(settings)}{now_iso()}{os.getpid()}{time.time_ns()}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


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
        self.settings = json.loads(canonical_json(settings))  # normalised: tuples become lists
        # What a resume must also match but a complete file need not (how parts were cut, which
        # runtime computed them): kept in the parts' settings only.
        self.run_settings = {**self.settings, **json.loads(canonical_json(resume or {}))}
        self.overwrite = overwrite
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._lock = Lock(self.path.with_name(self.path.name + ".lock"), self.path)
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

    def _prepare(self) -> None:
        _recover_parts(self.path, self.parts_dir, self.run_settings)
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
            tmp = fresh(self.parts_dir / "settings.json.tmp")
            with writing(tmp, "nothing was computed yet"):
                tmp.write_text(json.dumps(self.run_settings, indent=1, sort_keys=True))
            fsync_file(tmp)
            os.replace(tmp, settings_file)
            fsync_dir(self.parts_dir)
        self.done_parts |= _committed_parts(self.parts_dir)
        if self.done_parts:
            logger.info("%s: resuming, %d part(s) already done", self.path, len(self.done_parts))

    def write_part(self, part: int, data: PartData) -> None:
        """Commit one part: write a temporary file, sync it, rename it into place."""
        final = self.parts_dir / f"part-{part:06d}.h5"
        tmp = final.with_name(final.name + ".tmp")
        def write() -> None:
            with h5py.File(fresh(tmp), "w") as f:
                for a in PART_ARRAYS:  # the part's arrays, as the format lists them
                    value = getattr(data, a.name)
                    if a.dtype == "str":
                        f.create_dataset(a.name, data=np.array(value, dtype=object), dtype=STR)
                    else:
                        f.create_dataset(a.name, data=value)
                f.attrs["part"] = part
            fsync_file(tmp)

        write_isolated(tmp, KEPT_PARTS, write)
        fault("part-written")
        os.replace(tmp, final)
        fsync_dir(self.parts_dir)
        self.done_parts.add(part)
        fault("part-committed")

    def assemble(self, *, num_parts: int, feature_dim: int, dtype: str, compression: Optional[str],
                 images: Sequence, provenance: Provenance, layout: str = "copy") -> None:
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
        provenance : Provenance
            Written as the file's attributes; ``format``, ``format_version``, ``settings`` and
            ``layout`` are this method's.
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
        virtual = layout == "virtual"
        # A virtual cache's folder has a name of its own run: an old file never reads a new run's parts.
        data_dir = self.path.with_name(f"{self.path.name}.{_run_id(self.run_settings)}.data") if virtual else None
        plan = plan_assembly([self.parts_dir / f"part-{p:06d}.h5" for p in range(num_parts)], images,
                             feature_dim=feature_dim, dtype=dtype, compression=compression, data_dir=data_dir)
        attrs = {**provenance.to_attrs(), "layout": layout}
        replaced = data_folders(self.path) if self.path.exists() else []  # the old cache's own folders
        write_isolated(self.tmp_path, KEPT_ALL, lambda: write_final(self.tmp_path, plan, attrs, self.settings))
        if virtual:
            os.replace(self.parts_dir, data_dir)
            fsync_dir(self.path.parent)
            fault("virtual-parts-moved")
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        fault("assembled")
        for d in replaced:  # only folders the replaced cache read: featurecache made them
            if d != data_dir and d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
        if not virtual:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.complete = True


def _recover_parts(path: Path, parts_dir: Path, run_settings: dict) -> None:
    """Take back the parts of a virtual assembly killed between its renames.

    Its parts, whole, are in a data folder that the file at ``path`` (if any) does not read.
    Only a folder this run made (its settings) is taken back.
    """
    if parts_dir.exists():
        return
    in_use = set(data_folders(path)) if path.exists() else set()
    for d in sorted(path.parent.glob(glob.escape(path.name) + ".*.data")):
        if d.is_symlink() or not d.is_dir() or d in in_use:
            continue
        with contextlib.suppress(OSError, ValueError):
            if json.loads((d / "settings.json").read_text()) == run_settings:
                os.replace(d, parts_dir)
                logger.info("%s: recovered the parts of an interrupted assembly from %s", path, d)
                return


def _committed_parts(parts_dir: Path) -> set:
    """The parts committed in ``parts_dir``; damaged parts and temporary files left by a killed run are removed."""
    done = set()
    for f in parts_dir.iterdir():
        m = PART_PATTERN.match(f.name)
        if m:
            if _part_readable(f):
                done.add(int(m.group(1)))
            else:  # a damaged part (e.g. disk full after the rename): compute it again
                logger.warning("%s: unreadable part, it will be computed again", f)
                f.unlink()
        elif f.name.endswith(".tmp"):
            f.unlink()
    return done


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
            diffs.append(f"{prefix[:-1]}: {short(a)} before, {short(b)} now")

    walk(old, new, "")
    return "; ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")

