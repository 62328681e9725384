"""Tests of the cache readers: the in-memory cache and its views, open_cache, selections, the schema attributes."""

import json

import h5py
import numpy as np
import pytest

from featurecache.cache import FORMAT_NAME, FORMAT_VERSION, CacheWriter, FeatureCache, MemoryCache, PartData, open_cache
from featurecache.errors import CacheError
from featurecache.train import fit_head

from conftest import blob_cache


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    splits = ["train" if i % 3 else "val" for i in range(24)]
    return blob_cache(tmp_path_factory.mktemp("m") / "b.h5", n_images=24, patches=5, splits=splits)


def test_memory_cache_reads_like_the_file(cache_file):
    with FeatureCache(cache_file, split="train") as disk:
        mem = disk.to_memory()
        np.testing.assert_array_equal(mem.read_features(), disk.read_features())
        for name in ("labels", "image_index", "scales", "boxes"):
            np.testing.assert_array_equal(getattr(mem, name), getattr(disk, name))
        assert mem.images.path == disk.images.path and mem.num_patches == disk.num_patches
        chunks = list(mem.iter_chunks(7))
        np.testing.assert_array_equal(np.concatenate([c.features for c in chunks]), disk.read_features())


def test_views_select_images_without_copying(cache_file):
    with FeatureCache(cache_file) as c:
        mem = c.to_memory()
        with c.select([1, 4, 5]) as disk_view:
            view = mem.select([5, 1, 4])
            assert view.images.path == disk_view.images.path == ("img1.jpg", "img4.jpg", "img5.jpg")
            np.testing.assert_array_equal(view.read_features(), disk_view.read_features())
            np.testing.assert_array_equal(view.labels, disk_view.labels)
        assert view.features is mem.features and view.to_memory() is view  # one array shared by every view
        inner = view.select([2])
        assert inner.images.path == ("img5.jpg",) and inner.root() is mem
        assert mem.split("val").images.path == tuple(f"img{i}.jpg" for i in range(0, 24, 3))
        with pytest.raises(CacheError, match="no image in split"):
            mem.split("test")
        with pytest.raises(CacheError, match="positions"):
            mem.select([24])


def test_training_on_memory_equals_training_on_the_file(cache_file):
    with FeatureCache(cache_file) as c:
        mem = c.to_memory()
    a = fit_head(cache_file, head="logreg", train_split="train")
    b = fit_head(mem, head="logreg", train_split="train")
    np.testing.assert_array_equal(a.estimator.coef_, b.estimator.coef_)
    mlp = dict(hidden=8, max_epochs=3, device="cpu")
    a = fit_head(cache_file, params=mlp, train_split="train", val_split="val")
    b = fit_head(mem, params=mlp, train_split="train", val_split="val")
    for x, y in zip(a.estimator.net_.parameters(), b.estimator.net_.parameters()):
        np.testing.assert_array_equal(x.detach().numpy(), y.detach().numpy())


def test_open_cache_closes_only_what_it_opened(cache_file):
    with open_cache(cache_file) as c:
        assert isinstance(c, FeatureCache)
    assert not c._file.id.valid
    with FeatureCache(cache_file) as mine:
        with open_cache(mine) as same:
            assert same is mine
        with open_cache(mine, "val") as val:
            assert val is not mine and val.num_images == 8
        assert mine._file.id.valid and not val._file.id.valid
        mem = mine.to_memory()
    with open_cache(mem, "val") as v:
        assert isinstance(v, MemoryCache) and v.num_images == 8


def test_the_writer_owns_the_schema_attributes_and_the_provenance_round_trips(tmp_path):
    from featurecache.cache import DatasetSource, Provenance
    from featurecache.datasets import ImageRecord
    from featurecache.patches import LabelRule, PatchGrid

    out = tmp_path / "c.h5"
    rec = ImageRecord(path=tmp_path / "a.jpg", relpath="a.jpg", width=10, height=10, classes=(),
                      boxes=np.zeros((0, 4), np.float32), difficult=np.zeros(0, bool), splits=())
    provenance = Provenance(("cat",), {"mode": "crop"}, "f", {"name": "b"}, PatchGrid(scales=(1.0, 2.0)), LabelRule(),
                            DatasetSource(root="/data", layout="voc", num_images=1), {"runtime": "torch"})
    with CacheWriter(out, {"x": 1}) as w:
        w.write_part(0, PartData(np.zeros((2, 3), np.float16), np.zeros(2, np.int16), np.zeros(2, np.int64),
                                 np.zeros((2, 4), np.float32), np.ones(2, np.float32), np.zeros(0, np.int64), []))
        w.assemble(num_parts=1, feature_dim=3, dtype="float16", compression=None, images=[rec], provenance=provenance)
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == FORMAT_NAME and int(f.attrs["format_version"]) == FORMAT_VERSION
        assert f.attrs["layout"] == "copy" and json.loads(f.attrs["settings"]) == {"x": 1}
    with FeatureCache(out) as c:
        assert c.num_patches == 2 and c.provenance == provenance and c.provenance.dataset.layout == "voc"


# --------------------------------------------------------------------------- reads that match what is used


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _chunked_copy(src, dst, rows_per_chunk: int):
    """The cache with its features stored in chunks (as extract writes them), not contiguously."""
    import shutil

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        x = f["features"][:]
        del f["features"]
        f.create_dataset("features", data=x, chunks=(rows_per_chunk, x.shape[1]))
    return dst


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_split_reads_move_about_the_bytes_they_use(tmp_path):
    """Images of two splits interleaved, the writer's ~1 MiB chunks straddling images: a split's features
    cost <= 1.2x their bytes (HDF5's chunk cache would read each touched chunk whole: ~2x)."""
    path = blob_cache(tmp_path / "b.h5", n_images=40, patches=100, dim=1280, splits=["train", "val"] * 20)
    path = _chunked_copy(path, tmp_path / "chunked.h5", rows_per_chunk=409)
    with FeatureCache(path, split="val") as c:
        idx = c.indices
        used = len(idx) * c.feature_dim * 2
        before = _rchar()
        x = c.read_features()
        chunks = sum(len(ch.indices) for ch in c.iter_chunks(500, dtype=None))
        ratio = (_rchar() - before) / (2 * used)
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(x, f["features"][:][idx].astype(np.float32))
    assert chunks == len(idx) and ratio <= 1.2, ratio


def test_read_rows_returns_exactly_the_rows_asked_for(tmp_path):
    from featurecache.cache import read_rows

    rng = np.random.default_rng(0)
    data = rng.normal(size=(5000, 3)).astype(np.float16)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        f.create_dataset("x", data=data, chunks=(37, 3))
    with h5py.File(tmp_path / "r.h5", "r") as f:
        for trial in range(30):  # scattered rows, runs, runs with small and large gaps, spans over max_span
            kind = trial % 3
            rows = (np.unique(rng.integers(0, 5000, rng.integers(1, 400))) if kind == 0 else
                    np.concatenate([np.arange(a, a + 25) for a in range(int(rng.integers(0, 30)), 4900, 60)])
                    if kind == 1 else np.arange(int(rng.integers(0, 100)), 5000 - int(rng.integers(0, 100))))
            np.testing.assert_array_equal(read_rows(f["x"], rows, max_span=1000), data[rows])


def test_selections_share_what_their_first_reader_computed_once(cache_file):
    from featurecache.heads.pooling import image_features

    with FeatureCache(cache_file, split="train") as root:
        whole = image_features(root, pooling=("mean",))
        with root.select([1, 3, 5]) as part:
            np.testing.assert_array_equal(image_features(part, pooling=("mean",)), whole[[1, 3, 5]])
            memo, positions = part.memo
            assert list(positions) == [1, 3, 5] and ("image_features", ("mean",)) in memo
        mem = root.to_memory()
        np.testing.assert_allclose(image_features(mem.select([1, 3, 5]), pooling=("mean",)), whole[[1, 3, 5]],
                                   rtol=1e-6)


#: A Python as featurecache sees Windows: no fcntl, and an msvcrt whose ``locking`` locks bytes
#: from the file position (OSError when another process holds them), modelled with POSIX byte
#: ranges; like Windows' mandatory locks, a lock over the holder's PID would hide it, so the
#: model refuses one that starts before byte 64.
_AS_ON_WINDOWS = """
import fcntl as _fcntl, os, sys, time, types
from featurecache.cache import CacheWriter  # first: the standard library itself tells Windows by msvcrt
from featurecache.errors import CacheError
sys.modules["fcntl"] = None
msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_UNLCK, msvcrt.LK_NBLCK = 0, 2
def locking(fd, mode, nbytes):
    start = os.lseek(fd, 0, os.SEEK_CUR)
    assert start >= 64, "a Windows lock over the PID would make it unreadable"
    _fcntl.lockf(fd, (_fcntl.LOCK_EX | _fcntl.LOCK_NB) if mode == msvcrt.LK_NBLCK else _fcntl.LOCK_UN, nbytes, start)
msvcrt.locking = locking
sys.modules["msvcrt"] = msvcrt
out, hold = sys.argv[1], float(sys.argv[2])
try:
    with CacheWriter(out, {"a": 1}):
        print("locked", flush=True)
        time.sleep(hold)
except CacheError as e:
    print("refused:", e, flush=True)
"""


def test_windows_locks_refuse_a_second_writer_and_name_the_first(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "c.h5"
    first = subprocess.Popen([sys.executable, "-c", _AS_ON_WINDOWS, str(out), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-c", _AS_ON_WINDOWS, str(out), "0"], capture_output=True,
                                text=True, timeout=120)
        assert second.stdout.strip() == (f"refused: {out}: another featurecache process (PID {first.pid}) is "
                                         f"writing it (lock held on {out}.lock)"), second.stderr[-2000:]
    finally:
        first.kill()
        first.wait()
    # The holder gone (killed, as a crash would), the lock is free again.
    again = subprocess.run([sys.executable, "-c", _AS_ON_WINDOWS, str(out), "0"], capture_output=True, text=True,
                           timeout=120)
    assert again.stdout.strip() == "locked" and not (tmp_path / "c.h5.lock").exists()


def test_a_platform_without_file_locks_writes_nothing(tmp_path):
    import subprocess
    import sys

    script = _AS_ON_WINDOWS.replace('sys.modules["msvcrt"] = msvcrt', 'sys.modules["msvcrt"] = None')
    got = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.h5"), "0"], capture_output=True, text=True,
                         timeout=120)
    assert got.stdout.strip().startswith("refused: this platform has neither POSIX (fcntl) nor Windows (msvcrt) "
                                         "file locks"), got.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
