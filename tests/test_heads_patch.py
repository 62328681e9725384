"""Tests of the heads: estimator contract, sample weights, background policies, both training paths,
head files, and fingerprint refusal."""

import numpy as np
import pytest
import torch
from sklearn.base import clone

from featurecache.cache import FeatureCache
from featurecache.errors import HeadError
from featurecache.evaluate import evaluate
from featurecache.heads import (
    BackgroundPolicy,
    LinearSVMHead,
    LogRegHead,
    MLPHead,
    TrainedHead,
    background_weights,
    epoch_order,
)
from featurecache.patches import AMBIGUOUS
from featurecache.train import fit_head

from conftest import blob_cache

FAST_MLP = dict(hidden=32, max_epochs=15, batch_size=32, lr=0.05, device="cpu")


def blobs(n=300, dim=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (k, dim))
    y = rng.integers(0, k, n)
    return (rng.normal(0, 1, (n, dim)) + centers[y]).astype(np.float32), y


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    splits = ["train,trainval" if i % 4 else "val,trainval" for i in range(60)]
    return blob_cache(tmp_path_factory.mktemp("c") / "blobs.h5", n_images=60, splits=splits)


# --------------------------------------------------------------------------- estimator contract


@pytest.mark.parametrize("head", [MLPHead(**FAST_MLP), LogRegHead(), LinearSVMHead()])
def test_estimator_contract(head):
    X, y = blobs()
    c = clone(head)
    assert c.get_params() == head.get_params() and not hasattr(c, "classes_")
    c.set_params(random_state=3)
    assert c.get_params()["random_state"] == 3
    c.fit(X, y)
    p = c.predict_proba(X)
    assert p.shape == (len(X), 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert (c.predict(X) == y).mean() > 0.95
    assert list(c.classes_) == [0, 1, 2] and c.n_features_in_ == 8


def test_mlp_is_reproducible_with_a_seed_and_differs_without_it():
    X, y = blobs()
    a = MLPHead(**FAST_MLP, random_state=1).fit(X, y).predict_proba(X)
    b = MLPHead(**FAST_MLP, random_state=1).fit(X, y).predict_proba(X)
    c = MLPHead(**FAST_MLP, random_state=2).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mlp_depths_and_lr_schedule():
    X, y = blobs()
    assert len(MLPHead(**{**FAST_MLP, "hidden": 0}).fit(X, y).net_) == 1  # FCb only
    three = MLPHead(**{**FAST_MLP, "hidden": (16, 16)}).fit(X, y)
    assert [type(m).__name__ for m in three.net_][::3] == ["Linear", "Linear", "Linear"]
    h = MLPHead(**{**FAST_MLP, "max_epochs": 200, "lr_drops": 2}).fit(X, y)
    lrs = [e["lr"] for e in h.history_]
    assert h.n_epochs_ < 200 and lrs[0] == 0.05 and sorted(set(lrs), reverse=True) == [0.05, 0.005]


def test_n_outputs_keeps_unseen_classes_as_columns():
    X, y = blobs(k=2)
    for head in (MLPHead(**FAST_MLP, n_outputs=5), LogRegHead(n_outputs=5), LinearSVMHead(n_outputs=5)):
        p = head.fit(X, y).predict_proba(X)
        assert p.shape == (len(X), 5)
        if not isinstance(head, MLPHead):
            assert (p[:, 2:] == 0).all()  # never-seen outputs have probability 0


# --------------------------------------------------------------------------- sample weights


def test_zero_weight_removes_influence_mlp():
    X, y = blobs(k=2)
    flipped = 1 - y
    Xd, yd = np.vstack([X, X]), np.concatenate([y, flipped])
    ignored = MLPHead(**FAST_MLP).fit(Xd, yd, sample_weight=np.r_[np.ones(len(y)), np.zeros(len(y))])
    counted = MLPHead(**FAST_MLP).fit(Xd, yd)
    assert (ignored.predict(X) == y).mean() > 0.95
    assert (counted.predict(X) == y).mean() < 0.8  # the flipped copies do matter when weighted


@pytest.mark.parametrize("cls", [LogRegHead, LinearSVMHead])
def test_sklearn_zero_weight_and_integer_weights_act_like_repetition(cls):
    X, y = blobs(n=120, k=3)
    kw = dict(tol=1e-10, max_iter=10000) if cls is LogRegHead else dict(max_iter=100000)
    base = cls(**kw).fit(X[:80], y[:80])
    zero = cls(**kw).fit(X, y, sample_weight=np.r_[np.ones(80), np.zeros(40)])
    np.testing.assert_allclose(zero.coef_, base.coef_, atol=2e-3)
    w = np.r_[np.full(40, 2.0), np.ones(40)]
    weighted = cls(**kw).fit(X[:80], y[:80], sample_weight=w)
    repeated = cls(**kw).fit(np.vstack([X[:40], X[:80]]), np.r_[y[:40], y[:80]])
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, atol=2e-3)


# --------------------------------------------------------------------------- background policies


def test_background_policies():
    labels = np.array([0] * 90 + [1] * 6 + [2] * 4 + [AMBIGUOUS] * 5)
    keep, w, wbg = background_weights(labels, BackgroundPolicy())
    assert len(keep) == 100 and AMBIGUOUS not in labels[keep]
    assert w[labels[keep] == 0].sum() == pytest.approx(w[labels[keep] > 0].sum()) and wbg == pytest.approx(10 / 90)
    keep, w, wbg = background_weights(labels, BackgroundPolicy.parse("weight", weight=0.5))
    assert wbg == 0.5 and set(w[labels[keep] == 0]) == {0.5}
    keep, w, _ = background_weights(labels, BackgroundPolicy.parse("sample:0.1"), random_state=1)
    assert (labels[keep] == 0).sum() == 9 and (labels[keep] > 0).sum() == 10 and set(w) == {1.0}
    again, _, _ = background_weights(labels, BackgroundPolicy.parse("sample:0.1"), random_state=1)
    np.testing.assert_array_equal(keep, again)
    keep, w, _ = background_weights(labels, BackgroundPolicy.parse("none"))
    assert len(keep) == 100 and set(w) == {1.0}
    for bad in ("sample:2", "sample:x", "weights", "none:1"):
        with pytest.raises(HeadError):
            BackgroundPolicy.parse(bad)


# --------------------------------------------------------------------------- training from caches


def test_epoch_order_is_a_shuffle_of_contiguous_blocks():
    rng = np.random.RandomState(0)
    windows = list(epoch_order(1000, rng, block=64, buffer_blocks=3))
    for ranges, perm in windows:  # a window lays out whole blocks; its permutation covers them once
        assert all(b - a == min(64, 1000 - a) and a % 64 == 0 for a, b in ranges)
        assert sorted(perm.tolist()) == list(range(sum(b - a for a, b in ranges)))
    buffers = [np.concatenate([np.arange(a, b) for a, b in ranges])[perm] for ranges, perm in windows]
    allpos = np.concatenate(buffers)
    assert sorted(allpos.tolist()) == list(range(1000)) and not np.array_equal(allpos, np.arange(1000))
    assert max(len(b) for b in buffers) == 192
    for b in buffers:  # each buffer is made of whole blocks
        for k in np.unique(b // 64):
            assert ((b // 64) == k).sum() == min(64, 1000 - 64 * k)


def test_in_memory_and_streaming_training_give_the_same_model(cache_file):
    params = dict(hidden=16, max_epochs=5, batch_size=16, device="cpu")
    mem = fit_head(cache_file, params=params, memory_limit=1 << 40)
    stream = fit_head(cache_file, params=params, memory_limit=0)
    assert mem.summary["training_data"] == "memory" and stream.summary["training_data"] == "stream"
    for a, b in zip(mem.estimator.net_.state_dict().values(), stream.estimator.net_.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(HeadError, match="cannot stream"):
        fit_head(cache_file, head="logreg", memory_limit=0)


@pytest.mark.parametrize("kind,params", [("mlp", dict(hidden=16, max_epochs=10, device="cpu")), ("logreg", {}),
                                         ("linearsvm", {})])
def test_save_load_round_trip_and_evaluation(cache_file, tmp_path, kind, params):
    trained = fit_head(cache_file, head=kind, params=params, train_split="train", val_split="val")
    path = trained.save(tmp_path / "h.head.pt")
    raw = torch.load(path, weights_only=True)  # plain tensors and strings: no code
    assert raw["kind"] == kind and isinstance(raw["params"], str)
    loaded = TrainedHead.load(path, device="cpu")
    with FeatureCache(cache_file) as c:
        X = c.read_features()
    np.testing.assert_array_equal(loaded.predict_proba(X), trained.predict_proba(X))
    assert loaded.classes == ("c0", "c1", "c2") and loaded.fingerprint == trained.fingerprint
    report = evaluate(path, cache_file, split="val")
    assert report.n_images == 15 and report.mean_ap > 0.9 and report.patch_accuracy > 0.9


def test_a_head_is_refused_on_features_from_another_backbone(cache_file, tmp_path):
    trained = fit_head(cache_file, head="logreg")
    other = blob_cache(tmp_path / "other.h5", feature_settings={"backbone": "alexnet", "layer": "classifier.5",
                                                                "input_size": 0, "mode": "crop"})
    with pytest.raises(HeadError, match=r"other\.h5: features differ .*backbone: alexnet \(cache\) vs synthetic "
                                        r"\(head\); layer: classifier\.5 \(cache\) vs none \(head\)"):
        evaluate(trained, other)
    with pytest.raises(HeadError, match="validation features differ"):
        fit_head(cache_file, head="logreg", val=other)


def test_bad_head_files(tmp_path):
    p = tmp_path / "x.head.pt"
    p.write_bytes(b"junk")
    with pytest.raises(HeadError, match=r"x\.head\.pt: not a readable head file"):
        TrainedHead.load(p)
    torch.save({"format": "other"}, p)
    with pytest.raises(HeadError, match=r"not a featurecache head file"):
        TrainedHead.load(p)


def test_streamed_validation_gives_the_model_of_validation_in_memory(cache_file):
    """fit --val-split past the memory limit streams the held-out patches: same losses, same early stop, same model."""
    params = dict(hidden=16, max_epochs=6, batch_size=16, device="cpu")
    mem = fit_head(cache_file, params=params, train_split="train", val_split="val", memory_limit=1 << 40)
    stream = fit_head(cache_file, params=params, train_split="train", val_split="val", memory_limit=0)
    assert (mem.summary["validation_data"], stream.summary["validation_data"]) == ("memory", "stream")
    assert [h["val_loss"] for h in mem.estimator.history_] == pytest.approx(
        [h["val_loss"] for h in stream.estimator.history_], rel=1e-6)
    for a, b in zip(mem.estimator.net_.state_dict().values(), stream.estimator.net_.state_dict().values()):
        assert torch.equal(a, b)


def test_windows_read_ahead_in_a_thread_give_the_in_memory_model(tmp_path):
    """A StreamSource whose limit holds three windows reads the next one in a background thread (the random
    order drawn there): same batches, same model as the rows in memory."""
    import h5py

    from featurecache.heads._sources import ArraySource, StreamSource, batches

    rng = np.random.default_rng(0)
    X = rng.normal(size=(70000, 4)).astype(np.float16)  # > one 65,536-row window: two windows an epoch
    y = rng.integers(0, 3, len(X))
    w = rng.uniform(0.5, 2, len(X)).astype(np.float32)
    rows = np.sort(rng.choice(80000, len(X), replace=False))  # the selection has gaps in the file
    data = np.zeros((80000, 4), np.float16)
    data[rows] = X
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("x", data=data, chunks=(409, 4))
    with h5py.File(tmp_path / "s.h5", "r") as f:
        stream = StreamSource(f["x"], rows, y, w, memory_limit=1 << 40)
        memory = ArraySource(X.astype(np.float32), y, w)
        got = list(batches(stream, np.random.RandomState(3), 4096))
        want = list(batches(memory, np.random.RandomState(3), 4096))
        assert len(got) == len(want) and sum(len(b[1]) for b in got) == len(X)
        for a, b in zip(got, want):
            for u, v in zip(a, b):
                assert torch.equal(u, v)
        est = dict(hidden=0, max_epochs=2, batch_size=512, device="cpu")
        m1 = MLPHead(**est).fit_source(stream)
        m2 = MLPHead(**est).fit_source(memory)
    for a, b in zip(m1.net_.state_dict().values(), m2.net_.state_dict().values()):
        assert torch.equal(a, b)
