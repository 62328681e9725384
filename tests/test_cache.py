"""Tests of the cache readers: the in-memory cache and its views, open_cache, selections, the schema attributes."""

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


def test_the_writer_owns_the_schema_attributes(tmp_path):
    from featurecache.datasets import ImageRecord

    out = tmp_path / "c.h5"
    rec = ImageRecord(path=tmp_path / "a.jpg", relpath="a.jpg", width=10, height=10, classes=(),
                      boxes=np.zeros((0, 4), np.float32), difficult=np.zeros(0, bool), splits=())
    with CacheWriter(out, {"x": 1}) as w:
        w.write_part(0, PartData(np.zeros((2, 3), np.float16), np.zeros(2, np.int16), np.zeros(2, np.int64),
                                 np.zeros((2, 4), np.float32), np.ones(2, np.float32), np.zeros(0, np.int64), []))
        w.assemble(num_parts=1, feature_dim=3, dtype="float16", compression=None, images=[rec], classes=[],
                   attrs={"format": "something else", "format_version": 99, "classes": [], "feature_settings": {},
                          "fingerprint": "f", "backbone": {"name": "b"}})
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == FORMAT_NAME and int(f.attrs["format_version"]) == FORMAT_VERSION
    with FeatureCache(out) as c:
        assert c.num_patches == 2
